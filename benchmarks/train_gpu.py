"""Training speed on one GPU: Llama-3.2-1B- and 3B-shaped models in bf16 at sequence length 4096,
ember's training step next to a plain Hugging Face transformers loop (and float8 / torchtitan
where they install).

    python benchmarks/train_gpu.py                     # 1b and 3b, ember + hf (+ float8, torchtitan)
    python benchmarks/train_gpu.py --model 1b --micro-batch-size 4 --steps 30
    python benchmarks/train_gpu.py --model 3b --recompute full
    python benchmarks/train_gpu.py --smoke             # a tiny model, runs anywhere (CPU too): checks the script

Each side starts from the same initial weights and sees the same batches; it runs alone on the
GPU (the models do not fit twice) and is torn down before the next. Per side and model it prints

    train_gpu model=1b side=ember tokens_per_s=... mfu=... step_ms=... peak_mem_gib=... final_loss=...

where MFU = tokens/s x (6 x active parameters + attention FLOPs per token) / the GPU's dense bf16
peak (ember.train.metrics: H100 SXM 989 TFLOP/s; `--peak-tflops` to override), then how far each
side's loss curve is from ember's. Sides:
  ember       Trainer.train_step: fused output/loss, SDPA (flash), fused AdamW, compiled blocks
  ember-fp8   the same with torchao float8 training on the blocks' linear layers (if torchao imports)
  hf          LlamaForCausalLM (SDPA), F.cross_entropy, clip_grad_norm_, fused AdamW
  torchtitan  torchtitan's Llama 3 model in the same loop as hf (if torchtitan imports; best effort)
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import (  # noqa: E402
    Shape, ember_step, ember_trainer, hf_step, hf_twin, initial_state, scratch_dir, take_batches, time_steps,
)

from ember.train.metrics import device_name, peak_tflops  # noqa: E402

SHAPES = {
    "1b": Shape("1b", "llama3.2-1b", seq_length=4096, micro_batch_size=4),
    "3b": Shape("3b", "llama3.2-3b", seq_length=4096, micro_batch_size=1),
    # the same code path at a size any machine runs in seconds
    "smoke": Shape("smoke", "llama3.2-1b", seq_length=64, micro_batch_size=2, overrides=dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
        vocab_size=512)),
}
SIDES = ("ember", "ember-fp8", "hf", "torchtitan")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def apply_float8(model: torch.nn.Module) -> None:
    """torchao float8 training (dynamic tensorwise scaling) for every linear layer of the blocks;
    the output layer stays bf16 (the fused loss reads its weight directly)."""
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: fqn.startswith("layers."))


def torchtitan_model(args, state: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """torchtitan's Llama 3 Transformer with the same shape (best effort across torchtitan
    versions; its weights are its own random init, so only its speed is comparable)."""
    try:
        from torchtitan.models.llama3 import Transformer, TransformerModelArgs as TitanArgs
    except ImportError:
        from torchtitan.models.llama import ModelArgs as TitanArgs, Transformer
    base_ffn = int(2 * 4 * args.dim / 3)
    titan_args = TitanArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                           vocab_size=args.vocab_size, multiple_of=256, ffn_dim_multiplier=args.ffn_dim / base_ffn,
                           norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_seq_len=args.max_seq_len)
    with torch.device(device):
        model = Transformer(titan_args)
        if hasattr(model, "init_weights"):
            model.init_weights()
    ffn = model.layers["0"].feed_forward.w1.weight.shape[0] if hasattr(model.layers, "keys") else None
    if ffn is not None and ffn != args.ffn_dim:
        raise RuntimeError(f"torchtitan built ffn {ffn}, wanted {args.ffn_dim}")
    return model.train()


def torchtitan_step(model: torch.nn.Module, config, device: torch.device):
    """The hf loop around a model that returns logits directly."""
    from ember.train.optim import parameter_groups

    o = config.optim
    optimizer = torch.optim.AdamW(parameter_groups(model, o.weight_decay), lr=config.train.lr,
                                  betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, fused=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(micro_batches):
        total = sum(int(mb["loss_mask"].numel()) for mb in micro_batches)
        loss_sum = torch.zeros((), device=device)
        for mb in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(mb["input_ids"])
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), reduction="sum")
            (loss / total).backward()
            loss_sum += loss.detach()
        torch.nn.utils.clip_grad_norm_(params, o.clip_grad, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum / total

    return step


# kernel-name fragments that show which path a step took (CUDA kernel names as the profiler reports them)
KERNEL_PATHS = {
    "flash_attention": ("flash",),  # SDPA's flash backend: pytorch_flash::flash_fwd/bwd kernels
    "cudnn_attention": ("cudnn", "fmha"),
    "efficient_attention": ("efficient_attention", "mem_efficient", "fmha_cutlass"),
    "compiled_triton": ("triton_",),  # torch.compile's Inductor kernels
    "float8_gemm": ("f8", "fp8", "e4m3"),
}


def kernel_paths(step, batch, device: torch.device) -> dict[str, int]:
    """How many kernel launches of one more step fall under each KERNEL_PATHS entry: proof that the
    flash-attention and compiled paths were taken, not assumed."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize(device)
    names = [event.name.lower() for event in prof.events() if event.device_type.name == "CUDA"]
    counts = {path: sum(any(part in name for part in parts) for name in names) for path, parts in KERNEL_PATHS.items()}
    counts["all_kernels"] = len(names)
    return counts


def run_model(shape: Shape, args: argparse.Namespace, device: torch.device) -> list[dict]:
    steps = args.steps + args.warmup
    # blocks compiled on a GPU (ember's default there); eager elsewhere, where compiling a smoke run costs minutes
    options = dict(precision="bf16", compile=args.compile and device.type == "cuda", recompute=args.recompute)
    results = []
    with scratch_dir("ember-train-gpu-") as workdir:
        trainer = ember_trainer(shape, workdir, steps, **options)
        model_args = trainer.model_args
        state = initial_state(trainer)  # every side starts here
        batches = take_batches(trainer, steps)
        config = trainer.config
        trainer.close()
        del trainer
        flops_per_token = model_args.flops_per_token(shape.seq_length)
        peak = peak_tflops(device, "bf16", args.peak_tflops)
        for side in args.sides:
            _free(device)
            try:
                step, teardown = _build_side(side, shape, workdir, steps, options, model_args, state, config, device)
            except Exception as error:  # an optional side that does not install or build here
                if side in ("ember", "hf"):
                    raise
                print(f"train_gpu model={shape.name} side={side} skipped: {type(error).__name__}: {error}",
                      flush=True)
                continue
            try:
                seconds, losses = time_steps(step, batches, device, warmup=args.warmup)
                if args.check_kernels and device.type == "cuda":
                    counts = kernel_paths(step, batches[-1], device)
                    print(f"train_gpu model={shape.name} side={side} kernels "
                          + " ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"train_gpu model={shape.name} side={side} out of memory: try --recompute full or a "
                      f"smaller --micro-batch-size", flush=True)
                continue
            except Exception as error:  # an optional side that builds but cannot run here (float8 kernels, ...)
                if side in ("ember", "hf"):
                    raise
                print(f"train_gpu model={shape.name} side={side} failed: {type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}", flush=True)
                continue
            finally:
                peak_mem = _peak_memory_gib(device)
                teardown()
                del step, teardown
            step_s = statistics.median(seconds)
            tokens_per_s = shape.micro_batch_size * shape.seq_length / step_s
            mfu = tokens_per_s * flops_per_token / (peak * 1e12) if peak else None
            results.append(dict(side=side, losses=losses))
            print(f"train_gpu model={shape.name} params={model_args.num_params() / 1e9:.2f}B side={side} "
                  f"device=\"{device_name(device)}\" seq={shape.seq_length} micro_batch={shape.micro_batch_size} "
                  f"recompute={args.recompute or 'none'} compile={int(options['compile'])} "
                  f"tokens_per_s={tokens_per_s:.0f} mfu={'n/a' if mfu is None else f'{mfu:.3f}'} "
                  f"step_ms={1000 * step_s:.1f} peak_mem_gib={'n/a' if peak_mem is None else f'{peak_mem:.1f}'} "
                  f"final_loss={losses[-1]:.4f}", flush=True)
    _compare_curves(shape, results)
    return results


def _build_side(side, shape, workdir, steps, options, model_args, state, config, device):
    """(step function, teardown) for one side; raises ImportError when its package is missing."""
    if side in ("ember", "ember-fp8"):
        if side == "ember-fp8":
            import torchao.float8  # noqa: F401 (ImportError: skipped)
        trainer = ember_trainer(shape, os.path.join(workdir, side), steps, **options)
        trainer.model.load_state_dict(state)  # the same start as the other sides
        if side == "ember-fp8":
            apply_float8(trainer.model)
        return ember_step(trainer), trainer.close
    if side == "hf":
        model = hf_twin(model_args, state, device, gradient_checkpointing=options["recompute"] == "full")
        return hf_step(model, config, device), lambda: None
    if side == "torchtitan":
        import torchtitan  # noqa: F401 (ImportError: skipped)

        model = torchtitan_model(model_args, state, device)
        return torchtitan_step(model, config, device), lambda: None
    raise ValueError(side)


def _compare_curves(shape: Shape, results: list[dict]) -> None:
    by_side = {r["side"]: r["losses"] for r in results}
    reference = by_side.get("ember")
    if reference is None:
        return
    for side, losses in by_side.items():
        if side in ("ember", "torchtitan"):  # torchtitan starts from its own weights
            continue
        diff = max(abs(a - b) for a, b in zip(reference, losses))
        print(f"train_gpu model={shape.name} loss_max_diff side={side} vs ember: {diff:.3e} over {len(losses)} steps",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["1b", "3b", "all"], default="all")
    parser.add_argument("--smoke", action="store_true", help="a tiny model instead, on whatever device there is")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation happens here)")
    parser.add_argument("--micro-batch-size", type=int, help="default: 4 for 1b, 1 for 3b")
    parser.add_argument("--seq-length", type=int, help="default 4096")
    parser.add_argument("--recompute", choices=["selective", "full"], help="activation recomputation (default none)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager blocks (default: compiled on GPU, eager on CPU)")
    parser.add_argument("--check-kernels", action="store_true",
                        help="profile one extra step per side and count flash-attention / compiled / float8 kernels")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, if not in ember's table")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no GPU here: use --smoke to check the script on this machine")
    names = ["smoke"] if args.smoke else (["1b", "3b"] if args.model == "all" else [args.model])
    for name in names:
        shape = SHAPES[name]
        if args.micro_batch_size:
            shape = replace(shape, micro_batch_size=args.micro_batch_size)
        if args.seq_length:
            shape = replace(shape, seq_length=args.seq_length)
        run_model(shape, args, device)


if __name__ == "__main__":
    main()

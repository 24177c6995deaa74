"""Training speed on this CPU: ember's training step vs a plain Hugging Face transformers loop.

    python benchmarks/train_cpu.py                          # both shapes, fp32, all cores, wall time
    python benchmarks/train_cpu.py --loss plain             # ember's loss through the full logits
    python benchmarks/train_cpu.py --threads 1 --clock cpu  # steadier on a busy machine
    python benchmarks/train_cpu.py --shape 56m --compile    # ember with torch.compile'd blocks

Same Llama model, same initial weights, same batches, same dtype; the two sides take turns
(`--per-round` steps each) so that other work on a shared machine slows both alike, and the
figures are medians of per-step times. MFU counts 6 x non-embedding parameters (output layer
included) + attention FLOPs per token (`ModelArgs.flops_per_token`), against this CPU's fp32
(or bf16) matmul peak measured at the start. Per shape it prints one comparable line:

    train_cpu shape=56m params=56.4M dtype=fp32 threads=2 compile=0 loss=plain clock=wall timed_steps=...
              ember_tokens_per_s=... hf_tokens_per_s=... ratio=... paired_ratio=... ember_mfu=...
              hf_mfu=... peak_gflops=... loss_max_diff=... load1=...

`ratio` compares median step times; `paired_ratio` is the median over turns of HF time / ember
time for the same batches (steadier when the machine's load drifts). `loss=fused` is the trainer's
loss (ember.train.fused_loss), `loss=plain` goes through the full logits. With --curves it also prints
both loss curves step by step. Results and the machine they came from: RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from ember.models.from_config import model_args_from_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import (  # noqa: E402
    Shape, alternate, alternate_in_processes, ember_config, ember_trainer, load_average, loss_agreement, scratch_dir,
    side_step, take_batches, use_plain_loss,
)

_LLAMA_OVERRIDES = dict(swiglu=True, normalization="RMSNorm", untie_embeddings_and_output_weights=True,
                        disable_bias_linear=True)
SHAPES = {
    # 56M parameters: the figures in the issue were measured on this shape.
    "56m": Shape("56m", "llama2-7b", seq_length=512, micro_batch_size=4, overrides=dict(
        _LLAMA_OVERRIDES, num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=4,
        ffn_hidden_size=1408, vocab_size=32000)),
    # per-step overhead dominates here
    "tiny": Shape("tiny", "llama2-7b", seq_length=256, micro_batch_size=4, overrides=dict(
        _LLAMA_OVERRIDES, num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=352, vocab_size=8000)),
}
# glibc malloc settings that keep freed memory for reuse (no page faults on each large tensor): what
# `--hf-allocator tuned` gives the transformers side, to separate allocator effects from code.
_TUNED_GLIBC_MALLOC = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=8589934592:glibc.malloc.top_pad=268435456"
# steps (warm-up included) and steps per turn when not given
_DEFAULT_STEPS = {"56m": (16, 2), "tiny": (120, 10)}


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 1.5,
                       clock=time.perf_counter) -> float:
    """Best GFLOP/s of one square matmul over a few repeats: the ceiling every training step is
    measured against."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.mm(a, b, out=out)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / max(clock() - start, 1e-9) / 1e9)
    return best


def run_shape(shape: Shape, args: argparse.Namespace, peak_gflops: float, clock) -> dict:
    steps, per_round = _DEFAULT_STEPS[shape.name]
    steps = args.steps or steps
    per_round = args.per_round or per_round
    warmup = args.warmup if args.warmup is not None else per_round
    options = dict(precision=args.precision, compile=args.compile)
    load_start = load_average()
    if args.processes == "separate":
        env = {"hf": {"GLIBC_TUNABLES": _TUNED_GLIBC_MALLOC}} if args.hf_allocator == "tuned" else None
        timings = alternate_in_processes(["ember", "hf"], shape, steps, warmup=warmup, per_round=per_round,
                                         threads=args.threads, clock_name=args.clock, options=options,
                                         plain_loss=args.loss == "plain", env=env)
    else:
        with scratch_dir("ember-train-cpu-") as workdir:
            trainer = ember_trainer(shape, workdir, steps, **options)
            try:
                if args.loss == "plain":
                    use_plain_loss(trainer)
                batches = take_batches(trainer, steps)
                sides = {side: side_step(side, trainer) for side in ("ember", "hf")}
                timings = alternate(sides, batches, trainer.device, warmup=warmup, per_round=per_round, clock=clock)
            finally:
                trainer.close()
    load_end = load_average()
    model_args = model_args_from_config(ember_config(shape, "unused", steps, **options))
    tokens_per_step = shape.micro_batch_size * shape.seq_length
    flops_per_token = model_args.flops_per_token(shape.seq_length)
    result = {"shape": shape.name, "params_m": model_args.num_params() / 1e6}
    for side in ("ember", "hf"):
        tokens_per_s = tokens_per_step / timings.median(side)
        result[f"{side}_tokens_per_s"] = tokens_per_s
        result[f"{side}_mfu"] = tokens_per_s * flops_per_token / (peak_gflops * 1e9)
    result["ratio"] = result["ember_tokens_per_s"] / result["hf_tokens_per_s"]
    result["paired_ratio"] = timings.paired_speedup("ember", "hf")
    result["loss_max_diff"] = loss_agreement(timings.losses, "ember", "hf")
    result["timed_steps"] = len(timings.seconds["ember"])
    result["load1"] = (load_start + load_end) / 2
    result["losses"] = timings.losses
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--steps", type=int, help="steps per side, warm-up included")
    parser.add_argument("--per-round", type=int, help="steps one side runs before the other takes its turn")
    parser.add_argument("--warmup", type=int, help="untimed first steps per side (default: one turn)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="per-step wall time, or this process's CPU time (steadier on a busy machine; "
                             "use with --threads 1, as idle OpenMP threads spin)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile ember's blocks")
    parser.add_argument("--loss", choices=["fused", "plain"], default="fused",
                        help="ember's loss as the trainer computes it (output layer and cross-entropy "
                             "fused), or through the full logits (to measure what fusing gains)")
    parser.add_argument("--processes", choices=["separate", "one"], default="separate",
                        help="each side in its own process, as users run them (default), or both in this one "
                             "(the allocator's heap is then shared: see compare_training.alternate_in_processes)")
    parser.add_argument("--hf-allocator", choices=["default", "tuned"], default="default",
                        help="tuned: the transformers process gets glibc malloc settings that keep freed "
                             "memory (GLIBC_TUNABLES), to tell allocator effects from code (separate processes)")
    parser.add_argument("--curves", action="store_true", help="print both loss curves step by step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    peak = matmul_peak_gflops(dtype, clock=clock)
    print(f"# {args.precision} matmul peak on {args.threads} thread(s): {peak:.0f} GFLOP/s; "
          f"torch {torch.__version__}; load1 {load_average():.2f}", flush=True)
    for name in SHAPES if args.shape == "all" else [args.shape]:
        r = run_shape(SHAPES[name], args, peak, clock)
        if args.curves:
            for step, (a, b) in enumerate(zip(r["losses"]["ember"], r["losses"]["hf"]), start=1):
                print(f"loss shape={name} step={step} ember={a:.6f} hf={b:.6f} diff={a - b:+.2e}")
        print(f"train_cpu shape={name} params={r['params_m']:.1f}M dtype={args.precision} threads={args.threads} "
              f"compile={int(args.compile)} loss={args.loss} clock={args.clock} processes={args.processes} "
              f"hf_allocator={args.hf_allocator} timed_steps={r['timed_steps']} "
              f"ember_tokens_per_s={r['ember_tokens_per_s']:.0f} hf_tokens_per_s={r['hf_tokens_per_s']:.0f} "
              f"ratio={r['ratio']:.3f} paired_ratio={r['paired_ratio']:.3f} ember_mfu={r['ember_mfu']:.3f} hf_mfu={r['hf_mfu']:.3f} "
              f"peak_gflops={peak:.0f} loss_max_diff={r['loss_max_diff']:.2e} load1={r['load1']:.2f}", flush=True)


if __name__ == "__main__":
    main()

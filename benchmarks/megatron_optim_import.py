"""Peak memory and time of importing a Megatron checkpoint with its Adam state (issue 15: "streamed:
peak memory bounded by the largest tensor group, not the model").

    .venv/bin/python benchmarks/megatron_optim_import.py --layers 4 [--layers 10 ...] [--workdir DIR]

Builds, for each --layers, a Llama checkpoint of TinyLlama-1.1B's widths (hidden 2048, FFN 5632,
32 heads, 4 query groups, vocab 32000, untied output; 22 layers make 1.1B parameters) in
Megatron-Core's torch_dist form with random fp32 weights and the non-distributed optimizer's Adam
state (`optimizer.state.exp_avg.<tensor>`, `...exp_avg_sq...`, the parameter groups and step in
common.pt, as Megatron-LM's save_checkpoint writes them), then runs in a fresh process

    ember convert --from megatron --to ember SRC OUT               (weights only)
    ember convert --from megatron --to ember SRC OUT --load-optim  (ember training checkpoint)

and reports each one's wall time, peak RSS (the kernel's ru_maxrss of the child) and peak anonymous
memory (RssAnon sampled every 20 ms: RSS less the page cache of files the process maps).

The checkpoint is synthetic: written here with torch DCP, one file per tensor, each tensor stored
under its per-layer name (`decoder.layers.N.…`). Megatron-Core stores a layer-stacked tensor with one
DCP chunk per layer; ember reads one chunk at a time either way, so the memory seen is the same.
Fewer layers than 22 keep the input plus the output under --max-disk-gb (1.1B parameters with two
Adam moments are 13 GB in, 13 GB out): a streamed import's peak does not depend on the layer count,
so two counts show whether it grows with the model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ember.checkpoint.megatron_export import megatron_args_from_ember, megatron_tensors  # noqa: E402
from ember.models.args import ModelArgs  # noqa: E402
from ember.models.hf import ember_state_shapes  # noqa: E402

ITERATION = 10
ADAM = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}


def llama_1b_widths(layers: int) -> ModelArgs:
    return ModelArgs(vocab_size=32000, dim=2048, n_layers=layers, n_heads=32, n_kv_heads=4, ffn_dim=5632,
                     max_seq_len=2048, norm_type="rmsnorm", mlp_type="gated", position_type="rope",
                     tie_embeddings=False)


def megatron_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Megatron-Core tensor name -> global shape, for `args`."""
    ember = ember_state_shapes(args)

    def meta(name: str) -> torch.Tensor:
        return torch.empty(ember[name][0], device="meta")

    return {(name if layer is None else f"decoder.layers.{layer}.{name}"): tuple(t.shape)
            for layer, name, t in megatron_tensors(args, meta)}


def build_checkpoint(args: ModelArgs, save_dir: Path) -> int:
    """A Megatron save folder (`latest_checkpointed_iteration.txt`, `iter_0000010/`) with random
    weights and Adam state; returns its bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    shapes = megatron_shapes(args)
    folder = save_dir / f"iter_{ITERATION:07d}"
    folder.mkdir(parents=True)
    # zero-byte stand-ins (a broadcast scalar) for planning; each tensor is made when it is written
    state = {}
    for name, shape in shapes.items():
        for prefix in ("", "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."):
            state[prefix + name] = torch.zeros((), dtype=torch.float32).expand(shape)
    seeds = {fqn: n for n, fqn in enumerate(state)}

    class RandomTensors(DefaultSavePlanner):
        def resolve_data(self, write_item):
            fqn = write_item.index.fqn
            generator = torch.Generator().manual_seed(seeds[fqn])
            shape = state[fqn].shape
            if ".exp_avg_sq." in fqn:  # a second moment is a mean of squares
                return torch.rand(shape, generator=generator) * 1e-6
            scale = 1e-3 if ".exp_avg." in fqn else 0.02
            values = torch.randn(shape, generator=generator) * scale
            return values.add_(1.0) if name_is_norm(fqn) and ".exp_avg" not in fqn else values

    # one file per tensor: DCP keeps a file's tensors alive until the file is closed
    dcp.save(state, storage_writer=FileSystemWriter(folder, single_file_per_rank=False), planner=RandomTensors(),
             no_dist=True)
    namespace = megatron_args_from_ember(args, 1, 1, "torch_dist")
    namespace.iteration = ITERATION
    namespace.consumed_train_samples = ITERATION * 8
    namespace.global_batch_size, namespace.seq_length = 8, 2048
    namespace.lr, namespace.adam_beta1, namespace.adam_beta2 = ADAM["lr"], *ADAM["betas"]
    namespace.adam_eps, namespace.weight_decay = ADAM["eps"], ADAM["weight_decay"]
    # Megatron's standard grouping: weight decay on matrices, none on 1-D weights
    decayed = [n for n, s in shapes.items() if len(s) > 1]
    groups, first = [], 0
    for wd_mult, members in ((1.0, decayed), (0.0, [n for n in shapes if n not in decayed])):
        groups.append({"params": list(range(first, first + len(members))), "wd_mult": wd_mult,
                       "lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False, "lr": ADAM["lr"],
                       "betas": ADAM["betas"], "eps": ADAM["eps"], "weight_decay": ADAM["weight_decay"] * wd_mult,
                       "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                       "differentiable": False, "fused": None, "decoupled_weight_decay": True})
        first += len(members)
    common = {"args": namespace, "iteration": ITERATION, "checkpoint_version": 3.0,
              "optimizer": {"optimizer": {"param_groups": groups, "state": {"common_step": ITERATION}}},
              "opt_param_scheduler": {"max_lr": ADAM["lr"], "num_steps": ITERATION * 8}}
    torch.save(common, folder / "common.pt")
    (folder / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                          '"common_backend": "torch", "common_backend_version": 1}')
    (save_dir / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return folder_bytes(save_dir)


def name_is_norm(fqn: str) -> bool:
    return "layernorm" in fqn


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(command: list[str]) -> dict[str, float]:
    """Run `command`; its wall time, ru_maxrss and the largest RssAnon seen."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_anon
        while not done.is_set():
            try:
                for line in open(f"/proc/{child.pid}/status", encoding="ascii"):
                    if line.startswith("RssAnon:"):
                        peak_anon = max(peak_anon, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({child.returncode}):\n{output}")
    print(output.strip().splitlines()[-1], flush=True)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "peak_anon_mb": peak_anon / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, action="append", help="layer counts to measure (default: 4 and 10)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--max-disk-gb", type=float, default=15.0, help="refuse sizes whose input + output exceed it")
    parser.add_argument("--skip-weights-only", action="store_true", help="measure only --load-optim")
    options = parser.parse_args()
    rows = []
    for layers in options.layers or [4, 10]:
        args = llama_1b_widths(layers)
        params = sum(torch.Size(s).numel() for s in megatron_shapes(args).values())
        need_gb = params * 4 * 3 * 2 / 1e9  # weights + 2 moments, in and out
        if need_gb > options.max_disk_gb:
            raise SystemExit(f"--layers {layers}: {params / 1e9:.2f}B parameters need {need_gb:.1f} GB of disk, over "
                             f"--max-disk-gb {options.max_disk_gb}; use fewer layers")
        work = Path(tempfile.mkdtemp(prefix="megatron-optim-bench-", dir=options.workdir))
        try:
            started = time.perf_counter()
            size = build_checkpoint(args, work / "megatron")
            print(f"{layers} layers, {params / 1e9:.3f}B parameters: checkpoint {size / 1e9:.2f} GB built in "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
            runs = [("weights only", [])] if not options.skip_weights_only else []
            runs.append(("--load-optim", ["--load-optim"]))
            for what, extra in runs:
                out = work / "out"
                command = [sys.executable, "-m", "ember", "convert", "--from", "megatron", "--to", "ember",
                           str(work / "megatron"), str(out), *extra]
                found = measure(command)
                found.update(layers=layers, params_b=params / 1e9, what=what, out_gb=folder_bytes(out) / 1e9)
                rows.append(found)
                shutil.rmtree(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'layers':>6} {'params':>7} {'conversion':<13} {'wall s':>7} {'peak RSS MB':>12} {'peak anon MB':>13} "
          f"{'out GB':>7}")
    for r in rows:
        print(f"{r['layers']:>6} {r['params_b']:>6.3f}B {r['what']:<13} {r['seconds']:>7.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_anon_mb']:>13.0f} {r['out_gb']:>7.2f}")


if __name__ == "__main__":
    main()

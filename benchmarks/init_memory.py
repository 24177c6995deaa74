"""Host memory and time of the trainer's random initialisation, part by part, against making the
whole reference model first (how ember initialised before; rank 0 held a full fp32 copy).

    python benchmarks/init_memory.py                   # 349M-parameter Llama shape
    python benchmarks/init_memory.py --layers 48

Each way runs in a fresh process that first allocates the model being initialised, then resets
the kernel's RSS high-water mark, initialises, and reports the peak:

    init_memory way=parts params=349M model_mb=1330 peak_rss_mb=... seconds=...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def run_one(way: str, layers: int, dim: int) -> None:
    import torch

    from ember.checkpoint.initialize import initialize
    from ember.models import Transformer, get_model_args
    from ember.models.initialization import initial_weight_chunks

    torch.set_num_threads(1)
    args = get_model_args("tiny-llama", dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=dim // 128,
                          ffn_dim=dim * 11 // 4, vocab_size=32000)
    with torch.device("meta"):
        model = Transformer(args)
    model.materialize("cpu")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: only the initialisation counts
        f.write("5")
    start = time.perf_counter()
    if way == "whole":
        with torch.device("meta"):
            reference = Transformer(args)
        reference.to_empty(device="cpu")
        reference.init_weights(seed=1)
        model.load_state_dict(reference.state_dict(), strict=False)
        del reference
    else:
        initialize(model, lambda: initial_weight_chunks(args, 1))
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        peak_kb = int(f.read().split("VmHWM:")[1].split()[0])
    params = sum(p.numel() for p in model.parameters())
    print(f"init_memory way={way} params={params / 1e6:.0f}M model_mb={params * 4 / 2**20:.0f} "
          f"peak_rss_mb={peak_kb / 1024:.0f} seconds={seconds:.1f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--way", choices=["parts", "whole"], help="run one way in this process (internal)")
    args = parser.parse_args(argv)
    if args.way:
        run_one(args.way, args.layers, args.dim)
        return
    for way in ("whole", "parts"):
        subprocess.run([sys.executable, __file__, "--way", way, "--layers", str(args.layers), "--dim", str(args.dim)],
                       check=True)


if __name__ == "__main__":
    main()

"""Where a training step's time goes: torch.profiler over a few steps of ember's `Trainer.train_step`
(or of the Hugging Face loop it is compared with), as a table of operators by self time.

    python benchmarks/profile_step.py --shape 56m --side ember --steps 3
    python benchmarks/profile_step.py --shape tiny --side hf --rows 30 --trace /tmp/step.json

The trace (chrome://tracing, perfetto) shows the step on a timeline. For Python overhead use
py-spy on the same command: `py-spy record -o step.svg -- python benchmarks/profile_step.py ...`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import ember_trainer, scratch_dir, side_step, take_batches, use_plain_loss  # noqa: E402
from train_cpu import SHAPES  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="56m")
    parser.add_argument("--side", choices=["ember", "hf"], default="ember")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--loss", choices=["fused", "plain"], default="fused",
                        help="plain: ember's loss through the full logits (see train_cpu.py --loss)")
    parser.add_argument("--shapes", action="store_true", help="group the table by input shapes")
    parser.add_argument("--trace", help="also write a chrome trace here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    warmup = 2
    with scratch_dir("ember-profile-") as workdir:
        trainer = ember_trainer(shape, workdir, warmup + args.steps, precision=args.precision, compile=args.compile)
        try:
            if args.loss == "plain":
                use_plain_loss(trainer)
            step = side_step(args.side, trainer)
            batches = take_batches(trainer, warmup + args.steps)
            for batch in batches[:warmup]:
                step(batch)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
            start = time.perf_counter()
            with profile(activities=activities, record_shapes=args.shapes) as prof:
                for batch in batches[warmup:]:
                    with record_function("train_step"):
                        float(step(batch))
            wall = (time.perf_counter() - start) / args.steps
        finally:
            trainer.close()
    sort = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages(group_by_input_shape=args.shapes).table(sort_by=sort, row_limit=args.rows))
    print(f"profile shape={args.shape} side={args.side} steps={args.steps} step_ms={1000 * wall:.1f} "
          f"(under the profiler)")
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()

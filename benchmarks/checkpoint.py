"""Checkpoint speed: how long ember's training checkpoints (DCP: model + AdamW state) take to save
and load, and how much training an asynchronous save blocks.

    python benchmarks/checkpoint.py                       # the 56M CPU shape, in a temp folder
    python benchmarks/checkpoint.py --shape tiny --dir /fast/disk/tmp --repeats 3

Uses the Trainer's own pieces: a set-up `Trainer` (model, fused AdamW with state after a few
steps) and `ember.checkpoint.training.Checkpointer` / `load_training_state`, as `ember train --save`
and `--load` do. Prints one comparable line per shape:

    checkpoint shape=56m params=56.4M size_mb=... save_s=... save_mb_per_s=... load_s=...
               async_blocked_s=... async_wait_s=... step_ms=... step_ms_during_async=... load1=...

save_s: a synchronous save, rename and `latest` included. async_blocked_s: how long `save()`
holds the training loop with --async-save (the copy of the state to host memory);
async_wait_s: what is left to wait for after `--async-steps` more training steps (zero when the
write finished in their shadow). step_ms_during_async: the median step while the write runs, next
to step_ms without one. Medians over --repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import ember_step, ember_trainer, load_average, scratch_dir, take_batches  # noqa: E402
from train_cpu import SHAPES  # noqa: E402

from ember.checkpoint.training import Checkpointer, find_checkpoint, load_training_state  # noqa: E402


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 1e6


def timed(function, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(shape_name: str, args: argparse.Namespace, workdir: str) -> dict:
    shape = SHAPES[shape_name]
    steps_needed = 2 + args.repeats * (2 * args.async_steps + 1)
    trainer = ember_trainer(shape, os.path.join(workdir, "data"), steps_needed)
    try:
        step = ember_step(trainer)
        batches = iter(take_batches(trainer, steps_needed))
        for _ in range(2):  # optimizer state exists from here on
            step(next(batches))
        state = {"benchmark": True}
        model, optimizer = trainer.model, trainer.optimizer
        save_dir = os.path.join(args.dir or workdir, "checkpoints")
        saves, loads, blocked, waits, idle_steps, busy_steps = [], [], [], [], [], []
        size = 0.0
        for repeat in range(args.repeats):
            shutil.rmtree(save_dir, ignore_errors=True)
            path, seconds = timed(Checkpointer(save_dir).save, 1, model, optimizer, state)
            saves.append(seconds)
            size = folder_mb(str(path))
            _, seconds = timed(load_training_state, find_checkpoint(save_dir), model, optimizer)
            loads.append(seconds)
            for _ in range(args.async_steps):  # steps with no save in flight
                _, seconds = timed(step, next(batches))
                idle_steps.append(seconds)
            checkpointer = Checkpointer(save_dir, async_save=True)
            _, seconds = timed(checkpointer.save, 2 + repeat, model, optimizer, state)
            blocked.append(seconds)
            for _ in range(args.async_steps):  # the write runs behind these
                _, seconds = timed(step, next(batches))
                busy_steps.append(seconds)
            _, seconds = timed(checkpointer.wait)
            waits.append(seconds)
        shutil.rmtree(save_dir, ignore_errors=True)
    finally:
        trainer.close()
    median = statistics.median
    return dict(params_m=trainer.model_args.num_params() / 1e6, size_mb=size, save_s=median(saves),
                load_s=median(loads), async_blocked_s=median(blocked), async_wait_s=median(waits),
                step_ms=1000 * median(idle_steps), step_ms_during_async=1000 * median(busy_steps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="56m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--async-steps", type=int, default=3, help="training steps run while an async save writes")
    parser.add_argument("--dir", help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP, once per call
    for name in SHAPES if args.shape == "all" else [args.shape]:
        with scratch_dir("ember-checkpoint-bench-") as workdir:
            r = measure(name, args, workdir)
        print(f"checkpoint shape={name} params={r['params_m']:.1f}M size_mb={r['size_mb']:.0f} "
              f"save_s={r['save_s']:.2f} save_mb_per_s={r['size_mb'] / r['save_s']:.0f} load_s={r['load_s']:.2f} "
              f"async_blocked_s={r['async_blocked_s']:.2f} async_wait_s={r['async_wait_s']:.2f} "
              f"step_ms={r['step_ms']:.0f} step_ms_during_async={r['step_ms_during_async']:.0f} "
              f"threads={args.threads} load1={load_average():.2f}", flush=True)


if __name__ == "__main__":
    main()

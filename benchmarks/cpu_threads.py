"""CPU training while other work holds cores: one thread per core vs the trainer's choice.

    python benchmarks/cpu_threads.py                      # tiny shape, 0 then 1 busy core
    python benchmarks/cpu_threads.py --shape 56m --steps 6 --busy 0 1

For each number of busy cores (spinning processes the benchmark starts and stops), ember's
training step is timed with one torch thread per core (torch's default) and with the count
`ember.train.cpu_threads` chooses at that moment (what `ember train` does at start), one line each:

    cpu_threads shape=tiny cores=2 busy_cores=1 measured_busy=1.02 threads=2 chosen=0 step_ms=... tokens_per_s=...

Medians of per-step wall times. Results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_training import ember_step, ember_trainer, scratch_dir, take_batches, time_steps  # noqa: E402
from train_cpu import SHAPES  # noqa: E402

from ember.train.cpu_threads import busy_cpus, choose_cpu_threads  # noqa: E402

# A spinner stops by itself after this long, should the benchmark be killed before stopping it.
SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"


def start_spinners(count: int, seconds: float) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(count)]


def stop(spinners: list[subprocess.Popen]) -> None:
    for process in spinners:
        process.kill()
        process.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per setting (after 2 warm-up steps)")
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="numbers of cores to keep busy")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    shape = SHAPES[args.shape]
    torch.set_num_threads(cores)
    with scratch_dir("ember-cpu-threads-") as workdir:
        trainer = ember_trainer(shape, workdir, args.steps + 2)
        try:
            step = ember_step(trainer)
            batches = take_batches(trainer, args.steps + 2)
            for busy in args.busy:
                spinners = start_spinners(busy, seconds=600)
                try:
                    time.sleep(0.3)
                    measured = busy_cpus(window_s=0.3)
                    chosen = choose_cpu_threads(None, cores, measured, cores=cores).threads
                    for threads in sorted({cores, chosen}, reverse=True):
                        torch.set_num_threads(threads)
                        seconds, _ = time_steps(step, batches, trainer.device, warmup=2)
                        step_s = statistics.median(seconds)
                        tokens = shape.micro_batch_size * shape.seq_length
                        print(f"cpu_threads shape={shape.name} cores={cores} busy_cores={busy} "
                              f"measured_busy={measured if measured is None else round(measured, 2)} "
                              f"threads={threads} chosen={int(threads == chosen)} step_ms={step_s * 1e3:.1f} "
                              f"tokens_per_s={tokens / step_s:.0f}", flush=True)
                finally:
                    stop(spinners)
        finally:
            trainer.close()


if __name__ == "__main__":
    main()

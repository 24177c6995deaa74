"""Profiling and memory snapshots in the training loop (Megatron's `--profile` flags).

    --profile --profile-step-start 10 --profile-step-end 12 --profile-ranks 0 1

profiles, on ranks 0 and 1, the iterations after the 10th up to the 12th (Megatron counts the
same way: `end - start` steps, the one before them a profiler warm-up) with `torch.profiler`, and
writes per rank

    <output dir>/profile/rank<R>.pt.trace.json   Chrome/Perfetto trace (ui.perfetto.dev, chrome://tracing)
    <output dir>/profile/summary_rank<R>.txt     the table below

The lowest profiled rank prints its table when training ends: the top operators by self time
(device time on a GPU, host time on a CPU), the share spent in communication (NCCL kernels, gloo
and c10d collectives) against the rest, and the host syncs counted in the window (`.item()`-style
reads, device-to-host copies, synchronize calls: each one stalls the host until the device catches up).

`--record-memory-history` (CUDA only) records the caching allocator's history and dumps it with
`torch.cuda.memory._dump_snapshot` when a step runs out of memory and at the end of the profiled
steps; open the pickle at https://pytorch.org/memory_viz.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import torch

from ember.config import Config
from ember.errors import EmberError

_COMMUNICATION = re.compile(r"nccl|gloo|c10d::|all_?reduce|all_?gather|reduce_?scatter|broadcast|all_?to_?all|"
                            r"send|recv|barrier|FSDP::post_backward_reduce", re.IGNORECASE)
# What makes the host wait for the GPU: the runtime's synchronize calls (behind .item(), .tolist(),
# bool(tensor), device-to-host copies, explicit synchronizes). A CPU run has no device to wait for;
# its scalar reads are counted instead.
_HOST_SYNC = re.compile(r"cuda(Stream|Device|Event)Synchronize")
_SCALAR_READ = "aten::_local_scalar_dense"
TOP_OPS = 10


def profiled_ranks(values: list) -> list[int]:
    try:
        return sorted({int(v) for v in values})
    except ValueError:
        raise EmberError(f"--profile-ranks {' '.join(map(str, values))}: give rank numbers, e.g. "
                         f"--profile-ranks 0 1") from None


class RunProfiler:
    """What the loop calls around each step: `with profiler.step(iteration): ...`, then `finish()`.

    Inactive (every call a no-op) when the run asked for neither profiling nor memory history, or
    this rank is not among --profile-ranks.
    """

    def __init__(self, config: Config, rank: int, device: torch.device, train_iters: int, notice=print):
        lg = config.logging
        self.rank = rank
        self.device = device
        self.notice = notice
        out = config.output_dir
        self.folder = Path(out) / "profile" if out else None
        ranks = profiled_ranks(lg.profile_ranks) if lg.profile else []
        self.active = lg.profile and rank in ranks
        self.prints_summary = self.active and rank == ranks[0]
        self.start, self.end = lg.profile_step_start, lg.profile_step_end
        self._profiler = None
        self.summary: str | None = None
        if lg.profile:
            _check_window(self.start, self.end, train_iters, self.folder)
            self.end = min(self.end, train_iters)  # a window past the run's end closes with it
        self.memory_history = lg.record_memory_history and device.type == "cuda"
        if lg.record_memory_history and device.type != "cuda" and rank == 0:
            notice(f"--record-memory-history: memory snapshots need a CUDA device; nothing recorded on {device.type}")
        self.snapshot_path = Path(lg.memory_snapshot_path) if lg.memory_snapshot_path else None
        if self.memory_history:
            if self.snapshot_path is None and self.folder is None:
                raise EmberError("--record-memory-history needs --save or --output-dir (or --memory-snapshot-path) "
                                 "for the snapshot")
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    # ------------------------------------------------------------------ the loop's side

    @contextlib.contextmanager
    def step(self, iteration: int):
        """Around training iteration `iteration` (1-based)."""
        if self.active and iteration == max(self.start, 1) and self._profiler is None:
            self._begin()
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            self.dump_memory_snapshot("out of memory at iteration %d" % iteration)
            raise
        if self._profiler is not None:
            self._profiler.step()
            if iteration >= self.end:
                self._end()

    def finish(self) -> str | None:
        """After the loop: close a window the run ended inside; the summary text (also printed by
        the lowest profiled rank)."""
        if self._profiler is not None:
            self._end()
        if self.summary is not None and self.prints_summary:
            (self.notice if self.rank == 0 else _print_now)(self.summary)
        return self.summary

    # ------------------------------------------------------------------ profiler

    def _begin(self) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        warmup = 1 if self.start > 0 else 0  # the step before the window: its first-call costs stay out
        first = max(self.start, 1)
        self._profiler = profile(activities=activities, on_trace_ready=self._trace_ready,
                                 schedule=schedule(skip_first=first, wait=0, warmup=warmup,
                                                   active=self.end - self.start, repeat=1))
        self._profiler.step_num = first  # the trace's ProfilerStep#N are ember's iterations
        self._profiler.start()

    def _trace_ready(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank{self.rank}.pt.trace.json"
        prof.export_chrome_trace(str(trace))
        self.summary = summarize(prof.key_averages(), rank=self.rank, first=self.start + 1, last=self.end,
                                 device=self.device, folder=self.folder)
        (self.folder / f"summary_rank{self.rank}.txt").write_text(self.summary + "\n", encoding="utf-8")

    def _end(self) -> None:
        prof, self._profiler = self._profiler, None
        prof.stop()  # calls _trace_ready if the window completed; a cut-short window is exported here
        if self.summary is None:
            self._trace_ready(prof)
        if self.memory_history:
            self.dump_memory_snapshot("end of the profiled steps")

    # ------------------------------------------------------------------ memory

    def dump_memory_snapshot(self, why: str) -> None:
        if not self.memory_history:
            return
        path = self.snapshot_path or (self.folder / "memory")
        if path.suffix:  # a file name: one per rank beside it
            path = path.with_name(f"{path.stem}_rank{self.rank}{path.suffix}")
        else:
            path = path / f"snapshot_rank{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        _print_now(f"rank {self.rank}: memory snapshot ({why}) in {path}; open it at https://pytorch.org/memory_viz")


def _check_window(start: int, end: int, train_iters: int, folder: Path | None) -> None:
    if folder is None:
        raise EmberError("--profile needs --save or --output-dir: the traces go under <folder>/profile/")
    if start < 0 or end <= start:
        raise EmberError(f"--profile-step-start {start} --profile-step-end {end}: need 0 <= start < end "
                         f"(the iterations after `start` up to `end` are profiled)")
    if start >= train_iters:
        raise EmberError(f"--profile-step-start {start} is at or past the run's last iteration ({train_iters}); "
                         f"lower it (and --profile-step-end)")


def _print_now(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _self_time_us(event, on_device: bool) -> float:
    if on_device:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0
    return float(event.self_cpu_time_total)


def summarize(events, *, rank: int, first: int, last: int, device: torch.device, folder: Path) -> str:
    """One table from `profiler.key_averages()`: top ops, communication vs the rest, host syncs."""
    on_device = device.type == "cuda"
    clock = "device" if on_device else "host (CPU)"
    # ProfilerStep#N spans whole steps; its "self" time is the Python between the operators
    timed = [(e.key, e.count, _self_time_us(e, on_device)) for e in events if not e.key.startswith("ProfilerStep")]
    total = sum(t for _, _, t in timed) or 1.0
    comm = sum(t for key, _, t in timed if _COMMUNICATION.search(key))
    if on_device:
        syncs = sum(count for key, count, _ in timed if _HOST_SYNC.search(key))
        sync_line = f"host syncs (synchronize calls: .item(), .tolist(), copies to the host): {syncs}"
    else:
        reads = sum(count for key, count, _ in timed if key == _SCALAR_READ)
        sync_line = f"host syncs: none on a CPU (scalar reads, which would sync a GPU: {reads})"
    steps = last - first + 1
    width = 58
    lines = [f"profile of rank {rank}, iterations {first}-{last} ({steps} step(s)), self {clock} time; "
             f"traces in {folder}",
             f"  {'operator':<{width}} {'calls':>7} {'ms':>10} {'%':>6}"]
    for key, count, t in sorted(timed, key=lambda x: -x[2])[:TOP_OPS]:
        name = key if len(key) <= width else key[:width - 3] + "..."
        lines.append(f"  {name:<{width}} {count:>7d} {t / 1e3:>10.2f} {100 * t / total:>5.1f}%")
    lines.append(f"  {'communication (collectives, send/recv)':<{width}} {'':>7} {comm / 1e3:>10.2f} "
                 f"{100 * comm / total:>5.1f}%")
    lines.append(f"  {'compute and everything else':<{width}} {'':>7} {(total - comm) / 1e3:>10.2f} "
                 f"{100 * (total - comm) / total:>5.1f}%")
    lines.append(f"  {sync_line} in {steps} step(s)")
    return "\n".join(lines)

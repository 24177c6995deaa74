"""Training metrics: console lines, TensorBoard scalars and `logs/metrics.jsonl`.

`metrics.jsonl` has one JSON object per line: per logged iteration at least `iteration`, `loss`,
`lr`, `grad_norm`, `tokens_per_s` (all devices), `tokens_per_s_per_device`, `mfu` (null where the
device's peak is unknown), peak memory (`memory_gib` of rank 0, `max_memory_gib` over ranks,
`memory_gib_per_rank`, on a GPU `max_memory_reserved_gib`: see `memory_record`); per evaluation `iteration`, `eval_loss`, `eval_ppl` (and, once after
training, `test_loss`, `test_ppl`; as in Megatron, the validation then runs once more at the last
iteration, on the next samples). Values that are not
finite are written as null. A resumed run appends; readers take the last record of an iteration.
Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ember.errors import EmberError
from ember.progress import duration
from ember.train.console import RankWarnings, cpu_group

LOG_FORMATS = ("short", "megatron")

# Dense peak TFLOP/s per device: (16-bit tensor core, fp32). Vendor datasheet numbers, no sparsity.
_PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.0, 67.0),
    ("H100 PCIe", 756.0, 51.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("H20", 148.0, 44.0),
    ("GH200", 989.0, 67.0),
    ("B200", 2250.0, 80.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
    ("RTX 4090", 165.0, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("MI300X", 1307.0, 163.4),
    ("Ascend910B", 313.0, 78.0),
)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    npu = getattr(torch, "npu", None)
    if device.type == "npu" and npu is not None:
        return npu.get_device_name(device)
    return device.type


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The device's peak for this precision, or None (CPU, unknown GPU) unless given."""
    if override:
        return override
    name = device_name(device).replace(" ", "").lower()
    for key, half, single in _PEAK_TFLOPS:
        if key.replace(" ", "").lower() in name:
            return single if precision == "fp32" else half
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: accelerator memory allocated, or resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def memory_record(device: torch.device) -> dict[str, Any]:
    """Peak memory for a log record, from every rank: collective (a small all-gather over the CPU
    group), so every rank calls it. `memory_gib` is this rank's peak (allocated on a GPU, resident
    set size on a CPU); `max_memory_gib` the largest over ranks; on a GPU also the peak the caching
    allocator reserved; with several ranks, `memory_gib_per_rank` lists them."""
    mine = [memory_gib(device)]
    if device.type == "cuda":
        mine.append(torch.cuda.max_memory_reserved(device) / 2**30)
    local = torch.tensor(mine, dtype=torch.float64)
    rows = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        rows = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, local, group=cpu_group())
    table = torch.stack(rows).tolist()
    record: dict[str, Any] = {"memory_gib": mine[0], "max_memory_gib": max(row[0] for row in table)}
    if device.type == "cuda":
        record["max_memory_reserved_gib"] = max(row[1] for row in table)
    if len(table) > 1:
        record["memory_gib_per_rank"] = [round(row[0], 4) for row in table]
    return record


class MetricsLogger:
    """Writes each record to the console, TensorBoard and metrics.jsonl (rank 0 only)."""

    def __init__(self, output_dir: str | os.PathLike | None, *, enabled: bool, tensorboard: bool = True,
                 tensorboard_dir: str | os.PathLike | None = None, stream=None, trackers: list | None = None,
                 log_format: str = "short", ranks: tuple[int, int] = (0, 1)):
        if log_format not in LOG_FORMATS:
            raise EmberError(f"--log-format {log_format}: choose one of {', '.join(LOG_FORMATS)}")
        self.log_format = log_format
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self._jsonl = None
        self._tb = None
        # Weights & Biases and the like (ember.train.trackers): the records metrics.jsonl gets
        self.trackers = list(trackers or []) if enabled else []
        # (rank, world size): with several ranks, each warning is printed once, by rank 0
        self.rank_warnings = RankWarnings(*ranks, emit=self.print).install() if ranks[1] > 1 else None
        self.path: Path | None = None
        if not enabled or output_dir is None:
            return
        logs = Path(output_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.path = logs / "metrics.jsonl"
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = _summary_writer(Path(tensorboard_dir) if tensorboard_dir else Path(output_dir) / "tensorboard")

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        """Every rank calls this (a collective with several ranks, for their warnings); rank 0 writes."""
        if self.rank_warnings is not None:
            self.rank_warnings.flush()
        if not self.enabled:
            return
        clean = {k: _json_value(v) for k, v in record.items()}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(clean) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            step = int(record["iteration"])
            for key, value in clean.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}",
                                        value, step)
            self._tb.flush()
        for tracker in self.trackers:
            tracker.log(clean)
        if console:
            self.print(console)

    def close(self) -> None:
        if self.rank_warnings is not None:
            self.rank_warnings.print_local()
            self.rank_warnings.uninstall()
            self.rank_warnings = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the jsonl file still has everything
        return None
    return SummaryWriter(log_dir=str(path))


def _json_value(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity; a skipped step's gradient norm reads as null
    return value


def format_train_line(r: dict[str, Any], train_iters: int, style: str = "short") -> str:
    """The console line of a logged iteration: `short` (readable in 100 columns) or `megatron`."""
    return format_megatron_line(r, train_iters) if style == "megatron" else format_short_line(r, train_iters)


def format_short_line(r: dict[str, Any], train_iters: int) -> str:
    """`iter 40/200  loss 5.1234  lr 3.0e-4  grad 0.812  512 ms/it  8.0k tok/s  rss 1.21G  eta 1m22s`

    with the figures the device gives meaning to: on a GPU, MFU (TFLOP/s where the peak is
    unknown) and peak allocated/reserved memory, the largest over ranks; on a CPU, tokens/s and
    the resident set, where a TFLOP/s figure says nothing; skipped steps when there are some.
    Everything else (tokens/s on a GPU, consumed samples, per-rank memory) is in metrics.jsonl."""
    parts = [f"iter {r['iteration']}/{train_iters}", f"loss {_fmt(r['loss'], '.4f')}", f"lr {_short_exp(r['lr'])}",
             f"grad {_fmt(r['grad_norm'], '.3f')}"]
    if r.get("skipped_iterations"):  # fp16 overflows, empty batches (the loss scale: metrics.jsonl)
        parts.append(f"skipped {r['skipped_iterations']}")
    ms = r["iteration_time_ms"]
    parts.append(f"{ms:.0f} ms/it" if ms < 10_000 else f"{ms / 1000:.1f} s/it")
    gpu = r.get("max_memory_reserved_gib") is not None
    if gpu and r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    elif gpu and r.get("tflops") is not None:
        parts.append(f"{r['tflops']:.0f} TFLOP/s")
    else:
        parts.append(f"{_si(r['tokens_per_s'])} tok/s")
    peak = r.get("max_memory_gib", r.get("memory_gib"))
    if peak is not None:
        parts.append(f"mem {_gib(peak)}/{_gib(r['max_memory_reserved_gib'])}G" if gpu else f"rss {_gib(peak)}G")
    remaining = train_iters - r["iteration"]
    if remaining > 0:
        parts.append(f"eta {duration(remaining * ms / 1000)}")
    return "  ".join(parts)


def _short_exp(value: float) -> str:
    """3.0e-4 (not 3.00e-04): two significant figures are what a learning rate needs."""
    if value == 0:
        return "0"
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def _gib(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def _si(value: float) -> str:
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:.0f}"


def format_megatron_line(r: dict[str, Any], train_iters: int) -> str:
    """A Megatron-like console line (`--log-format megatron`), for scripts that parse it."""
    parts = [
        f"iteration {r['iteration']:>8d}/{train_iters:>8d}",
        f"consumed samples: {r['consumed_samples']:>10d}",
        f"consumed tokens: {r['consumed_tokens']:>12d}",
        f"elapsed time per iteration (ms): {r['iteration_time_ms']:.1f}",
        f"learning rate: {r['lr']:.6E}",
        f"lm loss: {_fmt(r['loss'])}",
    ]
    if r.get("loss_scale") is not None and r["loss_scale"] != 1.0:
        parts.append(f"loss scale: {r['loss_scale']:.1f}")
    parts += [
        f"grad norm: {_fmt(r['grad_norm'], '.3f')}",
        f"skipped iterations: {r['skipped_iterations']}",
        f"tokens/s/device: {r['tokens_per_s_per_device']:.0f}",
    ]
    if r.get("tflops") is not None:
        parts.append(f"TFLOP/s/device: {r['tflops']:.1f}")
    if r.get("mfu") is not None:
        parts.append(f"MFU: {100 * r['mfu']:.1f}%")
    parts.append(f"mem: {r['memory_gib']:.2f} GiB")
    return " | ".join(parts)


def _fmt(value: float | None, spec: str = ".6E") -> str:
    if value is None:
        return "nan"
    return format(value, spec)



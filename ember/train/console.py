"""The console of a multi-process run: each warning once, on rank 0, with the ranks that raised it.

Every rank runs the same code, so a library warning used to come once per rank (16 copies of one
FSDP2 warning at 16 processes). Here each rank keeps its Python warnings and the `ember` loggers'
warnings; at each logged iteration the ranks compare notes (a one-number all-reduce, then an
all-gather only when some rank has something) and rank 0 prints each distinct text once:

    warning (all 4 ranks): UserWarning: ... (_fsdp_state.py:331)
    warning (rank 3): ...                     <- a fact of one rank, shown because it differs

A run that fails prints what its rank still holds, locally. Warnings that are understood and
harmless are silenced at the source (`SILENCED`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist

# (logger, text): log records from torch that are understood and harmless.
SILENCED = (
    # The gradient norm of parameters sharded over two mesh dimensions (FSDP's data-parallel shard
    # and TP, or EP) is a one-element DTensor that is _NormPartial on both; making it whole takes one
    # all-reduce per mesh dimension instead of one over both. Two one-number all-reduces per step:
    # nothing to act on.
    ("torch.distributed.tensor._redistribute", "This is suboptimal"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_understood_warnings() -> None:
    for name, text in SILENCED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


class _Capture(logging.Handler):
    def __init__(self, sink: RankWarnings):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.pending.append(record.getMessage())


class RankWarnings:
    """Holds this rank's warnings until `flush()` (collective: every rank calls it) prints them once."""

    def __init__(self, rank: int, world_size: int, emit=None):
        self.rank, self.world_size = rank, world_size
        self.emit = emit or (lambda text: print(text, file=sys.stderr, flush=True))
        self.pending: list[str] = []
        self._shown: set[tuple[str, tuple[int, ...]]] = set()
        self._handler = _Capture(self)
        self._previous_showwarning = None

    def install(self) -> RankWarnings:
        silence_understood_warnings()
        self._previous_showwarning = warnings.showwarning
        warnings.showwarning = self._warning
        logger = logging.getLogger("ember")
        logger.addHandler(self._handler)
        logger.propagate = False  # else Python's last-resort handler prints them too
        return self

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.pending.append(f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})")

    def flush(self) -> None:
        """Collective over the default process group: rank 0 prints every rank's new warnings once."""
        if not (dist.is_available() and dist.is_initialized()):
            self.print_local()
            return
        count = torch.tensor([len(self.pending)], dtype=torch.int64)
        dist.all_reduce(count, group=cpu_group())
        if count.item() == 0:
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.pending, group=cpu_group())
        self.pending = []
        if self.rank != 0:
            return
        ranks_of: dict[str, list[int]] = {}
        for rank, texts in enumerate(gathered):
            for text in dict.fromkeys(texts):
                ranks_of.setdefault(text, []).append(rank)
        for text, ranks in ranks_of.items():
            key = (text, tuple(ranks))
            if key not in self._shown:
                self._shown.add(key)
                self.emit(f"warning ({describe_ranks(ranks, self.world_size)}): {text}")

    def print_local(self) -> None:
        """Without the other ranks (a failing run, no process group): this rank's own, once each."""
        for text in dict.fromkeys(self.pending):
            print(f"warning (rank {self.rank}): {text}", file=sys.stderr, flush=True)
        self.pending = []

    def uninstall(self) -> None:
        if self._previous_showwarning is not None:
            warnings.showwarning = self._previous_showwarning
            self._previous_showwarning = None
        logger = logging.getLogger("ember")
        logger.removeHandler(self._handler)
        logger.propagate = True


def describe_ranks(ranks: list[int], world_size: int) -> str:
    if len(ranks) == world_size:
        return f"all {world_size} ranks"
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return "ranks " + ", ".join(map(str, ranks))


_CPU_GROUPS: dict = {}


def cpu_group():
    """A gloo group for a few bytes of host data (None: the default group has gloo already); the
    default group may be NCCL-only on GPUs. Collective the first time: every rank calls it."""
    backend = str(dist.get_backend())
    if "gloo" in backend:
        return None
    world = dist.group.WORLD
    if world not in _CPU_GROUPS:
        _CPU_GROUPS[world] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[world]

"""Peak bytes of live tensors on one process, as torch's CPU allocator counts them.

c10's CPU allocator keeps a count of the bytes it has handed out and not yet taken back when
`FLAGS_caffe2_report_cpu_memory_usage` is set (`count_cpu_allocations()` sets it, through ctypes:
torch has no Python switch for it), whichever thread allocates or frees — gloo's worker threads
free the buffers of collectives whose work they finish, which the profiler alone, being
per-thread, would miss. Every allocation and free on this thread under a profiler with
`profile_memory=True` (storage resizes included: FSDP2 frees and re-allocates its gathered
parameters that way) then reports that count, so the profile gives the live bytes at every
allocation, and their peak.

    count_cpu_allocations()  # once, before the tensors to follow are allocated
    with PeakMemory(live_bytes(modules, optimizer, batches)) as memory:
        trainer.train_step(batches)
    memory.peak, memory.end

`PeakMemory(start)` reports live bytes as `start` (the bytes live when the block begins, which
`live_bytes` counts: parameters, gradients, optimizer state, buffers, the step's batches, each
storage once) plus the allocator's change since then; `end` should then be `live_bytes` again at
the end, a check that the two agree.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch.profiler import ProfilerActivity, profile


def count_cpu_allocations() -> None:
    """Make the CPU allocator count live bytes on every thread, from now on."""
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    ctypes.c_bool.in_dll(library, "FLAGS_caffe2_report_cpu_memory_usage").value = True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor  # a DTensor's own piece


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def live_bytes(modules, optimizer=None, *others) -> int:
    """Bytes of the storages behind `modules`' parameters, gradients and buffers, `optimizer`'s
    state and any tensors in `others` (nested lists/dicts), each storage counted once."""
    tensors = []
    for module in modules:
        for param in module.parameters():
            tensors.append(param)
            if param.grad is not None:
                tensors.append(param.grad)
        tensors.extend(module.buffers())
    if optimizer is not None:
        tensors.extend(_tensors(list(optimizer.state.values())))
    tensors.extend(_tensors(list(others)))
    storages = {}
    for tensor in tensors:
        storage = _local(tensor).untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _allocations(nodes):
    for node in nodes:
        if node.name == "[memory]":
            yield node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated
        yield from _allocations(node.children)


class PeakMemory:
    """Live bytes under the block: `start` (given), `peak`, `end`; `events`: allocations and frees
    seen. Needs `count_cpu_allocations()` first."""

    _PROBE = 64  # bytes of the tensor whose allocation reads the count at the block's ends

    def __init__(self, start: int):
        self.start = start
        self.peak = self.end = start
        self.events = 0

    def __enter__(self) -> PeakMemory:
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.__enter__()
        torch.empty(self._PROBE, dtype=torch.uint8)
        return self

    def __exit__(self, *exc) -> None:
        torch.empty(self._PROBE, dtype=torch.uint8)
        self._profiler.__exit__(*exc)
        events = sorted(_allocations(self._profiler.profiler.kineto_results.experimental_event_tree()),
                        key=lambda e: e[0])
        # the probes' allocations and frees open and close the list: the count before the first
        # is the block's start, the count after the last its end
        base = events[0][2] - events[0][1]
        totals = [total for _, _, total in events[2:-2]]
        self.peak = self.start + max([base, *totals]) - base
        self.end = self.start + events[-1][2] - base
        self.events = len(events)

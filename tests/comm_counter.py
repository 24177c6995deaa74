"""Bytes each rank sends, counted at the dispatcher: every collective and point-to-point operation
of torch.distributed passes through a `c10d::` op (process-group calls: FSDP2, pipeline sends,
ember's own all-reduces) or a `_c10d_functional::` op (DTensor: tensor, sequence and context
parallelism), so a TorchDispatchMode sees all of them, whatever part of the code issued them.

Each op is charged what a ring algorithm makes one rank send (the convention `ember plan` states):
all-reduce 2(n-1)/n of the buffer, all-gather (n-1)/n of the output, reduce-scatter (n-1)/n of
the input, all-to-all what leaves the rank, send its buffer; receives cost nothing (their sender
pays). Bytes are filed under the kind of parallelism whose process group carried them.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# op name (without namespace) -> how a rank's sent bytes follow from (tensor bytes, group size)
_RING = {
    "allreduce_": lambda b, n: 2 * (n - 1) / n * b,
    "all_reduce": lambda b, n: 2 * (n - 1) / n * b,
    "all_reduce_coalesced": lambda b, n: 2 * (n - 1) / n * b,
    "_allgather_base_": lambda b, n: (n - 1) * b,  # b: this rank's input
    "all_gather_into_tensor": lambda b, n: (n - 1) * b,
    "allgather_": lambda b, n: (n - 1) * b,
    "_reduce_scatter_base_": lambda b, n: (n - 1) / n * b,  # b: the full input
    "reduce_scatter_tensor": lambda b, n: (n - 1) / n * b,
    "reduce_scatter_": lambda b, n: (n - 1) / n * b,
    "alltoall_base_": lambda b, n: (n - 1) / n * b,
    "all_to_all_single": lambda b, n: (n - 1) / n * b,
    "broadcast_": lambda b, n: (n - 1) / n * b,
    "broadcast": lambda b, n: (n - 1) / n * b,
    "send": lambda b, n: b,
}
# process-group ops whose first argument is the output, the second the input
_INPUT_SECOND = {"_allgather_base_", "allgather_", "_reduce_scatter_base_", "reduce_scatter_", "alltoall_base_"}
_FREE = {"recv_", "recv_any_source_", "barrier", "monitored_barrier", "wait_tensor", "_wrap_tensor_autograd",
         "recv"}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _group_name(args) -> str | None:
    for value in reversed(args):
        if isinstance(value, str):  # functional collectives name their group last
            return value
        if isinstance(value, torch.ScriptObject):
            try:
                return dist.ProcessGroup.unbox(value).group_name
            except (RuntimeError, TypeError):
                continue
    return None


def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _group_size(name: str) -> int:
    return dist.get_world_size(_group(name))


def _ranks(name: str) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(_group(name)))


class CommCounter(TorchDispatchMode):
    """`with CommCounter(meshes) as counter: ...`; then `counter.sent` = {kind: bytes} and
    `counter.calls` = {(kind, op): count}, for ember's ParallelMeshes (ember.parallel.mesh).

    Kinds: "dp" is gradient and parameter synchronisation (FSDP2's collectives and ember's own
    reductions over the data-parallel, context-parallel and expert-data-parallel ranks: process-group
    calls over those groups); "tp", "cp", "pp", "ep" are the model-parallel traffic (DTensor's
    functional collectives, pipeline sends, MoE all-to-alls). The two are told apart by the op as
    well as the group, because one set of ranks can serve both (with dp 1, FSDP's shard group is
    the cp group; with ep = dp, the ep group is the data-parallel group).
    """

    def __init__(self, meshes):
        super().__init__()
        self.data_groups = _names(meshes.fsdp, meshes.dp, meshes.loss, meshes.edp)
        self.model_groups: dict[str, str] = {}
        # by name, and by rank set for groups DeviceMesh made again for a sliced or joined mesh
        # (the expert mesh (ep, tp), a pipeline stage's tp mesh)
        self.model_ranks: dict[tuple[int, ...], str] = {}
        for mesh, kind in ((meshes.tp, "tp"), (meshes.cp, "cp"), (meshes.pp, "pp"), (meshes.ep, "ep")):
            for name in _names(mesh):
                self.model_groups.setdefault(name, kind)
                self.model_ranks.setdefault(_ranks(name), kind)
        self.sent: dict[str, float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.sent_by_op: dict[tuple[str, str], float] = defaultdict(float)

    def kind(self, op: str, group: str, functional: bool) -> str:
        model_kind = self.model_groups.get(group) or self.model_ranks.get(_ranks(group))
        if op in ("send", "alltoall_base_", "all_to_all_single"):
            return model_kind or "other"  # activations (pp) or routed tokens (ep)
        if not functional and group in self.data_groups:
            return "dp"
        return model_kind or ("dp" if group in self.data_groups else "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("c10d", "_c10d_functional"):
            op = func._opname
            if op not in _FREE:
                if op not in _RING:
                    raise AssertionError(f"CommCounter does not know how to charge {func}")
                group = _group_name(args)
                kind = self.kind(op, group, functional=func.namespace == "_c10d_functional")
                tensor = args[1] if op in _INPUT_SECOND else args[0]
                sent = _RING[op](_nbytes(tensor), _group_size(group))
                self.sent[kind] += sent
                self.sent_by_op[(kind, op)] += sent
                self.calls[(kind, op)] += 1
        return func(*args, **(kwargs or {}))


def _names(*meshes) -> set[str]:
    """The process-group names of every dimension of `meshes` (None entries skipped)."""
    return {mesh.get_group(dim).group_name for mesh in meshes if mesh is not None for dim in range(mesh.ndim)}

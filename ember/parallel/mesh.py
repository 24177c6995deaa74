"""The device meshes of a `Layout` (`ember.config.layout`, where every impossible layout is refused
in one line before any process group starts).

The world mesh has the dimensions, outermost first, pp, dp_replicate, dp_shard, cp, tp (tp
innermost, so tensor-parallel peers are neighbours: the same node). dp_replicate and dp_shard are
always there (possibly of size 1); pp, cp and tp only above 1.

Expert parallelism borrows its ranks from data and context parallelism, as Megatron does (its
expert groups are carved out of the data-parallel x context-parallel ranks): the dp x cp ranks
are viewed as (edp, ep), ep innermost. An expert's weights are sharded over `ep` (and over `tp`
when tensor parallelism is on: Megatron's expert tensor parallelism = tp), and data-parallel
over `edp`, the "expert data-parallel" ranks: with zero1 / fsdp FSDP2 shards them over edp
(`expert_fsdp`, torchtitan's efsdp; `ember.parallel.fsdp`), with replicate their gradients are
summed by hand (`ember.train.gradients`). FSDP2 composes its mesh with a DTensor parameter's only
when both are slices of one parent mesh: edp and ep come from one unflattening of the dp x cp
ranks, tp from the world mesh they were flattened from. Borrowing from dp x cp rather than from
dp_shard x cp alone (torchtitan) lets expert parallelism run with every data-parallel mode,
replicated ones too; an HSDP run (--dp-replicate) still shards the experts over all of edp.

Which mesh serves what:
- `dp`: the data loader's rank/size (tp, cp and pp peers read the same samples);
- `loss`: dp x cp flattened: sums of losses and loss-token counts (each cp rank holds a piece of
  every sequence);
- `fsdp`: (dp_replicate, dp_shard x cp): FSDP2 reduces gradients over data and context
  parallelism together (torchtitan's dp_shard_cp), since cp ranks' gradients are partial sums too;
- `tp`, `cp`, `pp`: the model-parallel pieces;
- `ep`, `expert` ((ep, tp), or ep), `edp`: expert parallelism; `expert_fsdp`: edp where FSDP
  shards the experts (zero1, fsdp; None under replicate or when edp is 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ember.config.layout import Layout

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
DP_DIMS = ("dp_replicate", "dp_shard")


def build_meshes(layout: Layout, device_type: str) -> ParallelMeshes:
    """The world mesh of `layout` and its named sub-meshes (see the module docstring)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    degrees = layout.mesh_degrees()
    names = [n for n in MESH_ORDER if degrees[n] > 1 or n in DP_DIMS]
    world = init_device_mesh(device_type, tuple(degrees[n] for n in names), mesh_dim_names=tuple(names))
    dp = world[DP_DIMS]._flatten("dp")
    data_dims = (*DP_DIMS, "cp") if layout.cp > 1 else DP_DIMS
    loss = world[data_dims]._flatten("dp_cp") if layout.cp > 1 else dp
    fsdp = None
    if layout.dp * layout.cp > 1:
        shard = world[("dp_shard", "cp")]._flatten("dp_shard_cp") if layout.cp > 1 else world["dp_shard"]
        fsdp = world[("dp_replicate", shard.mesh_dim_names[0])]
    meshes = ParallelMeshes(layout=layout, world=world, dp=dp, loss=loss, fsdp=fsdp,
                            tp=world["tp"] if layout.tp > 1 else None, cp=world["cp"] if layout.cp > 1 else None,
                            pp=world["pp"] if layout.pp > 1 else None)
    if layout.ep > 1:
        experts = loss._unflatten(0, (layout.dp * layout.cp // layout.ep, layout.ep), ("edp", "ep"))
        meshes.ep = experts["ep"]
        meshes.edp = experts["edp"] if layout.dp * layout.cp > layout.ep else None
        meshes.expert = DeviceMesh._concatenate([meshes.ep, meshes.tp]) if meshes.tp is not None else meshes.ep
        meshes.expert_fsdp = meshes.edp if layout.dp_mode != "replicate" else None
    return meshes


@dataclass
class ParallelMeshes:
    """The meshes of one run (see the module docstring); None where a degree is 1."""

    layout: Layout
    world: Any
    dp: Any
    loss: Any
    fsdp: Any = None
    tp: Any = None
    cp: Any = None
    pp: Any = None
    ep: Any = None
    edp: Any = None
    expert: Any = None
    expert_fsdp: Any = None


def default_device() -> torch.device:
    """The accelerator this process should use: cuda:LOCAL_RANK, npu:LOCAL_RANK, else the CPU."""
    import os

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    npu = getattr(torch, "npu", None)
    if npu is not None and npu.is_available():
        return torch.device("npu", local_rank % npu.device_count())
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")

"""The device layout: parallel degrees -> one named DeviceMesh.

`ParallelDims` checks that the degrees multiply to the world size and builds a mesh with named
dimensions, outermost first: pp, dp_replicate, dp_shard, cp, tp. The two data-parallel dimensions
are always there; the others only above degree 1, so a plain data-parallel run has a 2-D mesh.
Tensor, pipeline, context and expert parallelism are placeholders at degree 1 today; they plug in
here, as further named dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.config import Config
from ember.errors import EmberError

MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
DP_DIMS = ("dp_replicate", "dp_shard")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "dp_shard", "tp", "pp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise EmberError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")
        product = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise EmberError(
                f"parallel degrees pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard "
                f"{self.dp_shard} x cp {self.cp} x tp {self.tp} = {product}, but there are "
                f"{self.world_size} processes")
        if self.ep > 1 and (self.dp_shard * self.cp) % self.ep:
            raise EmberError(f"expert parallel {self.ep} must divide dp_shard x cp = {self.dp_shard * self.cp}")

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> ParallelDims:
        p = config.parallel
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        if world_size % model_parallel:
            raise EmberError(f"{world_size} processes do not divide into model-parallel groups of {model_parallel}")
        dp = world_size // model_parallel
        if p.dp_mode == "replicate":
            replicate, shard = dp, 1
        else:
            if dp % p.dp_replicate:
                raise EmberError(f"--dp-replicate {p.dp_replicate} does not divide data-parallel size {dp}")
            replicate, shard = p.dp_replicate, dp // p.dp_replicate
        return cls(dp_replicate=replicate, dp_shard=shard, world_size=world_size,
                   tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                   cp=p.context_parallel_size, ep=p.expert_model_parallel_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "cp": self.cp, "tp": self.tp}

    def build_mesh(self, device_type: str):
        """(world mesh, flattened data-parallel mesh).

        dp_replicate and dp_shard are always dimensions of the world mesh (even at size 1), so data
        parallelism is always FSDP2 over the 2-D (dp_replicate, dp_shard) sub-mesh: HSDP, which is
        pure replication when dp_shard is 1 and pure sharding when dp_replicate is 1. The other
        dimensions appear when above 1. The flattened "dp" mesh is what the data loader and the
        loss reductions use.
        """
        from torch.distributed.device_mesh import init_device_mesh

        degrees = self.degrees()
        names = [n for n in MESH_ORDER if degrees[n] > 1 or n in DP_DIMS]
        shape = [degrees[n] for n in names]
        mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
        return mesh, mesh[DP_DIMS]._flatten("dp")

    @staticmethod
    def dp_mesh(mesh):
        """The 2-D (dp_replicate, dp_shard) sub-mesh FSDP works on."""
        return mesh[DP_DIMS]


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

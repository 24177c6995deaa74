"""The device layout: parallel degrees -> named DeviceMeshes, with every impossible layout refused
in one line before any process group starts.

The world mesh has the dimensions, outermost first, pp, dp_replicate, dp_shard, cp, tp (tp
innermost, so tensor-parallel peers are neighbours: the same node). dp_replicate and dp_shard are
always there (possibly of size 1); pp, cp and tp only above 1.

Expert parallelism borrows its ranks from data and context parallelism, as Megatron does (its
expert groups are carved out of the data-parallel x context-parallel ranks): the dp x cp ranks
are viewed as (edp, ep), ep innermost. An expert's weights are sharded over `ep` (and over `tp`
when tensor parallelism is on: Megatron's expert tensor parallelism = tp), and replicated over
`edp`, the "expert data-parallel" ranks, whose gradients are summed by hand (see
`ember.parallel.gradients`). Borrowing from dp x cp rather than from dp_shard x cp alone
(torchtitan) lets expert parallelism run with every data-parallel mode, replicated ones too.

Which mesh serves what:
- `dp`: the data loader's rank/size (tp, cp and pp peers read the same samples);
- `loss`: dp x cp flattened: sums of losses and loss-token counts (each cp rank holds a piece of
  every sequence);
- `fsdp`: (dp_replicate, dp_shard x cp): FSDP2 reduces gradients over data and context
  parallelism together (torchtitan's dp_shard_cp), since cp ranks' gradients are partial sums too;
- `tp`, `cp`, `pp`: the model-parallel pieces;
- `ep`, `expert` ((ep, tp), or ep), `edp`: expert parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ember.config import Config, pipeline_schedule_name
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
    sequence_parallel: bool = False

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
        if (self.dp * self.cp) % self.ep:
            raise EmberError(f"expert parallel size {self.ep} must divide data-parallel x context-parallel size "
                             f"{self.dp * self.cp}; change --expert-model-parallel-size or the process count")

    @classmethod
    def from_config(cls, config: Config, world_size: int) -> ParallelDims:
        p = config.parallel
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        if world_size % model_parallel:
            raise EmberError(f"{world_size} processes do not divide into model-parallel groups of {model_parallel} "
                             f"(tensor x pipeline x context parallel)")
        dp = world_size // model_parallel
        if p.dp_mode == "replicate":
            replicate, shard = dp, 1
        else:
            if dp % p.dp_replicate:
                raise EmberError(f"--dp-replicate {p.dp_replicate} does not divide data-parallel size {dp}")
            replicate, shard = p.dp_replicate, dp // p.dp_replicate
        tp = p.tensor_model_parallel_size
        return cls(dp_replicate=replicate, dp_shard=shard, world_size=world_size, tp=tp,
                   pp=p.pipeline_model_parallel_size, cp=p.context_parallel_size, ep=p.expert_model_parallel_size,
                   # Megatron turns sequence parallelism off without tensor parallelism; so does ember
                   sequence_parallel=p.sequence_parallel and tp > 1)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def grad_average_size(self) -> int:
        """How many ranks FSDP averages gradients over (dp x cp); 1 without FSDP."""
        return self.dp * self.cp

    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "cp": self.cp, "tp": self.tp}

    def describe(self) -> str:
        parts = [f"dp {self.dp}"]
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) > 1:
                parts.append(f"{name} {getattr(self, name)}")
        if self.sequence_parallel:
            parts.append("sp")
        return ", ".join(parts)

    # ------------------------------------------------------------------ checks against the model

    def check_model(self, args, config: Config) -> None:
        """Refuse, in one line, what this model cannot be split into (heads or experts by the
        degrees, layers by the pipeline stages, the sequence by tp/cp, micro-batches by the
        schedule). Runs before any process group exists."""
        p, t = config.parallel, config.train
        seq = config.data.seq_length
        if self.tp > 1:
            from ember.parallel.tensor import check_tensor_parallel

            check_tensor_parallel(args, self.tp, self.sequence_parallel, seq // self.cp)
        if self.cp > 1:
            from ember.parallel.context import check_context_parallel

            check_context_parallel(args, self.cp, seq, load_balance=True)
        if self.ep > 1:
            if not args.num_experts:
                raise EmberError(f"--expert-model-parallel-size {self.ep} needs a mixture-of-experts model; "
                                 f"this one has no experts")
            if args.num_experts % self.ep:
                raise EmberError(f"expert parallel size {self.ep} does not divide num_experts {args.num_experts}; "
                                 f"choose --expert-model-parallel-size among the divisors of the expert count")
        if self.pp > 1:
            from ember.parallel.pipeline import check_schedule, split_layers, virtual_stages_per_rank

            virtual = virtual_stages_per_rank(args.n_layers, self.pp, p.num_layers_per_virtual_pipeline_stage)
            split_layers(args.n_layers, self.pp * virtual, p.decoder_first_pipeline_num_layers,
                         p.decoder_last_pipeline_num_layers)
            micro_batches = t.global_batch_size // (t.micro_batch_size * self.dp)
            check_schedule(pipeline_schedule_name(p), micro_batches, self.pp, virtual)

    # ------------------------------------------------------------------ meshes

    def build_meshes(self, device_type: str) -> ParallelMeshes:
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        degrees = self.degrees()
        names = [n for n in MESH_ORDER if degrees[n] > 1 or n in DP_DIMS]
        world = init_device_mesh(device_type, tuple(degrees[n] for n in names), mesh_dim_names=tuple(names))
        dp = world[DP_DIMS]._flatten("dp")
        data_dims = (*DP_DIMS, "cp") if self.cp > 1 else DP_DIMS
        loss = world[data_dims]._flatten("dp_cp") if self.cp > 1 else dp
        fsdp = None
        if self.dp * self.cp > 1:
            shard = world[("dp_shard", "cp")]._flatten("dp_shard_cp") if self.cp > 1 else world["dp_shard"]
            fsdp = world[("dp_replicate", shard.mesh_dim_names[0])]
        meshes = ParallelMeshes(dims=self, world=world, dp=dp, loss=loss, fsdp=fsdp,
                                tp=world["tp"] if self.tp > 1 else None, cp=world["cp"] if self.cp > 1 else None,
                                pp=world["pp"] if self.pp > 1 else None)
        if self.ep > 1:
            experts = loss._unflatten(0, (self.dp * self.cp // self.ep, self.ep), ("edp", "ep"))
            meshes.ep = experts["ep"]
            meshes.edp = experts["edp"] if self.dp * self.cp > self.ep else None
            meshes.expert = DeviceMesh._concatenate([meshes.ep, meshes.tp]) if meshes.tp is not None else meshes.ep
        return meshes


@dataclass
class ParallelMeshes:
    """The meshes of one run (see the module docstring); None where a degree is 1."""

    dims: ParallelDims
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

"""Expert parallelism: each rank of an EP group holds num_experts / ep of every MoE block's experts,
and tokens travel to their experts' rank and back with two all-to-alls.

Applied from outside to a plain `Transformer` (torchtitan style), through the MoE block's public
extension points: `apply_expert_parallel` turns the stacked expert weights [E, ...] into DTensors
sharded on dim 0 over the EP mesh (so DCP can reshard them between layouts), points the experts'
`local_weight` at this rank's part, and sets each block's `dispatcher` to an
`ExpertParallelDispatch`. Router, shared experts and everything else stay replicated.

Semantics, chosen to match Megatron-LM and a single-process run of the same micro-batch:
- Routing is per rank: every rank routes its own tokens with the replicated router.
- Capacity (`moe_capacity_factor`) is computed from the rank's own token count and tokens over it
  are dropped on the rank before dispatch, with the same `MoE.sort_assignments` (and drop
  policy) the local dispatch uses for that micro-batch in one process. Dropless routing (capacity None) sends every
  assignment.
- The load-balancing loss is the one `MoE.forward` computes on the rank's tokens (Megatron's
  "aux_loss": per micro-batch per data-parallel rank; the trainer averages it like the LM loss).
  Under sequence parallelism the MoE block gathers whole sequences first (ember.parallel.tensor);
  under context parallelism the counts are summed over the cp ranks (ember.parallel.context), as
  Megatron sums them over its TP x CP group.

Gradients: an expert's gradient on its owner is the sum over the EP group of every rank's loss
gradient (the all-to-all backward brings them home). It is then summed over the expert
data-parallel ranks (those holding the same experts) and divided by the dp x cp size FSDP averages
every other gradient over: under zero1 / fsdp by FSDP2 itself, each block's experts being an FSDP
unit over those ranks (`ember.parallel.fsdp`, which also shards their AdamW state there); under
replicate by the trainer (`ember.train.gradients.reduce_expert_grads`).

With tensor parallelism (TP x EP): every expert's ffn dim is also split over the tp ranks
(Megatron's expert tensor parallelism equal to tp), so the weights are 2-D DTensors on the
(ep, tp) mesh, [Shard(0), Shard(ffn dim)]. The tp ranks of one ep group hold the same tokens
(routing sees whole sequences) and exchange them with their own ep peers; the experts' forward
hooks that tensor parallelism installed all-reduce each expert's output over tp before it goes
back (Megatron's f/g operators around the experts), so the router and its weights get whole
numbers.

All-to-all runs on NCCL, HCCL and gloo (gloo supports uneven `all_to_all_single` on CPU in torch
2.13), so the same code path is tested on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ember.errors import EmberError
from ember.models.moe import GroupedExperts, MoE
from ember.parallel.dtensor import local_part

EXPERT_WEIGHTS = ("w1", "w2", "w3")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward sends gradients back along the same routes
    (splits swapped). Written here rather than taken from torch.distributed.nn, which is
    deprecated, and the functional-collectives version needs a traced/async runtime."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(input_splits[:r]) : ...] go to rank r; rows from rank r arrive in output_splits[r]."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class ExpertParallelDispatch:
    """`MoE.dispatcher` on an EP group: same inputs, same output as `LocalDispatch`, with this
    rank's experts fed the assignments of every rank of the group."""

    def __init__(self, group, ep_size: int):
        self.group = group
        self.ep_size = ep_size

    def __call__(self, moe: MoE, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        order, counts = moe.sort_assignments(experts, weights)

        # Each rank learns how many rows every peer sends to each of its local experts.
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        received_counts = received_counts.view(self.ep_size, -1)  # [source, local expert]
        # all_to_all_single takes its splits as host integers (NCCL's API needs the sizes before
        # it launches), so this path reads the counts on the host once per block; the local
        # dispatch does not. Assignments past capacity (after sum(input_splits)) stay home.
        input_splits = counts.view(self.ep_size, -1).sum(1).tolist()
        output_splits = received_counts.sum(1).tolist()
        order = order[: sum(input_splits)]
        token_of = order // moe.top_k

        received = all_to_all(tokens[token_of], output_splits, input_splits, self.group)
        expert_out = self._run_local_experts(moe.experts, received, received_counts)
        returned = all_to_all(expert_out, input_splits, output_splits, self.group)

        combined = returned * weights.reshape(-1)[order][:, None]
        return torch.zeros_like(tokens).index_add_(0, token_of, combined)

    def _run_local_experts(self, experts: GroupedExperts, received: torch.Tensor,
                           received_counts: torch.Tensor) -> torch.Tensor:
        """Rows arrive grouped by source rank, then expert; regroup by expert for the experts'
        grouped GEMM, then restore the arrival order for the return trip."""
        num_local = received_counts.shape[1]
        local_ids = torch.arange(num_local, device=received.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_ids, received_counts.reshape(-1))
        by_expert = torch.argsort(row_expert, stable=True)
        grouped_out = experts(received[by_expert], received_counts.sum(0))
        return grouped_out[torch.argsort(by_expert)]


def moe_blocks(model: nn.Module) -> list[MoE]:
    return [module for module in model.modules() if isinstance(module, MoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh, expert_mesh=None) -> None:
    """Shard every MoE block's experts over the 1-D DeviceMesh `ep_mesh` and route tokens to
    them with all-to-all. In place; a model without MoE blocks is left alone.

    After tensor parallelism (experts already DTensors sharded over tp on their ffn dim), pass
    `expert_mesh`, the 2-D (ep, tp) mesh: the weights become [Shard(0), Shard(ffn)] on it."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if ep_mesh.ndim != 1:
        raise EmberError(f"expert parallelism needs a 1-D mesh, got {ep_mesh.ndim} dimensions {ep_mesh.mesh_dim_names}")
    ep_size, ep_rank = ep_mesh.size(), ep_mesh.get_local_rank()
    blocks = moe_blocks(model)
    for moe in blocks:
        if moe.num_experts % ep_size:
            raise EmberError(
                f"expert parallel size {ep_size} does not divide num_experts {moe.num_experts}; "
                "choose --expert-model-parallel-size among the divisors of the expert count"
            )
    if ep_size == 1:
        return
    group = ep_mesh.get_group()
    for moe in blocks:
        for name in EXPERT_WEIGHTS:
            weight = getattr(moe.experts, name)
            if weight is None:
                continue
            if isinstance(weight, DTensor):  # tensor-parallel already: add the ep dimension
                if expert_mesh is None or expert_mesh.ndim != 2:
                    raise EmberError("expert parallelism after tensor parallelism needs the 2-D (ep, tp) mesh")
                local = weight.to_local()
                chunk = local.shape[0] // ep_size
                local = local.narrow(0, ep_rank * chunk, chunk)
                sharded = DTensor.from_local(local, expert_mesh, [Shard(0), *weight.placements], run_check=False)
            else:
                # src_data_rank=None: every rank keeps its own chunk (all ranks built the same
                # model from the same seed, or will load a checkpoint), no broadcast needed.
                sharded = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(moe.experts, name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        moe.experts.local_weight = local_part
        moe.dispatcher = ExpertParallelDispatch(group, ep_size)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters sharded by expert parallelism (the stacked expert weights)."""
    params = []
    for moe in moe_blocks(model):
        params.extend(p for p in (getattr(moe.experts, n) for n in EXPERT_WEIGHTS) if p is not None)
    return params

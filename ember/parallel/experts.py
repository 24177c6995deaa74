"""Expert parallelism: each rank of an EP group holds num_experts / ep of every MoE block's experts,
and tokens travel to their experts' rank and back with two all-to-alls.

Applied from outside to a plain `Transformer` (torchtitan style): `apply_expert_parallel` turns the
stacked expert weights [E, ...] into DTensors sharded on dim 0 over the EP mesh (so DCP can reshard
them between layouts) and swaps each MoE block's `_dispatch` for `ExpertParallelDispatch`. Router,
shared experts and everything else stay replicated.

Semantics, chosen to match Megatron-LM and a single-process run of the same micro-batch:
- Routing is per rank: every rank routes its own tokens with the replicated router.
- Capacity (`moe_capacity_factor`) is computed from the rank's own token count and tokens over it
  are dropped on the rank before dispatch, exactly as `MoE._dispatch` drops them for that
  micro-batch in one process. Dropless routing (capacity None) sends every assignment.
- The load-balancing loss is the one `MoE.forward` computes on the rank's tokens (Megatron's
  "aux_loss": per micro-batch per data-parallel rank; the trainer averages it like the LM loss).
  Under sequence parallelism the MoE block gathers whole sequences first (ember.parallel.tensor);
  under context parallelism the counts are summed over the cp ranks (ember.parallel.context), as
  Megatron sums them over its TP x CP group.

Gradients: an expert's gradient on its owner is the sum over the EP group of every rank's loss
gradient (the all-to-all backward brings them home). If the trainer averages the loss over D
data-parallel ranks that include the EP group, expert gradients must be divided by D (not by the
D / ep ranks that replicate an expert): FSDP's `gradient_divide_factor` or `scale_expert_grads`.

With tensor parallelism (TP x EP): every expert's ffn dim is also split over the tp ranks
(Megatron's expert tensor parallelism equal to tp), so the weights are 2-D DTensors on the
(ep, tp) mesh, [Shard(0), Shard(ffn dim)]. The tp ranks of one ep group hold the same tokens
(routing sees whole sequences), exchange them with their own ep peers, and all-reduce each
expert's output over tp before it goes back (Megatron's f/g operators around the experts), so
the router and its weights get whole numbers.

All-to-all runs on NCCL, HCCL and gloo (gloo supports uneven `all_to_all_single` on CPU in torch
2.13), so the same code path is tested on CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ember.errors import EmberError
from ember.models.moe import MoE

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


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums the gradient over tp (each tp rank's experts saw the
    same tokens through their own slice of the ffn dim)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Sum over tp forward (partial expert outputs -> whole ones); identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Rows x[sum(input_splits[:r]) : ...] go to rank r; rows from rank r arrive in output_splits[r]."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ExpertParallelDispatch:
    """Replacement for `MoE._dispatch` on an EP group: same inputs, same output.

    tokens [N, dim], experts [N, k] (global expert ids), weights [N, k] -> combined output [N, dim].
    """

    def __init__(self, moe: MoE, group, ep_size: int, ep_rank: int, tp_group=None):
        self.moe = moe
        self.group = group
        self.tp_group = tp_group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local = moe.num_experts // ep_size

    def __call__(self, tokens: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        moe, top_k = self.moe, self.moe.top_k
        # Same order as MoE._dispatch (stable sort of the flattened assignments by expert), so
        # capacity drops the same assignments as the single-process block.
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=moe.num_experts)
        capacity = moe._capacity(tokens.shape[0])
        if capacity is not None:
            starts = torch.cumsum(counts, 0) - counts
            position = torch.arange(order.numel(), device=order.device) - starts[flat_experts[order]]
            order = order[position < capacity]
            counts = counts.clamp(max=capacity)
        token_of = order // top_k

        # Each rank learns how many rows every peer sends to each of its local experts.
        received_counts = torch.empty_like(counts)
        dist.all_to_all_single(received_counts, counts, group=self.group)
        received_counts = received_counts.view(self.ep_size, self.num_local)  # [source, local expert]
        input_splits = counts.view(self.ep_size, self.num_local).sum(1).tolist()
        output_splits = received_counts.sum(1).tolist()

        received = all_to_all(tokens[token_of], output_splits, input_splits, self.group)
        expert_out = self._run_local_experts(received, received_counts)
        returned = all_to_all(expert_out, input_splits, output_splits, self.group)

        combined = returned * weights.reshape(-1)[order][:, None]
        return torch.zeros_like(tokens).index_add_(0, token_of, combined)

    def _run_local_experts(self, received: torch.Tensor, received_counts: torch.Tensor) -> torch.Tensor:
        """Rows arrive grouped by source rank, then expert; regroup by expert for one matmul per
        expert, then restore the arrival order for the return trip."""
        local_ids = torch.arange(self.num_local, device=received.device).repeat(self.ep_size)
        row_expert = torch.repeat_interleave(local_ids, received_counts.reshape(-1))
        by_expert = torch.argsort(row_expert, stable=True)
        grouped = received[by_expert]
        if self.tp_group is not None:
            grouped = _CopyToTensorParallel.apply(grouped, self.tp_group)
        per_expert = received_counts.sum(0).tolist()
        experts = self.moe.experts
        w1, w2 = _local(experts.w1), _local(experts.w2)
        w3 = _local(experts.w3) if experts.w3 is not None else None
        outputs, start = [], 0
        for expert, count in enumerate(per_expert):
            # Empty slices still run: every local expert weight stays in the graph, so its
            # gradient is a zero tensor rather than None when no token picked it.
            x = grouped[start : start + count]
            hidden = experts.act(F.linear(x, w1[expert]))
            if w3 is not None:
                hidden = hidden * F.linear(x, w3[expert])
            outputs.append(F.linear(hidden, w2[expert]))
            start += count
        grouped_out = torch.cat(outputs)
        if self.tp_group is not None:
            grouped_out = _ReduceFromTensorParallel.apply(grouped_out, self.tp_group)
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
    tp_group = None
    for moe in blocks:
        for name in EXPERT_WEIGHTS:
            weight = getattr(moe.experts, name)
            if weight is None:
                continue
            if isinstance(weight, DTensor):  # tensor-parallel already: add the ep dimension
                if expert_mesh is None or expert_mesh.ndim != 2:
                    raise EmberError("expert parallelism after tensor parallelism needs the 2-D (ep, tp) mesh")
                tp_group = expert_mesh.get_group(1)
                local = weight.to_local()
                chunk = local.shape[0] // ep_size
                local = local.narrow(0, ep_rank * chunk, chunk)
                sharded = DTensor.from_local(local, expert_mesh, [Shard(0), *weight.placements], run_check=False)
            else:
                # src_data_rank=None: every rank keeps its own chunk (all ranks built the same
                # model from the same seed, or will load a checkpoint), no broadcast needed.
                sharded = distribute_tensor(weight.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(moe.experts, name, nn.Parameter(sharded, requires_grad=weight.requires_grad))
        moe._dispatch = ExpertParallelDispatch(moe, group, ep_size, ep_rank, tp_group)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters sharded by expert parallelism (the stacked expert weights)."""
    params = []
    for moe in moe_blocks(model):
        params.extend(p for p in (getattr(moe.experts, n) for n in EXPERT_WEIGHTS) if p is not None)
    return params


@torch.no_grad()
def scale_expert_grads(model: nn.Module, factor: float) -> None:
    """Multiply expert gradients by `factor` (e.g. 1 / ep when the loss is averaged over an EP
    group whose other parameters are averaged by an all-reduce)."""
    for param in expert_parameters(model):
        if param.grad is not None:
            param.grad.mul_(factor)

"""Data parallelism with FSDP2 (`fully_shard`) on the (dp_replicate, dp_shard) mesh.

One mechanism gives all three modes, on NCCL, HCCL and gloo alike:

- replicate: mesh (dp, 1). Nothing is sharded; gradients are all-reduced (DDP).
- zero1:     mesh (r, dp/r), parameters kept gathered between forward and backward
             (`reshard_after_forward=False`): gradients are reduce-scattered and the optimizer
             steps on shards, so optimizer state lives once per shard group (Megatron's distributed
             optimizer, with sharded gradients too).
- fsdp:      mesh (r, dp/r), parameters re-sharded after each layer's forward (ZeRO-3).

Blocks are wrapped one by one when communication should overlap computation: each block's
gradient reduce-scatter runs while the backward pass goes on (`--overlap-grad-reduce`), and each
block's parameter all-gather is prefetched while the block before it computes
(`--overlap-param-gather`; always for fsdp, whose per-block all-gathers need it). Otherwise the
whole model is one group, gathered before the forward pass and reduced once the backward pass has
finished: the fewest, largest collectives.

With context parallelism the shard dimension spans dp_shard x cp (see `ember.parallel.mesh`).

Expert-parallel weights (DTensors sharded over ep, and tp) are held by other ranks than the dense
ones: their data-parallel peers are the expert data-parallel ranks (`edp`, the dp x cp ranks with
the same experts). Under zero1 and fsdp each MoE block's experts are their own FSDP unit over the
`edp` mesh (torchtitan's `efsdp`), so their AdamW state (and, for fsdp, the weights between
uses) is sharded there too; FSDP2 composes the two because `edp` and the experts' (ep, tp) mesh
are slices of one parent mesh. Their gradients are summed over edp and divided by dp x cp, what
the dense gradients are averaged over (the loss is scaled by dp x cp and the all-to-all backward
already summed the ep peers). Under replicate, and where edp is 1, they stay out of FSDP and the
trainer reduces them (`ember.train.gradients.reduce_expert_grads`).
"""

from __future__ import annotations

from torch import nn


def apply_data_parallel(model: nn.Module, fsdp_mesh, mode: str, overlap: bool,
                        ignored_params: set[nn.Parameter] | None = None,
                        experts: list[nn.Module] | None = None, expert_mesh=None,
                        grad_average_size: int = 1) -> None:
    """Wrap `model` (which has `model.layers`) in place for data parallelism over the 2-D
    (replicate, shard) `fsdp_mesh`.

    `overlap`: wrap block by block (see the module docstring).
    `ignored_params` (expert-parallel weights, sharded over ranks that FSDP also spans) are left
    to the caller, who reduces their gradients over the expert data-parallel ranks.
    `experts`: the MoE blocks' expert modules to shard over the 1-D `expert_mesh` (edp) instead,
    their gradients divided by `grad_average_size` (dp x cp; see the module docstring).
    """
    from torch.distributed.fsdp import fully_shard

    reshard = mode == "fsdp"
    for module in experts or ():  # children first: the blocks and the root then skip these weights
        fully_shard(module, mesh=expert_mesh, reshard_after_forward=reshard)
        # a sum over edp, then / dp x cp; sum-only collectives (gloo has no pre-multiplied sum)
        module.set_force_sum_reduction_for_comms(True)
        module.set_gradient_divide_factor(float(grad_average_size))
    if mode == "fsdp" or overlap:
        for block in model.layers.values():
            fully_shard(block, mesh=fsdp_mesh, reshard_after_forward=reshard, ignored_params=ignored_params)
    # The root group holds what no block owns: embeddings, final norm, output layer.
    fully_shard(model, mesh=fsdp_mesh, reshard_after_forward=reshard, ignored_params=ignored_params)


def prepare_backward(model: nn.Module, mode: str, last_micro_batch: bool) -> None:
    """Before each micro-batch's backward: whether FSDP reduces gradients and re-shards the
    parameters after it.

    replicate and zero1 reduce once per step, on the last micro-batch (earlier ones accumulate
    full-size gradients locally, which these modes hold anyway), and zero1's parameters stay
    gathered until then too: one all-gather and one reduce-scatter per step, as Megatron's
    distributed optimizer does, instead of an all-gather per micro-batch. fsdp reduce-scatters and
    re-shards after every micro-batch: keeping memory sharded is its point.
    """
    once_per_step = mode in ("replicate", "zero1")
    finish = last_micro_batch or not once_per_step
    for setter in ("set_requires_gradient_sync", "set_reshard_after_backward"):
        method = getattr(model, setter, None)  # absent without data parallelism
        if method is not None:
            method(finish)

"""Data parallelism with FSDP2 (`fully_shard`) on the (dp_replicate, dp_shard) mesh.

One mechanism gives all three modes, on NCCL, HCCL and gloo alike:

- replicate: mesh (dp, 1). Nothing is sharded; gradients are all-reduced (DDP).
- zero1:     mesh (r, dp/r), parameters kept gathered between forward and backward
             (`reshard_after_forward=False`): gradients are reduce-scattered and the optimizer
             steps on shards, so optimizer state lives once per shard group (Megatron's distributed
             optimizer, with sharded gradients too).
- fsdp:      mesh (r, dp/r), parameters re-sharded after each layer's forward (ZeRO-3).

Blocks are wrapped one by one when their gradient reduction should overlap the backward pass
(`--overlap-grad-reduce`, and always for fsdp, whose per-block all-gathers need it); otherwise the
whole model is one group, reduced once the backward pass has finished.

With context parallelism the shard dimension spans dp_shard x cp (see `ember.parallel.mesh`).
"""

from __future__ import annotations

from torch import nn


def apply_data_parallel(model: nn.Module, fsdp_mesh, mode: str, overlap_grad_reduce: bool,
                        ignored_params: set[nn.Parameter] | None = None) -> None:
    """Wrap `model` (which has `model.layers`) in place for data parallelism over the 2-D
    (replicate, shard) `fsdp_mesh`.

    `ignored_params` (expert-parallel weights, sharded over ranks that FSDP also spans) are left
    to the caller, who reduces their gradients over the expert data-parallel ranks.
    """
    from torch.distributed.fsdp import fully_shard

    reshard = mode == "fsdp"
    if mode == "fsdp" or overlap_grad_reduce:
        for block in model.layers.values():
            fully_shard(block, mesh=fsdp_mesh, reshard_after_forward=reshard, ignored_params=ignored_params)
    # The root group holds what no block owns: embeddings, final norm, output layer.
    fully_shard(model, mesh=fsdp_mesh, reshard_after_forward=reshard, ignored_params=ignored_params)


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction on or off for the next backward (off: accumulate locally)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def accumulates_locally(mode: str) -> bool:
    """Whether micro-batches before the last skip gradient reduction.

    Replicated and ZeRO-1 gradients are full-size anyway, so reducing once per step saves
    communication; fully sharded runs reduce every micro-batch to keep gradients sharded.
    """
    return mode in ("replicate", "zero1")

"""Tensors that may be DTensors, handled the same way by every layout: the local shard, the type
test, and a gradient made whole (its parameter's placements) before anything reads it."""

from __future__ import annotations

import torch


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharded parameter or gradient), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (duck-typed: it carries a device mesh and placements)."""
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


@torch.no_grad()
def make_grad_whole(param: torch.Tensor) -> None:
    """Redistribute a DTensor parameter's gradient to the parameter's own placements, e.g. the
    `Partial` gradient of a replicated weight under sequence parallelism becomes `Replicate`."""
    grad = param.grad
    if grad is not None and is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
        param.grad = grad.redistribute(param.device_mesh, param.placements)

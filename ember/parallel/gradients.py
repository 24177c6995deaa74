"""Gradients across a parallel layout: finishing them, their global norm, the clipped step.

After the backward pass a layout leaves gradients in several forms:
- FSDP-managed parameters: DTensors already reduced (averaged) over dp x cp;
- tensor-parallel parameters without FSDP: DTensors, possibly `Partial` over tp (norm weights
  under sequence parallelism, Qwen3's q/k norms) — made whole here, once, before anything reads them;
- expert-parallel weights (left out of FSDP): the all-to-all backward has summed every ep peer's
  contribution; they still need summing over the expert data-parallel ranks (`edp`) and the
  same 1/(dp x cp) that FSDP applies to everything else (Megatron scales expert gradients alike);
- pipeline stages: disjoint parameters per pp rank.

The global norm is the L2 norm over the whole model, counting each parameter once: per group of
gradients living on one mesh, torch computes the norm and DTensor reduces it over that mesh's
shards (replicas are not double-counted); the groups' squares add up, and so do the stages'.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ember.train import optim
from ember.train.optim import StepOutcome


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


@torch.no_grad()
def make_partial_grads_whole(params: Iterable[nn.Parameter]) -> None:
    """Redistribute DTensor gradients to their parameter's placements (Partial -> Replicate)."""
    for param in params:
        grad = param.grad
        if grad is not None and _is_dtensor(grad) and tuple(grad.placements) != tuple(param.placements):
            param.grad = grad.redistribute(param.device_mesh, param.placements)


@torch.no_grad()
def reduce_expert_grads(expert_params: Iterable[nn.Parameter], edp_group, average_over: int) -> None:
    """Sum expert gradients over the expert data-parallel ranks and divide by `average_over`
    (the dp x cp size FSDP averages the other gradients over)."""
    for param in expert_params:
        if param.grad is None:
            continue
        local = _local(param.grad)
        if edp_group is not None:
            dist.all_reduce(local, group=edp_group)
        if average_over != 1:
            local.div_(average_over)


def global_grad_norm(params: Iterable[nn.Parameter], pp_group=None) -> torch.Tensor:
    """The L2 norm of the gradients of `params` over the whole model (see the module docstring).
    `params` must list each parameter this rank holds once (a tied copy left out)."""
    groups: dict[object, list[torch.Tensor]] = {}
    device = None
    for param in params:
        if param.grad is not None:
            groups.setdefault(param.grad.device_mesh if _is_dtensor(param.grad) else None, []).append(param.grad)
            device = _local(param.grad).device
    if len(groups) == 1 and pp_group is None:  # one mesh: the norm as is, no square and root
        norm = torch.nn.utils.get_total_norm(next(iter(groups.values())), norm_type=2.0, foreach=True)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares = squares + norm.float() ** 2
    if pp_group is not None:
        dist.all_reduce(squares, group=pp_group)
    return squares.sqrt()


def split_param_groups_by_mesh(optimizer: torch.optim.Optimizer) -> None:
    """One parameter group per (group, mesh): the fused and foreach optimizer kernels take one
    group's tensors in a single call, which DTensor runs only when they share a mesh (expert
    weights live on the ep mesh, the rest on the FSDP / tp mesh). Call before the first step."""
    groups = []
    for group in optimizer.param_groups:
        by_mesh: dict[object, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_mesh.setdefault(param.device_mesh if _is_dtensor(param) else None, []).append(param)
        groups.extend({**group, "params": members} for members in by_mesh.values())
    optimizer.param_groups = groups


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float, loss_scale: torch.Tensor,
                  norm_params: list[nn.Parameter], pp_group=None) -> StepOutcome:
    """`ember.train.optim.clip_and_step` for any layout: the clipping norm is the global norm of
    `norm_params`' gradients over meshes and pipeline stages; the gradients of every parameter the
    optimizer holds (tied copies included) are scaled."""
    return optim.clip_and_step(optimizer, max_norm, loss_scale,
                               scaled_norm=global_grad_norm(norm_params, pp_group))

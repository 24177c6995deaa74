"""Finishing the gradients of a step, for every layout: made whole, their global norm, the clipped
step, or its skip when they are not finite. The trainer runs these functions for every layout, and
the tests of pipeline and single-process steps call the same ones.

After the backward pass a layout leaves gradients in several forms:
- FSDP-managed parameters: DTensors already reduced (averaged) over dp x cp;
- tensor-parallel parameters without FSDP: DTensors, possibly `Partial` over tp (norm weights
  under sequence parallelism, Qwen3's q/k norms) — made whole here, once, before anything reads them;
- expert-parallel weights: under zero1 / fsdp FSDP-managed over the expert data-parallel ranks
  (`edp`) and reduced like the rest; under replicate left out of FSDP: the all-to-all backward has
  summed every ep peer's contribution, and they still need summing over `edp` and the same
  1/(dp x cp) that FSDP applies to everything else (Megatron scales expert gradients alike);
- pipeline stages: disjoint parameters per pp rank.

The global norm is the L2 norm over the whole model, counting each parameter once: per group of
gradients living on one mesh, torch computes the norm and DTensor reduces it over that mesh's
shards (replicas are not double-counted); the groups' squares add up, and so do the stages'.

A step whose gradient norm is NaN/Inf must leave parameters and optimizer state untouched. The
fused AdamW kernel takes a `found_inf` tensor and skips on the device, so the decision never needs
a host sync; where no fused kernel exists the step falls back to asking the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ember.parallel.dtensor import is_dtensor, local_part, make_grad_whole


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor  # unscaled, before clipping
    found_inf: torch.Tensor  # 0-dim float: 1.0 when the step was skipped


def make_partial_grads_whole(params: Iterable[nn.Parameter]) -> None:
    """Redistribute DTensor gradients to their parameter's placements (Partial -> Replicate)."""
    for param in params:
        make_grad_whole(param)


@torch.no_grad()
def reduce_expert_grads(expert_params: Iterable[nn.Parameter], edp_group, average_over: int) -> None:
    """Sum the gradients of expert weights left out of FSDP (replicate mode) over the expert
    data-parallel ranks and divide by `average_over` (the dp x cp size FSDP averages the other
    gradients over)."""
    for param in expert_params:
        if param.grad is None:
            continue
        local = local_part(param.grad)
        if edp_group is not None:
            dist.all_reduce(local, group=edp_group)
        if average_over != 1:
            local.div_(average_over)


def global_grad_norm(params: Iterable[nn.Parameter], pp_group=None) -> torch.Tensor:
    """The L2 norm of the gradients of `params` over the whole model (see the module docstring), as
    a 0-dim fp32 tensor. `params` must list each parameter this rank holds once (a tied copy left
    out); `pp_group`: the pipeline group whose stages hold the rest of the model."""
    groups: dict[object, list[torch.Tensor]] = {}
    device = None
    for param in params:
        if param.grad is not None:
            groups.setdefault(param.grad.device_mesh if is_dtensor(param.grad) else None, []).append(param.grad)
            device = local_part(param.grad).device
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
    weights live on the (edp,) ep (, tp) mesh, the rest on the FSDP / tp mesh). Call before the
    first step."""
    groups = []
    for group in optimizer.param_groups:
        by_mesh: dict[object, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_mesh.setdefault(param.device_mesh if is_dtensor(param) else None, []).append(param)
        groups.extend({**group, "params": members} for members in by_mesh.values())
    optimizer.param_groups = groups


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float, loss_scale: torch.Tensor,
                  norm_params: Iterable[nn.Parameter] | None = None, pp_group=None) -> StepOutcome:
    """Unscale, clip to `max_norm` (0 = off) and step, or skip when the gradients are not finite.

    The clipping norm is `global_grad_norm(norm_params, pp_group)` (default: every parameter the
    optimizer holds, on one process); the gradients of every parameter the optimizer holds (tied
    copies included) are scaled.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = global_grad_norm(params if norm_params is None else norm_params, pp_group) / loss_scale
    found_inf = (~torch.isfinite(norm)).float()
    factor = 1.0 / loss_scale
    if max_norm > 0:
        factor = factor * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    # One multiply applies both unscaling and clipping; a non-finite factor only hits skipped steps.
    local_grads = [local_part(p.grad) for p in params if p.grad is not None]
    if local_grads:
        torch._foreach_mul_(local_grads, factor.to(local_grads[0].device))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        optimizer.step()
    elif not bool(found_inf):  # no fused kernel: the decision needs the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm=norm, found_inf=found_inf)

"""AdamW, global gradient-norm clipping and the skip of steps whose gradients are not finite.

A step whose gradient norm is NaN/Inf must leave parameters and optimizer state untouched. The
fused AdamW kernel takes a `found_inf` tensor and skips on the device, so the decision never needs
a host sync; where no fused kernel exists the step falls back to asking the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ember.config import OptimConfig

_FUSED_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps", "npu")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor (sharded parameter or gradient), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's grouping: no weight decay on biases and 1-D weights (norm scales)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    fused = config.fused
    if fused is None:
        fused = device.type in _FUSED_DEVICE_TYPES
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=lr, betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps, fused=bool(fused), foreach=None if fused else True)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients across every rank, as a plain 0-dim fp32 tensor on the device.

    For sharded (DTensor) gradients the per-shard norms are reduced over the mesh by DTensor.
    """
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.float()


@dataclass
class StepOutcome:
    grad_norm: torch.Tensor  # unscaled, before clipping
    found_inf: torch.Tensor  # 0-dim float: 1.0 when the step was skipped


def clip_and_step(optimizer: torch.optim.Optimizer, max_norm: float, loss_scale: torch.Tensor,
                  scaled_norm: torch.Tensor | None = None) -> StepOutcome:
    """Unscale, clip to `max_norm` (0 = off) and step, or skip when the gradients are not finite.

    `scaled_norm` is the (still loss-scaled) global gradient norm when the caller computed it over
    a parallel layout (ember.parallel.gradients); by default it is the optimizer's gradients' norm.
    """
    grads = gradients(optimizer)
    if scaled_norm is None:
        scaled_norm = global_grad_norm(grads)
    norm = scaled_norm / loss_scale
    found_inf = (~torch.isfinite(norm)).float()
    factor = 1.0 / loss_scale
    if max_norm > 0:
        factor = factor * torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    # One multiply applies both unscaling and clipping; a non-finite factor only hits skipped steps.
    local_grads = [_local(g) for g in grads]
    if local_grads:
        torch._foreach_mul_(local_grads, factor.to(local_grads[0].device))
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found_inf
        optimizer.step()
    elif not bool(found_inf):  # no fused kernel: the decision needs the host
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(grad_norm=norm, found_inf=found_inf)

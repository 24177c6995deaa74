"""AdamW: its parameter groups (no weight decay on biases and norm scales), the fused kernel where
the device has one, and the learning rate set each step. Clipping and skipping a step whose
gradients are not finite are `ember.train.gradients`'s.
"""

from __future__ import annotations

import torch
from torch import nn

from ember.config import OptimConfig

_FUSED_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps", "npu")


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


"""Mixed precision: autocast for bf16/fp16 compute over fp32 parameters, and fp16 loss scaling.

Parameters, gradients and optimizer state stay fp32 in every mode (Megatron's "main params"), so
the data-parallel layouts all see the same numbers. The loss scaler keeps its state on the device
and decides with tensor ops, never `.item()`, so a training step needs no host sync.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The autocast context for a forward pass (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class LossScaler:
    """Dynamic loss scaling for fp16 (static when `growth_interval` is 0); scale 1 otherwise.

    After an overflow the scale halves (not below `min_scale`); after `growth_interval` clean steps
    in a row it doubles.
    """

    def __init__(self, device: torch.device, initial_scale: float = 1.0, *, dynamic: bool = False,
                 growth_interval: int = 1000, min_scale: float = 1.0, backoff: float = 0.5, growth: float = 2.0):
        self.dynamic = dynamic
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.backoff = backoff
        self.growth = growth
        self.scale = torch.tensor(float(initial_scale), device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int64, device=device)

    @classmethod
    def for_precision(cls, precision: str, device: torch.device, *, loss_scale: float | None,
                      initial_scale: float, min_scale: float, window: int) -> LossScaler:
        if precision != "fp16":
            return cls(device)
        if loss_scale is not None:
            return cls(device, loss_scale)
        return cls(device, initial_scale, dynamic=True, growth_interval=window, min_scale=min_scale)

    def update(self, found_inf: torch.Tensor) -> None:
        """Adjust the scale after a step; `found_inf` is a 0-dim float tensor (1.0 = overflow)."""
        if not self.dynamic:
            return
        overflow = found_inf > 0
        clean = torch.where(overflow, torch.zeros_like(self.clean_steps), self.clean_steps + 1)
        grow = clean >= self.growth_interval
        shrunk = torch.clamp(self.scale * self.backoff, min=self.min_scale)
        self.scale = torch.where(overflow, shrunk, torch.where(grow, self.scale * self.growth, self.scale))
        self.clean_steps = torch.where(grow, torch.zeros_like(clean), clean)

    def at_minimum(self) -> torch.Tensor:
        """True (as a tensor) when an overflow can no longer be fixed by lowering the scale."""
        if not self.dynamic:
            return torch.ones((), dtype=torch.bool, device=self.scale.device)
        return self.scale <= self.min_scale

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "clean_steps": int(self.clean_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.clean_steps.fill_(int(state["clean_steps"]))

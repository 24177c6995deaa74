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

    Megatron's DynamicGradScaler, step for step: an overflow skips the step and counts down a
    hysteresis tracker, and the scale drops by `backoff` (not below `min_scale`) once the tracker
    reaches 0; after `growth_interval` clean steps in a row the scale grows by `growth` and the
    tracker is reset to `hysteresis`. (So, as in Megatron, the tracker is not reset by clean steps
    alone: after the first `hysteresis` overflows every overflow lowers the scale until it grows.)
    """

    def __init__(self, device: torch.device, initial_scale: float = 1.0, *, dynamic: bool = False,
                 growth_interval: int = 1000, min_scale: float = 1.0, backoff: float = 0.5, growth: float = 2.0,
                 hysteresis: int = 2):
        self.dynamic = dynamic
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.backoff = backoff
        self.growth = growth
        self.hysteresis = hysteresis
        self.scale = torch.tensor(float(initial_scale), device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.hysteresis_left = torch.full((), hysteresis, dtype=torch.int64, device=device)

    @classmethod
    def for_precision(cls, precision: str, device: torch.device, *, loss_scale: float | None,
                      initial_scale: float, min_scale: float, window: int, hysteresis: int = 2) -> LossScaler:
        if precision != "fp16":
            return cls(device)
        if loss_scale is not None:
            return cls(device, loss_scale)
        return cls(device, initial_scale, dynamic=True, growth_interval=window, min_scale=min_scale,
                   hysteresis=hysteresis)

    def update(self, found_inf: torch.Tensor) -> None:
        """Adjust the scale after a step; `found_inf` is a 0-dim float tensor (1.0 = overflow)."""
        if not self.dynamic:
            return
        overflow = found_inf > 0
        left = torch.where(overflow, self.hysteresis_left - 1, self.hysteresis_left)
        clean = torch.where(overflow, torch.zeros_like(self.clean_steps), self.clean_steps + 1)
        grow = clean >= self.growth_interval
        lower = overflow & (left <= 0)
        shrunk = torch.clamp(self.scale * self.backoff, min=self.min_scale)
        self.scale = torch.where(lower, shrunk, torch.where(grow, self.scale * self.growth, self.scale))
        self.clean_steps = torch.where(grow, torch.zeros_like(clean), clean)
        self.hysteresis_left = torch.where(grow, torch.full_like(left, self.hysteresis), left)

    def at_minimum(self) -> torch.Tensor:
        """True (as a tensor) when an overflow can no longer be fixed by lowering the scale."""
        if not self.dynamic:
            return torch.ones((), dtype=torch.bool, device=self.scale.device)
        return self.scale <= self.min_scale

    def state_dict(self) -> dict:
        return {"scale": float(self.scale), "clean_steps": int(self.clean_steps),
                "hysteresis_left": int(self.hysteresis_left)}

    def load_state_dict(self, state: dict) -> None:
        self.scale.fill_(float(state["scale"]))
        self.clean_steps.fill_(int(state["clean_steps"]))
        self.hysteresis_left.fill_(int(state.get("hysteresis_left", self.hysteresis)))

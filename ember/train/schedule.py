"""Learning-rate schedule: linear warmup, then constant / linear / cosine / inverse-square-root / WSD
decay, as Megatron-LM's `OptimizerParamScheduler` computes them.

Progress is counted in iterations or in tokens (PAI-Megatron-Patch's TRAIN_TOKENS/WARMUP_TOKENS);
the schedule itself only sees numbers of "steps" in one unit. The learning rate is a pure function of
progress, so resuming needs no scheduler state beyond the iteration and token counters.

Unlike Megatron, the first iteration already uses a non-zero warmup learning rate: iteration i
(1-based) uses `lr_at(i)`, reaching the peak at the last warmup iteration, and `min_lr` at the end
of the decay.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ember.config import Config


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: float
    decay_steps: float
    style: str = "cosine"
    warmup_init: float = 0.0
    # "iterations" or "tokens": what the steps count.
    unit: str = "iterations"
    wsd_decay_steps: float = 0.0
    wsd_style: str = "linear"

    def lr_at(self, progress: float) -> float:
        """Megatron's `OptimizerParamScheduler.get_lr` at `progress` steps."""
        if self.warmup_steps > 0 and progress <= self.warmup_steps:
            return self.warmup_init + (self.max_lr - self.warmup_init) * progress / self.warmup_steps
        if self.style == "constant":
            return self.max_lr
        if progress > self.decay_steps:
            return self.min_lr
        if self.style == "inverse-square-root":
            warmup = max(self.warmup_steps, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(warmup) / math.sqrt(max(progress, 1)))
        span = self.decay_steps - self.warmup_steps
        ratio = (progress - self.warmup_steps) / span if span > 0 else 1.0
        if self.style == "linear":
            coeff = 1.0 - ratio
        elif self.style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        elif self.style == "WSD":
            # warmup-stable-decay: constant until the last `wsd_decay_steps`, then anneal
            anneal_start = self.decay_steps - self.wsd_decay_steps
            if progress <= anneal_start:
                coeff = 1.0
            else:
                wsd_ratio = (progress - anneal_start) / self.wsd_decay_steps
                coeff = {"linear": 1.0 - wsd_ratio, "cosine": 0.5 * (math.cos(math.pi * wsd_ratio) + 1.0),
                         "exponential": 2.0 * math.pow(0.5, wsd_ratio) - 1.0,
                         "minus_sqrt": 1.0 - math.sqrt(wsd_ratio)}[self.wsd_style]
        else:
            raise ValueError(f"unknown lr decay style {self.style}")
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def progress_of(self, iteration: int, consumed_tokens: int) -> float:
        return float(consumed_tokens if self.unit == "tokens" else iteration)

    def state_dict(self) -> dict:
        return asdict(self)


def build_schedule(config: Config, train_iters: int) -> LRSchedule:
    """Derive the schedule from the config; `train_iters` is the resolved number of iterations."""
    t = config.train
    tokens_per_iter = t.global_batch_size * config.data.seq_length
    by_tokens = t.lr_warmup_tokens is not None or t.lr_decay_tokens is not None or t.train_tokens is not None
    if by_tokens:
        decay = t.lr_decay_tokens
        if decay is None:
            decay = t.lr_decay_iters * tokens_per_iter if t.lr_decay_iters else train_iters * tokens_per_iter
        if t.lr_warmup_tokens is not None:
            warmup = t.lr_warmup_tokens
        elif t.lr_warmup_fraction is not None:
            warmup = t.lr_warmup_fraction * decay
        else:
            warmup = t.lr_warmup_iters * tokens_per_iter
        unit = "tokens"
    else:
        decay = t.lr_decay_iters or train_iters
        warmup = t.lr_warmup_fraction * decay if t.lr_warmup_fraction is not None else t.lr_warmup_iters
        unit = "iterations"
    wsd = 0.0
    if t.lr_decay_style == "WSD":
        wsd = float(t.lr_wsd_decay_iters * (tokens_per_iter if by_tokens else 1)) if t.lr_wsd_decay_iters else 0.0
    return LRSchedule(max_lr=t.lr, min_lr=t.min_lr, warmup_steps=float(warmup), decay_steps=float(decay),
                      style=t.lr_decay_style, warmup_init=t.lr_warmup_init, unit=unit, wsd_decay_steps=wsd,
                      wsd_style=t.lr_wsd_decay_style)

"""The dense feed-forward block: gated (SwiGLU / GeGLU) or plain (GELU MLP of Bloom, GPT-2)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":  # Bloom's bloom_gelu and GPT-2's gelu_new
        return partial(F.gelu, approximate="tanh")
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


class FeedForward(nn.Module):
    """gated: w2(act(w1 x) * w3 x); plain: w2(act(w1 x))."""

    def __init__(self, args: ModelArgs, hidden_dim: int):
        super().__init__()
        bias = args.mlp_bias
        self.w1 = nn.Linear(args.dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, args.dim, bias=bias)
        self.w3 = nn.Linear(args.dim, hidden_dim, bias=bias) if args.mlp_type == "gated" else None
        self.act = activation_fn(args.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.w1(x))
        if self.w3 is not None:
            hidden = hidden * self.w3(x)
        return self.w2(hidden)

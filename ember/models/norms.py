"""RMSNorm and LayerNorm, chosen by ModelArgs.norm_type."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales after casting back, the order Llama/HF use, so bf16
    results match the reference too."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def build_norm(args: ModelArgs, dim: int | None = None) -> nn.Module:
    width = args.dim if dim is None else dim
    if args.norm_type == "rmsnorm":
        return RMSNorm(width, eps=args.norm_eps)
    return nn.LayerNorm(width, eps=args.norm_eps)

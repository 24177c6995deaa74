"""RMSNorm and LayerNorm, chosen by ModelArgs.norm_type."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs
from ember.models.positions import is_plain_tensor


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales after casting back, the order Llama/HF use, so bf16
    results match the reference too."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.dtype == weight.dtype == torch.float32 and is_plain_tensor(x) and is_plain_tensor(weight)
                and not torch.compiler.is_compiling()):
            return _RMSNormFunction.apply(x, weight, self.eps)
        # low-precision inputs, DTensors, and graphs torch.compile fuses itself
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _RMSNormFunction(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: F.rms_norm's composite form (pow, mean, add,
    rsqrt, mul) and its autograd graph make about twice the passes over the activations.

    y = w * x * r with r = (mean(x^2) + eps)^-1/2 per row;
    dx = r * (g*w) - x * r^3 * mean(g*w*x);  dw = sum over rows of g * x * r."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # autocast would lower vecdot to bf16
            rstd = torch.linalg.vecdot(x, x).div_(x.shape[-1]).add_(eps).rsqrt_().unsqueeze(-1)
            ctx.save_for_backward(x, weight, rstd)
            return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        with torch.autocast(grad.device.type, enabled=False):
            return _RMSNormFunction._backward(ctx, grad.float())

    @staticmethod
    def _backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            scaled = grad * weight
            coefficient = torch.linalg.vecdot(scaled, x).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
            grad_x = scaled.mul_(rstd).sub_(x * coefficient)
        if ctx.needs_input_grad[1]:
            rows = grad.numel() // grad.shape[-1]
            grad_weight = torch.mul(grad, x).reshape(rows, -1).t().mv(rstd.reshape(rows))
        return grad_x, grad_weight, None


def build_norm(args: ModelArgs, dim: int | None = None) -> nn.Module:
    width = args.dim if dim is None else dim
    if args.norm_type == "rmsnorm":
        return RMSNorm(width, eps=args.norm_eps)
    return nn.LayerNorm(width, eps=args.norm_eps)

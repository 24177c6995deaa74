"""Position information: RoPE tables (with Llama-3 / linear scaling), ALiBi slopes, and the
attention mask that goes with a query block.

RoPE uses the "rotate half" layout of Hugging Face checkpoints (first half of head_dim paired
with the second half), so q/k projection weights convert without permutation.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from ember.models.args import ModelArgs


def rope_inv_freq(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies, one per pair of head dims, with the configured scaling applied."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["type"] == "linear":
        return inv_freq / scaling["factor"]
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly (Meta's reference, also what HF's _compute_llama3_parameters does).
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_band, smoothed, scaled)


def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_seq_len, head_dim] in fp32, computed once per model."""
    inv_freq = rope_inv_freq(args, device)
    positions = torch.arange(args.max_seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin. x: [B, T, H, D]; cos/sin: [B or 1, T, 1, D] in x's dtype
    or a wider one (bf16 queries under autocast meet fp32 tables; the result is then fp32)."""
    if is_plain_tensor(x) and not torch.compiler.is_compiling():
        return _RotateHalf.apply(x, cos, sin)
    # DTensors, and graphs torch.compile fuses itself, take the composite form
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def is_plain_tensor(x: torch.Tensor) -> bool:
    """Not a DTensor (tensor parallelism hands some modules DTensors; they keep composite ops)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is None or not isinstance(x, dtensor.DTensor)


class _RotateHalf(torch.autograd.Function):
    """RoPE in four fused multiply-adds per half instead of neg, cat, two multiplies and an add
    (and their backward: zero-filled slices, another cat). The rotation is linear in x, so the
    gradient is the transposed rotation: g * cos - rotate_half^T(g * sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.input_dtype = x.dtype
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        # the composite form's type promotion: bf16 q/k (autocast) with fp32 tables give fp32
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
        # rotate_half(x) = [-x2, x1], written half by half straight into `out`
        torch.mul(x1, cos[..., :half], out=out[..., :half]).addcmul_(x2, sin[..., :half], value=-1.0)
        torch.mul(x2, cos[..., half:], out=out[..., half:]).addcmul_(x1, sin[..., half:])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        half = grad.shape[-1] // 2
        g1, g2 = grad[..., :half], grad[..., half:]
        out = torch.empty_like(grad)
        # d/dx1 = g1 * cos1 + g2 * sin2; d/dx2 = g2 * cos2 - g1 * sin1
        torch.mul(g1, cos[..., :half], out=out[..., :half]).addcmul_(g2, sin[..., half:])
        torch.mul(g2, cos[..., half:], out=out[..., half:]).addcmul_(g1, sin[..., :half], value=-1.0)
        return out.to(ctx.input_dtype), None, None


def alibi_slopes(n_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ALiBi head slopes (Press et al.): a geometric sequence starting at 2^(-8/n) for the
    largest power of two n <= n_heads, then the odd powers of the next sequence for the rest."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest < n_heads:
        extra_base = 2.0 ** (-4.0 / closest)  # the sequence for 2*closest heads
        slopes += [extra_base ** (2 * i + 1) for i in range(n_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


@dataclass
class AttentionMask:
    """What attention needs to know about masking for one forward call, built once and shared
    by every layer. `mask` is None for the plain causal case so SDPA can use is_causal."""

    mask: torch.Tensor | None  # bool [T, S] or [B, 1, T, S] (True = attend), or float bias [B or 1, H, T, S]
    is_causal: bool
    # packed documents (ember.models.documents): the ids [B, T] the mask was built from, and
    # flex_attention's BlockMask, which replaces `mask` on CUDA
    documents: torch.Tensor | None = None
    block_mask: object | None = None
    sliding_window: int | None = None  # the window `block_mask` was built with

    def dense_mask(self) -> torch.Tensor | None:
        """`mask`, or with a BlockMask the dense block-diagonal mask it stands for (built on first
        use: what attention dropout needs, which flex_attention does not have)."""
        if self.mask is None and self.block_mask is not None:
            from ember.models.documents import dense_document_mask

            self.mask = dense_document_mask(self.documents, self.sliding_window)
        return self.mask


def build_attention_mask(
    args: ModelArgs,
    q_len: int,
    start: int,
    device: torch.device,
    dtype: torch.dtype,
    slopes: torch.Tensor | None,
    documents: torch.Tensor | None = None,
) -> AttentionMask:
    """Queries are positions start..start+q_len-1 of the sequence; keys are 0..start+q_len-1.
    With `documents` [B, T] (packed documents) attention stays inside each document."""
    if documents is not None:
        return _document_attention_mask(args, documents, start, device, dtype, slopes)
    kv_len = start + q_len
    window = args.sliding_window
    needs_window = window is not None and kv_len > window
    if slopes is None and not needs_window:
        if start == 0:
            return AttentionMask(None, is_causal=q_len > 1)
        if q_len == 1:  # one new token sees the whole cache
            return AttentionMask(None, is_causal=False)
    q_pos = torch.arange(start, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if needs_window:
        allowed = allowed & (q_pos - k_pos < window)
    if slopes is None:
        return AttentionMask(allowed, is_causal=False)
    # ALiBi: bias = -slope * distance. HF's Bloom adds slope * key_position instead; the two
    # differ by a per-query constant, which softmax ignores.
    distance = (k_pos - q_pos).to(torch.float32)
    bias = slopes.to(device)[:, None, None] * distance
    bias = bias.masked_fill(~allowed, float("-inf"))
    return AttentionMask(bias.to(dtype)[None], is_causal=False)


def _document_attention_mask(args: ModelArgs, documents: torch.Tensor, start: int, device: torch.device,
                             dtype: torch.dtype, slopes: torch.Tensor | None) -> AttentionMask:
    """Block-diagonal causal attention over `documents` [B, T] (T: the whole sequence this rank
    attends over, which a sequence-parallel pipeline stage's hidden states do not show)."""
    from ember.models.documents import (check_document_ids, dense_document_mask, document_block_mask,
                                        flex_attention_applies)

    check_document_ids(documents, start)
    documents = documents.to(device)
    window = args.sliding_window
    if slopes is None and args.attn_logit_softcap is None and flex_attention_applies(device):
        return AttentionMask(None, is_causal=False, documents=documents,
                             block_mask=document_block_mask(documents, window), sliding_window=window)
    allowed = dense_document_mask(documents, window)
    if slopes is None:
        return AttentionMask(allowed, is_causal=False, documents=documents)
    positions = torch.arange(documents.shape[-1], device=device)
    distance = (positions[None, :] - positions[:, None]).to(torch.float32)
    bias = (slopes.to(device)[:, None, None] * distance)[None].masked_fill(~allowed, float("-inf"))
    return AttentionMask(bias.to(dtype), is_causal=False, documents=documents)

"""Attention restricted to each document of a packed sequence (Megatron's --reset-attention-mask).

A packed sample holds several documents one after the other; `documents` [B, T] gives each token
the index of its document (non-decreasing along the sequence). A query attends to a key when both
lie in the same document and the key is not after the query (and, with a sliding window, within
it): a block-diagonal causal mask.

The mask is built per forward from the document ids, never stored with the data:
- on CUDA with `torch.nn.attention.flex_attention`, as a `BlockMask` (O(T^2 / 128^2) memory,
  fully masked blocks skipped by the kernel), unless ALiBi or soft-capping need the scores;
- elsewhere as a dense boolean mask [B, 1, T, T] for scaled_dot_product_attention, and on CUDA
  too when attention dropout is on in training (flex_attention has no dropout).
The flex path is tested on the CPU, where inductor compiles the same kernel template (forward
only: its backward is CUDA-only), tests/test_packed_documents.py.
"""

from __future__ import annotations

import functools

import torch

from ember.errors import EmberError


def dense_document_mask(documents: torch.Tensor, window: int | None = None,
                        q_positions: torch.Tensor | None = None, k_documents: torch.Tensor | None = None,
                        k_positions: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B, 1, Tq, Tk], True where attention is allowed.

    By default queries and keys are the same tokens, at positions 0..T-1. Context parallelism
    passes the global positions of its local queries and the gathered keys' ids and positions."""
    k_documents = documents if k_documents is None else k_documents
    if q_positions is None:
        q_positions = torch.arange(documents.shape[-1], device=documents.device)
    if k_positions is None:
        k_positions = torch.arange(k_documents.shape[-1], device=documents.device)
    q_pos, k_pos = q_positions[:, None], k_positions[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    same = documents[:, :, None] == k_documents[:, None, :]
    return (same & allowed)[:, None]


def flex_attention_applies(device: torch.device) -> bool:
    """flex_attention is used on CUDA when this torch has it."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def document_block_mask(documents: torch.Tensor, window: int | None = None, compile_mask: bool = True):
    """flex_attention's BlockMask for `documents` [B, T] (block-diagonal causal, optional window);
    `compile_mask=False` builds it eagerly (tests on the CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = documents.contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])
        if window is not None:
            allowed = allowed & (q_idx - kv_idx < window)
        return allowed

    batch, seq = documents.shape
    # _compile builds the block mask without materialising [T, T] (32k-token samples)
    return create_block_mask(mask_mod, batch, None, seq, seq, device=documents.device, _compile=compile_mask)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # eager flex_attention computes the whole score matrix; compiled, it is the fused kernel
    return torch.compile(flex_attention, dynamic=False)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float | None,
                            enable_gqa: bool) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, T, D] -> [B, H, T, D] under `block_mask`."""
    return _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def check_document_ids(documents: torch.Tensor, start: int) -> None:
    if start != 0:
        raise EmberError("document ids (packed-document attention) are for training; generate without them")
    if documents.dim() != 2:
        raise EmberError(f"document ids must be [batch, seq], got shape {tuple(documents.shape)}")

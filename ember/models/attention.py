"""Multi-head / grouped-query / multi-query attention through scaled_dot_product_attention,
and the KV cache generation uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs, default_attn_scale
from ember.models.documents import flex_document_attention
from ember.models.norms import build_norm
from ember.models.positions import AttentionMask, apply_rope


class KVCache:
    """Preallocated keys and values per layer, [B, n_kv_heads, max_len, head_dim].

    Layers are allocated on first use, so a pipeline stage holding a few layers only pays for
    those. `Transformer.forward` advances `length` once all its layers have written.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.batch_size = batch_size
        self.max_len = max_len
        self.shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0
        self._layers: dict[int, torch.Tensor] = {}

    def layer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole key and value buffers [B, Hkv, max_len, D] of one layer (positions past
        `length` hold nothing yet). Generation's fused decode step writes them in place."""
        if layer_id not in self._layers:
            self._layers[layer_id] = torch.zeros((2, *self.shape), dtype=self.dtype, device=self.device)
        keys_values = self._layers[layer_id]
        return keys_values[0], keys_values[1]

    def update(self, layer_id: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values [B, Hkv, T, D] after the cached ones; return all so far."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        k_all, v_all = self.layer(layer_id)
        k_all[:, :, self.length : end] = keys
        v_all[:, :, self.length : end] = values
        return k_all[:, :, :end], v_all[:, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.scale = default_attn_scale(args)
        self.softcap = args.attn_logit_softcap
        self.dropout = args.attention_dropout  # on the attention probabilities, in training (issue 16)
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(q_dim, args.dim, bias=args.attn_out_bias)
        if args.qk_norm:
            self.q_norm = build_norm(args, args.head_dim)
            self.k_norm = build_norm(args, args.head_dim)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope[0], rope[1]), apply_rope(k, rope[0], rope[1])
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, k, v)
        dropout = self.dropout if self.training else 0.0
        if mask.block_mask is not None and kv_cache is None and dropout == 0:  # packed documents on CUDA
            out = flex_document_attention(q, k, v, mask.block_mask, self.scale, self.n_kv_heads != self.n_heads)
        elif self.softcap is None:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                # flex_attention has no dropout: packed documents with attention dropout take the
                # dense block-diagonal mask (built once per forward, shared by the layers)
                attn_mask=mask.dense_mask() if mask.block_mask is not None else mask.mask,
                is_causal=mask.is_causal,
                dropout_p=dropout,
                scale=self.scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        else:
            out = self._softcapped_attention(q, k, v, mask, dropout)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def _softcapped_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask,
                              dropout: float = 0.0) -> torch.Tensor:
        """Grok-1 caps the scores with cap * tanh(s / cap) before softmax, which SDPA cannot
        express; this path materialises the score matrix."""
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        scores = self.softcap * torch.tanh(scores / self.softcap)
        q_len, kv_len = scores.shape[-2:]
        if mask.mask is not None:
            if mask.mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask.mask, float("-inf"))
            else:
                scores = scores + mask.mask.float()
        elif mask.is_causal:
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        probs = scores.softmax(dim=-1).to(v.dtype)
        return torch.matmul(F.dropout(probs, dropout, training=True) if dropout > 0 else probs, v)

"""The fused decode step: one token per step for Llama-shaped fp32 models on the CPU, with far
less work per op than the transformer's own forward (issue 18: generation >= 1.3x transformers'
`generate`).

At 56M parameters and batch 1 a quarter of a decode step through `Transformer.forward` was per-op
overhead around the weight matmuls. `FusedDecodeStep` runs the same operations in the same order
on copies of the weights laid out for a few rows at a time: wq|wk|wv and w1|w3 stacked, keys and
values written into the decoder's preallocated KV cache in place, attention as two batched
products. The copies are kept per model while its parameters do not change (`_decode_weights`).
`fused_decode_refusal` says why a model keeps its own forward instead (LoRA / tensor-parallel
hooks, MoE, q/k norms, bf16, the GPU, ...). `decoder` below is `ember.generation._Decoder`: its
KV cache, positions, padding mask and dtype.
"""

from __future__ import annotations

import weakref

import torch


# The fused decode step keeps a copy of the model's matrices in its own layout; past this many
# bytes (models where the weight matmuls dwarf the per-op overhead anyway) decoding keeps the
# transformer's own forward instead.
FUSED_DECODE_MAX_BYTES = 1 << 30


def fused_decode_refusal(model: torch.nn.Module) -> str | None:
    """Why `model` decodes through its own forward rather than the fused decode step (None: it
    takes the fused step). The step covers dense pre-norm RMSNorm / RoPE / gated-MLP models
    (Llama, Mistral within its window, Qwen2) with plain fp32 nn.Linear weights on the CPU;
    anything it does not reproduce (LoRA or tensor-parallel hooks, DTensors, MoE, ...) is refused."""
    from ember.models.attention import Attention
    from ember.models.feed_forward import FeedForward
    from ember.models.norms import RMSNorm
    from ember.models.positions import is_plain_tensor

    args = model.args
    unsupported = dict(position_type=args.position_type != "rope", norm_type=args.norm_type != "rmsnorm",
                       mlp_type=args.mlp_type != "gated", qk_norm=args.qk_norm, sandwich_norm=args.sandwich_norm,
                       embedding_norm=args.embedding_norm, attn_logit_softcap=args.attn_logit_softcap is not None,
                       embedding_multiplier=args.embedding_multiplier != 1.0,
                       output_multiplier=args.output_multiplier != 1.0)
    if any(unsupported.values()):
        return "args: " + ", ".join(name for name, bad in unsupported.items() if bad)
    if any(getattr(model, name, None) is None for name in ("tok_embeddings", "norm", "output", "rope_cos")):
        return "a pipeline stage (no embedding, norm or output layer)"
    if getattr(model, "pos_embeddings", None) is not None:
        return "learned positions"
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "global module hooks are registered"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or getattr(module, "parametrizations", None):
            return f"{name or 'the model'} has hooks (LoRA, tensor parallelism, ...)"
        if isinstance(module, torch.nn.Linear) and type(module) is not torch.nn.Linear:
            return f"{name} is a {type(module).__name__}"
    for name, layer in model.layers.items():
        if type(getattr(layer, "attention", None)) is not Attention:
            return f"layer {name}'s attention is not ember's Attention"
        if type(getattr(layer, "feed_forward", None)) is not FeedForward or getattr(layer, "moe", None) is not None:
            return f"layer {name} is not a dense feed-forward layer"
        if not (isinstance(layer.attention_norm, RMSNorm) and isinstance(layer.ffn_norm, RMSNorm)):
            return f"layer {name}'s norms are not RMSNorm"
    for name, param in model.named_parameters():
        if param.dtype != torch.float32 or param.device.type != "cpu" or not is_plain_tensor(param):
            return f"{name} is not a plain float32 CPU tensor"
    copies = _matrix_bytes(model)
    if copies > FUSED_DECODE_MAX_BYTES:
        return f"its matrices ({copies / 2**30:.1f} GiB) exceed FUSED_DECODE_MAX_BYTES"
    return None


class FusedDecodeStep:
    """One decode step of a dense RoPE model with its weights laid out for a few rows at a time
    (`_Matrix`): wq|wk|wv in one matrix and w1|w3 in another (fewer, larger products); each
    layer's keys and values written in place into the KV cache and attention done as two
    batched products over it. The same operations as the transformer's forward in the same
    order, with far less per-op work around them. At 56M, batch 1, one thread, a step went from
    ~18 to ~13.5 ms (nn.Linear's matmuls alone: ~13.2 ms; in this layout ~10.5 ms).

    The layout costs a copy of the matrices (~0.2-0.3 s at 56M), kept for the next call while no
    weight and not the batch size changes (`_decode_weights`). `build` gives None when the model
    needs its own forward (see `fused_decode_refusal`)."""

    @classmethod
    def build(cls, model: torch.nn.Module, decoder) -> FusedDecodeStep | None:
        window = model.args.sliding_window
        if window is not None and decoder.cache.max_len > window:
            return None  # the window would start cutting keys off: the model's own masks do that
        if fused_decode_refusal(model) is not None:
            return None
        return cls(model, decoder, _decode_weights(model, decoder.cache.batch_size))

    def __init__(self, model: torch.nn.Module, decoder, weights: _DecodeWeights):
        args = model.args
        self.cache = decoder.cache
        self.weights = weights
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.dim, self.ffn_dim, self.eps = args.dim, args.ffn_dim, args.norm_eps
        batch, total = self.cache.batch_size, self.cache.max_len
        positions = decoder.positions.expand(batch, total)
        # per slot: [B, total, 1, D], so a step's slice broadcasts over the heads
        self.cos = model.rope_cos[positions].unsqueeze(2).to(decoder.dtype)
        half = self.head_dim // 2
        sin = model.rope_sin[positions].unsqueeze(2).to(decoder.dtype)
        # rotate_half(x) * sin = swap_halves(x) * [-sin1, sin2]
        self.sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        # [B * Hkv, 1, total]: 0 where a slot holds a real token, -inf on padding
        bias = torch.zeros(batch, self.n_kv_heads, 1, total, dtype=decoder.dtype, device=decoder.device)
        if decoder.valid is not None:
            bias.masked_fill_(~decoder.valid[:, None, None, :], float("-inf"))
        self.bias = bias.view(batch * self.n_kv_heads, 1, total)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B]; logits [B, vocab] for the token after them."""
        cache, weights = self.cache, self.weights
        start = cache.length
        if start + 1 > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; this step needs {start + 1}")
        h = torch.nn.functional.embedding(tokens, weights.embedding)
        cos, sin, bias = self.cos[:, start], self.sin[:, start], self.bias[..., : start + 1]
        for layer in weights.layers:
            h = self._layer(layer, h, start, cos, sin, bias)
        cache.advance(1)
        return weights.output(torch.nn.functional.rms_norm(h, (self.dim,), weights.norm, self.eps))

    def _layer(self, layer: _LayerWeights, h: torch.Tensor, start: int, cos: torch.Tensor, sin: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        batch, heads, kv_heads, head_dim = h.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        q_width, kv_width = heads * head_dim, kv_heads * head_dim
        x = torch.nn.functional.rms_norm(h, (self.dim,), layer.attention_norm, self.eps)
        qkv = layer.qkv(x)
        keys, values = self.cache.layer(layer.layer_id)
        q = _rope(qkv[:, :q_width].view(batch, heads, head_dim), cos, sin)
        _rope(qkv[:, q_width : q_width + kv_width].view(batch, kv_heads, head_dim), cos, sin, out=keys[:, :, start])
        values[:, :, start] = qkv[:, q_width + kv_width :].view(batch, kv_heads, head_dim)
        # [B * Hkv, G, D] queries against [B * Hkv, S, D] keys: grouped heads share their keys
        keys = keys[:, :, : start + 1].flatten(0, 1)
        values = values[:, :, : start + 1].flatten(0, 1)
        scores = torch.baddbmm(bias, q.view(batch * kv_heads, heads // kv_heads, head_dim), keys.transpose(1, 2),
                               alpha=layer.scale)
        attended = torch.bmm(scores.softmax(dim=-1), values).view(batch, q_width)
        h = layer.wo(attended, residual=h)
        x = torch.nn.functional.rms_norm(h, (self.dim,), layer.ffn_norm, self.eps)
        gate_up = layer.w13(x)
        hidden = layer.act(gate_up[:, : self.ffn_dim]).mul_(gate_up[:, self.ffn_dim :])
        return layer.w2(hidden, residual=h)


class _LayerWeights:
    """One block's matrices for `FusedDecodeStep`, fused and laid out for `batch` rows (norms
    shared with the model)."""

    def __init__(self, layer_id: int, block: torch.nn.Module, batch: int, blocked: bool):
        attention, ffn = block.attention, block.feed_forward
        self.layer_id = layer_id
        self.scale = attention.scale
        self.act = ffn.act
        self.attention_norm, self.ffn_norm = block.attention_norm.weight, block.ffn_norm.weight
        self.qkv = _Matrix([attention.wq, attention.wk, attention.wv], batch, blocked)
        self.wo = _Matrix([attention.wo], batch, blocked)
        self.w13 = _Matrix([ffn.w1, ffn.w3], batch, blocked)
        self.w2 = _Matrix([ffn.w2], batch, blocked)


# oneDNN's blocked layout costs ~15 us more per call than a plain product; it pays off when the
# model's matrices, together, are far larger than the CPU caches, so that every step reads them
# from memory and MKL's repacking of each one costs another pass (56M, 160 MB: 166 -> 196-205
# tok/s at batch 4); for the tiny shape (6 MB) the plain layout is faster (5000 vs 4030).
BLOCKED_LAYOUT_MIN_BYTES = 32 << 20


class _Matrix:
    """x @ [W1; W2; ...]^T (+ biases) (+ a residual) for the given linears, the stacked weight
    either a plain [in, out] copy (fastest at one row, where the product is a matrix-vector one,
    and for small models) or, `blocked`, in oneDNN's layout for `batch` rows, which spares MKL
    repacking the weight for every small product (56M, batch 4: the decode steps' matmuls
    20 -> 15 ms)."""

    def __init__(self, linears: list[torch.nn.Linear], batch: int, blocked: bool):
        weight = torch.cat([linear.weight for linear in linears]) if len(linears) > 1 else linears[0].weight
        self.bias = None
        if any(linear.bias is not None for linear in linears):
            zeros = [linear.weight.new_zeros(linear.out_features) for linear in linears]
            self.bias = torch.cat([z if linear.bias is None else linear.bias for linear, z in zip(linears, zeros)])
        self.blocked = blocked
        if blocked:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch)
        else:
            self.weight = weight.t().contiguous()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.blocked:
            out = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
            return out if residual is None else out.add_(residual)
        out = torch.mm(x, self.weight) if residual is None else torch.addmm(residual, x, self.weight)
        return out if self.bias is None else out.add_(self.bias)


class _DecodeWeights:
    """The whole model's weights for `FusedDecodeStep`, and the parameters they were copied
    from: each one's identity, storage and in-place version at the time."""

    def __init__(self, model: torch.nn.Module, batch: int):
        self.sources = [(weakref.ref(p), p.data_ptr(), p._version) for p in model.parameters()]
        blocked = _blocked_layout(model, batch)
        self.layout = (blocked, batch if blocked else None)  # the plain layout serves any batch
        self.layers = [_LayerWeights(int(name), layer, batch, blocked) for name, layer in model.layers.items()]
        self.embedding = model.tok_embeddings.weight
        self.norm = model.norm.weight
        self.output = _Matrix([model.output], batch, blocked)

    def current(self, model: torch.nn.Module, batch: int) -> bool:
        """Whether `model` still has the very parameters these copies were made from, unchanged,
        and they are laid out for `batch` rows."""
        blocked = _blocked_layout(model, batch)
        if self.layout != (blocked, batch if blocked else None):
            return False
        params = list(model.parameters())
        return len(params) == len(self.sources) and all(
            ref() is p and p.data_ptr() == ptr and p._version == version
            for p, (ref, ptr, version) in zip(params, self.sources))


# model -> its _DecodeWeights; dropped with the model
_DECODE_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _decode_weights(model: torch.nn.Module, batch: int) -> _DecodeWeights:
    """The fused copies of `model`'s matrices laid out for `batch` rows, rebuilt when any
    parameter has changed since they were made (another storage, or written in place:
    load_state_dict, an optimizer step) or the batch size has."""
    weights = _DECODE_WEIGHTS.get(model)
    if weights is None or not weights.current(model, batch):
        _DECODE_WEIGHTS.pop(model, None)  # free the old copies before making new ones
        weights = _DECODE_WEIGHTS[model] = _DecodeWeights(model, batch)
    return weights


def _blocked_layout(model: torch.nn.Module, batch: int) -> bool:
    return batch > 1 and _matrix_bytes(model) >= BLOCKED_LAYOUT_MIN_BYTES and torch.backends.mkldnn.is_available()


def _matrix_bytes(model: torch.nn.Module) -> int:
    """The bytes of all nn.Linear weights: what the fused decode step copies."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, D] * cos + rotate_half(x) * sin, `sin` with its first half negated."""
    batch, heads, dim = x.shape
    swapped = x.view(batch, heads, 2, dim // 2).flip(2).view(batch, heads, dim)
    return torch.addcmul(x * cos, swapped, sin, out=out)

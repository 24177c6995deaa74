"""ember's one decoder-only transformer, driven entirely by ModelArgs.

Layers live in `self.layers` (an nn.ModuleDict keyed "0", "1", ...) and `tok_embeddings`,
`norm` and `output` may be set to None: pipeline parallelism deletes what a stage does not own
and feeds hidden states instead of tokens (the torchtitan pattern). No distribution code here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ember.models.args import ModelArgs
from ember.models.attention import Attention, KVCache
from ember.models.feed_forward import FeedForward
from ember.models.moe import GroupedExperts, MoE
from ember.models.norms import RMSNorm, build_norm
from ember.models.positions import AttentionMask, alibi_slopes, build_attention_mask, rope_tables


class Block(nn.Module):
    """Pre-norm residual block: h = x + attn(norm(x)); out = h + ffn(norm(h)). With
    sandwich_norm (Grok-1) each branch output is normalised again before the residual add; in
    training, hidden_dropout drops from each branch output before the add (Megatron's order)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention_norm = build_norm(args)
        self.attention = Attention(layer_id, args)
        self.post_attention_norm = build_norm(args) if args.sandwich_norm else None
        self.ffn_norm = build_norm(args)
        if args.is_moe_layer(layer_id):  # mixed models: the other layers a dense FeedForward
            self.moe = MoE(args)
            self.feed_forward = None
        else:
            self.feed_forward = FeedForward(args, args.ffn_dim)
            self.moe = None
        self.post_ffn_norm = build_norm(args) if args.sandwich_norm else None
        self.hidden_dropout = args.hidden_dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: AttentionMask,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        attn = self.attention(self.attention_norm(x), rope, mask, kv_cache)
        if self.post_attention_norm is not None:
            attn = self.post_attention_norm(attn)
        h = x + self._dropout(attn)
        ffn_in = self.ffn_norm(h)
        ffn = self.moe(ffn_in) if self.moe is not None else self.feed_forward(ffn_in)
        if self.post_ffn_norm is not None:
            ffn = self.post_ffn_norm(ffn)
        return h + self._dropout(ffn)

    def _dropout(self, branch: torch.Tensor) -> torch.Tensor:
        """Megatron's bias-dropout-add: dropout on the branch output, before the residual add."""
        if self.training and self.hidden_dropout > 0:
            return F.dropout(branch, self.hidden_dropout, training=True)
        return branch


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        learned = args.position_type == "learned"
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim) if learned else None
        self.embedding_norm = build_norm(args) if args.embedding_norm else None
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(args.n_layers)})
        self.norm = build_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        # Position tables are buffers outside the state_dict; init_buffers() recomputes them
        # after to_empty() (meta-device construction).
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.register_buffer("alibi_slopes", None, persistent=False)
        # Set by tensor parallelism (`ember.parallel.tensor`): the output layer then gives
        # vocabulary-sharded logits, which the loss must reduce over this mesh.
        self.tensor_parallel_mesh = None
        # Reference init right away (a no-op on the meta device), so Transformer(args) is
        # usable as is; call init_weights(seed) again for a reproducible draw.
        self.init_weights()

    # -- construction helpers -----------------------------------------------------------------
    def tie_weights(self) -> None:
        if self.args.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    def materialize(self, device: torch.device | str) -> None:
        """Allocate a model built on the meta device (and parallelized there, if it is) on
        `device`: memory only, the weights are left uninitialised; the position buffers are
        computed. The one build sequence every loader and the trainer use."""
        self.to_empty(device=device)
        # to_empty gives each module a new Parameter, which unties a shared embedding/output
        # matrix (FSDP keeps it shared); tie it again, or the two copies would load and train apart.
        self.tie_weights()
        self.init_buffers(device)

    def _buffer_device(self) -> torch.device:
        for param in self.parameters():
            return param.device
        return torch.device("cpu")

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute RoPE tables / ALiBi slopes on `device` (default: the parameters')."""
        device = torch.device(device) if device is not None else self._buffer_device()
        if self.args.position_type == "rope":
            self.rope_cos, self.rope_sin = rope_tables(self.args, device)
        elif self.args.position_type == "alibi":
            self.alibi_slopes = alibi_slopes(self.args.n_heads, device)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Reference initialisation (HF / Megatron): normal(0, init_std) for every matrix and
        embedding, zero biases, unit norms; with init_scaled_residual the projections that feed
        the residual stream (wo, w2) use init_std / sqrt(2 * n_layers), as GPT-2 does.
        Works after `to_empty()`: also recomputes the position buffers and re-ties weights."""
        self.tie_weights()
        self.init_buffers()
        devices = [] if self._buffer_device().type != "cuda" else [self._buffer_device()]
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self._init_parameters()

    def _init_parameters(self) -> None:
        for name, module in self.named_modules():
            if self.initialises(name, module):
                self.init_module(name, module)

    def initialises(self, name: str, module: nn.Module) -> bool:
        """Whether `init_module` gives `module` (named `name` in this model) its values. In
        `named_modules()` order these calls draw the random numbers of `init_weights`."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            return not (module is self.output and self.args.tie_embeddings)  # shares the embedding's weight
        return isinstance(module, (nn.LayerNorm, RMSNorm, GroupedExperts))

    def init_module(self, name: str, module: nn.Module, generator: torch.Generator | None = None) -> None:
        """The reference initialisation of one module's own parameters, from `generator` (a CPU
        generator seeded with s draws what the global RNG does after torch.manual_seed(s))."""
        args = self.args
        std = args.init_std
        residual_std = std / math.sqrt(2 * args.n_layers) if args.init_scaled_residual else std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            leaf = name.rsplit(".", 1)[-1]
            scaled = leaf in ("wo", "w2") and name.startswith("layers.")
            nn.init.normal_(module.weight, mean=0.0, std=residual_std if scaled else std, generator=generator)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.reset_parameters()
        elif isinstance(module, GroupedExperts):
            nn.init.normal_(module.w1, mean=0.0, std=std, generator=generator)
            nn.init.normal_(module.w2, mean=0.0, std=residual_std, generator=generator)
            if module.w3 is not None:
                nn.init.normal_(module.w3, mean=0.0, std=std, generator=generator)

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        head: Callable[[torch.Tensor, nn.Linear], torch.Tensor] | None = None,
        documents: torch.Tensor | None = None,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """tokens: LongTensor [B, T] (or hidden states [B, T, dim] when tok_embeddings is None).
        positions: [T] or [B, T]; default start..start+T-1 where start is the cache length.
        Returns logits [B, T, vocab] (hidden states when output is None).

        `head(hidden, output_layer)`, when given, replaces the output layer: the model returns
        what it returns, from the final hidden states (output multiplier applied). A loss that
        applies the output layer itself (ember.train.fused_loss) goes through it, inside this
        forward, where data parallelism has the output weight gathered.

        `documents` [B, T] (packed documents, ember.models.documents): each token's document index;
        attention then stays inside each document. T is the whole sequence attended over.

        `mask`, when given, replaces the attention mask the model would build (ember.generation's
        left-padded batches: no row attends to another row's padding)."""
        batch, seq = tokens.shape[:2]
        start = kv_cache.length if kv_cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + seq, device=tokens.device)
        if self.tok_embeddings is not None:
            h = self._embed(tokens, positions)
        else:
            h = tokens
        rope = self._rope(positions, h.dtype) if self.rope_cos is not None else None
        if mask is None:
            mask = build_attention_mask(self.args, seq, start, h.device, h.dtype, self.alibi_slopes, documents)
        for layer in self.layers.values():
            h = layer(h, rope, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None and head is not None:
            if self.args.output_multiplier != 1.0:
                h = h * self.args.output_multiplier  # (m h) W^T = m (h W^T)
            return head(h, self.output)
        if self.output is not None:
            h = self.output(h)
            if self.args.output_multiplier != 1.0:
                h = h * self.args.output_multiplier
        return h

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        if self.args.embedding_multiplier != 1.0:
            h = h * self.args.embedding_multiplier
        if self.pos_embeddings is not None:
            h = h + self.pos_embeddings(positions)
        if self.embedding_norm is not None:
            h = self.embedding_norm(h)
        if self.training and self.args.hidden_dropout > 0:  # Megatron's embedding dropout
            h = F.dropout(h, self.args.hidden_dropout, training=True)
        return h

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            positions = positions[None]
        # [B, T, 1, head_dim], cast once per forward rather than per layer
        cos = self.rope_cos[positions].unsqueeze(2).to(dtype)
        sin = self.rope_sin[positions].unsqueeze(2).to(dtype)
        return cos, sin

    # -- extras -------------------------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor:
        """Sum of the MoE blocks' load-balancing losses from the last forward (coefficient
        already applied); a 0-dim zero for dense models."""
        total = torch.zeros((), device=self._buffer_device())
        for layer in self.layers.values():
            if layer.moe is not None and layer.moe.aux_loss is not None:
                total = total + layer.moe.aux_loss
        return total

    def new_kv_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        args = self.args
        param = next(self.parameters())
        return KVCache(
            batch_size,
            max_len or args.max_seq_len,
            args.n_kv_heads,
            args.head_dim,
            dtype or param.dtype,
            param.device,
        )


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block (no dropout), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)

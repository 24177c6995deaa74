"""ModelArgs: every architecture knob of ember's one decoder-only transformer.

Family differences (Llama, Qwen, Mistral/Mixtral, Grok-1, Bloom, GPT-2) are values of these
fields, never subclasses. The parameter count and FLOPs helpers are computed from the fields
alone, so they work for a 405B config without building it; a test checks them against the
module built on the meta device.
"""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError

NORM_TYPES = ("rmsnorm", "layernorm")
MLP_TYPES = ("gated", "plain")  # gated: w2(act(w1 x) * w3 x) (SwiGLU/GeGLU); plain: w2(act(w1 x))
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
POSITION_TYPES = ("rope", "alibi", "learned", "none")
ROPE_SCALING_TYPES = ("llama3", "linear")
GATING_TYPES = ("softmax", "sigmoid")
DROP_POLICIES = ("probs", "position")  # Megatron --moe-token-drop-policy


@dataclass
class ModelArgs:
    """One decoder-only transformer, described completely.

    Defaults are Llama-2-7B's. `registry.get_model_args(name)` gives the named configurations;
    `ember.models.hf.args_from_hf_config` reads a Hugging Face `config.json`.
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (= n_heads); 1: multi-query
    head_dim: int | None = None  # None: dim // n_heads (Qwen3 sets it explicitly)
    ffn_dim: int = 11008
    max_seq_len: int = 4096

    # normalisation
    norm_type: str = "rmsnorm"
    norm_eps: float = 1e-5
    embedding_norm: bool = False  # Bloom: LayerNorm right after the token embedding
    sandwich_norm: bool = False  # Grok-1: extra norms on the attention and FFN outputs
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on queries and keys, before RoPE

    # feed-forward
    mlp_type: str = "gated"
    activation: str = "silu"

    # positions
    position_type: str = "rope"
    rope_theta: float = 10000.0
    # None, or {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_seq_len"} or {"type": "linear", "factor"}
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None  # Mistral: each token sees only the last N keys

    # attention
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_logit_softcap: float | None = None  # Grok-1: cap * tanh(scores / cap); disables SDPA

    # biases and embeddings
    qkv_bias: bool = False  # Qwen2, Bloom, GPT-2
    attn_out_bias: bool = False  # Bloom, GPT-2
    mlp_bias: bool = False  # Bloom, GPT-2
    tie_embeddings: bool = False
    embedding_multiplier: float = 1.0  # Grok-1 scales the input embeddings
    output_multiplier: float = 1.0  # Grok-1 scales the logits

    # mixture of experts (num_experts == 0: dense model)
    num_experts: int = 0
    moe_top_k: int = 2
    moe_ffn_dim: int | None = None  # None: ffn_dim
    moe_gating: str = "softmax"  # softmax (Mixtral) or sigmoid (DeepSeek-V3 style) scores
    moe_renormalize: bool = True  # top-k weights sum to 1 (Mixtral)
    num_shared_experts: int = 0  # always-on experts, fused into one MLP of width n * moe_ffn_dim
    moe_aux_loss_coef: float = 0.0  # Switch/Megatron load-balancing loss coefficient
    moe_capacity_factor: float | None = None  # None: dropless; else tokens past capacity dropped
    moe_drop_policy: str = "probs"  # over capacity, drop the lowest router weights (probs) or later tokens (position)
    moe_z_loss_coef: float = 0.0  # ST-MoE / Megatron router z-loss coefficient
    moe_input_jitter: float = 0.0  # Megatron --moe-input-jitter-eps: router input * U(1-eps, 1+eps)
    # Which layers are MoE: None, every layer (when num_experts); else one entry per layer, 1 MoE,
    # 0 a dense FeedForward of width ffn_dim (Megatron's --moe-layer-freq list, Qwen3-MoE's
    # mlp_only_layers). A pattern of all ones is stored as None, so old configs compare equal.
    moe_layer_pattern: list[int] | None = None

    # dropout (training only). Megatron: attention_dropout on the attention probabilities,
    # hidden_dropout on the embeddings and on each branch output before its residual add.
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0

    # initialisation
    init_std: float = 0.02
    init_scaled_residual: bool = False  # GPT-2/Megatron: output projections std / sqrt(2L)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise EmberError(
                    f"ModelArgs: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                    "set head_dim explicitly or change n_heads"
                )
            self.head_dim = self.dim // self.n_heads
        if self.num_experts and self.moe_ffn_dim is None:
            self.moe_ffn_dim = self.ffn_dim
        if self.moe_layer_pattern is not None:
            self.moe_layer_pattern = [int(v) for v in self.moe_layer_pattern]
            if self.num_experts and all(v == 1 for v in self.moe_layer_pattern):
                self.moe_layer_pattern = None
        self.validate()

    # -- aliases other code may find more familiar ------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.dim

    # -- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise EmberError(f"ModelArgs: {message}")

        need(self.norm_type in NORM_TYPES, f"norm_type {self.norm_type!r} not in {NORM_TYPES}")
        need(self.mlp_type in MLP_TYPES, f"mlp_type {self.mlp_type!r} not in {MLP_TYPES}")
        need(self.activation in ACTIVATIONS, f"activation {self.activation!r} not in {ACTIVATIONS}")
        need(self.position_type in POSITION_TYPES, f"position_type {self.position_type!r} not in {POSITION_TYPES}")
        need(self.moe_gating in GATING_TYPES, f"moe_gating {self.moe_gating!r} not in {GATING_TYPES}")
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads {self.n_heads} not a multiple of n_kv_heads {self.n_kv_heads}")
        need(min(self.vocab_size, self.dim, self.n_layers, self.n_heads, self.max_seq_len) > 0, "sizes must be positive")
        if self.position_type == "rope":
            need(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type")
            need(kind in ROPE_SCALING_TYPES, f"rope_scaling type {kind!r} not in {ROPE_SCALING_TYPES}")
        for name in ("attention_dropout", "hidden_dropout"):
            need(0.0 <= getattr(self, name) < 1.0, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.moe_drop_policy in DROP_POLICIES, f"moe_drop_policy {self.moe_drop_policy!r} not in {DROP_POLICIES}")
        need(self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
             f"moe_capacity_factor must be positive (or None: dropless), got {self.moe_capacity_factor}")
        if self.num_experts:
            need(0 < self.moe_top_k <= self.num_experts, f"moe_top_k {self.moe_top_k} must be in 1..{self.num_experts}")
        pattern = self.moe_layer_pattern
        if pattern is not None:
            need(bool(self.num_experts), "moe_layer_pattern needs num_experts > 0 (a dense model has no MoE layers)")
            need(len(pattern) == self.n_layers and set(pattern) <= {0, 1},
                 f"moe_layer_pattern must hold one 0 (dense) or 1 (MoE) per layer ({self.n_layers}), got {pattern}")

    # -- which layers are MoE -------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has a MoE block rather than a dense FeedForward."""
        if not self.num_experts:
            return False
        return self.moe_layer_pattern is None or self.moe_layer_pattern[layer] == 1

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict; `from_dict(to_dict())` gives an equal ModelArgs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EmberError(
                f"ModelArgs: unknown field(s) {unknown}; known fields are {sorted(known)} "
                "(was this file written by a newer ember?)"
            )
        return cls(**data)

    def replace(self, **changes: Any) -> ModelArgs:
        """A copy with `changes`. Fields that were derived (n_kv_heads = n_heads, head_dim =
        dim // n_heads, moe_ffn_dim = ffn_dim) are derived again when what they came from
        changes, so replace(dim=128) on a 64-wide model does not keep the old head_dim."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise EmberError(f"ModelArgs: unknown field(s) {unknown}; known fields are {sorted(known)}")
        derived = {
            "n_kv_heads": (self.n_heads, ("n_heads",)),
            "head_dim": (self.dim // self.n_heads, ("dim", "n_heads")),
            "moe_ffn_dim": (self.ffn_dim if self.num_experts else None, ("ffn_dim", "num_experts")),
        }
        for name, (auto_value, sources) in derived.items():
            if name not in changes and getattr(self, name) == auto_value and any(s in changes for s in sources):
                changes[name] = None
        return dataclasses.replace(self, **changes)

    # -- sizes --------------------------------------------------------------------------------
    def _norm_params(self, width: int) -> int:
        return width * (2 if self.norm_type == "layernorm" else 1)

    def _mlp_params(self, ffn: int) -> int:
        matrices = 3 if self.mlp_type == "gated" else 2
        bias = (ffn * (matrices - 1) + self.dim) if self.mlp_bias else 0
        return matrices * self.dim * ffn + bias

    def _attention_params(self) -> int:
        q = self.n_heads * self.head_dim
        kv = self.n_kv_heads * self.head_dim
        weights = self.dim * (q + 2 * kv) + q * self.dim
        bias = (q + 2 * kv if self.qkv_bias else 0) + (self.dim if self.attn_out_bias else 0)
        qk_norm = 2 * self._norm_params(self.head_dim) if self.qk_norm else 0
        return weights + bias + qk_norm

    def _layer_params(self, active_only: bool, moe: bool | None = None) -> int:
        """One layer's parameters; `moe`: whether it is a MoE layer (None: any MoE layer if
        the model has experts)."""
        norms = (4 if self.sandwich_norm else 2) * self._norm_params(self.dim)
        if not self.num_experts or moe is False:
            return self._attention_params() + norms + self._mlp_params(self.ffn_dim)
        experts = self.moe_top_k if active_only else self.num_experts
        ffn = experts * self._mlp_params(self.moe_ffn_dim) + self.num_experts * self.dim
        if self.num_shared_experts:
            ffn += self._mlp_params(self.num_shared_experts * self.moe_ffn_dim)
        return self._attention_params() + norms + ffn

    def _all_layer_params(self, active_only: bool) -> int:
        moe = self.n_moe_layers
        dense = self.n_layers - moe
        return (moe * self._layer_params(active_only, moe=True) if moe else 0) + (
            dense * self._layer_params(active_only, moe=False) if dense else 0)

    def embedding_params(self) -> int:
        """Token (and learned position) embedding tables."""
        positions = self.max_seq_len * self.dim if self.position_type == "learned" else 0
        return self.vocab_size * self.dim + positions

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Exact parameter count of `Transformer(self)` (tied embeddings counted once).

        exclude_embeddings drops the token and position embedding tables; an untied output
        layer stays counted, as it is a real matmul.
        """
        total = self._all_layer_params(active_only=False) + self._norm_params(self.dim)
        if self.embedding_norm:
            total += self._norm_params(self.dim)
        if not self.tie_embeddings:
            total += self.vocab_size * self.dim
        if not exclude_embeddings:
            total += self.embedding_params()
        return total

    def num_active_params(self) -> int:
        """Non-embedding parameters one token passes through (MoE: only top-k experts),
        plus the output projection, which every token multiplies by."""
        layers = self._all_layer_params(active_only=True)
        norms = self._norm_params(self.dim) * (2 if self.embedding_norm else 1)
        return layers + norms + self.vocab_size * self.dim

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as nanoGPT's estimate_mfu / PaLM:
        6 * N_active (matmul weights, output layer included, MoE counting top-k experts only)
        + 12 * L * n_heads * head_dim * seq_len for the attention scores and weighted sum.
        Router and norms are negligible and counted in N like nanoGPT does."""
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * self.num_active_params() + attention


def rope_scaling_from_dict(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Normalise a rope-scaling dict to ember's keys (accepts HF's names too)."""
    if not data:
        return None
    kind = data.get("type", data.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind == "llama3":
        return {
            "type": "llama3",
            "factor": float(data["factor"]),
            "low_freq_factor": float(data["low_freq_factor"]),
            "high_freq_factor": float(data["high_freq_factor"]),
            "original_max_seq_len": int(data.get("original_max_seq_len", data.get("original_max_position_embeddings"))),
        }
    if kind == "linear":
        return {"type": "linear", "factor": float(data["factor"])}
    raise EmberError(
        f"rope scaling type {kind!r} is not supported; ember implements {ROPE_SCALING_TYPES} "
        "(remove rope_scaling or convert another model)"
    )


def default_attn_scale(args: ModelArgs) -> float:
    return args.attn_scale if args.attn_scale is not None else 1.0 / math.sqrt(args.head_dim)


def moe_layer_pattern(freq: Any, n_layers: int, first_k_dense: int | None = None,
                      where: str = "--moe-layer-freq") -> list[int] | None:
    """Megatron's --moe-layer-freq (and MindSpeed's --first-k-dense-replace) -> ModelArgs'
    moe_layer_pattern: one 1 (MoE) or 0 (dense) per layer; None when every layer is MoE.

    `freq`: an int N (layer i is MoE when i % N == 0, as Megatron and MindSpeed test it: -1 is every
    layer, as MindSpeed's grok1 script passes it), or a list, or a string of a Python list
    expression as Megatron takes it ("[0,1,1,1]", "([0]*1+[1]*3)"; only list literals of ints,
    `list * int` and `list + list` are read, nothing is evaluated); None: every layer.
    `first_k_dense`: the first K layers dense whatever `freq` says (K <= 0: none)."""
    if freq is None:
        pattern = [1] * n_layers
    else:
        value = _pattern_value(freq, where) if isinstance(freq, str) else freq
        if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
            raise EmberError(f"{where} {freq!r}: give an int N (every N-th layer MoE) or a list of 0/1 per layer, "
                             "e.g. '([0]*1+[1]*3)'")
        if isinstance(value, int):
            if value == 0:
                raise EmberError(f"{where} {freq!r}: the frequency must not be 0 (1: every layer MoE)")
            pattern = [1 if i % value == 0 else 0 for i in range(n_layers)]
        else:
            pattern = list(value)
            if len(pattern) != n_layers or any(isinstance(v, bool) or v not in (0, 1) for v in pattern):
                raise EmberError(f"{where} {freq!r}: the list must hold one 0 (dense) or 1 (MoE) per layer, "
                                 f"{n_layers} in all (--num-layers); it has {len(pattern)}: {pattern}")
    if first_k_dense is not None and first_k_dense > 0:
        if first_k_dense > n_layers:
            raise EmberError(f"--first-k-dense-replace {first_k_dense}: more than the {n_layers} layers (--num-layers)")
        pattern = [0] * first_k_dense + pattern[first_k_dense:]
    return None if all(v == 1 for v in pattern) else pattern


def _pattern_value(text: str, where: str) -> Any:
    """The int or list a --moe-layer-freq string means, reading only int/list literals, `*` and
    `+` (Megatron evals the string; ember never evaluates user text)."""
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # quoted once more by a script
        text = text[1:-1]
    try:
        tree = ast.parse(text.strip(), mode="eval")
        return _literal(tree.body)
    except (SyntaxError, ValueError, TypeError, RecursionError):
        raise EmberError(f"{where} {text!r}: not an int or a list pattern; write e.g. 2, [0,1,1,1] or "
                         "'([0]*1+[1]*3)' (list literals of 0/1, * and + only)") from None


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
            and type(node.operand.value) is int:
        return -node.operand.value
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
        left, right = _literal(node.left), _literal(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, list) and isinstance(right, list):
            return left + right
        if isinstance(node.op, ast.Mult) and isinstance(left, list) and type(right) is int and 0 <= len(left) * right <= 100_000:
            return left * right
    raise ValueError("unsupported expression")

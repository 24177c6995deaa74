"""A config's model section -> `ModelArgs`: which architecture to build.

The architecture comes from, in order of precedence: Megatron architecture flags, the registry
name (`--model`), the checkpoint given to `--load` (its ModelArgs), and, when nothing else names a
model, Megatron's defaults for the flags not given. The checkpoint's ModelArgs and the
tokenizer's vocabulary size are plain inputs: reading checkpoints and building tokenizers belong
to the layers above (`ember.train.model_setup.resolve_model_args` gathers them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from ember.errors import EmberError
from ember.models.args import ModelArgs, moe_layer_pattern
from ember.models.registry import get_model_args

if TYPE_CHECKING:
    from ember.config import Config

_POSITIONS = {"rope": "rope", "learned_absolute": "learned", "learned": "learned", "alibi": "alibi", "none": "none"}
_NORMS = {"rmsnorm": "rmsnorm", "layernorm": "layernorm"}


# ModelArgs fields that change how tokens are routed, not the parameters a checkpoint holds.
ROUTING_SETTINGS = ("moe_capacity_factor", "moe_drop_policy", "moe_z_loss_coef")
# ... and the training-only behaviour that may change between runs too (dropout, router jitter).
TRAINING_SETTINGS = ("attention_dropout", "hidden_dropout", "moe_input_jitter")
LOAD_BALANCING_TYPES = ("aux_loss", "none")


def megatron_overrides(config: Config, n_layers: int | None = None) -> dict[str, Any]:
    """Megatron architecture flags -> ModelArgs fields (only those the user gave). `n_layers`: the
    layer count of the named or loaded model, for a --moe-layer-freq given without --num-layers."""
    m = config.model
    out: dict[str, Any] = {}
    simple = {"num_layers": "n_layers", "hidden_size": "dim", "ffn_hidden_size": "ffn_dim",
              "num_attention_heads": "n_heads", "kv_channels": "head_dim", "norm_epsilon": "norm_eps",
              "max_position_embeddings": "max_seq_len", "rotary_base": "rope_theta", "vocab_size": "vocab_size",
              "num_experts": "num_experts", "moe_router_topk": "moe_top_k", "moe_ffn_hidden_size": "moe_ffn_dim",
              "moe_aux_loss_coeff": "moe_aux_loss_coef", "init_method_std": "init_std",
              "moe_expert_capacity_factor": "moe_capacity_factor", "moe_token_drop_policy": "moe_drop_policy",
              "moe_z_loss_coeff": "moe_z_loss_coef"}
    for flag, name in simple.items():
        value = getattr(m, flag)
        if value is not None:
            out[name] = value
    if m.num_query_groups is not None:
        out["n_kv_heads"] = m.num_query_groups
    elif m.group_query_attention:
        out["n_kv_heads"] = 1  # Megatron's default number of query groups
    if m.position_embedding_type is not None:
        kind = _POSITIONS.get(m.position_embedding_type.lower())
        if kind is None:
            raise EmberError(f"--position-embedding-type {m.position_embedding_type}: use rope, "
                             f"learned_absolute, alibi or none")
        out["position_type"] = kind
    if m.normalization is not None:
        kind = _NORMS.get(m.normalization.lower())
        if kind is None:
            raise EmberError(f"--normalization {m.normalization}: use RMSNorm or LayerNorm")
        out["norm_type"] = kind
    if m.swiglu is not None:
        out.update(mlp_type="gated", activation="silu") if m.swiglu else out.update(mlp_type="plain", activation="gelu")
    if m.untie_embeddings_and_output_weights is not None:
        out["tie_embeddings"] = not m.untie_embeddings_and_output_weights
    if m.disable_bias_linear:
        out.update(qkv_bias=False, attn_out_bias=False, mlp_bias=False)
    if m.add_qkv_bias:
        out["qkv_bias"] = True
    if m.qk_layernorm is not None:
        out["qk_norm"] = m.qk_layernorm
    out.update(_dropin_overrides(m))
    if m.moe_layer_freq is not None or m.first_k_dense_replace is not None:
        layers = m.num_layers or n_layers
        if layers is None:
            raise EmberError("--moe-layer-freq/--first-k-dense-replace need the layer count: pass --num-layers")
        out["moe_layer_pattern"] = moe_layer_pattern(m.moe_layer_freq, layers, m.first_k_dense_replace)
    if m.rotary_seq_len_interpolation_factor:  # position interpolation (H3): positions / factor
        out["rope_scaling"] = {"type": "linear", "factor": float(m.rotary_seq_len_interpolation_factor)}
    return out


def _dropin_overrides(m) -> dict[str, Any]:
    """The upstream scripts' other model flags (issue 16): dropout, Grok-1's multipliers and
    post-norm, Bloom's embedding LayerNorm, router jitter and load balancing."""
    out: dict[str, Any] = {}
    for flag, name in (("attention_dropout", "attention_dropout"), ("hidden_dropout", "hidden_dropout"),
                       ("embedding_multiplier_scale", "embedding_multiplier"),
                       ("output_multiplier_scale", "output_multiplier"), ("post_norm", "sandwich_norm"),
                       ("embed_layernorm", "embedding_norm")):
        if getattr(m, flag) is not None:
            out[name] = getattr(m, flag)
    if m.input_jitter is False:  # ModelLink's store_false --input-jitter: given, no jitter
        out["moe_input_jitter"] = 0.0
    elif m.moe_input_jitter_eps is not None:
        out["moe_input_jitter"] = m.moe_input_jitter_eps
    kind = m.moe_router_load_balancing_type
    if kind is not None:
        if kind.lower() not in LOAD_BALANCING_TYPES:
            raise EmberError(f"--moe-router-load-balancing-type {kind}: ember implements aux_loss (the Switch/GShard "
                             f"loss, --moe-aux-loss-coeff) and none; use one of those")
        if kind.lower() == "none":
            out["moe_aux_loss_coef"] = 0.0
    return out


def _vocab_from_tokenizer(m, vocab: int) -> int:
    """Megatron pads the tokenizer's vocabulary to --make-vocab-size-divisible-by; PAI adds
    --extra-vocab-size tokens and does not pad."""
    if m.extra_vocab_size is not None:
        return vocab + m.extra_vocab_size
    return pad_vocab(vocab, m.make_vocab_size_divisible_by)


def megatron_default_args(config: Config, overrides: dict[str, Any]) -> dict[str, Any]:
    """Megatron's defaults for a model described by flags alone (GPT-style: LayerNorm, GELU,
    learned positions, biases, tied embeddings)."""
    for needed, flag in (("n_layers", "--num-layers"), ("dim", "--hidden-size"), ("n_heads", "--num-attention-heads")):
        if needed not in overrides:
            raise EmberError(f"a model described by flags needs {flag} (or name one with --model)")
    dim = overrides["dim"]
    gated = overrides.get("mlp_type") == "gated"
    # Megatron: 4h, or 2/3 of that for SwiGLU, rounded down to a multiple of 64.
    ffn = int(4 * dim * 2 / 3 / 64) * 64 if gated else 4 * dim
    base = dict(norm_type="layernorm", position_type="learned", mlp_type="plain", activation="gelu",
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True, ffn_dim=ffn,
                max_seq_len=config.data.seq_length)
    return {**base, **overrides}


def pad_vocab(size: int, multiple: int | None) -> int:
    if not multiple:
        return size
    return -(-size // multiple) * multiple


def model_args_from_config(config: Config, checkpoint_args: ModelArgs | None = None,
                           tokenizer_vocab: Callable[[], int | None] = lambda: None,
                           checkpoint_where: str = "the checkpoint") -> ModelArgs:
    """The architecture to train, with the vocabulary fitted to the tokenizer where that is safe.

    `checkpoint_args`: the architecture of the checkpoint given to `--load` (None: none given);
    `checkpoint_where` names it in errors. `tokenizer_vocab()`: the tokenizer's vocabulary size
    (None: no tokenizer configured); called only when the architecture needs it, since building
    a tokenizer may read large files.
    """
    m = config.model
    base = get_model_args(m.name) if m.name else checkpoint_args
    overrides = megatron_overrides(config, base.n_layers if base is not None else None)
    if "vocab_size" in overrides:  # Megatron pads the given vocabulary like a tokenizer's
        overrides["vocab_size"] = pad_vocab(overrides["vocab_size"], m.make_vocab_size_divisible_by)
    if m.padded_vocab_size is not None:  # MindSpeed: this size exactly, whatever the tokenizer's
        overrides["vocab_size"] = m.padded_vocab_size
    if m.name:
        args = get_model_args(m.name)
        if args.moe_layer_pattern is not None and overrides.get("n_layers", args.n_layers) != args.n_layers \
                and "moe_layer_pattern" not in overrides:
            raise EmberError(f"--num-layers {overrides['n_layers']}: {m.name} mixes dense and MoE layers "
                             f"({args.moe_layer_pattern}); give the new layers' pattern with --moe-layer-freq")
        if m.name.startswith("tiny-") and "vocab_size" not in overrides:
            # tiny models take the tokenizer's vocabulary (their registry size is a placeholder)
            vocab = tokenizer_vocab()
            if vocab is not None:
                overrides["vocab_size"] = _vocab_from_tokenizer(m, vocab)
        args = args.replace(**overrides) if overrides else args
    elif checkpoint_args is not None:
        # Routing settings (capacity, drop policy, z-loss) may change between runs, like Megatron's.
        run_settings = ROUTING_SETTINGS + TRAINING_SETTINGS
        if checkpoint_args.position_type == "alibi":
            # ALiBi sizes no table by the maximum length: --max-position-embeddings is the run's (PAI's Bloom
            # scripts pass their --seq-length; its converter saved 1024)
            run_settings += ("max_seq_len",)
        routing = {k: overrides.pop(k) for k in run_settings if k in overrides}
        args = checkpoint_args.replace(**routing) if routing else checkpoint_args
        if overrides:
            changed = {k: v for k, v in overrides.items() if getattr(args, k) != v}
            if changed:
                raise EmberError(f"architecture flags {sorted(changed)} differ from the checkpoint in "
                                 f"{checkpoint_where}; drop them (the checkpoint decides the architecture)")
    else:
        if "vocab_size" not in overrides:
            vocab = tokenizer_vocab()
            if vocab is None:
                raise EmberError("the vocabulary size is unknown: pass --vocab-size, or a tokenizer "
                                 "(--tokenizer-type/--tokenizer-name-or-path)")
            overrides["vocab_size"] = _vocab_from_tokenizer(m, vocab)
        args = ModelArgs(**megatron_default_args(config, overrides))
    if config.data.seq_length > args.max_seq_len:
        raise EmberError(f"--seq-length {config.data.seq_length} is longer than the model's maximum "
                         f"{args.max_seq_len}; shorten it or raise --max-position-embeddings")
    return args

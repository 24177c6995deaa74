"""Hugging Face <-> ember: config.json <-> ModelArgs, and tensor names/shapes per family.

The mapping is written once, in the export direction (ember -> HF), as a table of rules; import
runs the same rules backwards. Every rule is a pure re-indexing (rename, transpose, split,
concatenate, stack), so HF -> ember -> HF returns the very same bytes. Rules work on meta
tensors too, which is how `expected_hf_tensors` lists what a checkpoint must contain before any
data is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ember.errors import EmberError
from ember.models.args import ModelArgs, rope_scaling_from_dict

# model_type in config.json -> ember family. Mistral-style Llama variants share one mapping.
MODEL_TYPE_TO_FAMILY = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mixtral": "mixtral",
    "qwen3_moe": "qwen3_moe",
    "bloom": "bloom",
    "gpt2": "gpt2",
}
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "bloom": "BloomForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
SUPPORTED = ", ".join(sorted(MODEL_TYPE_TO_FAMILY))

_ACTIVATIONS_FROM_HF = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}
_ACTIVATIONS_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

# ModelArgs fields a HF config must reproduce exactly for an export to be faithful.
_ARCHITECTURE_FIELDS = (
    "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_type",
    "embedding_norm", "sandwich_norm", "qk_norm", "mlp_type", "activation", "position_type", "rope_theta",
    "rope_scaling", "sliding_window", "attn_scale", "attn_logit_softcap", "qkv_bias", "attn_out_bias",
    "mlp_bias", "tie_embeddings", "embedding_multiplier", "output_multiplier", "num_experts", "moe_top_k",
    "moe_ffn_dim", "moe_gating", "moe_renormalize", "num_shared_experts", "moe_layer_pattern",
)


# =============================================================================================
# config.json <-> ModelArgs
# =============================================================================================
def family_from_hf_config(config: dict[str, Any], where: str) -> str:
    model_type = config.get("model_type")
    family = MODEL_TYPE_TO_FAMILY.get(model_type)
    if family is None:
        arch = ",".join(config.get("architectures") or ["?"])
        raise EmberError(
            f"unknown architecture {arch} (model_type {model_type!r}) in {where}: "
            f"ember converts model_type {SUPPORTED}"
        )
    return family


def args_from_hf_config(config: dict[str, Any], where: str = "config.json") -> tuple[str, ModelArgs]:
    """(family, ModelArgs) for a Hugging Face config.json dict. Missing keys take the defaults
    of the corresponding transformers config class."""
    family = family_from_hf_config(config, where)
    try:
        if family == "bloom":
            fields = _bloom_fields(config, where)
        elif family == "gpt2":
            fields = _gpt2_fields(config, where)
        else:
            fields = _llama_like_fields(config, family, where)
    except KeyError as missing:
        raise EmberError(f"{where}: key {missing} is required for a {family} model") from None
    fields["init_std"] = float(config.get("initializer_range", 0.02))
    return family, ModelArgs(**fields)


def _rope_from_hf(config: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    # transformers >= 5 writes rope_parameters; older files rope_theta + rope_scaling.
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", default_theta)))
    scaling = params if params.get("rope_type", "default") != "default" else config.get("rope_scaling")
    return theta, rope_scaling_from_dict(scaling)


def _activation(config: dict[str, Any], key: str, default: str, where: str) -> str:
    name = config.get(key, default)
    if name not in _ACTIVATIONS_FROM_HF:
        raise EmberError(f"{where}: {key} {name!r} is not supported; ember has {sorted(_ACTIVATIONS_FROM_HF)}")
    return _ACTIVATIONS_FROM_HF[name]


def _llama_like_fields(c: dict[str, Any], family: str, where: str) -> dict[str, Any]:
    heads = c["num_attention_heads"]
    theta, scaling = _rope_from_hf(c, 1000000.0 if family in ("mixtral", "qwen2", "qwen3") else 10000.0)
    if c.get("use_sliding_window"):
        raise EmberError(
            f"{where}: use_sliding_window=true (sliding window on layers >= max_window_layers) is not "
            "supported; ember applies a sliding window to all layers (Mistral style) only"
        )
    bias = bool(c.get("attention_bias", False))
    fields: dict[str, Any] = dict(
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or None,
        ffn_dim=c["intermediate_size"],
        max_seq_len=c.get("max_position_embeddings", 2048),
        norm_eps=float(c.get("rms_norm_eps", 1e-5 if family == "mixtral" else 1e-6)),
        activation=_activation(c, "hidden_act", "silu", where),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
    )
    if family == "qwen2":  # Qwen2 always has q/k/v biases and never an output bias
        fields.update(qkv_bias=True, attn_out_bias=False)
    if family in ("qwen3", "qwen3_moe"):
        fields["qk_norm"] = True
    if family == "qwen3_moe":
        fields.update(_qwen3_moe_fields(c))
    if family in ("mistral", "mixtral"):
        fields["sliding_window"] = c.get("sliding_window")
    if family == "mixtral":
        fields.update(
            num_experts=c.get("num_local_experts", 8),
            moe_top_k=c.get("num_experts_per_tok", 2),
            moe_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)),
        )
    return fields


def _qwen3_moe_fields(c: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: softmax router over all experts, top-k, renormalised only with norm_topk_prob;
    dense layers (width intermediate_size) where mlp_only_layers names them or where
    (layer + 1) % decoder_sparse_step != 0, as transformers' Qwen3MoeDecoderLayer decides."""
    layers, step = c["num_hidden_layers"], int(c.get("decoder_sparse_step") or 1)
    dense = set(c.get("mlp_only_layers") or [])
    return dict(
        num_experts=c.get("num_experts") or c.get("num_local_experts") or 128,
        moe_top_k=c.get("num_experts_per_tok", 8),
        moe_ffn_dim=c.get("moe_intermediate_size", 768),
        moe_renormalize=bool(c.get("norm_topk_prob", False)),
        moe_aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)),
        moe_layer_pattern=[int(i not in dense and (i + 1) % step == 0) for i in range(layers)],
    )


def _bloom_fields(c: dict[str, Any], where: str) -> dict[str, Any]:
    if c.get("apply_residual_connection_post_layernorm"):
        raise EmberError(f"{where}: apply_residual_connection_post_layernorm=true is not supported")
    dim = c.get("hidden_size", c.get("n_embed", 64))
    return dict(
        vocab_size=c.get("vocab_size", 250880),
        dim=dim,
        n_layers=c.get("n_layer", c.get("num_hidden_layers", 2)),
        n_heads=c.get("n_head", c.get("num_attention_heads", 8)),
        ffn_dim=4 * dim,
        max_seq_len=c.get("seq_length", 2048),
        norm_type="layernorm",
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        embedding_norm=True,
        position_type="alibi",
        mlp_type="plain",
        activation="gelu_tanh",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
    )


def _gpt2_fields(c: dict[str, Any], where: str) -> dict[str, Any]:
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise EmberError(f"{where}: scale_attn_by_inverse_layer_idx=true is not supported")
    dim = c.get("n_embd", 768)
    return dict(
        vocab_size=c.get("vocab_size", 50257),
        dim=dim,
        n_layers=c.get("n_layer", 12),
        n_heads=c.get("n_head", 12),
        ffn_dim=c.get("n_inner") or 4 * dim,
        max_seq_len=c.get("n_positions", 1024),
        norm_type="layernorm",
        norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
        position_type="learned",
        mlp_type="plain",
        activation=_activation(c, "activation_function", "gelu_new", where),
        attn_scale=None if c.get("scale_attn_weights", True) else 1.0,
        qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(c.get("tie_word_embeddings", True)),
        init_scaled_residual=True,
    )


def hf_config_from_args(
    args: ModelArgs,
    family: str,
    base: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """A config.json dict that transformers loads as the same architecture. Keys of `base`
    (the original config.json, kept in the ember folder) survive unless the architecture
    overrides them. Raises EmberError when `args` use a feature the HF family lacks."""
    if family not in HF_ARCHITECTURES:
        raise EmberError(
            f"family {family!r} has no Hugging Face architecture to export to (supported: {', '.join(HF_ARCHITECTURES)})"
        )
    if family == "bloom":
        generated = _bloom_config(args)
    elif family == "gpt2":
        generated = _gpt2_config(args)
    else:
        generated = _llama_like_config(args, family)
    generated = {"architectures": [HF_ARCHITECTURES[family]], "model_type": family, **generated}
    generated["initializer_range"] = args.init_std
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        generated["torch_dtype"] = name  # transformers < 5
        generated["dtype"] = name
    config = {**(base or {}), **generated}
    _check_expressible(args, family, config)
    return config


def _llama_like_config(args: ModelArgs, family: str) -> dict[str, Any]:
    scaling = _rope_scaling_to_hf(args.rope_scaling)
    config: dict[str, Any] = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        hidden_act=_ACTIVATIONS_TO_HF[args.activation],
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        tie_word_embeddings=args.tie_embeddings,
        # Both spellings: rope_theta/rope_scaling for transformers 4.x, rope_parameters for 5.x.
        rope_theta=args.rope_theta,
        rope_scaling=scaling,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta, **(scaling or {})},
    )
    if family == "llama":
        config.update(attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias)
    if family in ("qwen3", "qwen3_moe"):
        config["attention_bias"] = args.qkv_bias
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        config["use_sliding_window"] = False
    if family == "qwen3_moe":
        pattern = args.moe_layer_pattern or [1] * args.n_layers
        config.update(
            num_experts=args.num_experts,
            num_experts_per_tok=args.moe_top_k,
            moe_intermediate_size=args.moe_ffn_dim,
            norm_topk_prob=args.moe_renormalize,
            router_aux_loss_coef=args.moe_aux_loss_coef,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
        )
    if family in ("mistral", "mixtral"):
        config["sliding_window"] = args.sliding_window
    if family == "mixtral":
        config.update(
            num_local_experts=args.num_experts,
            num_experts_per_tok=args.moe_top_k,
            router_aux_loss_coef=args.moe_aux_loss_coef,
            intermediate_size=args.moe_ffn_dim,
        )
    return config


def _rope_scaling_to_hf(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if scaling["type"] == "linear":
        return {"rope_type": "linear", "factor": scaling["factor"]}
    return {
        "rope_type": "llama3",
        "factor": scaling["factor"],
        "low_freq_factor": scaling["low_freq_factor"],
        "high_freq_factor": scaling["high_freq_factor"],
        "original_max_position_embeddings": scaling["original_max_seq_len"],
    }


def _bloom_config(args: ModelArgs) -> dict[str, Any]:
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        layer_norm_epsilon=args.norm_eps,
        apply_residual_connection_post_layernorm=False,
        tie_word_embeddings=args.tie_embeddings,
        seq_length=args.max_seq_len,
    )


def _gpt2_config(args: ModelArgs) -> dict[str, Any]:
    return dict(
        vocab_size=args.vocab_size,
        n_embd=args.dim,
        n_layer=args.n_layers,
        n_head=args.n_heads,
        n_inner=args.ffn_dim,
        n_positions=args.max_seq_len,
        layer_norm_epsilon=args.norm_eps,
        activation_function=_ACTIVATIONS_TO_HF[args.activation],
        scale_attn_weights=args.attn_scale is None,
        scale_attn_by_inverse_layer_idx=False,
        tie_word_embeddings=args.tie_embeddings,
    )


def _check_expressible(args: ModelArgs, family: str, config: dict[str, Any]) -> None:
    _, reread = args_from_hf_config(config, where=f"generated {family} config")
    for name in _ARCHITECTURE_FIELDS:
        mine, theirs = getattr(args, name), getattr(reread, name)
        if mine != theirs:
            raise EmberError(
                f"cannot export to a Hugging Face {family} model: ModelArgs.{name}={mine!r} has no "
                f"equivalent there (it would load as {theirs!r}); export to a family that has it"
            )


# =============================================================================================
# tensor names and layouts
# =============================================================================================
@dataclass(frozen=True)
class _Rename:
    """One ember tensor <-> one HF tensor, optionally transposed (GPT-2's Conv1D)."""

    ember: str
    hf: str
    transpose: bool = False


@dataclass(frozen=True)
class _Fuse:
    """Several ember tensors <-> one fused HF tensor (q/k/v of Bloom and GPT-2)."""

    ember: tuple[str, ...]
    hf: str
    layout: str  # "bloom" (per-head interleaved) or "gpt2" (blocks, Conv1D-transposed weight)


@dataclass(frozen=True)
class _Stack:
    """One ember [E, ...] tensor <-> E HF tensors, one per expert ({e} in the HF name)."""

    ember: str
    hf: str


_Rule = _Rename | _Fuse | _Stack

_LLAMA_LAYER = [
    _Rename("attention.wq.weight", "self_attn.q_proj.weight"),
    _Rename("attention.wk.weight", "self_attn.k_proj.weight"),
    _Rename("attention.wv.weight", "self_attn.v_proj.weight"),
    _Rename("attention.wo.weight", "self_attn.o_proj.weight"),
    _Rename("attention.wq.bias", "self_attn.q_proj.bias"),
    _Rename("attention.wk.bias", "self_attn.k_proj.bias"),
    _Rename("attention.wv.bias", "self_attn.v_proj.bias"),
    _Rename("attention.wo.bias", "self_attn.o_proj.bias"),
    _Rename("attention.q_norm.weight", "self_attn.q_norm.weight"),
    _Rename("attention.k_norm.weight", "self_attn.k_norm.weight"),
    _Rename("attention_norm.weight", "input_layernorm.weight"),
    _Rename("ffn_norm.weight", "post_attention_layernorm.weight"),
    _Rename("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    _Rename("feed_forward.w3.weight", "mlp.up_proj.weight"),
    _Rename("feed_forward.w2.weight", "mlp.down_proj.weight"),
    _Rename("feed_forward.w1.bias", "mlp.gate_proj.bias"),
    _Rename("feed_forward.w3.bias", "mlp.up_proj.bias"),
    _Rename("feed_forward.w2.bias", "mlp.down_proj.bias"),
    # Mixtral, in the per-expert layout of the published checkpoints (and of save_pretrained)
    _Rename("moe.router.weight", "block_sparse_moe.gate.weight"),
    _Stack("moe.experts.w1", "block_sparse_moe.experts.{e}.w1.weight"),
    _Stack("moe.experts.w2", "block_sparse_moe.experts.{e}.w2.weight"),
    _Stack("moe.experts.w3", "block_sparse_moe.experts.{e}.w3.weight"),
]
# Qwen3-MoE: the Llama layer (its dense layers' mlp.*_proj), MoE layers in the per-expert layout
# of the published checkpoints (and of save_pretrained)
_QWEN3_MOE_LAYER = [rule for rule in _LLAMA_LAYER if "block_sparse_moe" not in rule.hf] + [
    _Rename("moe.router.weight", "mlp.gate.weight"),
    _Stack("moe.experts.w1", "mlp.experts.{e}.gate_proj.weight"),
    _Stack("moe.experts.w2", "mlp.experts.{e}.down_proj.weight"),
    _Stack("moe.experts.w3", "mlp.experts.{e}.up_proj.weight"),
]
_LLAMA_TOP = [
    _Rename("tok_embeddings.weight", "model.embed_tokens.weight"),
    _Rename("norm.weight", "model.norm.weight"),
    _Rename("output.weight", "lm_head.weight"),
]

_QKV_WEIGHTS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")
_QKV_BIASES = ("attention.wq.bias", "attention.wk.bias", "attention.wv.bias")
_BLOOM_LAYER = [
    _Rename("attention_norm.weight", "input_layernorm.weight"),
    _Rename("attention_norm.bias", "input_layernorm.bias"),
    _Fuse(_QKV_WEIGHTS, "self_attention.query_key_value.weight", "bloom"),
    _Fuse(_QKV_BIASES, "self_attention.query_key_value.bias", "bloom"),
    _Rename("attention.wo.weight", "self_attention.dense.weight"),
    _Rename("attention.wo.bias", "self_attention.dense.bias"),
    _Rename("ffn_norm.weight", "post_attention_layernorm.weight"),
    _Rename("ffn_norm.bias", "post_attention_layernorm.bias"),
    _Rename("feed_forward.w1.weight", "mlp.dense_h_to_4h.weight"),
    _Rename("feed_forward.w1.bias", "mlp.dense_h_to_4h.bias"),
    _Rename("feed_forward.w2.weight", "mlp.dense_4h_to_h.weight"),
    _Rename("feed_forward.w2.bias", "mlp.dense_4h_to_h.bias"),
]
_BLOOM_TOP = [
    _Rename("tok_embeddings.weight", "transformer.word_embeddings.weight"),
    _Rename("embedding_norm.weight", "transformer.word_embeddings_layernorm.weight"),
    _Rename("embedding_norm.bias", "transformer.word_embeddings_layernorm.bias"),
    _Rename("norm.weight", "transformer.ln_f.weight"),
    _Rename("norm.bias", "transformer.ln_f.bias"),
    _Rename("output.weight", "lm_head.weight"),
]

_GPT2_LAYER = [
    _Rename("attention_norm.weight", "ln_1.weight"),
    _Rename("attention_norm.bias", "ln_1.bias"),
    _Fuse(_QKV_WEIGHTS, "attn.c_attn.weight", "gpt2"),
    _Fuse(_QKV_BIASES, "attn.c_attn.bias", "gpt2"),
    _Rename("attention.wo.weight", "attn.c_proj.weight", transpose=True),
    _Rename("attention.wo.bias", "attn.c_proj.bias"),
    _Rename("ffn_norm.weight", "ln_2.weight"),
    _Rename("ffn_norm.bias", "ln_2.bias"),
    _Rename("feed_forward.w1.weight", "mlp.c_fc.weight", transpose=True),
    _Rename("feed_forward.w1.bias", "mlp.c_fc.bias"),
    _Rename("feed_forward.w2.weight", "mlp.c_proj.weight", transpose=True),
    _Rename("feed_forward.w2.bias", "mlp.c_proj.bias"),
]
_GPT2_TOP = [
    _Rename("tok_embeddings.weight", "transformer.wte.weight"),
    _Rename("pos_embeddings.weight", "transformer.wpe.weight"),
    _Rename("norm.weight", "transformer.ln_f.weight"),
    _Rename("norm.bias", "transformer.ln_f.bias"),
    _Rename("output.weight", "lm_head.weight"),
]


def _layer_rules(layer_rules: list[_Rule], hf_prefix: str) -> list[_Rule]:
    """Prefix layer-relative rules with `layers.{i}.` (ember) and `hf_prefix{i}.` (HF)."""
    out: list[_Rule] = []
    for rule in layer_rules:
        if isinstance(rule, _Rename):
            out.append(_Rename(f"layers.{{i}}.{rule.ember}", f"{hf_prefix}{{i}}.{rule.hf}", rule.transpose))
        elif isinstance(rule, _Fuse):
            out.append(_Fuse(tuple(f"layers.{{i}}.{e}" for e in rule.ember), f"{hf_prefix}{{i}}.{rule.hf}", rule.layout))
        else:
            out.append(_Stack(f"layers.{{i}}.{rule.ember}", f"{hf_prefix}{{i}}.{rule.hf}"))
    return out


_RULES: dict[str, list[_Rule]] = {
    **{f: _LLAMA_TOP + _layer_rules(_LLAMA_LAYER, "model.layers.") for f in ("llama", "mistral", "qwen2", "qwen3", "mixtral")},
    "qwen3_moe": _LLAMA_TOP + _layer_rules(_QWEN3_MOE_LAYER, "model.layers."),
    "bloom": _BLOOM_TOP + _layer_rules(_BLOOM_LAYER, "transformer.h."),
    "gpt2": _GPT2_TOP + _layer_rules(_GPT2_LAYER, "transformer.h."),
}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(pattern + "$")


def _fill(template: str, **values: Any) -> str:
    return template.replace("{i}", str(values.get("i", "{i}"))).replace("{e}", str(values.get("e", "{e}")))


# ---------------------------------------------------------------------------------------------
class TensorMapper:
    """Stateful ember <-> HF tensor mapper for one model; feed tensors one at a time in any
    order, collect what comes out. Fused/stacked tensors are held until all parts arrived."""

    def __init__(self, family: str, args: ModelArgs):
        if family not in _RULES:
            raise EmberError(f"family {family!r} has no Hugging Face mapping (supported: {', '.join(_RULES)})")
        self.family = family
        self.args = args
        self._rules = _RULES[family]
        self._ember_index = self._index(lambda r: (r.ember,) if not isinstance(r, _Fuse) else r.ember)
        self._hf_index = self._index(lambda r: (r.hf,))
        self._pending: dict[tuple[str, str], dict[Any, torch.Tensor]] = {}

    def _index(self, names_of) -> list[tuple[re.Pattern[str], _Rule, int]]:
        return [(_template_regex(name), rule, k) for rule in self._rules for k, name in enumerate(names_of(rule))]

    @staticmethod
    def _match(index, name: str) -> tuple[_Rule, int, dict[str, str]] | None:
        for regex, rule, k in index:
            found = regex.match(name)
            if found:
                return rule, k, found.groupdict()
        return None

    # -- ember -> HF ----------------------------------------------------------------------------
    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        hit = self._match(self._ember_index, name)
        if hit is None:
            raise EmberError(f"ember tensor {name} has no Hugging Face {self.family} equivalent")
        rule, part, groups = hit
        if isinstance(rule, _Rename):
            return [(_fill(rule.hf, **groups), tensor.t() if rule.transpose else tensor)]
        if isinstance(rule, _Stack):
            return [(_fill(rule.hf, i=groups["i"], e=e), tensor[e]) for e in range(tensor.shape[0])]
        parts = self._gather(("to_hf", _fill(rule.hf, **groups)), part, tensor, len(rule.ember))
        if parts is None:
            return []
        return [(_fill(rule.hf, **groups), self._fuse(rule, [parts[k] for k in range(len(rule.ember))]))]

    # -- HF -> ember ----------------------------------------------------------------------------
    def to_ember(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        hit = self._match(self._hf_index, name)
        if hit is None:
            raise EmberError(f"Hugging Face tensor {name} is not part of a {self.family} model")
        rule, _, groups = hit
        if isinstance(rule, _Rename):
            return [(_fill(rule.ember, **groups), tensor.t() if rule.transpose else tensor)]
        if isinstance(rule, _Fuse):
            return [(_fill(e, **groups), t) for e, t in zip(rule.ember, self._split(rule, tensor))]
        experts = self.args.num_experts
        parts = self._gather(("to_ember", _fill(rule.ember, **groups)), int(groups["e"]), tensor, experts)
        if parts is None:
            return []
        return [(_fill(rule.ember, **groups), torch.stack([parts[e] for e in range(experts)]))]

    def _gather(self, key: tuple[str, str], part: Any, tensor: torch.Tensor, needed: int) -> dict[Any, torch.Tensor] | None:
        parts = self._pending.setdefault(key, {})
        parts[part] = tensor
        if len(parts) < needed:
            return None
        return self._pending.pop(key)

    def pending(self) -> list[str]:
        """Names still waiting for their other parts (non-empty means the input was incomplete)."""
        return [name for _, name in self._pending]

    # -- fused q/k/v layouts ---------------------------------------------------------------------
    def _fuse(self, rule: _Fuse, parts: list[torch.Tensor]) -> torch.Tensor:
        if rule.layout == "gpt2":
            fused = torch.cat(parts, dim=0)
            return fused.t() if fused.dim() == 2 else fused
        # Bloom interleaves per head: [n_heads, (q, k, v), head_dim, ...]
        heads, head_dim = self.args.n_heads, self.args.head_dim
        per_head = [p.reshape(heads, head_dim, *p.shape[1:]) for p in parts]
        return torch.stack(per_head, dim=1).reshape(3 * heads * head_dim, *parts[0].shape[1:])

    def _split(self, rule: _Fuse, fused: torch.Tensor) -> list[torch.Tensor]:
        if rule.layout == "gpt2":
            blocks = fused.t() if fused.dim() == 2 else fused
            return list(blocks.chunk(3, dim=0))
        heads, head_dim = self.args.n_heads, self.args.head_dim
        per_head = fused.reshape(heads, 3, head_dim, *fused.shape[1:])
        return [per_head[:, k].reshape(heads * head_dim, *fused.shape[1:]) for k in range(3)]


# ---------------------------------------------------------------------------------------------
# Tensors some HF checkpoints carry that are not weights (or that ember derives itself).
_IGNORED_HF = [
    re.compile(r".*\.attn\.(masked_)?bias$"),  # GPT-2's causal-mask buffers in old checkpoints
    re.compile(r".*rotary_emb\.inv_freq$"),  # RoPE buffers saved by old Llama checkpoints
]
# Expert weights transformers >= 5 fuses in memory: [E, 2F, D] gate+up and [E, D, F] down.
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_FUSED_ROUTER = re.compile(r"model\.layers\.(\d+)\.mlp\.gate\.weight$")


def normalise_hf_tensor(family: str, args: ModelArgs, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """Bring one tensor of a HF checkpoint to the canonical names the mapping uses: adds the
    `transformer.` prefix base-model checkpoints lack, drops buffers and tied heads, and splits
    transformers-5-style fused expert tensors into per-expert ones."""
    if any(p.match(name) for p in _IGNORED_HF):
        return
    if family in ("bloom", "gpt2") and not name.startswith(("transformer.", "lm_head.")):
        name = "transformer." + name
    if name == "lm_head.weight" and args.tie_embeddings:
        return  # tied: the embedding is the head
    if family in _PER_EXPERT_NAMES:
        router = _FUSED_ROUTER.match(name)
        if router and family == "mixtral":
            yield f"model.layers.{router.group(1)}.block_sparse_moe.gate.weight", tensor
            return
        fused = _FUSED_EXPERTS.match(name)
        if fused:
            layer, kind = fused.groups()
            module, gate_name, up_name, down_name = _PER_EXPERT_NAMES[family]
            prefix = f"model.layers.{layer}.{module}.experts"
            for e in range(tensor.shape[0]):
                if kind == "down_proj":
                    yield f"{prefix}.{e}.{down_name}.weight", tensor[e]
                else:
                    gate, up = tensor[e].chunk(2, dim=0)
                    yield f"{prefix}.{e}.{gate_name}.weight", gate
                    yield f"{prefix}.{e}.{up_name}.weight", up
            return
    yield name, tensor


# family -> (MoE module name, per-expert gate, up and down projection names) in published checkpoints
_PER_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
                     "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def ember_state_shapes(args: ModelArgs) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Names and shapes of the tensors an ember weight folder holds for `args` (tied output
    weight excluded), from a model built on the meta device."""
    from ember.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    state = model.state_dict()
    if args.tie_embeddings:
        state.pop("output.weight", None)
    return {name: (t.shape, t.dtype) for name, t in state.items()}


def expected_hf_tensors(family: str, args: ModelArgs) -> dict[str, torch.Size]:
    """Every tensor name and shape a HF checkpoint of this family and config must contain."""
    mapper = TensorMapper(family, args)
    expected: dict[str, torch.Size] = {}
    for name, (shape, dtype) in ember_state_shapes(args).items():
        for hf_name, tensor in mapper.to_hf(name, torch.empty(shape, dtype=dtype, device="meta")):
            expected[hf_name] = tensor.shape
    return expected


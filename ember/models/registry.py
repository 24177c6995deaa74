"""Named model configurations: the published models' shapes and tiny-* versions for tests.

Each entry records the published parameter count and where the shape comes from; a test
builds every full-size config on the meta device and compares its count with that figure.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Any

from ember.errors import EmberError
from ember.models.args import ModelArgs


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # llama | mistral | qwen2 | qwen3 | mixtral | qwen3_moe | grok1 | bloom | gpt2
    args: ModelArgs
    published_params: float | None  # the figure from the model card / paper, None for tiny-*
    source: str
    params_tolerance: float = 0.005  # relative; published figures are rounded


_SPECS: dict[str, ModelSpec] = {}


def _register(name: str, family: str, published: float | None, source: str, tolerance: float = 0.005, **fields: Any) -> None:
    _SPECS[name] = ModelSpec(name, family, ModelArgs(**fields), published, source, tolerance)


# ---------------------------------------------------------------------------------------------
# Llama 2 / 3 / 3.1 / 3.2 (meta-llama/*/config.json)
_LLAMA2 = dict(vocab_size=32000, norm_eps=1e-5, max_seq_len=4096, rope_theta=10000.0)
_register("llama2-7b", "llama", 6.74e9, "meta-llama/Llama-2-7b-hf", dim=4096, n_layers=32, n_heads=32, ffn_dim=11008, **_LLAMA2)
_register("llama2-13b", "llama", 13.02e9, "meta-llama/Llama-2-13b-hf", dim=5120, n_layers=40, n_heads=40, ffn_dim=13824, **_LLAMA2)
_register(
    "llama2-70b", "llama", 68.98e9, "meta-llama/Llama-2-70b-hf",
    dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA2,
)

_LLAMA3 = dict(vocab_size=128256, norm_eps=1e-5, max_seq_len=8192, rope_theta=500000.0)
_register("llama3-8b", "llama", 8.03e9, "meta-llama/Meta-Llama-3-8B", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, **_LLAMA3)
_register("llama3-70b", "llama", 70.55e9, "meta-llama/Meta-Llama-3-70B", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, **_LLAMA3)


def _llama31_scaling(factor: float) -> dict[str, Any]:
    return {"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192}


_LLAMA31 = dict(vocab_size=128256, norm_eps=1e-5, max_seq_len=131072, rope_theta=500000.0)
_register(
    "llama3.1-8b", "llama", 8.03e9, "meta-llama/Llama-3.1-8B",
    dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, rope_scaling=_llama31_scaling(8.0), **_LLAMA31,
)
_register(
    "llama3.1-70b", "llama", 70.55e9, "meta-llama/Llama-3.1-70B",
    dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, rope_scaling=_llama31_scaling(8.0), **_LLAMA31,
)
_register(
    "llama3.1-405b", "llama", 405.85e9, "meta-llama/Llama-3.1-405B",
    dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim=53248, rope_scaling=_llama31_scaling(8.0), **_LLAMA31,
)
_register(
    "llama3.2-1b", "llama", 1.24e9, "meta-llama/Llama-3.2-1B",
    dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
    rope_scaling=_llama31_scaling(32.0), **_LLAMA31,
)
_register(
    "llama3.2-3b", "llama", 3.21e9, "meta-llama/Llama-3.2-3B",
    dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True,
    rope_scaling=_llama31_scaling(32.0), **_LLAMA31,
)

# ---------------------------------------------------------------------------------------------
# Qwen2.5 (Qwen/Qwen2.5-*/config.json): q/k/v biases, no output bias; small ones tie embeddings.
_QWEN25 = dict(norm_eps=1e-6, max_seq_len=32768, rope_theta=1000000.0, qkv_bias=True)
_register("qwen2.5-0.5b", "qwen2", 0.49e9, "Qwen/Qwen2.5-0.5B", tolerance=0.01, vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, tie_embeddings=True, **_QWEN25)
_register("qwen2.5-1.5b", "qwen2", 1.54e9, "Qwen/Qwen2.5-1.5B", vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_dim=8960, tie_embeddings=True, **_QWEN25)
_register("qwen2.5-3b", "qwen2", 3.09e9, "Qwen/Qwen2.5-3B", vocab_size=151936, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008, tie_embeddings=True, **_QWEN25)
_register("qwen2.5-7b", "qwen2", 7.61e9, "Qwen/Qwen2.5-7B", vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944, **_QWEN25)
_register("qwen2.5-14b", "qwen2", 14.7e9, "Qwen/Qwen2.5-14B", vocab_size=152064, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, ffn_dim=13824, **_QWEN25)
# The Qwen2.5-32B model card says 32.5B; its config gives 32.76B (the card rounds loosely).
_register(
    "qwen2.5-32b", "qwen2", 32.5e9, "Qwen/Qwen2.5-32B", tolerance=0.01,
    vocab_size=152064, dim=5120, n_layers=64, n_heads=40, n_kv_heads=8, ffn_dim=27648, **_QWEN25,
)
_register("qwen2.5-72b", "qwen2", 72.7e9, "Qwen/Qwen2.5-72B", vocab_size=152064, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=29568, **_QWEN25)

# ---------------------------------------------------------------------------------------------
# Qwen3 (Qwen/Qwen3-*/config.json): q/k RMSNorm, head_dim 128 regardless of dim, no biases.
_QWEN3 = dict(vocab_size=151936, norm_eps=1e-6, max_seq_len=40960, rope_theta=1000000.0, qk_norm=True, head_dim=128)
_register("qwen3-0.6b", "qwen3", 0.6e9, "Qwen/Qwen3-0.6B", tolerance=0.01, dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=3072, tie_embeddings=True, **_QWEN3)
_register("qwen3-1.7b", "qwen3", 1.7e9, "Qwen/Qwen3-1.7B", tolerance=0.015, dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, ffn_dim=6144, tie_embeddings=True, **_QWEN3)
_register("qwen3-4b", "qwen3", 4.0e9, "Qwen/Qwen3-4B", tolerance=0.01, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=9728, tie_embeddings=True, **_QWEN3)
_register("qwen3-8b", "qwen3", 8.19e9, "Qwen/Qwen3-8B", dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, ffn_dim=12288, **_QWEN3)
_register("qwen3-14b", "qwen3", 14.8e9, "Qwen/Qwen3-14B", dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, ffn_dim=17408, **_QWEN3)
_register("qwen3-32b", "qwen3", 32.8e9, "Qwen/Qwen3-32B", dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, ffn_dim=25600, **_QWEN3)

# ---------------------------------------------------------------------------------------------
# Mixtral (mistralai/Mixtral-8x7B-v0.1/config.json)
_register(
    "mixtral-8x7b", "mixtral", 46.7e9, "mistralai/Mixtral-8x7B-v0.1",
    vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=32768,
    norm_eps=1e-5, rope_theta=1000000.0, num_experts=8, moe_top_k=2, moe_aux_loss_coef=0.02,
)

# Qwen3-MoE (Qwen/Qwen3-30B-A3B/config.json): q/k norm, 128 experts of width 768, top-8
# renormalised (norm_topk_prob), every layer MoE (mlp_only_layers empty); 3.3B active.
_register(
    "qwen3-30b-a3b", "qwen3_moe", 30.5e9, "Qwen/Qwen3-30B-A3B",
    vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, ffn_dim=6144,
    max_seq_len=40960, norm_eps=1e-6, rope_theta=1000000.0, qk_norm=True, num_experts=128, moe_top_k=8,
    moe_ffn_dim=768, moe_aux_loss_coef=0.001,
)

# ---------------------------------------------------------------------------------------------
# Grok-1. The full model follows xai-org/grok-1 (model.py / run.py): 64 layers, GeGLU experts
# (ffn = 8 * 6144 * 2/3), sandwich RMSNorms, attention logits soft-capped at 30, embeddings
# times 78.38 and logits times 0.577, tied input/output embedding.
_GROK1 = dict(
    vocab_size=131072, dim=6144, n_heads=48, n_kv_heads=8, head_dim=128, ffn_dim=32768, max_seq_len=8192,
    norm_eps=1e-5, rope_theta=10000.0, sandwich_norm=True, num_experts=8, moe_top_k=2,
    embedding_multiplier=78.38367176906169, output_multiplier=0.5773502691896257,
)
# "314B" counts 64 x 4.92B of layers; the 0.8B embedding table brings it to 315.7B.
_register(
    "grok1-314b", "grok1", 314e9, "xai-org/grok-1 run.py (314B parameters)", tolerance=0.01,
    n_layers=64, activation="gelu_tanh", attn_logit_softcap=30.0, tie_embeddings=True, **_GROK1,
)
# grok1-40b is the seeds' scaled-down Grok-1 from Ascend ModelLink
# examples/mcore/grok1/pretrain_grok1_40b_ptd.sh (mirror: aeeeeeep/ModelLink): Grok-1's width
# with 8 layers ("total num layers of grok1 is 64"), --swiglu experts, --post-norm (sandwich),
# --untie-embeddings-and-output-weights, the same embedding/output multipliers, flash attention
# (so no logit soft-cap), --init-method-std 0.01, --moe-aux-loss-coeff 1e-2. That is 40.97B
# parameters for the "40B" name. (Later MindSpeed-LLM copies of the script say 12 layers,
# which would be 60B, so the 8-layer original is used.) ModelLink also passes --input-jitter, but
# that flag is action='store_false' (modellink/training/arguments.py): passing it turns router
# jitter off, so moe_input_jitter stays 0 here, as in the seed's run.
_register(
    "grok1-40b", "grok1", 40e9, "Ascend ModelLink examples/mcore/grok1/pretrain_grok1_40b_ptd.sh", tolerance=0.03,
    n_layers=8, activation="silu", init_std=0.01, moe_aux_loss_coef=0.01, **_GROK1,
)

# ---------------------------------------------------------------------------------------------
# Bloom (bigscience/bloom-*/config.json): ALiBi, embedding LayerNorm, GELU MLP with biases.
_BLOOM = dict(
    vocab_size=250880, max_seq_len=2048, norm_type="layernorm", norm_eps=1e-5, embedding_norm=True,
    position_type="alibi", mlp_type="plain", activation="gelu_tanh", qkv_bias=True, attn_out_bias=True,
    mlp_bias=True, tie_embeddings=True,
)
_register("bloom-560m", "bloom", 559.2e6, "bigscience/bloom-560m", dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, **_BLOOM)
_register("bloom-1b1", "bloom", 1.065e9, "bigscience/bloom-1b1", dim=1536, n_layers=24, n_heads=16, ffn_dim=6144, **_BLOOM)
_register("bloom-1b7", "bloom", 1.722e9, "bigscience/bloom-1b7", dim=2048, n_layers=24, n_heads=16, ffn_dim=8192, **_BLOOM)
_register("bloom-3b", "bloom", 3.003e9, "bigscience/bloom-3b", dim=2560, n_layers=30, n_heads=32, ffn_dim=10240, **_BLOOM)
_register("bloom-7b1", "bloom", 7.07e9, "bigscience/bloom-7b1", dim=4096, n_layers=30, n_heads=32, ffn_dim=16384, **_BLOOM)
_register("bloom-176b", "bloom", 176.2e9, "bigscience/bloom", dim=14336, n_layers=70, n_heads=112, ffn_dim=57344, **_BLOOM)

# ---------------------------------------------------------------------------------------------
# GPT-2 (openai-community/gpt2*): learned positions, GELU MLP, biases, scaled residual init.
_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, norm_type="layernorm", norm_eps=1e-5, position_type="learned",
    mlp_type="plain", activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
    tie_embeddings=True, init_scaled_residual=True,
)
_register("gpt2", "gpt2", 124.4e6, "openai-community/gpt2", dim=768, n_layers=12, n_heads=12, ffn_dim=3072, **_GPT2)
_register("gpt2-medium", "gpt2", 354.8e6, "openai-community/gpt2-medium", dim=1024, n_layers=24, n_heads=16, ffn_dim=4096, **_GPT2)
_register("gpt2-large", "gpt2", 774.0e6, "openai-community/gpt2-large", dim=1280, n_layers=36, n_heads=20, ffn_dim=5120, **_GPT2)
_register("gpt2-xl", "gpt2", 1.558e9, "openai-community/gpt2-xl", dim=1600, n_layers=48, n_heads=25, ffn_dim=6400, **_GPT2)

# ---------------------------------------------------------------------------------------------
# tiny-*: one per family, same architecture features, CPU-test sized. vocab_size is replaced by
# the tokenizer's at train time.
_TINY = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=256)
_register("tiny-llama", "llama", None, "tiny Llama (GQA, SwiGLU, RoPE)", n_kv_heads=2, ffn_dim=176, **_TINY)
_register("tiny-qwen2", "qwen2", None, "tiny Qwen2 (q/k/v biases, tied)", n_kv_heads=2, ffn_dim=176, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True, **_TINY)
_register("tiny-qwen3", "qwen3", None, "tiny Qwen3 (q/k norm, head_dim 32)", n_kv_heads=2, head_dim=32, ffn_dim=176, norm_eps=1e-6, qk_norm=True, tie_embeddings=True, **_TINY)
_register("tiny-mistral", "mistral", None, "tiny Mistral (sliding window 64)", n_kv_heads=2, ffn_dim=176, sliding_window=64, **_TINY)
_register("tiny-mixtral", "mixtral", None, "tiny Mixtral (4 experts, top-2)", n_kv_heads=2, ffn_dim=96, num_experts=4, moe_top_k=2, moe_aux_loss_coef=0.02, **_TINY)
_register(
    "tiny-grok1", "grok1", None, "tiny grok1-40b (sandwich norms, multipliers, 4 experts)",
    n_kv_heads=2, ffn_dim=96, num_experts=4, moe_top_k=2, moe_aux_loss_coef=0.01, sandwich_norm=True,
    embedding_multiplier=78.38367176906169, output_multiplier=0.5773502691896257, **_TINY,
)
_register(
    "tiny-qwen3-moe", "qwen3_moe", None, "tiny Qwen3-MoE (layer 0 dense, layer 1 MoE: 4 experts, top-2)",
    n_kv_heads=2, head_dim=32, ffn_dim=176, norm_eps=1e-6, qk_norm=True, num_experts=4, moe_top_k=2,
    moe_ffn_dim=96, moe_aux_loss_coef=0.001, moe_layer_pattern=[0, 1], **_TINY,
)
_register(
    "tiny-bloom", "bloom", None, "tiny Bloom (ALiBi, embedding LayerNorm)",
    ffn_dim=256, **{**_BLOOM, **_TINY},
)
_register("tiny-gpt2", "gpt2", None, "tiny GPT-2 (learned positions)", ffn_dim=256, **{**_GPT2, **_TINY})


# ---------------------------------------------------------------------------------------------
def list_models() -> list[str]:
    return sorted(_SPECS)


def get_model_spec(name: str) -> ModelSpec:
    spec = _SPECS.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(_SPECS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise EmberError(f"unknown model {name!r}{hint} (`ember models` lists all {len(_SPECS)})")
    return spec


def get_model_args(name: str, **overrides: Any) -> ModelArgs:
    """A fresh ModelArgs for a named configuration, with fields replaced by `overrides`."""
    args = copy.deepcopy(get_model_spec(name).args)
    return args.replace(**overrides) if overrides else args


def get_model_family(name: str) -> str:
    return get_model_spec(name).family

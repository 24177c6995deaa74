"""ember weights -> Megatron-LM checkpoints (`ember convert --from ember --to megatron`).

Writes what Megatron-LM's training loop writes for a Megatron-Core GPTModel (local or TE spec
naming), at any tensor/pipeline-parallel layout:

- legacy (`--ckpt-format torch`): OUT/latest_checkpointed_iteration.txt and
  OUT/iter_0000000/mp_rank_TT[_PPP]/model_optim_rng.pt = {'args', 'checkpoint_version': 3.0,
  'iteration': 0, 'model': this rank's state_dict}; q/k/v rows interleaved per query group and
  split by groups, SwiGLU's fc1 as [this rank's gate rows; its up rows], column-parallel tensors
  (and the vocab-parallel embedding/output) split on rows, row-parallel ones on columns, layer
  numbers local to the pipeline stage, the tied output's copy on the last stage;
- torch_dist: OUT/iter_0000000/ as `megatron.core.dist_checkpointing.save` writes it: a torch DCP
  checkpoint (`.metadata`, `__0_0.distcp`) with global shapes and the layers stacked on a leading
  dimension (`decoder.layers.self_attention.linear_qkv.weight` is [num_layers, ...], norms under
  their fused names `linear_qkv.layer_norm_weight`), SwiGLU's fc1 as [all gates; all ups], plus
  `common.pt` ({'args', 'iteration', 'checkpoint_version'}) and `metadata.json`. The layout is
  the reader's choice there: the same folder loads at any TP/PP (the args say the one asked for).

Mixture-of-experts models (Mixtral style) are written as Megatron-Core's SequentialMLP experts:
`mlp.router.weight`, per expert `mlp.experts.local_experts.L.linear_fc1/linear_fc2.weight` in the
per-rank files, one file per (tensor, pipeline, expert) rank with `expert_parallel` > 1
(`mp_rank_TT[_PPP]_EEE`, holding that expert rank's experts), and
`decoder.layers.mlp.experts.experts.linear_fc1.weight` [layers, experts, ...] in torch_dist.

Bloom (ALiBi, embedding LayerNorm) has no Megatron-Core model; it is written as PAI-Megatron-Patch's
legacy Bloom model saves it (`megatron_patch/model/bloom/`, the layout `ember.checkpoint.megatron`
reads): per-rank files only, nested legacy names ({'language_model': {'embedding': {'word_embeddings':
{'weight', 'norm.weight', 'norm.bias'}}, 'encoder': {'layers.N.self_attention.query_key_value.weight',
..., 'final_layernorm.weight'}}}, `word_embeddings_for_head` on the last stage with pipeline
parallelism), and the args its training saves (`--position-embedding-type alibi --embed-layernorm`).

Streamed: legacy files are made one pipeline stage at a time, distributed chunks one tensor at a
time (one chunk per layer), each read from the ember folder when needed.
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint import weights as io_weights
from ember.checkpoint.megatron import (
    RANK_FILE, TRACKER_FILE, _EXPERT_KEY, dense_key, expert_key, fuse_qkv, is_megatron_checkpoint)
from ember.errors import EmberError
from ember.models.args import ModelArgs

ITERATION = 0
_LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
_COLUMN = {"self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight",
           "mlp.linear_fc1.bias", "embedding.word_embeddings.weight", "output_layer.weight"}
_ROW = {"self_attention.linear_proj.weight", "mlp.linear_fc2.weight"}
# names of the norms in Megatron-Core's sharded_state_dict (fused into the next linear)
_DIST_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


# =============================================================================================
# ModelArgs -> Megatron-LM args
# =============================================================================================
def megatron_args_from_ember(args: ModelArgs, tensor_parallel: int, pipeline_parallel: int, ckpt_format: str,
                             params_dtype: torch.dtype = torch.float32, expert_parallel: int = 1) -> argparse.Namespace:
    """The Namespace Megatron-LM saves for this model (the inverse of `model_args_from_megatron`);
    what Megatron-Core cannot express is refused in one line. Bloom-style models (ALiBi, an
    embedding LayerNorm) get the args of PAI-Megatron-Patch's Bloom training instead."""
    if is_pai_bloom(args):
        return pai_bloom_args(args, tensor_parallel, pipeline_parallel, ckpt_format, params_dtype, expert_parallel)
    moe = bool(args.num_experts)
    unsupported = [
        (moe and args.num_shared_experts, "shared experts (ember's have no Megatron --moe-shared-expert-intermediate-size "
                                          "equivalent in this exporter)"),
        (moe and args.mlp_bias, "mixture-of-experts models with MLP biases"),
        (moe and args.moe_gating == "sigmoid" and args.moe_renormalize != (args.moe_top_k > 1),
         "sigmoid routers whose top-k weights are renormalized other than Megatron's (only when top-k > 1)"),
        (args.sandwich_norm, "sandwich norms (Grok-1)"),
        (args.sliding_window, "sliding-window attention"),
        (args.attn_logit_softcap, "attention logit soft-capping"),
        (args.embedding_multiplier != 1.0 or args.output_multiplier != 1.0, "embedding/output multipliers"),
    ]
    for present, what in unsupported:
        if present:
            raise EmberError(f"{what} have no Megatron-Core GPTModel equivalent; ember cannot export this model to Megatron")
    if args.mlp_type == "gated" and args.activation != "silu":
        raise EmberError(f"a gated MLP with {args.activation} is not expressible in Megatron-LM's args (only SwiGLU)")
    if args.mlp_type != "gated" and args.activation not in ("gelu", "gelu_tanh"):
        raise EmberError(f"activation {args.activation} is not expressible in Megatron-LM's args (gelu, gelu_tanh, swiglu)")
    biases = (args.qkv_bias, args.attn_out_bias, args.mlp_bias)
    if biases not in ((False, False, False), (True, False, False), (True, True, True)):
        raise EmberError(f"biases (qkv, attention output, mlp) = {biases}: Megatron has --add-bias-linear for all "
                         "linears and --add-qkv-bias for q/k/v only")
    rope_scaling = args.rope_scaling
    if rope_scaling is not None and not (
            rope_scaling.get("type") == "llama3" and rope_scaling.get("low_freq_factor") == 1.0
            and rope_scaling.get("high_freq_factor") == 4.0 and rope_scaling.get("original_max_seq_len") == 8192):
        raise EmberError(f"RoPE scaling {rope_scaling} is not Megatron's --use-rope-scaling (Llama-3.1 with fixed factors)")
    tp, pp = tensor_parallel, pipeline_parallel
    ffn = [(args.moe_ffn_dim, "moe_ffn_hidden_size")] if moe else []
    if args.n_moe_layers < args.n_layers:  # dense layers (all, or mixed with MoE ones)
        ffn.append((args.ffn_dim, "ffn_hidden_size"))
    checks = [(args.n_heads, "attention heads"), (args.n_kv_heads, "query groups"), *ffn, (args.vocab_size, "vocabulary rows")]
    for count, what in checks:
        if count % tp:
            raise EmberError(f"--target-tensor-parallel-size {tp} does not divide the {count} {what}")
    if args.n_layers % pp:
        raise EmberError(f"--target-pipeline-parallel-size {pp} does not divide the {args.n_layers} layers")
    ep = expert_parallel
    if ep < 1 or (ep > 1 and not moe):
        raise EmberError(f"--target-expert-parallel-size {ep}: " + (
            "must be at least 1" if ep < 1 else "needs a mixture-of-experts model; this one has no experts"))
    if moe and args.num_experts % ep:
        raise EmberError(f"--target-expert-parallel-size {ep} does not divide the {args.num_experts} experts")
    position = {"rope": "rope", "learned": "learned_absolute", "none": "none"}[args.position_type]
    namespace = argparse.Namespace(
        num_layers=args.n_layers, hidden_size=args.dim, ffn_hidden_size=args.ffn_dim,
        num_attention_heads=args.n_heads, group_query_attention=args.n_kv_heads != args.n_heads,
        num_query_groups=args.n_kv_heads, kv_channels=args.head_dim,
        max_position_embeddings=args.max_seq_len, seq_length=args.max_seq_len,
        position_embedding_type=position, use_rotary_position_embeddings=position == "rope",
        rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
        rotary_percent=1.0, rotary_interleaved=False,
        use_rope_scaling=rope_scaling is not None,
        rope_scaling_factor=float(rope_scaling["factor"]) if rope_scaling else 8.0,
        normalization="RMSNorm" if args.norm_type == "rmsnorm" else "LayerNorm", norm_epsilon=args.norm_eps,
        apply_layernorm_1p=False, swiglu=args.mlp_type == "gated", squared_relu=False,
        openai_gelu=args.activation == "gelu_tanh", untie_embeddings_and_output_weights=not args.tie_embeddings,
        add_bias_linear=args.mlp_bias, add_qkv_bias=args.qkv_bias, qk_layernorm=args.qk_norm,
        softmax_scale=args.attn_scale, num_experts=args.num_experts or None,
        moe_router_topk=args.moe_top_k, moe_ffn_hidden_size=args.moe_ffn_dim if moe else None,
        moe_aux_loss_coeff=args.moe_aux_loss_coef, moe_router_load_balancing_type="aux_loss",
        moe_router_score_function=args.moe_gating,
        moe_router_pre_softmax=moe and args.moe_gating == "softmax" and not args.moe_renormalize,
        moe_grouped_gemm=False, moe_token_dispatcher_type="allgather",
        moe_layer_freq=list(args.moe_layer_pattern) if args.moe_layer_pattern else 1,
        moe_shared_expert_intermediate_size=None, moe_router_topk_scaling_factor=None,
        moe_router_enable_expert_bias=False, moe_router_num_groups=None,
        moe_expert_capacity_factor=args.moe_capacity_factor,
        moe_token_drop_policy=getattr(args, "moe_drop_policy", "probs"),
        moe_z_loss_coeff=getattr(args, "moe_z_loss_coef", 0.0) or None,
        moe_input_jitter_eps=args.moe_input_jitter or None,
        vocab_size=args.vocab_size, padded_vocab_size=args.vocab_size, make_vocab_size_divisible_by=1,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp,
        virtual_pipeline_model_parallel_size=None, world_size=tp * pp * ep, data_parallel_size=ep,
        params_dtype=params_dtype, fp16=params_dtype == torch.float16, bf16=params_dtype == torch.bfloat16,
        ckpt_format=ckpt_format, init_method_std=args.init_std, attention_dropout=0.0, hidden_dropout=0.0,
        iteration=ITERATION, consumed_train_samples=0, consumed_valid_samples=0,
    )
    return namespace


def is_pai_bloom(args: ModelArgs) -> bool:
    """Whether the model needs PAI-Megatron-Patch's Bloom (no Megatron-Core model has ALiBi or an embedding norm)."""
    return args.position_type == "alibi" or args.embedding_norm


def pai_bloom_args(args: ModelArgs, tp: int, pp: int, ckpt_format: str, params_dtype: torch.dtype,
                   ep: int = 1) -> argparse.Namespace:
    """The Namespace PAI-Megatron-Patch's Bloom training (Megatron-LM's legacy args plus its patch
    args) saves for this model; what its Bloom model cannot hold is refused in one line."""
    if ckpt_format != "legacy":
        raise EmberError(f"--format {ckpt_format}: Bloom (ALiBi, embedding LayerNorm) has no Megatron-Core model, so "
                         "no distributed checkpoint; pass --format legacy (PAI-Megatron-Patch's per-rank Bloom files)")
    unsupported = [
        (args.position_type != "alibi", f"{args.position_type} positions with an embedding layernorm (PAI's Bloom has ALiBi)"),
        (args.norm_type != "layernorm", f"{args.norm_type} norms (PAI's Bloom has LayerNorm)"),
        (args.mlp_type != "plain" or args.activation not in ("gelu", "gelu_tanh"),
         f"a {args.mlp_type} {args.activation} MLP (PAI's Bloom has a plain GELU MLP)"),
        (not (args.qkv_bias and args.attn_out_bias and args.mlp_bias), "linears without biases"),
        (not args.tie_embeddings, "an untied output layer"),
        (args.n_kv_heads != args.n_heads, "grouped-query attention"),
        (bool(args.num_experts), "mixture of experts"),
        (args.qk_norm or args.sandwich_norm, "q/k or sandwich norms"),
        (bool(args.sliding_window) or bool(args.attn_logit_softcap) or args.attn_scale is not None,
         "sliding windows, soft-capping or a custom attention scale"),
        (args.embedding_multiplier != 1.0 or args.output_multiplier != 1.0, "embedding/output multipliers"),
    ]
    for present, what in unsupported:
        if present:
            raise EmberError(f"{what}: not expressible in PAI-Megatron-Patch's Bloom model, the only Megatron "
                             "model with ALiBi; ember cannot export this model to Megatron")
    for count, what in ((args.n_heads, "attention heads"), (args.ffn_dim, "ffn_hidden_size"), (args.vocab_size, "vocabulary rows")):
        if count % tp:
            raise EmberError(f"--target-tensor-parallel-size {tp} does not divide the {count} {what}")
    if args.n_layers % pp:
        raise EmberError(f"--target-pipeline-parallel-size {pp} does not divide the {args.n_layers} layers")
    if ep != 1:
        raise EmberError(f"--target-expert-parallel-size {ep}: needs a mixture-of-experts model; this one has no experts")
    return argparse.Namespace(
        num_layers=args.n_layers, hidden_size=args.dim, ffn_hidden_size=args.ffn_dim,
        num_attention_heads=args.n_heads, kv_channels=args.head_dim,
        max_position_embeddings=args.max_seq_len, seq_length=args.max_seq_len,
        position_embedding_type="alibi", embed_layernorm=args.embedding_norm, layernorm_epsilon=args.norm_eps,
        apply_residual_connection_post_layernorm=False, apply_query_key_layer_scaling=True,
        # the fused bias-GELU is the tanh approximation; without it PAI's MLP runs torch's exact GELU
        bias_gelu_fusion=args.activation == "gelu_tanh", openai_gelu=False, onnx_safe=None, swiglu=False,
        padded_vocab_size=args.vocab_size, make_vocab_size_divisible_by=128, extra_vocab_size=0,
        patch_tokenizer_type="BloomTokenizerFromHF",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=None,
        data_parallel_size=1, world_size=tp * pp,
        params_dtype=params_dtype, fp16=params_dtype == torch.float16, bf16=params_dtype == torch.bfloat16,
        use_flash_attn=False, ckpt_format="torch", init_method_std=args.init_std,
        attention_dropout=args.attention_dropout, hidden_dropout=args.hidden_dropout,
        iteration=ITERATION, consumed_train_samples=0, consumed_valid_samples=0,
    )


# =============================================================================================
# ember tensors -> Megatron global tensors
# =============================================================================================
def megatron_tensors(args: ModelArgs, get: Callable[[str], torch.Tensor], layers: range | None = None,
                     first: bool = True, last: bool = True) -> Iterator[tuple[int | None, str, torch.Tensor]]:
    """(global layer or None, Megatron-Core name, global tensor) for the layers `layers` (and the
    model-level tensors of the first/last stage), made from ember tensors `get(name)`; the
    inverse of `megatron.ember_tensors`."""
    norm_parts = ("weight", "bias") if args.norm_type == "layernorm" else ("weight",)
    if first:
        yield None, "embedding.word_embeddings.weight", get("tok_embeddings.weight")
        if args.embedding_norm:
            for part in ("weight", "bias"):
                yield None, f"embedding.word_embeddings.norm.{part}", get(f"embedding_norm.{part}")
        if args.position_type == "learned":
            yield None, "embedding.position_embeddings.weight", get("pos_embeddings.weight")
    for i in layers if layers is not None else range(args.n_layers):
        p = f"layers.{i}."
        for part in norm_parts:
            yield i, f"input_layernorm.{part}", get(p + f"attention_norm.{part}")
        for part, present in (("weight", True), ("bias", args.qkv_bias)):
            if present:
                yield i, f"self_attention.linear_qkv.{part}", fuse_qkv(
                    args, get(p + f"attention.wq.{part}"), get(p + f"attention.wk.{part}"), get(p + f"attention.wv.{part}"))
        if args.qk_norm:
            for which in ("q", "k"):
                for part in norm_parts:
                    yield i, f"self_attention.{which}_layernorm.{part}", get(p + f"attention.{which}_norm.{part}")
        yield i, "self_attention.linear_proj.weight", get(p + "attention.wo.weight")
        if args.attn_out_bias:
            yield i, "self_attention.linear_proj.bias", get(p + "attention.wo.bias")
        for part in norm_parts:
            yield i, f"pre_mlp_layernorm.{part}", get(p + f"ffn_norm.{part}")
        if args.is_moe_layer(i):
            yield i, "mlp.router.weight", get(p + "moe.router.weight")
            w1 = get(p + "moe.experts.w1")
            w3 = get(p + "moe.experts.w3") if args.mlp_type == "gated" else None
            for e in range(args.num_experts):  # per expert: [gate; up] like the dense fc1
                fc1 = torch.cat([w1[e], w3[e]], dim=0) if w3 is not None else w1[e]
                yield i, expert_key(e, "linear_fc1", "weight"), fc1
            del w1, w3
            w2 = get(p + "moe.experts.w2")
            for e in range(args.num_experts):
                yield i, expert_key(e, "linear_fc2", "weight"), w2[e]
            del w2
            continue
        for part, present in (("weight", True), ("bias", args.mlp_bias)):
            if not present:
                continue
            if args.mlp_type == "gated":  # global [all gates; all ups]
                fc1 = torch.cat([get(p + f"feed_forward.w1.{part}"), get(p + f"feed_forward.w3.{part}")], dim=0)
            else:
                fc1 = get(p + f"feed_forward.w1.{part}")
            yield i, f"mlp.linear_fc1.{part}", fc1
            yield i, f"mlp.linear_fc2.{part}", get(p + f"feed_forward.w2.{part}")
    if last:
        for part in norm_parts:
            yield None, f"decoder.final_layernorm.{part}", get(f"norm.{part}")
        if not args.tie_embeddings:
            yield None, "output_layer.weight", get("output.weight")


def tp_slice(args: ModelArgs, key: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Tensor-parallel rank `rank`'s part of a global tensor, as a per-rank file holds it."""
    if size == 1:
        return tensor
    key = dense_key(key)  # an expert's linears split like the dense MLP's
    if key.startswith("mlp.linear_fc1.") and args.mlp_type == "gated":
        gate, up = tensor.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]], dim=0)
    if key in _COLUMN:
        return tensor.chunk(size, dim=0)[rank]
    if key in _ROW:
        return tensor.chunk(size, dim=1)[rank]
    return tensor


class _EmberSource:
    """Random access to the tensors of an ember weight folder, one at a time."""

    def __init__(self, folder: Path, dtype: torch.dtype | None):
        self.files = io_weights.WeightFiles(folder)
        self.entries = {entry.name: (path, entry) for path, entry in self.files.entries()}
        self.dtype = dtype

    def get(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise EmberError(f"{self.files.folder}: tensor {name} is missing")
        path, entry = self.entries[name]
        if isinstance(entry, io_weights.StoredTensor):
            with open(path, "rb") as f:
                tensor = io_weights.read_stored_tensor(f, entry)
        else:
            tensor = io_weights._load_bin(path)[name]
        return io_weights.cast_floating(tensor, self.dtype)


# =============================================================================================
# the two formats
# =============================================================================================
def _write_legacy(args: ModelArgs, source: _EmberSource, folder: Path, namespace: argparse.Namespace,
                  tp: int, pp: int, ep: int = 1) -> int:
    """Per-rank files; with expert parallelism (ep > 1) one file per (tensor, pipeline, expert)
    rank, `mp_rank_TT[_PPP]_EEE`, each with its experts under local numbers and the rest copied."""
    per_stage = args.n_layers // pp
    local_experts = args.num_experts // ep if args.num_experts else 0
    files = 0
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        layers = range(stage * per_stage, (stage + 1) * per_stage)
        ranks: dict[tuple[int, int], dict[str, Any]] = {(r, e): {} for r in range(tp) for e in range(ep)}

        def put(expert_ranks: range, name: str, key: str, tensor: torch.Tensor | None) -> None:
            for r in range(tp):
                part = None if tensor is None else tp_slice(args, key, tensor, r, tp).clone()
                for e in expert_ranks:
                    ranks[(r, e)][name] = part

        for layer, key, tensor in megatron_tensors(args, source.get, layers, first, last):
            local = None if layer is None else layer - layers.start
            expert = _EXPERT_KEY.match(key)
            if expert:
                index = int(expert.group(1))
                owner = range(index // local_experts, index // local_experts + 1)
                module = f"decoder.layers.{local}.mlp.experts.local_experts.{index % local_experts}.{expert.group(2)}"
                put(owner, f"{module}.{expert.group(3)}", key, tensor)
                if expert.group(3) == "weight":
                    put(owner, f"{module}._extra_state", key, None)
                continue
            name = key if layer is None else f"decoder.layers.{local}.{key}"
            put(range(ep), name, key, tensor)
            if layer is not None and key.endswith(".weight") and key[: -len(".weight")] in _LINEARS:
                put(range(ep), f"decoder.layers.{local}.{key[:-len('.weight')]}._extra_state", key, None)
        if last:
            if args.tie_embeddings and pp > 1:  # the last stage keeps its own copy of the tied embedding
                put(range(ep), "output_layer.weight", "output_layer.weight", source.get("tok_embeddings.weight"))
            put(range(ep), "output_layer._extra_state", "", None)
        for (r, e), model in ranks.items():
            name = f"mp_rank_{r:02d}" + (f"_{stage:03d}" if pp > 1 else "") + (f"_{e:03d}" if ep > 1 else "")
            (folder / name).mkdir(parents=True)
            state = {"args": namespace, "checkpoint_version": 3.0, "iteration": ITERATION, "model": _ordered(model)}
            torch.save(state, folder / name / RANK_FILE)
            files += 1
        del ranks
    return files


# Megatron-Core layer names -> the legacy model's (PAI's Bloom layers)
_LEGACY_MODULES = {"self_attention.linear_qkv": "self_attention.query_key_value",
                   "self_attention.linear_proj": "self_attention.dense", "pre_mlp_layernorm": "post_attention_layernorm",
                   "mlp.linear_fc1": "mlp.dense_h_to_4h", "mlp.linear_fc2": "mlp.dense_4h_to_h"}


def _write_pai_bloom(args: ModelArgs, source: _EmberSource, folder: Path, namespace: argparse.Namespace,
                     tp: int, pp: int) -> int:
    """PAI-Megatron-Patch's Bloom per-rank files: its legacy model's nested state dict per
    (tensor, pipeline) rank, layer numbers local to the stage."""
    per_stage = args.n_layers // pp
    for stage in range(pp):
        first, last = stage == 0, stage == pp - 1
        layers = range(stage * per_stage, (stage + 1) * per_stage)
        models: list[dict[str, Any]] = [{"language_model": {}} for _ in range(tp)]
        for layer, key, tensor in megatron_tensors(args, source.get, layers, first, last):
            for rank, model in enumerate(models):
                part = tp_slice(args, key, tensor, rank, tp).clone()
                language_model = model["language_model"]
                if key.startswith("embedding.word_embeddings."):
                    words = language_model.setdefault("embedding", {}).setdefault("word_embeddings", {})
                    words[key[len("embedding.word_embeddings."):]] = part
                elif layer is None:  # decoder.final_layernorm.*
                    language_model.setdefault("encoder", {})[key[len("decoder."):]] = part
                else:
                    module, kind = key.rsplit(".", 1)
                    name = f"layers.{layer - layers.start}.{_LEGACY_MODULES.get(module, module)}.{kind}"
                    language_model.setdefault("encoder", {})[name] = part
        if last and not first:  # the tied head's copy, as Megatron's legacy GPTModel keeps it on the last stage
            embedding = source.get("tok_embeddings.weight")
            for rank, model in enumerate(models):
                model["word_embeddings_for_head"] = {"weight": tp_slice(args, "output_layer.weight", embedding, rank, tp).clone()}
        for rank, model in enumerate(models):
            name = f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True)
            torch.save({"args": namespace, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model},
                       folder / name / RANK_FILE)
        del models
    return tp * pp


def _ordered(model: dict[str, Any]) -> dict[str, Any]:
    """The order of Megatron-Core's state_dict: embedding, layers, final norm, output layer."""
    def rank(name: str) -> int:
        return 0 if name.startswith("embedding.") else 2 if name.startswith(("decoder.final", "output_layer")) else 1
    return dict(sorted(model.items(), key=lambda item: rank(item[0])))


def _write_torch_dist(args: ModelArgs, source: _EmberSource, folder: Path, namespace: argparse.Namespace) -> int:
    """One DCP file holding every tensor with its global shape (one chunk per layer), the
    metadata megatron-core's loader reads, common.pt and metadata.json."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
        TensorStorageMetadata)
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    folder.mkdir(parents=True)
    data_name = "__0_0.distcp"
    state_meta: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    layers = args.n_layers
    # megatron-core stacks the layers' tensors [layers, ...] when every layer is alike; a model mixing
    # dense and MoE layers it saves layer by layer (decoder.layers.N.*, experts [experts, ...])
    by_layer = args.moe_layer_pattern is not None
    with open(folder / data_name, "wb") as f:
        def put(index: Any, payload: bytes) -> None:
            storage[index] = _StorageInfo(relative_path=data_name, offset=f.tell(), length=len(payload))
            f.write(payload)

        def saved(obj: Any) -> bytes:
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            return buffer.getvalue()

        for layer, key, tensor in megatron_tensors(args, source.get):
            expert = _EXPERT_KEY.match(key) if layer is not None else None
            if layer is None:
                fqn, shape, offsets, chunk = key, tuple(tensor.shape), (0,) * tensor.dim(), tensor
            elif by_layer and expert:
                index, experts = int(expert.group(1)), args.num_experts
                fqn = f"decoder.layers.{layer}.mlp.experts.experts.{expert.group(2)}.{expert.group(3)}"
                shape, offsets, chunk = (experts, *tensor.shape), (index, *(0,) * tensor.dim()), tensor[None]
            elif by_layer:
                fqn = f"decoder.layers.{layer}." + _DIST_NAMES.get(key, key)
                shape, offsets, chunk = tuple(tensor.shape), (0,) * tensor.dim(), tensor
            elif expert:  # [layers, experts, ...], as SequentialMLP.sharded_state_dict stores them
                index, experts = int(expert.group(1)), args.num_experts
                fqn = f"decoder.layers.mlp.experts.experts.{expert.group(2)}.{expert.group(3)}"
                shape = (layers, experts, *tensor.shape)
                offsets, chunk = (layer, index, *(0,) * tensor.dim()), tensor[None, None]
            else:
                fqn = "decoder.layers." + _DIST_NAMES.get(key, key)
                shape, offsets, chunk = (layers, *tensor.shape), (layer, *(0,) * tensor.dim()), tensor[None]
            item = state_meta.get(fqn)
            if item is None:
                item = state_meta[fqn] = TensorStorageMetadata(
                    properties=TensorProperties(dtype=tensor.dtype), size=torch.Size(shape), chunks=[])
            item.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(chunk.shape)))
            put(MetadataIndex(fqn, torch.Size(offsets)), saved(chunk.contiguous().clone()))
            if by_layer and layer is not None and (expert and expert.group(3) == "weight" or not expert and
                                                   key.endswith(".weight") and key[: -len(".weight")] in _LINEARS):
                module = f"mlp.experts.experts.{expert.group(2)}" if expert else key[: -len(".weight")]
                extra = f"decoder.layers.{layer}.{module}._extra_state/" + (
                    f"shard_{index}_{experts}" if expert else "shard_0_1")
                state_meta[extra] = BytesStorageMetadata()
                put(MetadataIndex(extra), saved([None]))
            elif by_layer:
                pass
            elif expert and expert.group(3) == "weight":
                extra = (f"decoder.layers.mlp.experts.experts.{expert.group(2)}._extra_state/"
                         f"shard_{layer}.{index}_{layers}.{experts}")
                state_meta[extra] = BytesStorageMetadata()
                put(MetadataIndex(extra), saved([None]))
            elif layer is not None and key.endswith(".weight") and key[: -len(".weight")] in _LINEARS:
                extra = f"decoder.layers.{key[:-len('.weight')]}._extra_state/shard_{layer}_{layers}"
                state_meta[extra] = BytesStorageMetadata()
                put(MetadataIndex(extra), saved([None]))  # what megatron-core saves for a local linear
    metadata = Metadata(state_dict_metadata=state_meta, storage_data=storage)
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    torch.save({"args": namespace, "iteration": ITERATION, "checkpoint_version": 3.0}, folder / "common.pt")
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                      "common_backend": "torch", "common_backend_version": 1}))
    return 1


def convert_ember_to_megatron(
    src: str | Path,
    out: str | Path,
    format: str = "torch_dist",
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    expert_parallel: int = 1,
) -> dict[str, Any]:
    """ember weight folder (or `ember train --save` folder) -> Megatron save folder, written
    atomically. Returns a report: family, format, layout, tensors, files. `expert_parallel`
    (`--target-expert-parallel-size`): the expert-parallel size the args name and, for the
    per-rank format, the number of `_EEE` expert-rank files per (tensor, pipeline) rank."""
    import tempfile

    from ember.checkpoint.convert import check_output_folder
    from ember.checkpoint.export import export_training_checkpoint, is_training_checkpoint
    from ember.models.hf import ember_state_shapes

    if format not in ("torch_dist", "legacy"):
        raise EmberError(f"--format {format}: expected torch_dist or legacy")
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise EmberError("the target tensor/pipeline-parallel sizes must be at least 1")
    src, out = Path(src), Path(out)
    check_output_folder(src, out)
    if is_training_checkpoint(src):
        with tempfile.TemporaryDirectory(prefix="ember-export-", dir=out.parent if out.parent.is_dir() else None) as tmp:
            weights = export_training_checkpoint(src, Path(tmp) / "weights")
            return convert_ember_to_megatron(weights, out, format, tensor_parallel, pipeline_parallel, overwrite, dtype,
                                             expert_parallel)
    manifest = io_weights.read_manifest(src)
    args = ModelArgs.from_dict(manifest["model_args"])
    source = _EmberSource(src, dtype)
    found = {name: (entry.shape, entry.dtype) for name, (_, entry) in source.entries.items()}
    io_weights.check_tensor_set(found, ember_state_shapes(args), where=str(src))
    first = next(iter(source.entries.values()))[1]
    params_dtype = dtype or first.dtype
    namespace = megatron_args_from_ember(args, tensor_parallel, pipeline_parallel, format, params_dtype, expert_parallel)
    # --force replaces an earlier Megatron export (or ember/HF output), never anything else
    with io_weights.atomic_folder(out, overwrite, replaceable=is_megatron_checkpoint) as tmp:
        folder = tmp / f"iter_{ITERATION:07d}"
        if is_pai_bloom(args):
            files = _write_pai_bloom(args, source, folder, namespace, tensor_parallel, pipeline_parallel)
        elif format == "legacy":
            files = _write_legacy(args, source, folder, namespace, tensor_parallel, pipeline_parallel, expert_parallel)
        else:
            files = _write_torch_dist(args, source, folder, namespace)
        (tmp / TRACKER_FILE).write_text(str(ITERATION))
    return {"family": manifest.get("family"), "format": format, "tensor_parallel": tensor_parallel,
            "pipeline_parallel": pipeline_parallel, "expert_parallel": expert_parallel, "tensors": len(found), "files": files,
            "bytes": sum(e.nbytes for _, e in source.entries.values())}


__all__ = ["convert_ember_to_megatron", "is_pai_bloom", "megatron_args_from_ember", "megatron_tensors", "pai_bloom_args",
           "tp_slice"]

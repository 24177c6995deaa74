"""From config to a ready model: which architecture, then build -> parallelize -> initialise.

The architecture comes from, in order of precedence: Megatron architecture flags, the registry
name (`--model`), the checkpoint given to `--load` (converted weights or a training checkpoint),
and, when nothing else names a model, Megatron's defaults for the flags not given.

The model is built on the meta device and, with pipeline parallelism, cut into this rank's stages;
then, from outside and in the torchtitan order, tensor (+ sequence) parallelism, expert
parallelism, context parallelism, recomputation, compilation and data parallelism (FSDP2) are
applied to each stage, and only then is memory allocated — already sharded. Random
initialisation always happens on the CPU with the run's seed, so every layout and every device
type starts from the same weights; it is made part by part (embeddings, each layer, ...) on rank 0
and broadcast, so no process ever holds a full copy beside its shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ember.config import Config
from ember.errors import EmberError
from ember.models import ModelArgs, Transformer, get_model_args
from ember.parallel.fsdp import apply_data_parallel
from ember.parallel.mesh import ParallelMeshes
from ember.parallel.recompute import apply_recompute
from ember.train.checkpoint import CheckpointRef, load_full_weights

_POSITIONS = {"rope": "rope", "learned_absolute": "learned", "learned": "learned", "alibi": "alibi", "none": "none"}
_NORMS = {"rmsnorm": "rmsnorm", "layernorm": "layernorm"}


def megatron_overrides(config: Config) -> dict[str, Any]:
    """Megatron architecture flags -> ModelArgs fields (only those the user gave)."""
    m = config.model
    out: dict[str, Any] = {}
    simple = {"num_layers": "n_layers", "hidden_size": "dim", "ffn_hidden_size": "ffn_dim",
              "num_attention_heads": "n_heads", "kv_channels": "head_dim", "norm_epsilon": "norm_eps",
              "max_position_embeddings": "max_seq_len", "rotary_base": "rope_theta", "vocab_size": "vocab_size",
              "num_experts": "num_experts", "moe_router_topk": "moe_top_k", "moe_ffn_hidden_size": "moe_ffn_dim",
              "moe_aux_loss_coeff": "moe_aux_loss_coef", "init_method_std": "init_std"}
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
    return out


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


def _tokenizer_vocab(config: Config) -> int | None:
    d = config.data
    if not (d.tokenizer_type or d.tokenizer_name_or_path or d.tokenizer_model or d.vocab_file):
        return None
    from ember.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(d.tokenizer_type or "PretrainedFromHF", name_or_path=d.tokenizer_name_or_path,
                                model_file=d.tokenizer_model, vocab_file=d.vocab_file, merge_file=d.merge_file)
    return tokenizer.vocab_size


def args_from_checkpoint(ref: CheckpointRef) -> ModelArgs:
    if ref.kind == "weights":
        from ember.models.checkpoint_io import read_manifest

        return ModelArgs.from_dict(read_manifest(ref.path)["model_args"])
    return ModelArgs.from_dict(ref.train_state()["model_args"])


def resolve_model_args(config: Config, ref: CheckpointRef | None) -> ModelArgs:
    """The architecture to train, with the vocabulary fitted to the tokenizer where that is safe."""
    m = config.model
    overrides = megatron_overrides(config)
    if "vocab_size" in overrides:  # Megatron pads the given vocabulary like a tokenizer's
        overrides["vocab_size"] = pad_vocab(overrides["vocab_size"], m.make_vocab_size_divisible_by)
    if m.name:
        args = get_model_args(m.name)
        if m.name.startswith("tiny-") and "vocab_size" not in overrides:
            # tiny models take the tokenizer's vocabulary (their registry size is a placeholder)
            vocab = _tokenizer_vocab(config)
            if vocab is not None:
                overrides["vocab_size"] = pad_vocab(vocab, m.make_vocab_size_divisible_by)
        args = args.replace(**overrides) if overrides else args
    elif ref is not None:
        args = args_from_checkpoint(ref)
        if overrides:
            changed = {k: v for k, v in overrides.items() if getattr(args, k) != v}
            if changed:
                raise EmberError(f"architecture flags {sorted(changed)} differ from the checkpoint in "
                                 f"{ref.path}; drop them (the checkpoint decides the architecture)")
    else:
        if "vocab_size" not in overrides:
            vocab = _tokenizer_vocab(config)
            if vocab is None:
                raise EmberError("the vocabulary size is unknown: pass --vocab-size, or a tokenizer "
                                 "(--tokenizer-type/--tokenizer-name-or-path)")
            overrides["vocab_size"] = pad_vocab(vocab, m.make_vocab_size_divisible_by)
        args = ModelArgs(**megatron_default_args(config, overrides))
    if config.data.seq_length > args.max_seq_len:
        raise EmberError(f"--seq-length {config.data.seq_length} is longer than the model's maximum "
                         f"{args.max_seq_len}; shorten it or raise --max-position-embeddings")
    return args


@dataclass
class ParallelModel:
    """What this rank trains.

    `model`: the whole model, or (pipeline parallelism) this rank's stages as one module under
    the whole model's parameter names (`RankStages`): what the optimizer and checkpoints see.
    `modules`: what runs (the model, or the stages). `pipeline`: the stages' `PipelineParts`.
    `expert_params`: expert-parallel weights, whose gradients the trainer finishes itself.
    """

    model: nn.Module
    modules: list[nn.Module]
    pipeline: Any = None
    expert_params: list[nn.Parameter] = field(default_factory=list)


def build_model(args: ModelArgs, config: Config, device: torch.device,
                meshes: ParallelMeshes | None = None) -> ParallelModel:
    """Allocate the model on `device`, parallelized; weights are left uninitialised."""
    p = config.parallel
    with torch.device("meta"):
        model = Transformer(args)
    pipeline = None
    modules = [model]
    if meshes is not None and meshes.pp is not None:
        from ember.parallel.pipeline import build_pipeline_stages, virtual_stages_per_rank

        virtual = virtual_stages_per_rank(args.n_layers, meshes.dims.pp, p.num_layers_per_virtual_pipeline_stage)
        pipeline = build_pipeline_stages(model, meshes.pp, virtual_stages=virtual,
                                         first_stage_layers=p.decoder_first_pipeline_num_layers,
                                         last_stage_layers=p.decoder_last_pipeline_num_layers, device=device)
        modules = pipeline.modules
    for module in modules:
        parallelize(module, config, device, meshes)
    experts = []
    for module in modules:
        module.to_empty(device=device)
        # to_empty gives each module a new Parameter, which unties a shared embedding/output matrix
        # (FSDP keeps it shared); tie it again, or the two copies would train apart.
        module.tie_weights()
        module.init_buffers(device)
        if meshes is not None and meshes.ep is not None:
            from ember.parallel.experts import expert_parameters

            experts.extend(expert_parameters(module))
    if pipeline is not None:
        from ember.parallel.pipeline import RankStages

        return ParallelModel(RankStages(modules), modules, pipeline, experts)
    return ParallelModel(model, modules, None, experts)


def parallelize(model: nn.Module, config: Config, device: torch.device, meshes: ParallelMeshes | None) -> None:
    """TP -> EP -> CP -> recompute -> compile -> FSDP on one model or pipeline stage, in place."""
    t, p = config.train, config.parallel
    if meshes is not None and meshes.tp is not None:
        from ember.parallel.tensor import apply_tensor_parallel

        # loss_parallel: logits stay split over the vocabulary; ember.parallel.loss reduces them
        apply_tensor_parallel(model, meshes.tp, sequence_parallel=meshes.dims.sequence_parallel, loss_parallel=True)
    if meshes is not None and meshes.ep is not None:
        from ember.parallel.experts import apply_expert_parallel

        apply_expert_parallel(model, meshes.ep, meshes.expert if meshes.tp is not None else None)
    if meshes is not None and meshes.cp is not None:
        from ember.parallel.context import apply_context_parallel

        apply_context_parallel(model, meshes.cp, load_balance=True)
    apply_recompute(model, t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
    if compile_enabled(config, device):
        for block in model.layers.values():
            block.compile()
    if meshes is not None and meshes.fsdp is not None:
        ignored = None
        if meshes.ep is not None:
            from ember.parallel.experts import expert_parameters

            ignored = set(expert_parameters(model))
        apply_data_parallel(model, meshes.fsdp, p.dp_mode, p.overlap_grad_reduce, ignored)


def compile_enabled(config: Config, device: torch.device) -> bool:
    if config.train.compile is not None:
        return config.train.compile
    return device.type == "cuda"


def initial_weight_chunks(args: ModelArgs, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """The run's random initialisation, one part of the model at a time (the embeddings, each
    layer, the final norm, the output layer), made on the CPU so it is the same for every layout.

    The values are `Transformer.init_weights(seed)`'s, drawn in the same order, but only one part
    is ever in memory: a 70B model does not need 280 GB of host memory on rank 0 to start.
    """
    with torch.device("meta"):
        reference = Transformer(args)
    parts: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in reference.named_modules():
        if reference.initialises(name, module):
            top = name.split(".")[0]
            parts.setdefault(f"layers.{name.split('.')[1]}" if top == "layers" else top, []).append((name, module))
    expected = set(reference.state_dict())
    seen: set[str] = set()
    generator = torch.Generator().manual_seed(seed)  # private: the global RNG is left alone
    for modules in parts.values():
        chunk: dict[str, torch.Tensor] = {}
        for name, module in modules:
            module.to_empty(device="cpu", recurse=False)
            reference.init_module(name, module, generator)
            for param_name, param in module.named_parameters(recurse=False):
                chunk[f"{name}.{param_name}" if name else param_name] = param.detach()
        if args.tie_embeddings and "tok_embeddings.weight" in chunk:
            chunk["output.weight"] = chunk["tok_embeddings.weight"]  # one matrix, both names
        seen.update(chunk)
        yield chunk
        for _, module in modules:  # give the memory back before the next part
            module.to_empty(device="meta", recurse=False)
    if seen != expected:
        raise EmberError(f"initialisation left out {sorted(expected - seen)[:3]}; this is a bug in ember")


def initial_weights(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """All of `initial_weight_chunks` in one dict (small models, tests)."""
    weights: dict[str, torch.Tensor] = {}
    for chunk in initial_weight_chunks(args, seed):
        weights.update(chunk)
    return weights


def converted_weight_chunks(ref: CheckpointRef) -> Iterator[dict[str, torch.Tensor]]:
    """The weights of an ember weight folder (converted from Hugging Face), one safetensors file
    at a time, as fp32 (training keeps fp32 parameters whatever the checkpoint's dtype; bf16
    autocast computes). Names and shapes are checked against the architecture first."""
    from ember.models.checkpoint_io import iter_ember_weight_files

    for args, state in iter_ember_weight_files(ref.path):
        state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
        if args.tie_embeddings and "tok_embeddings.weight" in state:  # the folder stores it once
            state["output.weight"] = state["tok_embeddings.weight"]
        yield state


def initialize(model: nn.Module, weight_chunks: Callable[[], Iterable[dict[str, torch.Tensor]]],
               partial: bool = False) -> None:
    """Fill the model with the whole model's weights, given part by part: `weight_chunks()`
    yields dicts of names to full tensors. Distributed, only rank 0 calls it and broadcasts each
    part, so no process ever holds more than one part of the full weights (and only rank 0 needs
    to see the files). `partial`: the model holds only some of them (pipeline stages)."""
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not distributed or dist.get_rank() == 0
    chunks = iter(weight_chunks()) if rank0 else None
    names: set[str] = set()
    while True:
        chunk, failure = {}, None
        if rank0:
            try:
                chunk = next(chunks, None)
            except EmberError as err:  # every rank stops with it, none waits for a part that never comes
                if not distributed:
                    raise
                failure = str(err)
        if distributed:  # rank 0 says whether a part follows, or why none will
            news = [failure if failure is not None else chunk is not None]
            dist.broadcast_object_list(news, src=0)
            if isinstance(news[0], str):
                raise EmberError(news[0])
            if not news[0]:
                break
            load_full_weights(model, chunk, from_rank0=True)
        elif chunk is None:
            break
        else:
            _, unexpected = model.load_state_dict(chunk, strict=False)
            if unexpected and not partial:
                raise EmberError(f"the weights do not fit the model: unexpected {unexpected[:3]}")
        names.update(chunk)
    if distributed:  # every rank checks what it holds against rank 0's names
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        names = shared[0]
    model_names = {name.replace("._checkpoint_wrapped_module", "") for name in model.state_dict()}
    missing = sorted(model_names - names)
    extra = [] if partial else sorted(names - model_names)
    if missing or extra:
        raise EmberError(f"the weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}")

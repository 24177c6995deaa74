"""From config to a ready model: which architecture, then build -> parallelize.

`resolve_model_args` gathers what `ember.models.from_config` needs (the checkpoint's
architecture, the tokenizer's vocabulary size) and lets it choose the architecture.

The model is built on the meta device and, with pipeline parallelism, cut into this rank's stages;
then, from outside and in the torchtitan order, tensor (+ sequence) parallelism, expert
parallelism, context parallelism, recomputation, compilation and data parallelism (FSDP2) are
applied to each stage, and only then is memory allocated — already sharded. The weights are set
afterwards by `ember.checkpoint.initialize` (random initialisation or converted weights, part by
part from rank 0) or by loading a training checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ember.checkpoint.training import CheckpointRef
from ember.config import Config
from ember.models import ModelArgs, Transformer
from ember.models.from_config import model_args_from_config
from ember.parallel.fsdp import apply_data_parallel
from ember.parallel.mesh import ParallelMeshes
from ember.parallel.recompute import apply_recompute


def _tokenizer_vocab(config: Config) -> int | None:
    d = config.data
    if not (d.tokenizer_type or d.tokenizer_name_or_path or d.tokenizer_model or d.vocab_file):
        return None
    from ember.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer(d.tokenizer_type or "PretrainedFromHF", name_or_path=d.tokenizer_name_or_path,
                                model_file=d.tokenizer_model, vocab_file=d.vocab_file, merge_file=d.merge_file)
    return tokenizer.vocab_size


def resolve_model_args(config: Config, ref: CheckpointRef | None) -> ModelArgs:
    """The architecture to train: `model_args_from_config` given the checkpoint's architecture
    (when `--load` names one) and the tokenizer's vocabulary (built only if needed)."""
    return model_args_from_config(config, ref.model_args() if ref is not None else None,
                                  lambda: _tokenizer_vocab(config),
                                  str(ref.path) if ref is not None else "the checkpoint")


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
    with torch.device("meta"):
        model = Transformer(args)
    pipeline = None
    modules = [model]
    if meshes is not None and meshes.pp is not None:
        from ember.parallel.pipeline import build_pipeline_stages

        virtual = meshes.layout.virtual_stages(args.n_layers)
        pipeline = build_pipeline_stages(model, meshes.pp, virtual_stages=virtual,
                                         first_stage_layers=meshes.layout.first_stage_layers,
                                         last_stage_layers=meshes.layout.last_stage_layers, device=device)
        modules = pipeline.modules
    for module in modules:
        parallelize(module, config, device, meshes)
    experts = []
    for module in modules:
        module.materialize(device)
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
        apply_tensor_parallel(model, meshes.tp, sequence_parallel=meshes.layout.sequence_parallel, loss_parallel=True)
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

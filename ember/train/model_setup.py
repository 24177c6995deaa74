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

from ember.checkpoint.training import CheckpointRef, load_full_weights
from ember.config import Config
from ember.errors import EmberError
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
                                model_file=d.tokenizer_model, vocab_file=d.vocab_file, merge_file=d.merge_file,
                                vocab_size=config.model.vocab_size)  # NullTokenizer's --vocab-size
    return tokenizer.vocab_size


def resolve_model_args(config: Config, ref: CheckpointRef | None) -> ModelArgs:
    """The architecture to train: `model_args_from_config` given the checkpoint's architecture
    (when `--load` names one) and the tokenizer's vocabulary (built only if needed)."""
    args = model_args_from_config(config, ref.model_args() if ref is not None else None,
                                  lambda: _tokenizer_vocab(config),
                                  str(ref.path) if ref is not None else "the checkpoint")
    spec = lora_spec(config)
    if spec is not None:  # refused here, before any process group exists
        from ember.models.lora import check_model

        check_model(args, spec)
    return args


@dataclass
class ParallelModel:
    """What this rank trains.

    `model`: the whole model, or (pipeline parallelism) this rank's stages as one module under
    the whole model's parameter names (`RankStages`): what the optimizer and checkpoints see.
    `modules`: what runs (the model, or the stages). `pipeline`: the stages' `PipelineParts`.
    `expert_params`: expert-parallel weights left out of FSDP (replicate mode, or one expert
    data-parallel rank), whose gradients the trainer finishes itself; under zero1 / fsdp with
    expert data parallelism FSDP holds them (`ember.parallel.fsdp`) and this list is empty.
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
        if meshes is not None and meshes.ep is not None and meshes.expert_fsdp is None:
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
    spec = lora_spec(config)
    if spec is not None:  # after TP (the adapters follow their layers' split), before FSDP
        from ember.models.lora import add_adapters

        add_adapters(model, spec)
        if config.lora.base_bf16:
            keep_frozen_linears_in_bf16(model)
    if meshes is not None and meshes.ep is not None:
        from ember.parallel.experts import apply_expert_parallel

        apply_expert_parallel(model, meshes.ep, meshes.expert if meshes.tp is not None else None)
    if meshes is not None and meshes.cp is not None:
        from ember.parallel.context import apply_context_parallel

        apply_context_parallel(model, meshes.cp, load_balance=True)
        from ember.parallel.rng import apply_dropout_streams

        apply_dropout_streams(model)  # dropout masks per sequence shard (done already if TP applied it)
    apply_recompute(model, t.recompute_granularity, t.recompute_method, t.recompute_num_layers)
    if compile_enabled(config, device):
        for block in model.layers.values():
            block.compile()
    if meshes is not None and meshes.fsdp is not None:
        ignored, experts = None, None
        if meshes.ep is not None and meshes.expert_fsdp is not None:  # sharded over edp by FSDP
            from ember.parallel.experts import moe_blocks

            experts = [moe.experts for moe in moe_blocks(model)]
        elif meshes.ep is not None:  # replicated over edp, reduced by the trainer
            from ember.parallel.experts import expert_parameters

            ignored = set(expert_parameters(model))
        # per-block FSDP units for either overlap: a block's gradients reduce while earlier blocks'
        # backward runs, and its parameters all-gather while the previous block computes (issue 16)
        apply_data_parallel(model, meshes.fsdp, p.dp_mode, p.overlap_grad_reduce or p.overlap_param_gather, ignored,
                            experts, meshes.expert_fsdp, meshes.layout.grad_average_size)


def compile_enabled(config: Config, device: torch.device) -> bool:
    if config.train.compile is not None:
        return config.train.compile
    return device.type == "cuda"


# ------------------------------------------------------------------------------ LoRA


def lora_spec(config: Config):
    """The run's `LoRASpec`, or None when --lora-target-modules is not given."""
    lora = config.lora
    if not lora.target_modules:
        if lora.adapter:
            raise EmberError("--lora-load needs --lora-target-modules (the adapter trains on those layers)")
        return None
    from ember.models.lora import make_spec

    if lora.base_bf16 and config.train.precision != "bf16":
        raise EmberError("--lora-base-bf16 keeps frozen weights in bf16 for bf16 compute; add --bf16")
    return make_spec(lora.r, lora.alpha, lora.dropout, lora.target_modules)


def keep_frozen_linears_in_bf16(model: nn.Module) -> None:
    """The blocks' frozen linear weights (and biases) in bf16: under bf16 autocast every linear layer
    computes with its weight rounded to bf16 anyway, so the results are the same and the memory
    half. Embeddings, norms, the output layer and the adapters stay fp32."""
    from ember.models.lora import ATTENTION_LEAVES, MLP_LEAVES, target_paths

    for path in target_paths(model, ATTENTION_LEAVES + MLP_LEAVES):  # not the router: it computes in fp32
        module = model.get_submodule(path)
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad:
                module.register_parameter(name, nn.Parameter(param.to(torch.bfloat16), requires_grad=False))


def holds_adapters(ref: CheckpointRef | None) -> bool:
    """Whether a training checkpoint was saved by a LoRA run (it then resumes as any run does)."""
    if ref is None or ref.kind != "training":
        return False
    return bool(ref.train_state().get("config", {}).get("lora", {}).get("target_modules"))


def check_lora_checkpoint(config: Config, ref: CheckpointRef | None) -> None:
    """A LoRA run's checkpoint loads only into the same adapters: without them its training would be
    lost silently (DCP reads what the model asks for)."""
    if not holds_adapters(ref):
        return
    from ember.models.lora import make_spec

    saved = ref.train_state()["config"]["lora"]
    before = make_spec(saved["r"], saved["alpha"], saved.get("dropout", 0.0), saved["target_modules"])
    now = lora_spec(config)
    if now is None or (now.r, now.alpha, now.leaves) != (before.r, before.alpha, before.leaves):
        raise EmberError(f"{ref.path} was saved by a LoRA run (r={before.r}, alpha={before.alpha:g}, layers "
                         f"{' '.join(before.leaves)}); continue it with the same --lora-r, --lora-alpha and "
                         f"--lora-target-modules, or merge it first (ember convert --from ember --to ember "
                         f"{ref.path.parent} OUT --merge-lora) and --load OUT")


def adapter_weights(config: Config, args: ModelArgs, family: str | None = None) -> dict[str, torch.Tensor]:
    """The adapters a LoRA run starts from: --lora-load's PEFT folder, else PEFT's initialisation."""
    from ember.models.lora import initial_adapter_weights

    spec = lora_spec(config)
    if not config.lora.adapter:
        return initial_adapter_weights(args, spec, config.train.seed)
    from ember.checkpoint.export import infer_family
    from ember.checkpoint.peft_adapter import load_peft_adapter

    family = family or infer_family(args, config.model.name)
    loaded, adapters = load_peft_adapter(config.lora.adapter, family, args)
    wanted = initial_adapter_weights(args, spec, config.train.seed)
    if (loaded.r, loaded.alpha) != (spec.r, spec.alpha) or set(adapters) != set(wanted):
        raise EmberError(f"--lora-load {config.lora.adapter}: the adapter (r={loaded.r}, alpha={loaded.alpha:g}, "
                         f"{len(adapters) // 2} layers) is not the one the flags describe (r={spec.r}, "
                         f"alpha={spec.alpha:g}, {len(wanted) // 2} layers); give the adapter's --lora-r, "
                         f"--lora-alpha and --lora-target-modules")
    return adapters


def initialize_lora(model: nn.Module, ref: CheckpointRef | None, config: Config, args: ModelArgs,
                    partial: bool, notice) -> None:
    """Set a LoRA run's weights at its start: the base (a training checkpoint without adapters,
    converted weights, or the random initialisation) and the adapters (new, or --lora-load's)."""
    import torch.distributed as dist

    from ember.checkpoint.initialize import converted_weight_chunks, initialize
    from ember.models.initialization import initial_weight_chunks

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if ref is not None and ref.kind == "training":
        _load_base_from_training_checkpoint(ref, model)
        notice(f"LoRA: base weights from {ref.path}")
        load_full_weights(model, adapter_weights(config, args) if rank0 else {}, from_rank0=True)
        return
    if ref is not None:
        notice(f"LoRA: base weights from the converted weights in {ref.path}")
        base = lambda: converted_weight_chunks(ref)  # noqa: E731
    else:
        base = lambda: initial_weight_chunks(args, config.train.seed)  # noqa: E731
    family = None
    if ref is not None:
        from ember.checkpoint.weights import read_manifest

        family = read_manifest(ref.path).get("family")
    initialize(model, lambda: [*base(), adapter_weights(config, args, family)], partial=partial)


def _load_base_from_training_checkpoint(ref: CheckpointRef, model: nn.Module) -> None:
    """The base weights of a (non-LoRA) training checkpoint, into a model that also has adapters."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from ember.checkpoint.training import dcp_load
    from ember.models.lora import is_adapter_name

    options = StateDictOptions(strict=False)
    state = {name: t for name, t in get_model_state_dict(model, options=options).items()
             if not is_adapter_name(name)}
    try:
        dcp_load({"model": state}, ref.path, no_dist=not dist.is_initialized())
    except Exception as err:  # noqa: BLE001 - DCP reports a missing or misshapen tensor in many ways
        raise EmberError(f"cannot load the base weights from {ref.path}: {str(err).splitlines()[0][:200]}") from None
    set_model_state_dict(model, state, options=options)


def _base_family(config: Config, args: ModelArgs) -> str:
    """The Hugging Face family of the base model (its adapter's module names)."""
    from ember.checkpoint.export import infer_family
    from ember.checkpoint.weights import read_manifest

    load = config.checkpoint.load
    if load:
        try:
            return read_manifest(load)["family"]
        except (EmberError, KeyError):
            pass
    return infer_family(args, config.model.name)


ADAPTER_FOLDER = "adapter"


def save_lora_adapter(model: nn.Module, config: Config, args: ModelArgs, notice) -> None:
    """Write the adapters as a PEFT adapter folder, `<save>/adapter` (replaced at every save).
    Every rank calls it: each gathers its stage's adapters (whole tensors: they are small), rank 0
    writes them all."""
    import torch.distributed as dist

    from ember.models.lora import is_adapter_name

    adapters = {}
    for name, param in model.named_parameters():
        if is_adapter_name(name):
            whole = param.full_tensor() if hasattr(param, "full_tensor") else param
            adapters[name.replace("._checkpoint_wrapped_module", "")] = whole.detach().to("cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(adapters, gathered, dst=0)
        if dist.get_rank() != 0:
            return
        adapters = {name: t for part in gathered for name, t in part.items()}
    from pathlib import Path

    from ember.checkpoint.peft_adapter import save_peft_adapter

    out = Path(config.checkpoint.save) / ADAPTER_FOLDER
    try:
        save_peft_adapter(out, adapters, lora_spec(config), _base_family(config, args), args,
                          base_model=config.checkpoint.load, overwrite=True)
    except EmberError as err:  # e.g. a fused q/k/v in HF: the checkpoint has the adapters still
        notice(f"LoRA: no PEFT adapter folder written ({err})")
        return
    notice(f"saved LoRA adapter (PEFT) {out}")

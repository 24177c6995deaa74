"""A Megatron run's Adam state -> an ember training checkpoint, so the run continues in ember.

`ember convert --from megatron --to ember SRC OUT --load-optim` and `ember train --load MEGATRON_DIR`
(an `iter_N` checkpoint, no `--finetune`) write OUT as an ember save folder (`OUT/latest`,
`OUT/iter_000000N/`) holding the weights, Adam's moments in ember's optimizer layout and the
iteration; `ember train --load OUT` resumes it like one of its own, at any ember layout (DCP
reshards on load).

What is read (Megatron-LM's optimizers, torch AdamW or apex/TE FusedAdam state):
- torch_dist: `optimizer.state.exp_avg.<model tensor>`, `...exp_avg_sq...` and, for bf16/fp16
  runs, `...fp32_param...` (the fp32 master weights), each with the model tensor's global shape and
  sharding; the Adam step (`common_step`) and the parameter groups from common.pt.
- legacy per-rank files: 'optimizer' in model_optim_rng.pt, torch's optimizer state_dict, keyed by
  parameter index in param-group order (bf16/fp16: under 'optimizer', with the masters in
  'fp32_from_fp16_params'). The index -> parameter map is rebuilt as Megatron builds its groups:
  each group takes, in the model's parameter order (the order of the rank's 'model' entries), the
  parameters of its class (no weight decay: 1-D or `.bias`; expert weights with EP > 1 or not), and every
  count and shape must agree; anything else (learning-rate multipliers, other grouping) is refused.
- the distributed optimizer (--use-distributed-optimizer), torch_dist saved with
  --dist-ckpt-optim-fully-reshardable ('fully_reshardable'): `optimizer.state.{param,exp_avg,exp_avg_sq}.
  <model tensor>` in model space, `param` the fp32 master weights; read as the above.
- the distributed optimizer's flat gradient buffers (legacy distrib_optim.pt, torch_dist
  'dp_reshardable', Megatron-LM 0.16's default): `ember.checkpoint.megatron_distributed_optim`.
What every form gives is a `ember.checkpoint.megatron_adam.MegatronAdam`.

Moments are elementwise per parameter, so they go through exactly the weights' conversion
(`ember.checkpoint.megatron.ember_tensors`: q/k/v de-interleaving, SwiGLU halves, tensor- and
pipeline-parallel merging). The fp32 master weights, when there, are the weights (the bf16 model
copies are their rounding), and are checked against the saved weights wherever the state names its
parameters (torch_dist model-space forms: megatron-core 0.16.1 misplaces the 'fully_reshardable'
state of a bucketed buffer). Refused in one line: any buffer layout of the distributed optimizer
that fails the check and, in dp_reshardable, of uneven or virtual pipelines and MoE models;
checkpoints without optimizer state; the legacy model's names.
Megatron's RNG states are not imported (every rank of the resumed run derives its random stream from
the seed and the iteration, as on a layout change); its LR schedule continues because ember's
learning rate is a function of the iteration.

Streamed: the training checkpoint is written as the Megatron one is read, tensor group by tensor
group (`Checkpointer.save_streamed`), with the keys and hyper-parameters of ember's own model and
optimizer built over zero-byte stand-ins; so memory holds a group of weights and of each moment (and
what the readers keep: a DCP chunk each, a pipeline stage's mapped rank files) rather than the model
with its optimizer. TinyLlama-1.1B's shape imports in 1.4 GB peak RSS, as do 0.22B and 0.57B of
its widths (weights only: 1.1 GB), where the whole-model import took ~17 bytes per parameter
(benchmarks/megatron_optim_import.py, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.megatron import (
    LegacyReader,
    MegatronCheckpoint,
    TorchDistReader,
    ember_tensors,
    load_megatron_pickle,
    locate_megatron_checkpoint,
    model_args_from_megatron,
    open_megatron_checkpoint,
    saved_args_dict,
)
from ember.checkpoint.megatron_adam import (
    DISTRIBUTED_FILE,
    MASTER,
    MOMENTS,
    MegatronAdam,
    NoUsableOptimizerState,
    adam_state,
    check_standard_group,
    group_step,
    model_parameters,
    refuse,
)
from ember.checkpoint.megatron_distributed_optim import BUCKET_FQN, dp_reshardable_adam, legacy_distributed_adam
from ember.errors import EmberError

_PREFIX = "optimizer.state."
# torch_dist's `optimizer.state.<name>.<model tensor>` -> what it holds: the distributed optimizer's
# model-space forms call the (fp32) master weights `param` ('fully_reshardable') or `fp32_param`
# (like the non-distributed optimizer: 'fully_sharded_model_space')
_TORCH_DIST_KINDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "fp32_param": MASTER, "param": MASTER}
_MODEL_SPACE_SHARDINGS = ("fully_reshardable", "fully_sharded_model_space")


# ------------------------------------------------------------------------------------ torch_dist
def _torch_dist_adam(checkpoint: MegatronCheckpoint, weights: TorchDistReader) -> MegatronAdam:
    where = str(checkpoint.folder)
    stored = [fqn for fqn, item in weights.metadata.state_dict_metadata.items()
              if fqn.startswith("optimizer.") and hasattr(item, "chunks")]
    if not stored:
        raise refuse(where, "holds no optimizer state (saved with --no-save-optim, or by a converter)")
    known = tuple(f"{_PREFIX}{name}." for name in _TORCH_DIST_KINDS)
    other = [fqn for fqn in stored if not fqn.startswith(known)]
    common_pt = checkpoint.folder / "common.pt"
    common = load_megatron_pickle(common_pt, mmap=False) if common_pt.is_file() else {}
    if other and all(BUCKET_FQN.match(fqn) for fqn in other) and len(other) == len(stored):
        return dp_reshardable_adam(checkpoint, weights, other, common if isinstance(common, dict) else {})
    if other:
        raise refuse(where, f"holds optimizer tensors ember does not know ({other[0]}, ...); it cannot map them "
                             "to parameters")
    optim = common.get("optimizer") if isinstance(common, dict) else None
    inner = optim.get("optimizer") if isinstance(optim, dict) and isinstance(optim.get("optimizer"), dict) else optim
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise refuse(where, "common.pt holds no optimizer parameter groups next to the optimizer tensors")
    step = (inner.get("state") or {}).get("common_step")
    if step is None:
        step = group_step(where, inner["param_groups"])
    sharding = optim.get("param_state_sharding_type") if isinstance(optim, dict) else None
    if sharding not in (None, *_MODEL_SPACE_SHARDINGS):
        raise refuse(where, f"holds the distributed optimizer's state in its {sharding!r} form, which ember cannot "
                             "map to parameters; save it from Megatron-LM with --dist-ckpt-optim-fully-reshardable")
    present = [name for name in _TORCH_DIST_KINDS if any(fqn.startswith(f"{_PREFIX}{name}.") for fqn in stored)]
    if [_TORCH_DIST_KINDS[name] for name in present].count(MASTER) > 1:
        raise refuse(where, "holds two sets of master weights (fp32_param and param); ember cannot tell which is the run's")
    readers = {_TORCH_DIST_KINDS[name]: TorchDistReader(checkpoint.folder, prefix=f"{_PREFIX}{name}.") for name in present}
    if set(MOMENTS) - set(readers):
        raise refuse(where, f"optimizer state without {' and '.join(sorted(set(MOMENTS) - set(readers)))}: not Adam")
    if MASTER in readers:
        _check_masters_are_the_weights(where, readers[MASTER], weights, sharding)
    return adam_state(where, inner["param_groups"], step, readers, common.get("opt_param_scheduler"))


def _check_masters_are_the_weights(where: str, masters: TorchDistReader, weights: TorchDistReader,
                                   sharding: str | None) -> None:
    """Each parameter's saved master copy must equal, or round to, its saved weight: state stored under
    a parameter's name that is not that parameter's is refused, not imported.

    megatron-core 0.16.1 writes such state itself: its 'fully_reshardable' save of a gradient buffer cut
    into buckets (--overlap-grad-reduce) slices each parameter's state at its padded buffer offset out
    of the buckets laid end to end without their padding, so every parameter after the first bucket
    gets another's values (it warns "param range exceeds unpadded buffer" while saving)."""
    for layer, key in weights.shapes:
        if (layer, key) not in masters.shapes:
            continue  # a tensor without optimizer state (none in a trained GPT model); the weights cover it
        weight = weights.get(layer, key)
        if not torch.equal(masters.get(layer, key).to(weight.dtype), weight):
            what = key if layer is None else f"{key} of layer {layer}"
            cause = (" (megatron-core misplaces the 'fully_reshardable' state of a buffer in several buckets, "
                     "from --overlap-grad-reduce)" if sharding == "fully_reshardable" else "")
            raise refuse(where, f"holds a master copy of {what} that is not that weight{cause}; its optimizer state "
                                 "cannot be trusted: convert the same run's legacy (--ckpt-format torch) or default "
                                 "'dp_reshardable' save, or take the weights only")


# ------------------------------------------------------------------------------------ legacy
def _legacy_optimizer(state: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[list[torch.Tensor]] | None]:
    """(torch's optimizer state_dict, the fp32 master weights per group or None) of a rank file."""
    optim = state.get("optimizer")
    if not isinstance(optim, dict):
        raise refuse(str(path), "holds no optimizer state (saved with --no-save-optim, or by a converter)")
    if "state" in optim and "param_groups" in optim:  # FP32Optimizer: torch's own state_dict
        return optim, None
    inner = optim.get("optimizer")
    if isinstance(inner, dict) and "state" in inner and "fp32_from_fp16_params" in optim:  # Float16Optimizer
        return inner, optim["fp32_from_fp16_params"]
    raise refuse(str(path), f"holds the distributed optimizer's parameter groups but no {DISTRIBUTED_FILE} next to "
                             "it (its tensors); incomplete save?")


def _no_weight_decay(name: str, tensor: torch.Tensor) -> bool:
    """Megatron's standard grouping (`get_standard_config_overrides`): 1-D weights and biases."""
    return tensor.ndim == 1 or name.endswith(".bias")


def legacy_parameter_names(state: dict[str, Any], path: Path) -> dict[int, str]:
    """optimizer parameter index -> model tensor name of one rank file, as Megatron's
    `_get_param_groups` assigns them (see the module docstring); every count and shape checked."""
    where = str(path)
    optim, _ = _legacy_optimizer(state, path)
    params = model_parameters(state, path)
    # Megatron's expert-parallel group: expert weights when the experts are split over ranks (EP > 1)
    saved = state.get("args")
    ep = int((saved_args_dict(saved, where).get("expert_model_parallel_size") if saved is not None else 1) or 1)
    unused = list(params)
    names: dict[int, str] = {}
    for number, group in enumerate(optim["param_groups"]):
        check_standard_group(where, number, group)
        no_wd, expert = group["wd_mult"] == 0.0, bool(group.get("is_expert_parallel", False))
        members = [(name, t) for name, t in unused
                   if _no_weight_decay(name, t) == no_wd and (ep > 1 and ".experts." in name) == expert]
        if len(members) != len(group["params"]):
            raise refuse(where, f"parameter group {number} holds {len(group['params'])} parameters where Megatron's "
                                 f"grouping of this rank's model gives {len(members)}; the layout cannot be mapped")
        for index, (name, tensor) in zip(group["params"], members):
            found = optim["state"].get(index)
            if not isinstance(found, dict) or any(found.get(k) is None for k in MOMENTS):
                raise refuse(where, f"parameter {index} ({name}) has no Adam moments: the optimizer never stepped?")
            if any(tuple(found[k].shape) != tuple(tensor.shape) for k in MOMENTS):
                raise refuse(where, f"optimizer index {index} has moments of shape {tuple(found['exp_avg'].shape)} where "
                                     f"its parameter {name} is {tuple(tensor.shape)}; the layout cannot be mapped")
            names[index] = name
        taken = {name for name, _ in members}
        unused = [(name, t) for name, t in unused if name not in taken]
    if unused:
        raise refuse(where, f"{unused[0][0]} (and {len(unused) - 1} more) belongs to no optimizer parameter group")
    return names


def _legacy_tensors(kind: str) -> Callable[[dict[str, Any], Path], Iterator[tuple[str, torch.Tensor]]]:
    """A LegacyReader `tensors_of`: the rank file's `kind` state under its parameters' names."""

    def tensors_of(state: dict[str, Any], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        optim, masters = _legacy_optimizer(state, path)
        names = legacy_parameter_names(state, path)
        if kind != MASTER:
            for index, name in names.items():
                yield name, optim["state"][index][kind]
            return
        for group, group_masters in zip(optim["param_groups"], masters or []):
            if len(group_masters) != len(group["params"]):
                raise refuse(str(path), "fp32_from_fp16_params does not hold one master weight per parameter of "
                                         "its group (fp32 parameters among bf16 ones?); cannot map them")
            for index, master in zip(group["params"], group_masters):
                yield names[index], master

    return tensors_of


def _legacy_adam(checkpoint: MegatronCheckpoint, weights: LegacyReader) -> MegatronAdam:
    where = str(checkpoint.folder)
    first = weights.rank_files[(0, 0, 0)]
    if any(path.parent.joinpath(DISTRIBUTED_FILE).is_file() for path in weights.rank_files.values()):
        return legacy_distributed_adam(checkpoint, weights)
    state = load_megatron_pickle(first)
    optim, masters = _legacy_optimizer(state, first)
    legacy_parameter_names(state, first)  # refuses an unmappable layout before any reading
    steps = {float(s["step"]) for s in optim["state"].values() if isinstance(s, dict) and s.get("step") is not None}
    if len(steps) > 1:
        raise refuse(where, f"Adam's step differs between parameters ({sorted(steps)[:4]}); ember keeps one")
    step = steps.pop() if steps else group_step(where, optim["param_groups"])
    kinds = (*MOMENTS, MASTER) if masters is not None else MOMENTS
    readers = {kind: LegacyReader(checkpoint.folder, tensors_of=_legacy_tensors(kind)) for kind in kinds}
    return adam_state(where, optim["param_groups"], step, readers, state.get("opt_param_scheduler"))


# ------------------------------------------------------------------------------------ both
def read_megatron_adam(checkpoint: MegatronCheckpoint, weights: Any) -> MegatronAdam:
    """The checkpoint's Adam state, or NoUsableOptimizerState saying in one line why there is none."""
    if weights.format == "torch_dist":
        adam = _torch_dist_adam(checkpoint, weights)
    else:
        adam = _legacy_adam(checkpoint, weights)
    for kind, reader in adam.readers.items():
        if set(reader.shapes) != set(weights.shapes) or any(
                reader.shapes[k][0] != weights.shapes[k][0] for k in weights.shapes):
            missing = sorted(set(weights.shapes) ^ set(reader.shapes), key=str)
            what = f" ({missing[0][1]} of layer {missing[0][0]})" if missing else ""
            raise refuse(str(checkpoint.folder), f"its {kind} tensors do not match the model's{what}")
    return adam


def optimizer_state_summary(checkpoint: MegatronCheckpoint) -> str | None:
    """None when the checkpoint's Adam state can be imported, else the one-line reason."""
    weights = open_megatron_checkpoint(checkpoint)
    try:
        read_megatron_adam(checkpoint, weights).close()
    except NoUsableOptimizerState as err:
        return str(err)
    finally:
        weights.close()
    return None


# ------------------------------------------------------------------------------------ writing
OptimizerFactory = Callable[[torch.nn.Module, dict[str, Any]], torch.optim.Optimizer]


def convert_megatron_to_training_checkpoint(
    src: str | Path,
    out: str | Path,
    optimizer_factory: OptimizerFactory,
    *,
    iteration: int | None = None,
    load_optim: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Megatron save folder (or one iteration) -> ember save folder `out` (`latest`, `iter_N/`) at
    the Megatron iteration: the weights and, with `load_optim`, Adam's state; without it (Megatron's
    --no-load-optim) the checkpoint has no optimizer and ember resumes with a fresh one.

    `optimizer_factory(model, {"lr", "betas", "eps", "weight_decay"})` builds ember's optimizer for
    the model (ember.train.optim's, which this layer cannot import), with Megatron's settings.
    Raises NoUsableOptimizerState (with `load_optim`) when there is no state to import. Returns a
    report: iteration, step, family, format, and what was imported or dropped."""
    from ember.checkpoint.convert import check_output_folder
    from ember.checkpoint.foreign import remove_training_checkpoints
    from ember.checkpoint.training import Checkpointer, find_checkpoint

    src, out = Path(src), Path(out)
    check_output_folder(src, out)
    checkpoint = locate_megatron_checkpoint(src, iteration)
    where = str(checkpoint.folder)
    if checkpoint.iteration == "release":
        raise EmberError(f"{where} is a release checkpoint (weights only, iteration 0): convert it without "
                         "--load-optim and train with --load OUT")
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and find_checkpoint(out) is None):
            raise EmberError(f"{out} exists and is not an ember save folder; give a new output folder")
        if find_checkpoint(out) is not None and not overwrite:
            raise EmberError(f"{out} already holds an ember checkpoint; pass --force to replace it")
    weights = open_megatron_checkpoint(checkpoint)
    if weights.saved_args is None:
        raise EmberError(f"{where}: the checkpoint holds no saved 'args', so its architecture is unknown")
    family, args = model_args_from_megatron(weights.saved_args, where=f"{where} (saved args)")
    saved = saved_args_dict(weights.saved_args, where)
    adam = None
    try:
        adam = read_megatron_adam(checkpoint, weights) if load_optim else None
        if adam is not None:
            hyper = {"lr": adam.lr, "betas": adam.betas, "eps": adam.eps, "weight_decay": adam.weight_decay}
        else:  # informational: no optimizer is written
            hyper = {"lr": float(saved.get("lr") or 0.0), "eps": float(saved.get("adam_eps", 1e-8)),
                     "betas": (float(saved.get("adam_beta1", 0.9)), float(saved.get("adam_beta2", 0.999))),
                     "weight_decay": float(saved.get("weight_decay", 0.01))}
        number = int(checkpoint.iteration)
        consumed = int(saved.get("consumed_train_samples") or number * int(saved.get("global_batch_size") or 0))
        seq = int(saved.get("seq_length") or 0)
        train_state = {
            "state": {"iteration": number, "consumed_samples": consumed, "consumed_tokens": consumed * seq,
                      "skipped_iterations": 0},
            "has_optimizer": adam is not None,
            "model_args": args.to_dict(),
            "config": {},
            "world_size": 1, "dp_size": 1,
            "source": {"kind": "megatron", "path": str(src.resolve()), "iteration": number, "format": weights.format,
                       "optimizer": adam is not None, "adam_step": adam.step if adam else None,
                       "opt_param_scheduler": _plain(adam.scheduler) if adam else None},
        }
        state, produce, order, release = _streamed_state(args, weights, adam, optimizer_factory, hyper, where)
        if out.exists() and overwrite:
            remove_training_checkpoints(out)
        try:
            Checkpointer(out).save_streamed(number, state, produce, order, train_state)
        finally:
            release()
    finally:
        weights.close()
        if adam is not None:
            adam.close()
    return {"family": family, "format": weights.format, "iteration": number, "optimizer": adam is not None,
            "adam_step": adam.step if adam else None, "master_weights": bool(adam and adam.has_master_weights),
            "hyper": hyper, "tensor_parallel": saved.get("tensor_model_parallel_size"),
            "pipeline_parallel": saved.get("pipeline_model_parallel_size")}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _streamed_state(args: Any, weights: Any, adam: MegatronAdam | None, optimizer_factory: OptimizerFactory,
                    hyper: dict[str, Any], where: str
                    ) -> tuple[dict[str, Any], Callable[[str], torch.Tensor], list[str], Callable[[], None]]:
    """(the training checkpoint's state dict with stand-ins, `produce`, `order`) for
    `Checkpointer.save_streamed`, and `release()` to call after it: the keys and hyper-parameters
    are those of ember's own model and optimizer (built over zero-byte stand-ins of the fp32
    parameters), the tensors are made when written, one Megatron tensor group (fused q/k/v,
    SwiGLU's fc1) at a time for the weights (the master copies, when there) and for each moment, so
    memory holds about a group of each rather than the model and its optimizer."""
    from ember.checkpoint.training import training_state_dict
    from ember.checkpoint.weights import model_from_state
    from ember.models.hf import ember_state_shapes

    # the fp32 master weights, when the run kept them, are the weights (the bf16 copies their rounding)
    sources = {"model": adam.readers[MASTER] if adam is not None and adam.has_master_weights else weights}
    if adam is not None:
        sources.update({kind: adam.readers[kind] for kind in MOMENTS})
    model_source = sources["model"]

    def planned(layer: int | None, key: str) -> torch.Tensor:  # the moments' tensors: read_megatron_adam checked
        if (layer, key) not in model_source.shapes:
            what = key if layer is None else f"decoder.layers.{layer}.{key}"
            raise EmberError(f"{where}: tensor {what} is missing, but the saved args describe a model with it")
        shape, dtype = model_source.shapes[(layer, key)]
        return torch.empty(shape, dtype=dtype, device="meta")

    shapes = {name: tuple(tensor.shape) for name, tensor in ember_tensors(args, planned)}
    names = list(shapes)
    expected = ember_state_shapes(args)
    for name in sorted(set(shapes) | set(expected)):
        wanted = tuple(expected[name][0]) if name in expected else None
        if shapes.get(name) != wanted:
            raise EmberError(f"{where}: ember's {name} would be {shapes.get(name)} where the saved args give {wanted}; "
                             "the args and the tensors disagree")
    stand_ins = {name: torch.zeros((), dtype=torch.float32).expand(expected[name][0]) for name in names}
    model = model_from_state(args, stand_ins)
    optimizer = None
    if adam is not None:
        optimizer = optimizer_factory(model, hyper)
        for param in model.parameters():
            stand_in = torch.zeros((), dtype=param.dtype).expand(param.shape)
            optimizer.state[param] = {"step": torch.tensor(float(adam.step), dtype=torch.float32),
                                      "exp_avg": stand_in, "exp_avg_sq": stand_in}
    state = training_state_dict(model, optimizer)
    del model, optimizer  # the stand-ins stay in `state`; nothing else of them is needed
    tied_copy = args.tie_embeddings and "output.weight" in state["model"]
    tied = {"tok_embeddings.weight": "output.weight"} if tied_copy else {}

    def fqns(kind: str, name: str) -> list[str]:
        if kind == "model":
            return [f"model.{name}"] + ([f"model.{tied[name]}"] if name in tied else [])
        return [f"optimizer.state.{name}.{kind}"]

    # written name by name: the weight, then each moment; each kind's stream reads its next Megatron
    # tensor group only when the group's first tensor is written
    kind_of = {fqn: kind for name in names for kind in sources for fqn in fqns(kind, name)}
    order = list(kind_of)
    streams = {kind: ember_tensors(args, reader.get) for kind, reader in sources.items()}
    made: dict[str, torch.Tensor] = {}  # made, not yet written: the tied output's copy of the embedding

    def produce(fqn: str) -> torch.Tensor:
        kind = kind_of[fqn]
        while fqn not in made:
            name, tensor = next(streams[kind])
            tensor = tensor.to(torch.float32)
            if kind == "model" and not bool(torch.isfinite(tensor).all()):
                raise EmberError(f"{where}: the weight {name} holds NaN or Inf; nothing imported (convert an "
                                 "earlier iteration)")
            for key in fqns(kind, name):
                made[key] = tensor
        return made.pop(fqn)

    def release() -> None:
        # DCP leaves its planner, which holds `produce`, in reference cycles until the garbage
        # collector runs; the streams hold the readers, each with the last chunk it read (~1 GB
        # for a 1B model's output layer and moments), which `ember train --load` would carry into training
        streams.clear()
        made.clear()

    return state, produce, order, release


def describe_training_import(report: dict[str, Any]) -> str:
    """One line for a command to print after `convert_megatron_to_training_checkpoint`."""
    h = report["hyper"]
    if report["optimizer"]:
        what = (f"weights{' (its fp32 master copies)' if report['master_weights'] else ''}, Adam moments "
                f"(step {report['adam_step']}, betas {tuple(h['betas'])}, eps {h['eps']:g}, weight decay "
                f"{h['weight_decay']:g}) and iteration {report['iteration']}")
    else:
        what = f"weights and iteration {report['iteration']}; Adam moments dropped (a fresh optimizer)"
    return (f"megatron {report['format']} (TP {report['tensor_parallel']} x PP {report['pipeline_parallel']}) "
            f"-> ember {report['family']} training checkpoint: {what}")


__all__ = [
    "MegatronAdam", "NoUsableOptimizerState", "convert_megatron_to_training_checkpoint", "describe_training_import",
    "legacy_parameter_names", "optimizer_state_summary", "read_megatron_adam",
]

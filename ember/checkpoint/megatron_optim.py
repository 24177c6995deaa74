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
- the distributed optimizer, legacy: each rank folder's distrib_optim.pt holds flat 'param',
  'exp_avg', 'exp_avg_sq' tensors of the rank's gradient buffer gathered over the data-parallel ranks;
  the parameter -> slice map is rebuilt as megatron-core's DDP lays its buffer out (reverse model
  order, each parameter 64-aligned, one bucket) and verified against the weights of the rank file.
  torch_dist's 'dp_reshardable' (Megatron-LM 0.16's default) stores those buffers per bucket
  without naming the parameters of the rank, and is refused in one line.

Moments are elementwise per parameter, so they go through exactly the weights' conversion
(`ember.checkpoint.megatron.ember_tensors`: q/k/v de-interleaving, SwiGLU halves, tensor- and
pipeline-parallel merging). The fp32 master weights, when there, are the weights (the bf16 model
copies are their rounding). Refused in one line: the distributed optimizer's dp_reshardable form and
any buffer layout that fails the check, checkpoints without optimizer state, the legacy model's names.
Megatron's RNG states are not imported (every rank of the resumed run derives its random stream from
the seed and the iteration, as on a layout change); its LR schedule continues because ember's
learning rate is a function of the iteration.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.megatron import (
    LegacyReader,
    MegatronCheckpoint,
    TorchDistReader,
    canonical_name,
    ember_tensors,
    flatten_state,
    load_megatron_pickle,
    locate_megatron_checkpoint,
    model_args_from_megatron,
    saved_args_dict,
    open_megatron_checkpoint,
)
from ember.errors import EmberError

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32_param"
_PREFIX = "optimizer.state."
# torch_dist's `optimizer.state.<name>.<model tensor>` -> what it holds: the distributed optimizer's
# model-space forms call the (fp32) master weights `param` ('fully_reshardable') or `fp32_param`
# (like the non-distributed optimizer: 'fully_sharded_model_space')
_TORCH_DIST_KINDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "fp32_param": MASTER, "param": MASTER}
_MODEL_SPACE_SHARDINGS = ("fully_reshardable", "fully_sharded_model_space")
# the legacy distributed optimizer's file next to each model_optim_rng.pt, and its flat tensors' names
DISTRIBUTED_FILE = "distrib_optim.pt"
_FLAT_KINDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", MASTER: "param"}
# Megatron's parameter-group fields that only say how its own scheduler treats a group
_GROUP_FIELDS = {"params", "is_expert_parallel", "default_config", "wd_mult", "lr_mult", "is_decoupled_lr", "max_lr",
                 "min_lr", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                 "differentiable", "fused", "decoupled_weight_decay", "bias_correction", "adam_w_mode", "step"}


class NoUsableOptimizerState(EmberError):
    """The checkpoint holds no optimizer state, or one whose layout ember cannot map."""


@dataclass
class MegatronAdam:
    """What a Megatron checkpoint's optimizer holds, ready to read tensor by tensor."""

    step: int  # Adam's step counter (bias correction)
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float  # of the decayed group (biases and 1-D weights: none)
    readers: dict[str, Any] = field(default_factory=dict)  # "exp_avg", "exp_avg_sq"[, "fp32_param"] -> reader
    scheduler: dict[str, Any] | None = None

    @property
    def has_master_weights(self) -> bool:
        return MASTER in self.readers

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def _refuse(where: str, what: str) -> NoUsableOptimizerState:
    return NoUsableOptimizerState(f"{where}: {what}")


# ------------------------------------------------------------------------------------ torch_dist
def _torch_dist_adam(checkpoint: MegatronCheckpoint, weights: TorchDistReader) -> MegatronAdam:
    where = str(checkpoint.folder)
    stored = [fqn for fqn, item in weights.metadata.state_dict_metadata.items()
              if fqn.startswith("optimizer.") and hasattr(item, "chunks")]
    if not stored:
        raise _refuse(where, "holds no optimizer state (saved with --no-save-optim, or by a converter)")
    known = tuple(f"{_PREFIX}{name}." for name in _TORCH_DIST_KINDS)
    other = [fqn for fqn in stored if not fqn.startswith(known)]
    if any(fqn.startswith("optimizer.distributed.") for fqn in other):
        raise _refuse(where, "holds the distributed optimizer's state in its 'dp_reshardable' form (Megatron-LM's "
                             "default: flat gradient-bucket buffers that name no parameter), which ember cannot map "
                             "to parameters; save it once more from Megatron-LM with --dist-ckpt-optim-fully-reshardable, "
                             "or with --ckpt-format torch")
    if other:
        raise _refuse(where, f"holds optimizer tensors ember does not know ({other[0]}, ...); it cannot map them "
                             "to parameters")
    common_pt = checkpoint.folder / "common.pt"
    common = load_megatron_pickle(common_pt, mmap=False) if common_pt.is_file() else {}
    optim = common.get("optimizer") if isinstance(common, dict) else None
    inner = optim.get("optimizer") if isinstance(optim, dict) and isinstance(optim.get("optimizer"), dict) else optim
    if not isinstance(inner, dict) or "param_groups" not in inner:
        raise _refuse(where, "common.pt holds no optimizer parameter groups next to the optimizer tensors")
    step = (inner.get("state") or {}).get("common_step")
    if step is None:
        step = _group_step(where, inner["param_groups"])
    sharding = optim.get("param_state_sharding_type") if isinstance(optim, dict) else None
    if sharding not in (None, *_MODEL_SPACE_SHARDINGS):
        raise _refuse(where, f"holds the distributed optimizer's state in its {sharding!r} form, which ember cannot "
                             "map to parameters; save it from Megatron-LM with --dist-ckpt-optim-fully-reshardable")
    present = [name for name in _TORCH_DIST_KINDS if any(fqn.startswith(f"{_PREFIX}{name}.") for fqn in stored)]
    if [_TORCH_DIST_KINDS[name] for name in present].count(MASTER) > 1:
        raise _refuse(where, "holds two sets of master weights (fp32_param and param); ember cannot tell which is the run's")
    readers = {_TORCH_DIST_KINDS[name]: TorchDistReader(checkpoint.folder, prefix=f"{_PREFIX}{name}.") for name in present}
    if set(MOMENTS) - set(readers):
        raise _refuse(where, f"optimizer state without {' and '.join(sorted(set(MOMENTS) - set(readers)))}: not Adam")
    return _adam(where, inner["param_groups"], step, readers, common.get("opt_param_scheduler"))


# ------------------------------------------------------------------------------------ legacy
def _legacy_optimizer(state: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[list[torch.Tensor]] | None]:
    """(torch's optimizer state_dict, the fp32 master weights per group or None) of a rank file."""
    optim = state.get("optimizer")
    if not isinstance(optim, dict):
        raise _refuse(str(path), "holds no optimizer state (saved with --no-save-optim, or by a converter)")
    if "state" in optim and "param_groups" in optim:  # FP32Optimizer: torch's own state_dict
        return optim, None
    inner = optim.get("optimizer")
    if isinstance(inner, dict) and "state" in inner and "fp32_from_fp16_params" in optim:  # Float16Optimizer
        return inner, optim["fp32_from_fp16_params"]
    raise _refuse(str(path), f"holds the distributed optimizer's parameter groups but no {DISTRIBUTED_FILE} next to "
                             "it (its tensors); incomplete save?")


def _no_weight_decay(name: str, tensor: torch.Tensor) -> bool:
    """Megatron's standard grouping (`get_standard_config_overrides`): 1-D weights and biases."""
    return tensor.ndim == 1 or name.endswith(".bias")


def _check_standard_group(where: str, number: int, group: dict[str, Any]) -> None:
    strange = sorted(set(group) - _GROUP_FIELDS)
    if strange or group.get("lr_mult", 1.0) != 1.0 or group.get("is_decoupled_lr", False) or "wd_mult" not in group:
        what = f"fields {strange}" if strange else "learning-rate multipliers or no wd_mult"
        raise _refuse(where, f"parameter group {number} has {what}: not Megatron's standard grouping, so the "
                             "parameter of each optimizer index is unknown")


def legacy_parameter_names(state: dict[str, Any], path: Path) -> dict[int, str]:
    """optimizer parameter index -> model tensor name of one rank file, as Megatron's
    `_get_param_groups` assigns them (see the module docstring); every count and shape checked."""
    where = str(path)
    optim, _ = _legacy_optimizer(state, path)
    params = _model_parameters(state, path)
    # Megatron's expert-parallel group: expert weights when the experts are split over ranks (EP > 1)
    saved = state.get("args")
    ep = int((saved_args_dict(saved, where).get("expert_model_parallel_size") if saved is not None else 1) or 1)
    unused = list(params)
    names: dict[int, str] = {}
    for number, group in enumerate(optim["param_groups"]):
        _check_standard_group(where, number, group)
        no_wd, expert = group["wd_mult"] == 0.0, bool(group.get("is_expert_parallel", False))
        members = [(name, t) for name, t in unused
                   if _no_weight_decay(name, t) == no_wd and (ep > 1 and ".experts." in name) == expert]
        if len(members) != len(group["params"]):
            raise _refuse(where, f"parameter group {number} holds {len(group['params'])} parameters where Megatron's "
                                 f"grouping of this rank's model gives {len(members)}; the layout cannot be mapped")
        for index, (name, tensor) in zip(group["params"], members):
            found = optim["state"].get(index)
            if not isinstance(found, dict) or any(found.get(k) is None for k in MOMENTS):
                raise _refuse(where, f"parameter {index} ({name}) has no Adam moments: the optimizer never stepped?")
            if any(tuple(found[k].shape) != tuple(tensor.shape) for k in MOMENTS):
                raise _refuse(where, f"optimizer index {index} has moments of shape {tuple(found['exp_avg'].shape)} where "
                                     f"its parameter {name} is {tuple(tensor.shape)}; the layout cannot be mapped")
            names[index] = name
        taken = {name for name, _ in members}
        unused = [(name, t) for name, t in unused if name not in taken]
    if unused:
        raise _refuse(where, f"{unused[0][0]} (and {len(unused) - 1} more) belongs to no optimizer parameter group")
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
                raise _refuse(str(path), "fp32_from_fp16_params does not hold one master weight per parameter of "
                                         "its group (fp32 parameters among bf16 ones?); cannot map them")
            for index, master in zip(group["params"], group_masters):
                yield names[index], master

    return tensors_of


def _model_parameters(state: dict[str, Any], path: Path) -> list[tuple[str, torch.Tensor]]:
    """A rank file's model parameters in the model's order (that of its 'model' entries)."""
    params = [(name, value) for name, value in flatten_state(state["model"])
              if isinstance(value, torch.Tensor) and canonical_name(name) is not None]
    if any(name.startswith(("language_model.", "word_embeddings_for_head.")) for name, _ in params):
        raise _refuse(str(path), "the legacy model's optimizer state (language_model.* names): its parameter order is "
                                 "not one ember can verify")
    return params


def distributed_parameter_slices(state: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, slice]]:
    """(the flat tensors of the distrib_optim.pt next to rank file `path`, model tensor name -> its
    slice of them). megatron-core's DDP lays the parameters of a rank out in one gradient buffer in
    reverse model order, each starting at a multiple of 64 elements; save_parameter_state gathers
    every data-parallel shard of it into flat 'param' (fp32 master weights), 'exp_avg' and
    'exp_avg_sq' tensors without the buffer's end padding. The layout is rebuilt so and then
    verified: each parameter's 'param' slice must be (round to) the model weight of the rank file,
    otherwise (several buckets, another buffer layout) it is refused."""
    where = str(path.parent / DISTRIBUTED_FILE)
    saved = load_megatron_pickle(path.parent / DISTRIBUTED_FILE)
    if not isinstance(saved, dict) or not saved.get("buckets_coalesced"):
        raise _refuse(where, "is not megatron-core's coalesced distributed optimizer state (an older layout, or one "
                             "optimizer per expert group); ember cannot map it to parameters")
    buffers = {k: v for k, v in saved.items() if k != "buckets_coalesced"}
    dtypes = next(iter(buffers.values())) if len(buffers) == 1 else None
    if not isinstance(dtypes, dict) or len(dtypes) != 1:
        raise _refuse(where, f"holds {len(buffers)} gradient buffers (parameters of several dtypes?); ember maps one")
    flat = next(iter(dtypes.values()))
    if not isinstance(flat, dict) or any(not isinstance(flat.get(k), torch.Tensor) for k in _FLAT_KINDS.values()):
        raise _refuse(where, "holds no flat 'param', 'exp_avg' and 'exp_avg_sq' tensors: not Adam's state")
    slices: dict[str, slice] = {}
    start = 0
    for name, tensor in reversed(_model_parameters(state, path)):
        start = -(-start // 64) * 64
        slices[name] = slice(start, start + tensor.numel())
        start += tensor.numel()
    size = flat["param"].numel()
    problem = None if start == size else f"{size} elements where the rank's parameters take {start}"
    for name, tensor in _model_parameters(state, path) if problem is None else []:
        master = flat["param"][slices[name]].view(tensor.shape)
        if not torch.equal(master.to(tensor.dtype), tensor):
            problem = f"its 'param' slice for {name} is not that weight"
            break
    if problem is not None:
        raise _refuse(where, f"is not laid out as ember rebuilds megatron-core's gradient buffer ({problem}; several "
                             "buckets, from --overlap-grad-reduce?); ember cannot map it to parameters")
    return flat, slices


def _distributed_tensors(kind: str) -> Callable[[dict[str, Any], Path], Iterator[tuple[str, torch.Tensor]]]:
    """A LegacyReader `tensors_of`: the `kind` state of the rank's distrib_optim.pt under its parameters' names."""

    def tensors_of(state: dict[str, Any], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        flat, slices = distributed_parameter_slices(state, path)
        for name, tensor in _model_parameters(state, path):
            yield name, flat[_FLAT_KINDS[kind]][slices[name]].view(tensor.shape)

    return tensors_of


def _legacy_distributed_adam(checkpoint: MegatronCheckpoint, weights: LegacyReader) -> MegatronAdam:
    where = str(checkpoint.folder)
    missing = [path.parent for path in weights._ranks.values() if not path.parent.joinpath(DISTRIBUTED_FILE).is_file()]
    if missing:
        raise _refuse(str(missing[0]), f"has no {DISTRIBUTED_FILE} where the other ranks have one; incomplete save?")
    first = weights._ranks[(0, 0, 0)]
    state = load_megatron_pickle(first)
    optim = state.get("optimizer")
    inner = optim.get("optimizer") if isinstance(optim, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list):
        raise _refuse(str(first), "holds no parameter groups of the distributed optimizer next to its distrib_optim.pt")
    for number, group in enumerate(inner["param_groups"]):
        _check_standard_group(str(first), number, group)
    distributed_parameter_slices(state, first)  # refuses an unmappable layout before any reading
    readers = {kind: LegacyReader(checkpoint.folder, tensors_of=_distributed_tensors(kind)) for kind in (*MOMENTS, MASTER)}
    return _adam(where, inner["param_groups"], _group_step(where, inner["param_groups"]), readers,
                 state.get("opt_param_scheduler"))


def _legacy_adam(checkpoint: MegatronCheckpoint, weights: LegacyReader) -> MegatronAdam:
    where = str(checkpoint.folder)
    first = weights._ranks[(0, 0, 0)]
    if any(path.parent.joinpath(DISTRIBUTED_FILE).is_file() for path in weights._ranks.values()):
        return _legacy_distributed_adam(checkpoint, weights)
    state = load_megatron_pickle(first)
    optim, masters = _legacy_optimizer(state, first)
    legacy_parameter_names(state, first)  # refuses an unmappable layout before any reading
    steps = {float(s["step"]) for s in optim["state"].values() if isinstance(s, dict) and s.get("step") is not None}
    if len(steps) > 1:
        raise _refuse(where, f"Adam's step differs between parameters ({sorted(steps)[:4]}); ember keeps one")
    step = steps.pop() if steps else _group_step(where, optim["param_groups"])
    kinds = (*MOMENTS, MASTER) if masters is not None else MOMENTS
    readers = {kind: LegacyReader(checkpoint.folder, tensors_of=_legacy_tensors(kind)) for kind in kinds}
    return _adam(where, optim["param_groups"], step, readers, state.get("opt_param_scheduler"))


# ------------------------------------------------------------------------------------ both
def _group_step(where: str, groups: list[dict[str, Any]]) -> float:
    """Adam's step where apex's FusedAdam keeps it: in every parameter group."""
    steps = {float(g["step"]) for g in groups if g.get("step") is not None and g.get("params", [0])}
    if len(steps) != 1:
        raise _refuse(where, "the optimizer state holds no single Adam step (per parameter or per group); "
                             "did the optimizer never step?")
    return steps.pop()


def _adam(where: str, groups: list[dict[str, Any]], step: Any, readers: dict[str, Any],
          scheduler: Any) -> MegatronAdam:
    if not groups:
        raise _refuse(where, "the optimizer has no parameter groups")
    if any(g.get("amsgrad") for g in groups):
        raise _refuse(where, "AMSGrad state (max_exp_avg_sq) is not ember's Adam")
    coupled = [g for g in groups if g.get("decoupled_weight_decay", g.get("adam_w_mode", True)) is False]
    if any(g.get("weight_decay") for g in coupled):
        raise _refuse(where, "Adam with L2 weight decay (not AdamW's decoupled one) is not ember's optimizer")
    betas = {tuple(float(b) for b in g["betas"]) for g in groups if "betas" in g}
    eps = {float(g["eps"]) for g in groups if "eps" in g}
    decays = {float(g.get("weight_decay", 0.0)) for g in groups if g.get("wd_mult", 1.0) != 0.0}
    if len(betas) != 1 or len(eps) != 1 or len(decays) > 1:
        raise _refuse(where, f"parameter groups with different Adam settings (betas {sorted(betas)}, eps "
                             f"{sorted(eps)}, weight decay {sorted(decays)}); ember has one")
    lr = float(groups[0].get("lr", 0.0))
    step = float(step.item() if isinstance(step, torch.Tensor) else step)
    return MegatronAdam(step=int(step), lr=lr, betas=betas.pop(), eps=eps.pop(),
                        weight_decay=decays.pop() if decays else 0.0, readers=readers,
                        scheduler=scheduler if isinstance(scheduler, dict) else None)


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
            raise _refuse(str(checkpoint.folder), f"its {kind} tensors do not match the model's{what}")
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
    from ember.checkpoint.training import Checkpointer, find_checkpoint, write_checksums
    from ember.checkpoint.weights import model_from_state

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
    adam = read_megatron_adam(checkpoint, weights) if load_optim else None
    try:
        source = adam.readers[MASTER].get if adam is not None and adam.has_master_weights else weights.get
        model = model_from_state(args, {name: tensor.float() for name, tensor in ember_tensors(args, source)})
        if adam is not None:
            hyper = {"lr": adam.lr, "betas": adam.betas, "eps": adam.eps, "weight_decay": adam.weight_decay}
        else:  # informational: no optimizer is written
            hyper = {"lr": float(saved.get("lr") or 0.0), "eps": float(saved.get("adam_eps", 1e-8)),
                     "betas": (float(saved.get("adam_beta1", 0.9)), float(saved.get("adam_beta2", 0.999))),
                     "weight_decay": float(saved.get("weight_decay", 0.01))}
        optimizer = None
        if adam is not None:
            optimizer = optimizer_factory(model, hyper)
            _set_adam_state(model, optimizer, args, adam)
    finally:
        weights.close()
        if adam is not None:
            adam.close()
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
    if out.exists() and overwrite:
        remove_training_checkpoints(out)
    final = Checkpointer(out).save(number, model, optimizer, train_state)
    # Megatron's RNG states are not imported, and this process's would put rank 0 of the resumed run
    # on another random stream than its peers: without one, every rank derives its stream from the
    # seed and the iteration, as ember does when a run resumes at another layout
    shutil.rmtree(final / "rng", ignore_errors=True)
    write_checksums(final)
    return {"family": family, "format": weights.format, "iteration": number, "optimizer": adam is not None,
            "adam_step": adam.step if adam else None, "master_weights": bool(adam and adam.has_master_weights),
            "hyper": hyper, "tensor_parallel": saved.get("tensor_model_parallel_size"),
            "pipeline_parallel": saved.get("pipeline_model_parallel_size")}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def _set_adam_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: Any, adam: MegatronAdam) -> None:
    """Adam's state of every ember parameter, from the Megatron moments through the weights' transforms."""
    params = dict(model.named_parameters())
    moments = {kind: dict(ember_tensors(args, adam.readers[kind].get)) for kind in MOMENTS}
    for name, param in params.items():
        optimizer.state[param] = {
            "step": torch.tensor(float(adam.step), dtype=torch.float32),
            "exp_avg": moments["exp_avg"][name].to(param.dtype).contiguous(),
            "exp_avg_sq": moments["exp_avg_sq"][name].to(param.dtype).contiguous(),
        }


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

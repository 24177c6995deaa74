"""Megatron's distributed optimizer (`--use-distributed-optimizer`): its Adam state lives in flat
gradient buffers, one per tensor- x pipeline-parallel rank, sharded over the data-parallel ranks,
naming no parameter. ember rebuilds megatron-core's buffer layout (`grad_buffer_layout`: the
parameters in reverse registration order, each starting at a multiple of 64 elements, cut into
buckets with --overlap-grad-reduce, plus one of its own for an embedding tied across pipeline
stages) and uses it only once every parameter's fp32 'param' (master) slice equals, or rounds to,
the saved weight:

- legacy: each rank folder's distrib_optim.pt (`save_parameter_state`: the buffer gathered over the
  data-parallel ranks, its buckets one after the other) next to its model_optim_rng.pt, whose 'model'
  entries give the order; the bucket size comes from the saved args (`megatron_bucket_size`);
- torch_dist 'dp_reshardable' (Megatron-LM 0.16's default): the buffers per model-parallel rank
  and bucket, whose sizes say where the buckets end; torch_dist keeps no registration order, so each
  layer spec's order (`_LAYER_ORDERS`: local, Transformer Engine) is tried and the one whose masters
  match is taken.

Anything else (several buffers, MoE, uneven or virtual pipelines) is refused in one line saying how
to re-save it.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ember.checkpoint.megatron import (
    LegacyReader,
    MegatronCheckpoint,
    TorchDistReader,
    dense_key,
    load_megatron_pickle,
    saved_args_dict,
    split_dim,
)
from ember.checkpoint.megatron_adam import (
    DISTRIBUTED_FILE,
    FLAT_KINDS,
    MASTER,
    MOMENTS,
    MegatronAdam,
    adam_state,
    check_standard_group,
    group_step,
    model_parameters,
    refuse,
)

# ------------------------------------------------------------------------------------ torch_dist dp_reshardable
# torch_dist's 'dp_reshardable' form: each tensor- x pipeline-parallel rank's gradient buffer per bucket,
# `optimizer.distributed.dp_group_idx_<rank>.gbuf_idx_<buffer>.dtype_<dtypes>.bucket_idx_<bucket>.<kind>`
# (its size without the bucket's end padding), where <rank> is the rank in megatron-core's
# model-parallel group (tp + tp_size * pp); beside them the optimizer's parameter groups
# (`...dp_group_idx_<rank>.optimizer`) and bucket sizes as pickled objects
BUCKET_FQN = re.compile(r"optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(.+)\.bucket_idx_(\d+)\."
                     r"(param|exp_avg|exp_avg_sq)$")
# megatron-core's registration order of a transformer layer's parameters (ember's canonical names), the
# order its DDP reverses into the buffer, for the layer specs a GPT checkpoint comes from (their
# torch_dist names are the same: the local spec saves its norms as the TE spec's fused ones). Both
# build the attention's linear_proj before linear_qkv and the q/k norms after it; the TE spec fuses
# each norm into the linear after it, whose norm parameters come before its weight.
_LAYER_ORDERS = {
    "local": ("input_layernorm.weight", "input_layernorm.bias",
              "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
              "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
              "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
              "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
              "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
              "mlp.linear_fc1.weight", "mlp.linear_fc1.bias", "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"),
    "transformer_engine": ("self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                           "input_layernorm.weight", "input_layernorm.bias",
                           "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                           "self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                           "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias",
                           "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
                           "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                           "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"),
}
_FIRST_STAGE = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
_LAST_STAGE = ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer.weight")
_TIED_HEAD = (None, "output_layer.weight")  # the last stage's copy of a tied embedding (not in torch_dist)
_EMBEDDING = (None, "embedding.word_embeddings.weight")

Name = tuple[int | None, str]  # (global layer or None, canonical name), as the weight readers key tensors


def _tp_pieces(key: str, shape: tuple[int, ...], tp: int, rank: int, gated: bool) -> tuple[int, list[tuple[int, int]]]:
    """(dim, ranges): tensor-parallel rank `rank`'s parameter is the global tensor's `ranges` along
    `dim`, concatenated (SwiGLU's fc1: its share of the gates, then of the ups); replicated: all of it."""
    dim = split_dim(key)
    if dim is None:
        return 0, [(0, shape[0])]
    if gated and dense_key(key).startswith("mlp.linear_fc1."):
        half = shape[0] // 2
        share = [(rank * half // tp, (rank + 1) * half // tp)]
        return 0, share + [(half + a, half + b) for a, b in share]
    return dim, [(rank * shape[dim] // tp, (rank + 1) * shape[dim] // tp)]


def _read_flat(weights: TorchDistReader, fqn: str, start: int, end: int) -> torch.Tensor:
    """Elements start..end of the 1-D torch_dist tensor `fqn`, from the chunks that hold them."""
    out = torch.empty(end - start, dtype=weights.metadata.state_dict_metadata[fqn].properties.dtype)
    filled = 0
    for index, chunk in enumerate(weights.metadata.state_dict_metadata[fqn].chunks):
        offset, size = chunk.offsets[0], chunk.sizes[0]
        first, last = max(offset, start), min(offset + size, end)
        if first < last:
            data = weights.read_chunk(fqn, tuple(chunk.offsets), index).reshape(-1)
            out[first - start:last - start] = data[first - offset:last - offset]
            filled += last - first
    if filled != end - start:
        raise refuse(str(weights.folder), f"the chunks of {fqn} cover {filled} of its elements {start}..{end}; "
                                           "an incomplete checkpoint?")
    return out


def _read_object(weights: TorchDistReader, fqn: str) -> Any:
    """A small object megatron-core saved into the torch_dist files (torch.save'd; read weights-only)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    info = weights.metadata.storage_data.get(MetadataIndex(fqn))
    if info is None:
        raise refuse(str(weights.folder), f"lists {fqn} but not where it is stored; an incomplete checkpoint?")
    with open(weights.folder / info.relative_path, "rb") as f:
        f.seek(info.offset)
        raw = f.read(info.length)
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for bad pickles
        raise refuse(str(weights.folder), f"{fqn} is not readable ({type(err).__name__})") from None


@dataclass
class _BufferLayout:
    """Where each parameter of every pipeline stage lies in its ranks' gradient buffers (the same for
    the tensor-parallel ranks of a stage: they hold equal shares)."""

    tp: int
    gated: bool
    buckets: dict[tuple[int, int, str], str]  # (model-parallel rank, bucket, kind) -> fqn
    # parameter -> (stage, bucket, start, the weight it must equal: itself, or a tied head's embedding)
    places: dict[Name, tuple[int, int, int, Name]] = field(default_factory=dict)

    def local_shape(self, source: Name, shape: tuple[int, ...]) -> tuple[int, ...]:
        dim, ranges = _tp_pieces(source[1], shape, self.tp, 0, self.gated)
        return (*shape[:dim], sum(b - a for a, b in ranges), *shape[dim + 1:])

    def local(self, name: Name, kind: str, tp: int, shape: tuple[int, ...], weights: TorchDistReader) -> torch.Tensor:
        """Tensor-parallel rank `tp`'s `kind` state of parameter `name` (global shape `shape`)."""
        stage, bucket, start, source = self.places[name]
        local_shape = self.local_shape(source, shape)
        numel = int(torch.Size(local_shape).numel())
        fqn = self.buckets[(tp + self.tp * stage, bucket, kind)]
        return _read_flat(weights, fqn, start, start + numel).view(local_shape)


def _stage_parameters(shapes: dict[Name, Any], order: tuple[str, ...], stage: int,
                      stages: int) -> list[tuple[Name, Name]]:
    """(parameter, the weight it holds) of a pipeline stage in megatron-core's registration order
    (GPTModel: embedding, the stage's layers, final norm, output layer) with layer order `order`."""
    layers = sorted({layer for layer, _ in shapes if layer is not None})
    per_stage = len(layers) // stages
    names: list[Name] = [(None, key) for key in _FIRST_STAGE if stage == 0 and (None, key) in shapes]
    for layer in layers[stage * per_stage:(stage + 1) * per_stage]:
        names += [(layer, key) for key in order if (layer, key) in shapes]
    names += [(None, key) for key in _LAST_STAGE if stage == stages - 1 and (None, key) in shapes]
    pairs = [(name, name) for name in names]
    if stage == stages - 1 and stages > 1 and _TIED_HEAD not in shapes:
        pairs.append((_TIED_HEAD, _EMBEDDING))
    return pairs


def _place_stage(layout: _BufferLayout, weights: TorchDistReader, order: tuple[str, ...], stage: int, stages: int,
                 stored: set[tuple[int, ...] | None], own_bucket: Callable[[Any], bool]) -> str | None:
    """Lay pipeline stage `stage`'s parameters out in `layout` with layer order `order`; what is
    wrong with it (bucket sizes, a master slice that is not its weight), or None."""
    pairs = _stage_parameters(weights.shapes, order, stage, stages)
    sources = dict(pairs)
    numels = [(name, torch.Size(layout.local_shape(source, weights.shapes[source][0])).numel())
              for name, source in pairs]
    # the stored sizes say where megatron-core cut the buffer into buckets (--overlap-grad-reduce); the
    # tensor-parallel ranks of a stage hold equal shares, so one set of sizes serves them all
    ends = next(iter(stored)) if len(stored) == 1 else None
    places, sizes = grad_buffer_layout(numels, own_bucket, bucket_ends=ends)
    if stored != {tuple(sizes)}:
        return f"stage {stage}'s buckets hold {sorted(stored, key=str)} elements where its parameters take {sizes}"
    for name, (bucket, start) in places.items():
        layout.places[name] = (stage, bucket, start, sources[name])
    # in buffer order: a wrong layer order shows at the first parameter it moves
    for name, _ in sorted(places.items(), key=lambda item: item[1]):
        layer, key = sources[name]
        weight = weights.get(layer, key)
        for rank in range(layout.tp):
            dim, ranges = _tp_pieces(key, weight.shape, layout.tp, rank, layout.gated)
            share = torch.cat([weight.narrow(dim, a, b - a) for a, b in ranges], dim)
            master = layout.local(name, "param", rank, weight.shape, weights)
            if not torch.equal(master.to(share.dtype), share):
                return f"tensor-parallel rank {rank}'s 'param' slice for {key} of layer {layer} is not that weight"
    return None


def _dp_reshardable_layout(where: str, weights: TorchDistReader, fqns: list[str]) -> _BufferLayout:
    """The buffer layout of a 'dp_reshardable' save, rebuilt from the model's parameter shapes for
    each candidate layer order (`_LAYER_ORDERS`) and accepted only when every rank's fp32 'param'
    (master) slice of every parameter equals, or rounds to, that rank's share of the saved weight."""
    how = ("save it once more from Megatron-LM with --dist-ckpt-optim-fully-reshardable, or with "
           "--ckpt-format torch")
    buckets: dict[tuple[int, int, str], str] = {}
    buffers: dict[int, set[tuple[str, str]]] = {}
    for fqn in fqns:
        rank, buffer, dtype, bucket, kind = BUCKET_FQN.match(fqn).groups()
        buffers.setdefault(int(rank), set()).add((buffer, dtype))
        buckets[(int(rank), int(bucket), kind)] = fqn
    if any(len(found) > 1 for found in buffers.values()):
        raise refuse(where, "holds several gradient buffers per rank (parameters of several dtypes, or a virtual "
                             f"pipeline) in its 'dp_reshardable' optimizer state, which ember does not map; {how}")

    def stored_sizes(rank: int) -> tuple[int, ...] | None:
        """The sizes of a rank's buckets, None unless each holds param, exp_avg and exp_avg_sq."""
        count = 1 + max(bucket for r, bucket, _ in buckets if r == rank)
        if any({kind for r, b, kind in buckets if (r, b) == (rank, bucket)} != set(FLAT_KINDS.values())
               for bucket in range(count)):
            return None
        return tuple(int(weights.metadata.state_dict_metadata[buckets[(rank, bucket, "param")]].size[0])
                     for bucket in range(count))

    args = saved_args_dict(weights.saved_args, where) if weights.saved_args is not None else {}
    tp, stages = int(args.get("tensor_model_parallel_size") or 1), int(args.get("pipeline_model_parallel_size") or 1)
    uneven = [flag for flag in ("num_experts", "virtual_pipeline_model_parallel_size",
                                "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                                "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split",
                                "mtp_num_layers") if args.get(flag)]
    ranks = {rank for rank, _, _ in buckets}
    if uneven or ranks != set(range(tp * stages)):
        what = (f"--{uneven[0].replace('_', '-')}" if uneven
                else f"{len(ranks)} ranks' buffers for TP {tp} x PP {stages}")
        raise refuse(where, f"holds the distributed optimizer's 'dp_reshardable' state of a run ember does not lay "
                             f"out ({what}); {how}")
    stored = [{stored_sizes(tp * stage + rank) for rank in range(tp)} for stage in range(stages)]
    problems = []
    for spec, order in _LAYER_ORDERS.items():
        layout = _BufferLayout(tp, bool(args.get("swiglu")), buckets)
        problem = None
        for stage in range(stages):
            problem = _place_stage(layout, weights, order, stage, stages, stored[stage], _shared_embedding(args))
            if problem is not None:
                break
        unplaced = set(weights.shapes) - {source for _, _, _, source in layout.places.values()}
        if problem is None and unplaced:
            layer, key = min(unplaced, key=str)
            problem = f"{key} of layer {layer} is in no buffer"
        if problem is None:
            return layout
        problems.append(f"{spec} spec: {problem}")
    raise refuse(where, f"holds the distributed optimizer's 'dp_reshardable' state, whose buffers are not laid out as "
                         f"ember rebuilds megatron-core's for the local or Transformer Engine layer spec "
                         f"({'; '.join(problems)}); {how}")


class _BufferReader:
    """One Adam state kind of a 'dp_reshardable' save as global tensors by (layer, name), like the
    weight readers: each tensor-parallel rank's share read from its buffer and put in place."""

    def __init__(self, weights: TorchDistReader, layout: _BufferLayout, kind: str):
        self._weights, self._layout, self._kind = weights, layout, kind
        self.shapes = {name: (weights.shapes[name][0], torch.float32) for name in weights.shapes}

    def get(self, layer: int | None, key: str) -> torch.Tensor:
        shape = self.shapes[(layer, key)][0]
        out = torch.empty(shape, dtype=torch.float32)
        for rank in range(self._layout.tp):
            share = self._layout.local((layer, key), self._kind, rank, shape, self._weights)
            dim, ranges = _tp_pieces(key, shape, self._layout.tp, rank, self._layout.gated)
            done = 0
            for a, b in ranges:
                out.narrow(dim, a, b - a).copy_(share.narrow(dim, done, b - a))
                done += b - a
        return out

    def close(self) -> None:
        pass


def dp_reshardable_adam(checkpoint: MegatronCheckpoint, weights: TorchDistReader, fqns: list[str],
                         common: dict[str, Any]) -> MegatronAdam:
    where = str(checkpoint.folder)
    layout = _dp_reshardable_layout(where, weights, fqns)
    state = _read_object(weights, "optimizer.distributed.dp_group_idx_0.optimizer/shard_0_1")
    state = state[0] if isinstance(state, list) and len(state) == 1 else state
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list):
        raise refuse(where, "holds no parameter groups of the distributed optimizer next to its buffers")
    for number, group in enumerate(groups):
        check_standard_group(where, number, group)
    readers = {kind: _BufferReader(weights, layout, FLAT_KINDS[kind]) for kind in (*MOMENTS, MASTER)}
    return adam_state(where, groups, group_step(where, groups), readers, common.get("opt_param_scheduler"))


# ------------------------------------------------------------------------------------ legacy
def grad_buffer_layout(params: list[tuple[Any, int]], own_bucket: Callable[[Any], bool] = lambda name: False,
                       bucket_size: int | None = None, bucket_ends: tuple[int, ...] | None = None,
                       ) -> tuple[dict[Any, tuple[int, int]], list[int]]:
    """megatron-core's gradient buffer (`_ParamAndGradBuffer`) for one rank's parameters, given as
    (name, number of elements) in the model's registration order, with the distributed optimizer:
    the parameters in reverse order, each starting at a multiple of 64 elements; one that
    `own_bucket` names (the embedding the first and last pipeline stages share) alone in a bucket.
    With --overlap-grad-reduce the buffer is cut into buckets: one closes after the parameter that
    takes it to `bucket_size` elements or more, or, where a checkpoint lists its buckets' sizes,
    at exactly `bucket_ends` (the same cut, without knowing the size asked for). Returns (name ->
    (bucket, start in it), each bucket's size without its end padding, as the checkpoints store them)."""
    places: dict[Any, tuple[int, int]] = {}
    sizes: list[int] = []
    start, used = 0, False
    for name, numel in reversed(params):
        start = -(-start // 64) * 64
        if own_bucket(name) and used:  # megatron-core closes the bucket at the aligned start
            sizes.append(start)
            start = 0
        places[name] = (len(sizes), start)
        start, used = start + numel, True
        full = (bucket_size is not None and start >= bucket_size) or (
            bucket_ends is not None and len(sizes) < len(bucket_ends) and start == bucket_ends[len(sizes)])
        if own_bucket(name) or full:
            sizes.append(start)
            start, used = 0, False
    if used:
        sizes.append(start)
    return places, sizes


def megatron_bucket_size(args: dict[str, Any]) -> int | None:
    """The gradient bucket size a Megatron-LM run used (None: one bucket): --ddp-bucket-size, or
    megatron-core DDP's default with --overlap-grad-reduce, max(40M, 1M x data-parallel ranks)."""
    if not args.get("overlap_grad_reduce"):
        return None
    if args.get("ddp_bucket_size"):
        return int(args["ddp_bucket_size"])
    data_parallel = int(args.get("data_parallel_size") or 1) * int(args.get("context_parallel_size") or 1)
    return max(40_000_000, 1_000_000 * data_parallel)


def _shared_embedding(args: dict[str, Any]) -> Callable[[Any], bool]:
    """The parameters megatron-core's DDP marks `shared_embedding`: a tied embedding and its output
    copy when they sit on different pipeline stages."""
    shared = not args.get("untie_embeddings_and_output_weights", False) and (
        args.get("pipeline_model_parallel_size") or 1) > 1
    names = {"embedding.word_embeddings.weight", "output_layer.weight"}
    return lambda name: shared and (name[1] if isinstance(name, tuple) else name) in names


def distributed_parameter_slices(state: dict[str, Any], path: Path, verified: dict[Path, dict[str, slice]] | None = None
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, slice]]:
    """(the flat tensors of the distrib_optim.pt next to rank file `path`, model tensor name -> its
    slice of them). save_parameter_state gathers every data-parallel shard of the rank's gradient
    buffer (`grad_buffer_layout`) into flat 'param' (fp32 master weights), 'exp_avg' and
    'exp_avg_sq' tensors, its buckets one after the other without their end padding. The layout is
    rebuilt so (the bucket size from the saved args) and then verified: each parameter's 'param' slice
    must be (round to) the model weight of the rank file, otherwise it is refused. `verified` (rank
    file -> slices) keeps what one import has verified, so each rank file is compared once, not once
    per Adam state kind read from it."""
    where = str(path.parent / DISTRIBUTED_FILE)
    saved = load_megatron_pickle(path.parent / DISTRIBUTED_FILE)
    if not isinstance(saved, dict) or not saved.get("buckets_coalesced"):
        raise refuse(where, "is not megatron-core's coalesced distributed optimizer state (an older layout, or one "
                             "optimizer per expert group); ember cannot map it to parameters")
    buffers = {k: v for k, v in saved.items() if k != "buckets_coalesced"}
    dtypes = next(iter(buffers.values())) if len(buffers) == 1 else None
    if not isinstance(dtypes, dict) or len(dtypes) != 1:
        raise refuse(where, f"holds {len(buffers)} gradient buffers (parameters of several dtypes?); ember maps one")
    flat = next(iter(dtypes.values()))
    if not isinstance(flat, dict) or any(not isinstance(flat.get(k), torch.Tensor) for k in FLAT_KINDS.values()):
        raise refuse(where, "holds no flat 'param', 'exp_avg' and 'exp_avg_sq' tensors: not Adam's state")
    if verified is not None and path in verified:
        return flat, verified[path]
    params = model_parameters(state, path)
    args = saved_args_dict(state["args"], where) if state.get("args") is not None else {}
    places, sizes = grad_buffer_layout([(name, t.numel()) for name, t in params], _shared_embedding(args),
                                       bucket_size=megatron_bucket_size(args))
    slices = {}
    for name, tensor in params:
        bucket, start = places[name]
        start += sum(sizes[:bucket])
        slices[name] = slice(start, start + tensor.numel())
    size = flat["param"].numel()
    problem = None if sum(sizes) == size else f"{size} elements where the rank's parameters take {sum(sizes)}"
    for name, tensor in params if problem is None else []:
        master = flat["param"][slices[name]].view(tensor.shape)
        if not torch.equal(master.to(tensor.dtype), tensor):
            problem = f"its 'param' slice for {name} is not that weight"
            break
    if problem is not None:
        raise refuse(where, f"is not laid out as ember rebuilds megatron-core's gradient buffer ({problem}); "
                             "ember cannot map it to parameters")
    if verified is not None:
        verified[path] = slices
    return flat, slices


def _distributed_tensors(kind: str, verified: dict[Path, dict[str, slice]]
                         ) -> Callable[[dict[str, Any], Path], Iterator[tuple[str, torch.Tensor]]]:
    """A LegacyReader `tensors_of`: the `kind` state of the rank's distrib_optim.pt under its parameters' names."""

    def tensors_of(state: dict[str, Any], path: Path) -> Iterator[tuple[str, torch.Tensor]]:
        flat, slices = distributed_parameter_slices(state, path, verified)
        for name, tensor in model_parameters(state, path):
            yield name, flat[FLAT_KINDS[kind]][slices[name]].view(tensor.shape)

    return tensors_of


def legacy_distributed_adam(checkpoint: MegatronCheckpoint, weights: LegacyReader) -> MegatronAdam:
    where = str(checkpoint.folder)
    missing = [path.parent for path in weights.rank_files.values() if not path.parent.joinpath(DISTRIBUTED_FILE).is_file()]
    if missing:
        raise refuse(str(missing[0]), f"has no {DISTRIBUTED_FILE} where the other ranks have one; incomplete save?")
    first = weights.rank_files[(0, 0, 0)]
    state = load_megatron_pickle(first)
    optim = state.get("optimizer")
    inner = optim.get("optimizer") if isinstance(optim, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list):
        raise refuse(str(first), "holds no parameter groups of the distributed optimizer next to its distrib_optim.pt")
    for number, group in enumerate(inner["param_groups"]):
        check_standard_group(str(first), number, group)
    verified: dict[Path, dict[str, slice]] = {}  # shared by the readers: each rank file is checked once
    distributed_parameter_slices(state, first, verified)  # refuses an unmappable layout before any reading
    readers = {kind: LegacyReader(checkpoint.folder, tensors_of=_distributed_tensors(kind, verified))
               for kind in (*MOMENTS, MASTER)}
    return adam_state(where, inner["param_groups"], group_step(where, inner["param_groups"]), readers,
                 state.get("opt_param_scheduler"))

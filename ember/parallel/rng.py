"""Dropout under tensor, sequence and context parallelism: which ranks draw the same masks.

A tensor replicated over ranks must be dropped alike on each of them, or the copies drift apart; a
tensor sharded over ranks must be dropped independently on each, or every shard repeats one
pattern (attention heads under tensor parallelism; pieces of the sequence under sequence and
context parallelism). Every rank of a tensor-parallel group runs the same default RNG stream, so
the first case holds by itself and the second needs a stream per rank.

Megatron keeps that stream in a tracker (seed + 2718 + tp_rank, `get_cuda_rng_tracker().fork()`
around dropout in model-parallel regions) and its CheckpointFunction saves and restores the
tracker so recomputation replays the masks. ember derives the stream instead: on entering a
region, one number drawn from the default CPU generator, plus this rank's key, seeds the
generators (CPU, and the GPU's when the region runs there) for the region; on leaving, they are put
back, so the default stream has moved by that one draw on every rank alike. Nothing is kept but
the default generator's state, which is why
- activation recomputation replays the masks: torch's checkpoint restores the RNG state a block
  saw in its forward (inside the model's region, when there is one), and the hooks inside the
  block draw the same seeds again (`ember.parallel.recompute`);
- a run is deterministic for its seed, and a resumed run continues from the RNG state its
  checkpoint saved.

The regions, each a pair of forward hooks on a module, are static for a model, so a block's
recomputation enters exactly the regions its forward did:
- tensor parallelism without sequence parallelism: each attention module (this rank's heads),
  keyed by the tp rank; hidden dropout acts on replicated activations and stays on the shared
  stream;
- sequence or context parallelism: the whole forward of the model (or pipeline stage), keyed by
  the cp rank and, with sequence parallelism, the tp rank: every dropout in it acts on this rank's
  piece of the sequence or its heads. Attention regions nest inside (tp without sp, with cp).
  `apply_tensor_parallel` installs them; for context parallelism alone the trainer's model setup
  calls `apply_dropout_streams(model)` itself.

Limits: an MoE router's input jitter is drawn on the whole (gathered) sequence under sequence
parallelism, which must be the same on every tp rank: with dropout on, that is refused. LoRA's
input dropout (`ember.models.lora`) draws in whatever region its layer sits in: rank-distinct masks
on the replicated inputs of wq/wk/wv (and of w1/w3 under sp), which keeps the computation
consistent (each rank's output columns see their own mask) but is not the single-process draw.
Pipeline stages hold different layers: the trainer seeds each stage's stream apart (seed + 100 x
pp rank, as Megatron does), so layers on different stages do not repeat each other's masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.errors import EmberError
from ember.parallel.context import sequence_layout

_OFFSET = 2718  # Megatron's offset of the model-parallel seed; any positive number would do
_HOOKED = "ember_dropout_streams"


def _first_tensor(args: tuple, kwargs: dict | None = None) -> torch.Tensor | None:
    for value in (*args, *(kwargs or {}).values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _device_generator(device: torch.device) -> list[torch.Generator]:
    """The default generator of an accelerator (cuda, xpu, ...) `device`; none for the CPU."""
    if device.type in ("cpu", "meta"):
        return []
    backend = getattr(torch, device.type, None)
    generators = getattr(backend, "default_generators", None)
    if not generators:
        return []
    return [generators[device.index if device.index is not None else backend.current_device()]]


def _enter_stream(key: int, device: torch.device) -> list[tuple[torch.Generator, torch.Tensor]]:
    """Seed the default generators (CPU, and `device`'s if it is a GPU) for rank `key`'s stream;
    return their states before, for `_leave_stream`."""
    # the default CPU generator is the same on the ranks that share a stream, and recomputation
    # restores it: every rank draws the same number here, forward and recomputation alike
    drawn = int(torch.randint(2**62, (), dtype=torch.int64))
    seed = drawn + _OFFSET + key
    generators = [torch.default_generator, *_device_generator(device)]
    saved = [(generator, generator.get_state()) for generator in generators]
    for generator in generators:
        generator.manual_seed(seed)
    return saved


def _leave_stream(saved: list[tuple[torch.Generator, torch.Tensor]]) -> None:
    for generator, state in saved:
        generator.set_state(state)


class RankStream:
    """Forward hooks running a module on a stream of this rank's own: `key(module)` gives the
    rank's key for a call, or None when the call needs no stream of its own (no dropout to draw)."""

    def __init__(self, key: Callable[[nn.Module], int | None]):
        self.key = key
        self.saved: list[list | None] = []  # a stack: a module may be called inside itself

    def enter(self, module: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
        key = self.key(module)
        tensor = _first_tensor(args, kwargs)
        device = tensor.device if tensor is not None else torch.device("cpu")
        self.saved.append(None if key is None else _enter_stream(key, device))

    def leave(self, module: nn.Module, args: tuple, output) -> None:
        saved = self.saved.pop() if self.saved else None
        if saved is not None:
            _leave_stream(saved)

    def install(self, module: nn.Module) -> None:
        # eager under torch.compile: a traced graph would take the generators' states for constants
        enter, leave = torch.compiler.disable(self.enter), torch.compiler.disable(self.leave)
        module.register_forward_pre_hook(enter, with_kwargs=True)
        # always_call: put the generators back even when the forward raises (or recomputation
        # stops early), so no rank leaves the region on another stream
        module.register_forward_hook(leave, always_call=True)


def _has_dropout(model: nn.Module) -> bool:
    args = model.args
    return args.hidden_dropout > 0 or args.attention_dropout > 0


def _model_key(model: nn.Module) -> int | None:
    """The model's region: this rank's piece of the sequence (cp rank, tp rank with sp)."""
    if not model.training or not _has_dropout(model):
        return None
    layout = sequence_layout(model)
    mesh = getattr(model, "tensor_parallel_mesh", None)
    if layout.sp_degree > 1 and mesh is not None:
        tp_rank, tp = mesh.get_local_rank(), mesh.size()
    else:
        tp_rank, tp = 0, 1
    if layout.cp_size == 1 and tp == 1:
        return None
    return layout.cp_rank * tp + tp_rank


def apply_dropout_streams(model: nn.Module, tp_mesh=None, sequence_parallel: bool = False) -> None:
    """Give `model` (an ember Transformer or a pipeline stage of one, tensor- and/or
    context-parallel) the per-rank dropout regions described above; once per model, and only when
    its args have dropout (a model built without keeps no hooks).

    The model's region reads its sequence layout at each call, so context parallelism applied after
    this call is covered too."""
    if getattr(model, _HOOKED, False) or not _has_dropout(model):
        return  # without dropout, no hooks: nothing to draw, and no graph breaks under compile
    args = model.args
    if sequence_parallel and args.moe_input_jitter > 0:
        # the router sees the whole (gathered) sequence on every tp rank, inside the model's
        # per-rank region: its jitter would differ across ranks and so would the routing
        raise EmberError(f"router input jitter ({args.moe_input_jitter}) with dropout under sequence parallelism "
                         "is not supported: pass --moe-input-jitter-eps 0, set the dropouts to 0, "
                         "or drop --sequence-parallel")
    setattr(model, _HOOKED, True)
    RankStream(_model_key).install(model)
    if tp_mesh is None or tp_mesh.size() == 1 or sequence_parallel:
        return  # under sequence parallelism the model's region already holds attention
    tp_rank = tp_mesh.get_local_rank()

    def attention_key(attention: nn.Module) -> int | None:
        return tp_rank if attention.training and attention.dropout > 0 else None

    for block in model.layers.values():
        RankStream(attention_key).install(block.attention)

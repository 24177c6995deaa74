"""Pipeline parallelism: the decoder cut into stages, run by `torch.distributed.pipelining` schedules.

A stage is a copy of the plain `Transformer` with what it does not own deleted (torchtitan's
pattern): layers outside its range are dropped, `tok_embeddings` exists only on the first stage,
`norm` and `output` only on the last. Parameter names are those of the whole model, so a stage's
state dict is a slice of the full one and checkpoints reshard across layouts by name.

Stages are assigned to pipeline ranks in Megatron's interleaved ("loop") order: with `pp` ranks and
`v` virtual stages per rank, rank r holds stages r, r + pp, ..., r + (v-1)·pp.

The loss. ember's training loss is the token cross-entropy summed over the loss mask and divided
by the number of loss tokens in the whole global batch. Every micro-batch's loss is therefore
`sum(CE · mask) · scale` with `scale = loss_scale · dp_average_size / global_tokens`, passed in
through the schedule's `loss_kwargs`; the schedule is built with `scale_grads=False` so that it
does not divide again by the number of micro-batches. The sum of micro-batch losses is the global
mean, exactly as `Trainer.train_step` computes it with gradient accumulation.

MoE load-balancing loss: every stage attaches its layers' aux loss to its output with an identity
autograd function whose backward injects the aux gradient (`loss_scale / n_microbatches`, the
trainer's weighting), as Megatron's MoEAuxLossAutoScaler does. No extra tensors travel between
stages.

Tied embeddings (Qwen3, Bloom, GPT-2): the first stage holds `tok_embeddings.weight`, the last a
copy as `output.weight`; after backward the two gradients are summed over the pair of ranks
(Megatron's embedding group), so both copies take the same optimizer step and stay equal. The copy
is left out of gradient-norm computation (`parameters_for_grad_norm`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ember.config.layout import PIPELINE_SCHEDULES, check_schedule, schedule_spelling, split_layers
from ember.errors import EmberError
from ember.models.transformer import Transformer
from ember.parallel.dtensor import local_part, make_grad_whole

IGNORE_INDEX = -100  # cross_entropy's default ignore_index: labels outside the loss mask


# ------------------------------------------------------------------------------ the stage split


def stage_ids_on_rank(pp_rank: int, pp_size: int, virtual_stages: int) -> list[int]:
    """The global stage indices rank `pp_rank` holds (loop order, as the schedules expect)."""
    return [pp_rank + v * pp_size for v in range(virtual_stages)]


def cut_to_stage(model: Transformer, layer_ids: Sequence[int], is_first: bool, is_last: bool) -> Transformer:
    """Delete, in place, what a stage holding `layer_ids` does not own; returns the model."""
    keep = {str(i) for i in layer_ids}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if not is_first:
        model.tok_embeddings = None
        model.pos_embeddings = None
        model.embedding_norm = None
    if not is_last:
        model.norm = None
        model.output = None
    return model


# ------------------------------------------------------------------------------ building stages


class _AuxLossScale:
    """The weight of the MoE aux loss in backward, set per step by `pipeline_train_step`."""

    def __init__(self) -> None:
        self.value: torch.Tensor | float = 1.0


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `output`; in backward, gives `aux_loss` the gradient `scale`, so the aux loss
    joins the objective without being sent to the last stage."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        ctx.aux_shape, ctx.aux_dtype, ctx.scale = aux_loss.shape, aux_loss.dtype, scale
        # a copy, not `output.view_as(output)`: FSDP2 registers its pre-backward hook on the stage's
        # output and warns that a view would lose it to an in-place op ("returned a view tensor")
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        aux_grad = torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad_output.device) * ctx.scale
        return grad_output, aux_grad, None


def _attach_aux_loss_hook(scale: _AuxLossScale):
    def hook(module: Transformer, _inputs, output: torch.Tensor) -> torch.Tensor:
        aux = module.aux_loss()
        if not aux.requires_grad:  # no MoE layer on this stage, or evaluation
            return output
        return _AttachAuxLoss.apply(output, aux, scale.value)

    return hook


@dataclass
class TiedEmbeddings:
    """The first stage's token embedding and the last stage's copy of it as the output head.

    Each of the two ranks holds one side (`local`, None elsewhere); `peer` is the global rank of
    the other side. Gradients (and, at initialisation, weights) are exchanged point-to-point in
    the pipeline group.
    """

    group: dist.ProcessGroup
    peer: int
    local: Callable[[], nn.Parameter] | None
    is_first_side: bool

    def all_reduce_grads(self) -> None:
        """Both sides end with grad_embedding + grad_output (IEEE addition commutes, so the two
        sums are bit-identical and the copies stay equal after the optimizer step)."""
        if self.local is None:
            return
        param = self.local()
        make_grad_whole(param)  # e.g. a vocab-parallel embedding's gradient comes out Partial
        grad = local_part(param.grad) if param.grad is not None else torch.zeros_like(local_part(param))
        other = self._exchange(grad)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        local_part(param.grad).add_(other)

    @torch.no_grad()
    def copy_weights_to_last(self) -> None:
        """Make the output head equal to the embedding (after initialising or loading weights)."""
        if self.local is None:
            return
        weight = local_part(self.local())
        other = self._exchange(weight.detach())
        if not self.is_first_side:
            weight.copy_(other)

    def _exchange(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, self.peer, group=self.group),
               dist.P2POp(dist.irecv, received, self.peer, group=self.group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return received


@dataclass
class PipelineParts:
    """What one pipeline rank holds: its stages (in its local order) and their model parts."""

    stages: list  # torch.distributed.pipelining.PipelineStage
    modules: list[Transformer]
    stage_ids: list[int]
    layer_counts: list[int]  # per global stage
    pp_group: dist.ProcessGroup
    last_stage_rank: int  # global rank holding the last stage
    tied: TiedEmbeddings | None = None
    aux_scale: _AuxLossScale = field(default_factory=_AuxLossScale)

    @property
    def num_stages(self) -> int:
        return len(self.layer_counts)

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter this rank trains (for the optimizer)."""
        return [p for module in self.modules for p in module.parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(full-model name, parameter) pairs; names are unique across a rank's stages."""
        return [pair for module in self.modules for pair in module.named_parameters()]

    def parameters_for_grad_norm(self) -> list[nn.Parameter]:
        """Parameters without the tied output-head copy, whose gradient the embedding already counts."""
        skip = None
        if self.tied is not None and self.has_last_stage:
            skip = self.modules[self.stage_ids.index(self.num_stages - 1)].output.weight
        return [p for p in self.parameters() if p is not skip]


class RankStages(nn.Module):
    """This rank's pipeline stages seen as one model, under the whole model's parameter names:
    `tok_embeddings` / `norm` / `output` where a stage here has them, and every layer here in
    `layers`. The submodules are the stages' own (shared, not copied). It is never run; it is
    what the optimizer, state dicts (DCP checkpoints reshard by these names) and gradient
    clipping see."""

    _OWNED = ("tok_embeddings", "pos_embeddings", "embedding_norm", "norm", "output")

    def __init__(self, modules: Sequence[Transformer]):
        super().__init__()
        self.args = modules[0].args
        self.layers = nn.ModuleDict()
        for module in modules:
            for name in self._OWNED:
                if getattr(module, name, None) is not None:
                    setattr(self, name, getattr(module, name))
            for key, layer in module.layers.items():
                self.layers[key] = layer

    def forward(self, *args, **kwargs):
        raise RuntimeError("pipeline stages run through their schedule, not as one module")


def build_pipeline_stages(
    model: Transformer | Callable[[], Transformer],
    pp_mesh,
    *,
    virtual_stages: int = 1,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    device: torch.device | None = None,
) -> PipelineParts:
    """Cut a model into this pipeline rank's stages and wrap each in a `PipelineStage`.

    `model` is the whole model (typically on the meta device; each stage deep-copies it) or a
    factory that builds one. The returned modules are the stage's own objects: apply tensor
    parallelism, FSDP or recomputation to them in place, materialise and load them, then call
    `parts.tied.copy_weights_to_last()` for tied embeddings if the weights were not copied from one
    initialised model. Stage input/output shapes are inferred at the first schedule step.
    """
    from torch.distributed.pipelining import PipelineStage

    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    if pp_size < 2:
        raise EmberError(f"pipeline parallelism needs at least 2 pipeline ranks, got {pp_size}")
    if virtual_stages < 1:
        raise EmberError(f"virtual pipeline stages per rank must be >= 1, got {virtual_stages}")
    stage_ids = stage_ids_on_rank(pp_rank, pp_size, virtual_stages)
    # one whole model per local stage, cut below (cheap on the meta device)
    whole = [copy.deepcopy(model) if isinstance(model, Transformer) else model() for _ in stage_ids]
    args = whole[0].args
    num_stages = pp_size * virtual_stages
    counts = split_layers(args.n_layers, num_stages, first_stage_layers, last_stage_layers)
    starts = [sum(counts[:i]) for i in range(num_stages)]
    device = device or _mesh_device(pp_mesh)
    group = pp_mesh.get_group()

    parts = PipelineParts(stages=[], modules=[], stage_ids=stage_ids, layer_counts=counts, pp_group=group,
                          last_stage_rank=dist.get_global_rank(group, (num_stages - 1) % pp_size))
    for stage_id, part in zip(stage_ids, whole):
        layer_ids = range(starts[stage_id], starts[stage_id] + counts[stage_id])
        cut_to_stage(part, layer_ids, is_first=stage_id == 0, is_last=stage_id == num_stages - 1)
        if args.num_experts and args.moe_aux_loss_coef > 0:
            part.register_forward_hook(_attach_aux_loss_hook(parts.aux_scale))
        parts.modules.append(part)
        parts.stages.append(PipelineStage(part, stage_id, num_stages, device, group=group))
    if args.tie_embeddings:
        parts.tied = _tied_embeddings(parts, group)
    return parts


def _tied_embeddings(parts: PipelineParts, group: dist.ProcessGroup) -> TiedEmbeddings:
    first_rank = dist.get_global_rank(group, 0)
    if parts.has_first_stage:
        module = parts.modules[parts.stage_ids.index(0)]
        return TiedEmbeddings(group, parts.last_stage_rank, lambda: module.tok_embeddings.weight, True)
    if parts.has_last_stage:
        module = parts.modules[parts.stage_ids.index(parts.num_stages - 1)]
        return TiedEmbeddings(group, first_rank, lambda: module.output.weight, False)
    return TiedEmbeddings(group, first_rank, None, False)


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


# ------------------------------------------------------------------------------ schedules and steps


def pipeline_loss(output: torch.Tensor, target: torch.Tensor, *, scale: torch.Tensor | float) -> torch.Tensor:
    """One micro-batch's share of the objective: CE summed over loss tokens, times `scale`.

    `target` holds the labels with IGNORE_INDEX outside the loss mask. Same arithmetic as
    `Trainer._loss_sum` (fp32 logits, per-token losses summed), so the numbers are the same;
    vocab-sharded logits (tensor parallelism's loss_parallel) are reduced without gathering.
    """
    from ember.parallel.loss import cross_entropy_sum

    return cross_entropy_sum(output, target, target != IGNORE_INDEX) * scale


@dataclass
class PipelineSchedule:
    """A `torch.distributed.pipelining` schedule with the stages it runs."""

    schedule: object
    parts: PipelineParts
    n_microbatches: int
    name: str


def build_schedule(parts: PipelineParts, schedule_name: str, n_microbatches: int,
                   loss_fn: Callable[..., torch.Tensor] = pipeline_loss, scale_grads: bool = False) -> PipelineSchedule:
    """GPipe, 1F1B or interleaved 1F1B over this rank's stages.

    `loss_fn(output, target, **loss_kwargs)` must return the micro-batch's share of the whole
    objective (the default, `pipeline_loss`, does); keep `scale_grads=False` with it, because the
    schedule would otherwise divide gradients by the number of micro-batches a second time.
    """
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    name = schedule_spelling(schedule_name)
    if name not in PIPELINE_SCHEDULES:
        raise EmberError(f"unknown pipeline schedule {schedule_name!r}; choose one of {', '.join(PIPELINE_SCHEDULES)}")
    pp_size = dist.get_world_size(parts.pp_group)
    check_schedule(name, n_microbatches, pp_size, len(parts.stages))
    if name == "interleaved_1f1b":
        schedule = ScheduleInterleaved1F1B(parts.stages, n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    else:
        single = Schedule1F1B if name == "1f1b" else ScheduleGPipe
        schedule = single(parts.stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=scale_grads)
    return PipelineSchedule(schedule, parts, n_microbatches, name)


def pipeline_train_step(
    pipeline: PipelineSchedule,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    num_tokens: torch.Tensor | float | None = None,
    loss_scale: torch.Tensor | float = 1.0,
    dp_average_size: int = 1,
    finish_gradients: bool = True,
    broadcast_loss: bool = False,
    positions: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Forward and backward of one (local) batch [n_microbatches · micro_batch, seq] through the
    pipeline; gradients accumulate into the stage parameters (call it again to accumulate more).

    `num_tokens`: loss tokens in the whole global batch (all data-parallel ranks, all accumulation
    calls); default: this batch's. `loss_scale`: the fp16 loss scale the gradients carry.
    `dp_average_size`: the data-parallel degree when gradients are later averaged over it (FSDP), so
    the objective is multiplied back to a sum, as in `Trainer.train_step`. The loss mask is read as
    0/1 (nonzero = counted). `finish_gradients`: sum the tied-embedding gradients of the first and
    last stage; pass False on all but the last of several calls accumulating into one optimizer step
    (the exchange must see the finished gradients exactly once). The MoE aux loss is weighted
    loss_scale / n_microbatches per call, the trainer's weighting when one call makes the step.

    Returns this rank's share of the loss (the masked CE summed over its batch / `num_tokens`,
    unscaled) as a 0-dim tensor on ranks holding the last stage and None on the others; with
    `broadcast_loss`, every pipeline rank gets it (one broadcast in the pipeline group).

    `positions` / `documents` [batch, seq] (packed documents): given on every pipeline rank, cut
    into micro-batches with the inputs and passed to every stage's forward.
    """
    parts = pipeline.parts
    batch = input_ids.shape[0]
    if batch % pipeline.n_microbatches:
        raise EmberError(f"batch of {batch} sequences does not split into {pipeline.n_microbatches} micro-batches")
    if num_tokens is None:
        num_tokens = loss_mask.sum()
    num_tokens = torch.as_tensor(num_tokens, dtype=torch.float32, device=input_ids.device).clamp(min=1.0)
    scale = loss_scale * dp_average_size / num_tokens
    parts.aux_scale.value = loss_scale / pipeline.n_microbatches
    target = labels.masked_fill(loss_mask == 0, IGNORE_INDEX) if parts.has_last_stage else None
    losses: list[torch.Tensor] = []
    inputs = (input_ids,) if parts.has_first_stage else ()
    pipeline.schedule.step(*inputs, target=target, losses=losses, return_outputs=False,
                           loss_kwargs={"scale": scale}, **_stage_kwargs(positions, documents))
    if parts.tied is not None and finish_gradients:
        parts.tied.all_reduce_grads()
    loss = None
    if parts.has_last_stage:
        loss = torch.stack([x.detach() for x in losses]).sum() / (loss_scale * dp_average_size)
    if broadcast_loss:
        if loss is None:
            loss = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        dist.broadcast(loss, src=parts.last_stage_rank, group=parts.pp_group)
    return loss


@torch.no_grad()
def pipeline_eval_step(pipeline: PipelineSchedule, input_ids: torch.Tensor, labels: torch.Tensor,
                       loss_mask: torch.Tensor, *, broadcast_loss: bool = False, positions: torch.Tensor | None = None,
                       documents: torch.Tensor | None = None) -> torch.Tensor | None:
    """Forward only: the masked CE summed over this batch (not divided; the caller divides by the
    loss tokens of everything it evaluated, as `Trainer.evaluate` does). Last-stage ranks get it,
    others None, unless `broadcast_loss`."""
    parts = pipeline.parts
    target = labels.masked_fill(loss_mask == 0, IGNORE_INDEX) if parts.has_last_stage else None
    losses: list[torch.Tensor] = []
    inputs = (input_ids,) if parts.has_first_stage else ()
    pipeline.schedule.eval(*inputs, target=target, losses=losses, loss_kwargs={"scale": 1.0},
                           **_stage_kwargs(positions, documents))
    loss = torch.stack(losses).sum() if parts.has_last_stage else None
    if broadcast_loss:
        if loss is None:
            loss = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        dist.broadcast(loss, src=parts.last_stage_rank, group=parts.pp_group)
    return loss



def _stage_kwargs(positions: torch.Tensor | None, documents: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Keyword inputs every stage's forward receives, per micro-batch (packed documents)."""
    return {name: value for name, value in (("positions", positions), ("documents", documents)) if value is not None}

"""Tensor parallelism (Megatron-style) and sequence parallelism with DTensor, applied from outside
to an ember Transformer or a pipeline stage of one.

Layout over the tp mesh, per block:
- attention: wq/wk/wv column-parallel (each rank holds n_heads/tp query heads and n_kv_heads/tp
  key/value heads, biases sharded alike), wo row-parallel; the module's head counts are set to the
  local ones. Qwen3's q/k norms act on head-sharded tensors, so their weights are replicated and
  their gradients summed over ranks (SequenceParallel over the head dim). ALiBi biases are rebuilt
  per layer call from the slopes of the local heads.
- dense MLP: w1/w3 column-parallel, w2 row-parallel (Megatron's ColumnParallel/RowParallel pair).
- MoE: the router is replicated; every expert's ffn dim is sharded (Megatron's expert tensor
  parallelism: w1/w3 [E, ffn/tp, dim], w2 [E, dim, ffn/tp]) by `ExpertTensorParallel`, through the
  experts' public extension points (`local_weight` and forward hooks). The experts' outputs are
  all-reduced before the router weights multiply them, so the router, its top-k and the
  load-balancing loss see whole numbers and get whole gradients on every rank; this costs top_k
  times the all-reduce volume of a dense MLP. Shared experts are a column/row-parallel MLP.
- embeddings: the token table is split over the vocabulary (vocab-parallel embedding); the output
  layer is column-parallel over the vocabulary. With `loss_parallel` its logits stay a DTensor
  sharded on the vocab dim and `ember.parallel.loss.cross_entropy_sum` computes the loss without
  ever gathering them; otherwise they are all-gathered.
- sequence parallelism: between the tensor-parallel regions (norms, residual adds, embeddings'
  outputs) activations are split over the sequence dim; attention/MLP inputs are all-gathered
  once per module and their outputs reduce-scattered, instead of all-reduced.
- dropout: masks on sharded tensors (this rank's heads; its piece of the sequence under sequence
  parallelism) come from a stream of this rank's own, masks on replicated activations from the
  stream all tp ranks share (`ember.parallel.rng`).

Every parameter becomes a DTensor on the tp mesh (replicated ones too), so gradient clipping,
optimizers and DCP see one kind of tensor. Replicated weights that see only part of the data
(norms under sequence parallelism, q/k norms) get `Partial` gradients: DTensor sums them when
they are used, e.g. by the optimizer or `full_tensor()`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (DTensor, Partial, Placement, Replicate, Shard, distribute_module,
                                      distribute_tensor)
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from ember.config.layout import check_tensor_parallel
from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.models.attention import Attention
from ember.models.positions import AttentionMask, build_attention_mask
from ember.parallel.context import set_sequence_layout
from ember.parallel.dtensor import local_part
from ember.parallel.rng import apply_dropout_streams


# ------------------------------------------------------------------------------ parallel styles


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors on the tp mesh; the module sees whole (replicated)
    inputs and returns a plain tensor (torchtitan's NoParallel).

    `shard_sequence_output`: the output continues in the sequence-parallel region, so it is cut to
    this rank's piece of the sequence (dim -2; no communication, the backward all-gathers).
    """

    def __init__(self, shard_sequence_output: bool = False):
        super().__init__()
        self.shard_sequence_output = shard_sequence_output

    @staticmethod
    def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for param_name, param in list(module.named_parameters(recurse=False)):
            replicated = distribute_tensor(param, mesh, [Replicate()])
            module.register_parameter(param_name, nn.Parameter(replicated, requires_grad=param.requires_grad))

    @staticmethod
    def _wrap_inputs(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    def _local_output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh) -> torch.Tensor:
        if self.shard_sequence_output:
            output = output.redistribute(mesh, [Shard(output.ndim - 2)])
        return output.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._replicate_params, self._wrap_inputs, self._local_output)


def _norm_style(sequence_parallel: bool) -> ParallelStyle:
    return SequenceParallel(use_local_output=True) if sequence_parallel else ReplicateParallel()


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
                          loss_parallel: bool = True) -> None:
    """Shard `model` (an ember Transformer, or a pipeline stage of one) in place over `tp_mesh`,
    and record the mesh as `model.tensor_parallel_mesh` (the loss reads it: the output layer is
    split over the vocabulary).

    With `loss_parallel` the model returns logits as a DTensor sharded over the vocabulary: take
    the loss with `ember.parallel.loss.cross_entropy_sum`. Otherwise it returns whole logits.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return
    if getattr(model, "tensor_parallel_mesh", None) is not None:
        raise EmberError("tensor parallelism was already applied to this model")
    args: ModelArgs = model.args
    check_tensor_parallel(args, tp)
    activations = Shard(1) if sequence_parallel else Replicate()
    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=activations)
    if model.pos_embeddings is not None:
        plan["pos_embeddings"] = ReplicateParallel(shard_sequence_output=sequence_parallel)
    if model.embedding_norm is not None:
        plan["embedding_norm"] = _norm_style(sequence_parallel)
    if model.norm is not None:
        plan["norm"] = _norm_style(sequence_parallel)
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=activations,
                                         output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                         use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, plan)
    mask_cache: dict[str, object] = {"source": None, "mask": None}  # shared by the layers
    for block in model.layers.values():
        _parallelize_block(block, tp_mesh, sequence_parallel, activations)
        _localize_attention(block.attention, model, tp_mesh, mask_cache)
    model.tie_weights()  # each style made its own DTensor parameter; share the embedding's again
    if sequence_parallel:
        set_sequence_layout(model, sp_degree=tp)
    model.tensor_parallel_mesh = tp_mesh
    # dropout on this rank's heads (and, with sp, its piece of the sequence) draws its own masks
    apply_dropout_streams(model, tp_mesh, sequence_parallel)


def _parallelize_block(block: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool,
                       activations: Placement) -> None:
    attention = block.attention
    plan = {
        "attention_norm": _norm_style(sequence_parallel),
        # one all-gather (or none) for wq, wk and wv together; use_local_output=False keeps x a
        # DTensor, so its gradient is reduced once rather than once per projection
        "attention": PrepareModuleInput(input_layouts=(activations, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=activations),
        "ffn_norm": _norm_style(sequence_parallel),
    }
    if attention.q_norm is not None:
        # [B, T, heads/tp, head_dim]: the norm weight is shared by all heads, so shard "dim 2"
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    for name in ("post_attention_norm", "post_ffn_norm"):
        if getattr(block, name) is not None:
            plan[name] = _norm_style(sequence_parallel)
    if block.feed_forward is not None:
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(activations,), desired_input_layouts=(Replicate(),))
        plan.update(_mlp_plan("feed_forward", block.feed_forward, output_layouts=activations))
    parallelize_module(block, tp_mesh, plan)
    if block.moe is not None:
        _parallelize_moe(block.moe, tp_mesh, sequence_parallel)
    attention.n_heads //= tp_mesh.size()
    attention.n_kv_heads //= tp_mesh.size()


def _mlp_plan(prefix: str, mlp: nn.Module, output_layouts: Placement) -> dict[str, ParallelStyle]:
    plan = {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel(output_layouts=output_layouts)}
    if mlp.w3 is not None:
        plan[f"{prefix}.w3"] = ColwiseParallel()
    return plan


# ------------------------------------------------------------------------------ mixture of experts


def _parallelize_moe(moe: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    plan = {"router": ReplicateParallel(), "experts": ExpertTensorParallel()}
    if moe.shared_experts is not None:
        plan.update(_mlp_plan("shared_experts", moe.shared_experts, output_layouts=Replicate()))
    parallelize_module(moe, tp_mesh, plan)
    if sequence_parallel:
        # routing needs every token: gather the sequence at the block's input, cut it at its output
        moe.register_forward_pre_hook(partial(_gather_sequence, tp_mesh))
        moe.register_forward_hook(partial(_scatter_sequence, tp_mesh))


class ExpertTensorParallel(ParallelStyle):
    """GroupedExperts with every expert's ffn dim sharded over the tp mesh: w1/w3 [E, ffn/tp, dim],
    w2 [E, dim, ffn/tp]; the experts multiply by this rank's slices (`local_weight`).

    The grouped rows are the same on every rank: their gradient, partial per rank, is summed in
    backward; the experts' outputs, partial per rank, are summed in forward (Megatron's f and g
    operators), once for all the rows of a call."""

    @staticmethod
    def _shard_ffn_dim(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        if name:  # the experts module itself, not a submodule
            return
        # [E, ffn, dim] for w1/w3 and [E, dim, ffn] for w2: shard the ffn dim
        for param_name, dim in (("w1", 1), ("w3", 1), ("w2", 2)):
            param = getattr(module, param_name)
            if param is not None:
                sharded = distribute_tensor(param, mesh, [Shard(dim)])
                module.register_parameter(param_name, nn.Parameter(sharded, requires_grad=param.requires_grad))
        module.local_weight = local_part

    @staticmethod
    def _replicated_rows(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        grouped, *rest = inputs
        grouped = DTensor.from_local(grouped, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])
        return (grouped, *rest)

    @staticmethod
    def _summed_output(module: nn.Module, output: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        return DTensor.from_local(output, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, self._shard_ffn_dim, self._replicated_rows, self._summed_output)


def _gather_sequence(mesh: DeviceMesh, module: nn.Module, inputs: tuple) -> tuple:
    x = DTensor.from_local(inputs[0], mesh, [Shard(1)], run_check=False)
    return (x.redistribute(mesh, [Replicate()]).to_local(), *inputs[1:])


def _scatter_sequence(mesh: DeviceMesh, module: nn.Module, inputs: tuple,
                      output: torch.Tensor) -> torch.Tensor:
    out = DTensor.from_local(output, mesh, [Replicate()], run_check=False)
    return out.redistribute(mesh, [Shard(1)]).to_local()


# ------------------------------------------------------------------------------ attention masks


def _localize_attention(attention: Attention, model: nn.Module, tp_mesh: DeviceMesh,
                        cache: dict[str, object]) -> None:
    """Give the attention module a mask for its local heads and the whole sequence.

    The model builds one mask per forward for all heads and for the sequence length it was fed;
    under tensor parallelism a layer holds n_heads/tp heads (ALiBi biases differ per head), and
    a pipeline stage fed sequence-parallel hidden states sees 1/tp of the sequence. Plain causal
    masks need neither, so only ALiBi and sliding-window models get the hook. `cache` holds the
    last mask built, keyed by the model's mask it replaces, so a forward builds it once."""
    args = model.args
    if args.position_type != "alibi" and args.sliding_window is None:
        return
    rank, tp = tp_mesh.get_local_rank(), tp_mesh.size()
    heads = args.n_heads // tp

    def hook(module, inputs):
        x, rope, mask, kv_cache = inputs
        if kv_cache is not None:
            return None  # generation is not tensor-parallel (the KV cache holds every head)
        if cache["source"] is not mask:  # the model builds one mask per forward for all its layers
            slopes = model.alibi_slopes[rank * heads:(rank + 1) * heads] if model.alibi_slopes is not None else None
            cache["mask"] = build_attention_mask(args, x.shape[1], 0, x.device, x.dtype, slopes, mask.documents)
            cache["source"] = mask
        local: AttentionMask = cache["mask"]
        return x, rope, local, kv_cache

    attention.register_forward_pre_hook(hook)

"""Memory and communication of one training step per device, from ModelArgs and a layout alone
(`ember.config.layout.Layout`, the one `ember train` runs and `ember plan` searches).

The memory model counts what ember's code actually keeps, the way Korthikanti et al. ("Reducing
Activation Recomputation in Large Transformer Models", 2022) count Megatron's: bytes per token per
layer of the tensors autograd saves for backward, times the tokens and layers in flight.

- Parameters, gradients and AdamW state are fp32 (4 + 4 + 8 bytes per parameter) whatever the
  compute precision (ember/train/precision.py). With data (or context) parallelism FSDP2 holds
  them: sharded over dp_shard x cp for ZeRO-1/FSDP, plus a gathered copy (for replicate and
  ZeRO-1 from the first forward to the last backward — replicate keeps the model twice; for FSDP
  the root group and the block in backward). Expert-parallel weights: the same over the expert
  data-parallel ranks under zero1/fsdp; under replicate outside FSDP, whole.
- Under bf16/fp16 autocast every matmul casts its weight, and autocast caches one
  half-precision copy per matrix until its context exits (a micro-batch's forward; a pipeline
  step's whole schedule); each linear layer keeps its own half-precision copy of its input.
- The residual stream, norm inputs and softmax statistics stay fp32; RMSNorm on fp32 plain
  tensors keeps only its input and 1/rms (ember.models.norms), F.rms_norm (tensor-parallel
  DTensors) the normalised value too.
- Attention is SDPA (saves q, k, v, output and the log-sum-exp); Grok-1's soft-capped attention
  materialises the score matrix; context parallelism keeps the whole sequence's keys and values,
  the queries' chunk copies and outputs, and their masks (ember.parallel.context).
- The loss is the fused output layer + cross-entropy (ember.train.fused_loss: gradients made in
  forward, a block of logits at a time) except under tensor parallelism (vocabulary-parallel
  logits) and pipelines (the schedule keeps each stage's output, logits on the last).
- Tensor parallelism follows torchtitan: column/row-parallel projections, vocabulary-parallel
  embedding and loss; with sequence parallelism the norm regions are split over TP ranks while the
  projections' inputs are gathered whole. Experts are split over EP ranks and, as in Megatron's
  default, over `expert_tp` = TP ranks.
- MoE blocks route top-k rows per token, spread evenly over experts (dropless routing can be
  uneven; a capacity factor bounds it).
- Recompute "full" keeps only each block's input (and rebuilds one block at a time); "selective"
  keeps the outputs of matmuls and attention (ember/parallel/recompute.py's policy). Backward
  through a block adds its MLP's hidden gradients.
- Pipeline schedules keep activations of min(pp, micro-batches) micro-batches on the first stage
  (1F1B), pp * (1 + (pp - 1) / (pp * v)) for interleaved 1F1B with v virtual stages (the last
  rank ((v - 1) pp + 1) / v), and all micro-batches for GPipe; the last stage keeps one (1F1B)
  and holds the loss.

Tests check these numbers against measured peaks: tests/test_plan.py (torch's MemTracker, one
process, real and fake tensors, recomputation and autocast) and tests/test_plan_memory.py (torch's
CPU allocator over real `Trainer` steps on gloo, every parallel layout, within 10% per rank).
Communication is counted as bytes each device sends per optimizer step (ring algorithms).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.config.layout import Layout
from ember.models.args import ModelArgs

PRECISIONS = ("bf16", "fp16", "fp32")

MASTER_BYTES = 4  # fp32 parameters
GRAD_BYTES = 4  # fp32 gradients
ADAM_BYTES = 8  # fp32 exp_avg + exp_avg_sq
RESIDUAL_BYTES = 4  # the residual stream and norms run in fp32 (parameters are fp32)


@dataclass(frozen=True)
class Workload:
    seq_length: int
    global_batch_size: int
    precision: str = "bf16"

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"


def micro_batches(layout: Layout, workload: Workload) -> int:
    """Micro-batches each data-parallel rank runs per step (gradient accumulation steps)."""
    return max(1, workload.global_batch_size // (layout.micro_batch_size * layout.dp))


# ------------------------------------------------------------------------------ parameters


@dataclass
class Params:
    """Parameters held by one device, split by how they are replicated."""

    dense: int = 0  # replicated over the data-parallel group
    expert: int = 0  # replicated over dp * cp / ep ranks
    matrices: int = 0  # of these, the matrices autocast copies to half precision
    largest_block: int = 0  # one transformer block (what FSDP gathers at once)

    def __add__(self, other: Params) -> Params:
        return Params(self.dense + other.dense, self.expert + other.expert, self.matrices + other.matrices,
                      max(self.largest_block, other.largest_block))

    def scaled(self, n: int) -> Params:
        return Params(self.dense * n, self.expert * n, self.matrices * n, self.largest_block)

    @property
    def total(self) -> int:
        return self.dense + self.expert


def _norm(args: ModelArgs, width: int) -> int:
    return width * (2 if args.norm_type == "layernorm" else 1)


def _mlp_split(args: ModelArgs, ffn: int, tp: int) -> tuple[int, int]:
    """(local parameters, local matrix parameters) of one MLP of width ffn split over tp."""
    matrices = (3 if args.mlp_type == "gated" else 2) * args.dim * ffn // tp
    bias = (ffn * (2 if args.mlp_type == "gated" else 1) // tp + args.dim) if args.mlp_bias else 0
    return matrices + bias, matrices


def block_params(args: ModelArgs, layout: Layout, moe: bool | None = None) -> Params:
    """One transformer block's parameters on one device; `moe`: a MoE block or a dense one
    (None: the model's kind; models mixing the two ask for each)."""
    tp = layout.tp
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    attn_matrices = (args.dim * (q + 2 * kv) + q * args.dim) // tp
    attn = attn_matrices + ((q + 2 * kv) // tp if args.qkv_bias else 0) + (args.dim if args.attn_out_bias else 0)
    attn += 2 * _norm(args, args.head_dim) if args.qk_norm else 0
    norms = (4 if args.sandwich_norm else 2) * _norm(args, args.dim)
    dense, matrices, expert = attn + norms, attn_matrices, 0
    if _moe(args, moe):
        dense += args.num_experts * args.dim  # router, replicated
        matrices += args.num_experts * args.dim
        one_expert, one_expert_matrices = _mlp_split(args, args.moe_ffn_dim, layout.etp)
        local_experts = args.num_experts // layout.ep
        expert = local_experts * one_expert
        matrices += local_experts * one_expert_matrices
        if args.num_shared_experts:
            shared, shared_matrices = _mlp_split(args, args.num_shared_experts * args.moe_ffn_dim, tp)
            dense, matrices = dense + shared, matrices + shared_matrices
    else:
        mlp, mlp_matrices = _mlp_split(args, args.ffn_dim, tp)
        dense, matrices = dense + mlp, matrices + mlp_matrices
    return Params(dense, expert, matrices, dense + expert)


def local_vocab(args: ModelArgs, layout: Layout) -> int:
    """Rows of the vocabulary-parallel tables per TP rank (the vocabulary padded to a multiple of tp)."""
    return -(-args.vocab_size // layout.tp)


def embedding_params(args: ModelArgs, layout: Layout) -> Params:
    """Vocabulary-parallel token embedding (+ learned positions, embedding norm): first stage."""
    dense = local_vocab(args, layout) * args.dim
    dense += args.max_seq_len * args.dim if args.position_type == "learned" else 0
    dense += _norm(args, args.dim) if args.embedding_norm else 0
    return Params(dense=dense)


def head_params(args: ModelArgs, layout: Layout) -> Params:
    """Final norm and vocabulary-parallel output layer: last stage. Tied embeddings share the
    table when one stage holds both; across stages the last keeps its own copy (as Megatron)."""
    output = local_vocab(args, layout) * args.dim
    shared = args.tie_embeddings and layout.pp == 1
    return Params(dense=_norm(args, args.dim) + (0 if shared else output), matrices=output)


def layers_per_stage(args: ModelArgs, layout: Layout) -> int:
    """Layers on the most loaded pipeline stage (the first/last may take fewer)."""
    return math.ceil(args.n_layers / layout.pp)


def _moe(args: ModelArgs, moe: bool | None) -> bool:
    return bool(args.num_experts) if moe is None else moe


def stage_layers(args: ModelArgs, layout: Layout, first: bool) -> dict[bool, int]:
    """{is MoE: number of layers} of the first stage (first) or else the last one, each counted as
    layers_per_stage layers; models mixing dense and MoE layers (ModelArgs.moe_layer_pattern) have
    both kinds."""
    n = layers_per_stage(args, layout)
    layers = range(min(n, args.n_layers)) if first else range(max(0, args.n_layers - n), args.n_layers)
    moe = sum(args.is_moe_layer(i) for i in layers)
    return {kind: count for kind, count in ((True, moe), (False, len(layers) - moe)) if count}


def stage_params(args: ModelArgs, layout: Layout, first: bool, last: bool) -> Params:
    params = Params()
    for moe, count in stage_layers(args, layout, first).items():
        params = params + block_params(args, layout, moe).scaled(count)
    if first:
        params = params + embedding_params(args, layout)
    if last:
        params = params + head_params(args, layout)
    return params


# ----------------------------------------------------------------------------- activations


def _linear_inputs(width: int, consumers: int, workload: Workload) -> int:
    """Bytes per token kept for the input of `consumers` linear layers reading one fp32 tensor:
    fp32 shares the tensor; autocast keeps one half-precision cast per layer."""
    if workload.autocast:
        return consumers * workload.compute_bytes * width
    return RESIDUAL_BYTES * width


def _norm_saved(args: ModelArgs, layout: Layout, width: int, input_bytes: int) -> int:
    """Bytes per row a norm keeps (its output is kept by whatever reads it, counted there).
    RMSNorm (ember.models.norms): on fp32 plain tensors its own function keeps the input and
    1/rms; otherwise (tensor-parallel weights are DTensors, half-precision inputs) F.rms_norm
    keeps the fp32 input and 1/rms, and the scaling by the weight the normalised value, in the
    input's dtype. LayerNorm, which autocast runs in fp32: its fp32 input, mean and 1/std."""
    if args.norm_type == "layernorm":
        return RESIDUAL_BYTES * width + 8
    if layout.tp == 1 and input_bytes == RESIDUAL_BYTES:
        return input_bytes * width + 4
    return RESIDUAL_BYTES * width + input_bytes * width + 4


def _attention_saved(args: ModelArgs, layout: Layout, workload: Workload) -> float:
    p, tp = workload.compute_bytes, layout.tp
    q, kv = args.n_heads * args.head_dim / tp, args.n_kv_heads * args.head_dim / tp
    heads, kv_heads = args.n_heads / tp, args.n_kv_heads / tp
    seq = workload.seq_length  # keys each query sees (whole sequence, also under CP)
    if args.attn_logit_softcap is not None:
        # q, k and v repeated to all heads, the output, and two fp32 score matrices (+ a cast)
        saved = 4 * p * q + heads * seq * (8 + (p if workload.autocast else 0))
    else:
        saved = p * (2 * q + 2 * kv) + 4 * heads  # q, k, v, output; log-sum-exp
        if layout.cp > 1:
            # ember.parallel.context: the keys and values of the whole sequence (in place of the
            # local ones), the queries cut into the two load-balanced chunks (copies, in place of
            # the whole) with each chunk's output besides their concatenation, and each chunk's
            # mask over the keys it sees (fp32 in SDPA): 4 c^2 (2 cp + 1) bytes for chunks of c
            saved += p * 2 * kv * (layout.cp - 1) + p * q
            chunk = seq / (2 * layout.cp)
            saved += 4 * chunk * chunk * (2 * layout.cp + 1) / (layout.micro_batch_size * seq / layout.cp)
    if args.qk_norm:
        saved += (RESIDUAL_BYTES + p) * (q + kv) + 4 * (heads + kv_heads)
    return saved


def _mlp_saved(args: ModelArgs, ffn: float, workload: Workload) -> float:
    """Hidden activations of one MLP per row: gated keeps w1 out, act out, w3 out, product."""
    return workload.compute_bytes * ffn * (4 if args.mlp_type == "gated" else 2)


def block_backward_bytes(args: ModelArgs, layout: Layout, workload: Workload, moe: bool | None = None) -> float:
    """Bytes per local token a block's backward adds at its largest, on top of what the block
    keeps: the MLP's hidden gradients once its product (gated) or activation output has been
    used — two hidden-width gradients where one saved tensor was freed (gated), else one."""
    if _moe(args, moe):
        ffn = args.moe_top_k * args.moe_ffn_dim / layout.etp
    else:
        ffn = args.ffn_dim / layout.tp
    return workload.compute_bytes * ffn * (2 if args.mlp_type == "gated" else 1)


def _mlp_inputs(args: ModelArgs) -> int:
    return 2 if args.mlp_type == "gated" else 1


def _moe_saved(args: ModelArgs, layout: Layout, workload: Workload) -> float:
    """Per token: routing state, then per routed row (top-k of them) the gathered token, the
    expert MLP, its output and the weighted output."""
    p, k, h = workload.compute_bytes, args.moe_top_k, args.dim
    routing = 4 * args.num_experts + 8 * k + 4 + 4 * k + 16 * k  # probs, top-k ids/weights, sort order
    routing += _linear_inputs(h, 1, workload)  # router input
    gathered = _linear_inputs(h, _mlp_inputs(args), workload)
    per_row = gathered + p * h + RESIDUAL_BYTES * h + 4 + _mlp_saved(args, args.moe_ffn_dim / layout.etp, workload)
    saved = routing + k * per_row
    if args.num_shared_experts:
        shared_in = _linear_inputs(h, _mlp_inputs(args), workload) if workload.autocast else 0
        saved += shared_in + _mlp_saved(args, args.num_shared_experts * args.moe_ffn_dim / layout.tp, workload)
    return saved


def block_activation_bytes(args: ModelArgs, layout: Layout, workload: Workload, moe: bool | None = None) -> float:
    """Bytes per local token one block keeps for backward without recomputation."""
    h, p, shards = args.dim, workload.compute_bytes, layout.seq_shards
    norms = 2 * _norm_saved(args, layout, h, RESIDUAL_BYTES)
    if args.sandwich_norm:
        norms += 2 * _norm_saved(args, layout, h, p)
    saved = norms / shards
    saved += _linear_inputs(h, 3, workload) + _attention_saved(args, layout, workload)
    if _moe(args, moe):
        saved += _moe_saved(args, layout, workload)
    else:
        saved += _linear_inputs(h, _mlp_inputs(args), workload) + _mlp_saved(args, args.ffn_dim / layout.tp, workload)
    return saved


def block_selective_bytes(args: ModelArgs, layout: Layout, workload: Workload, moe: bool | None = None) -> float:
    """Bytes per local token a block keeps under selective recomputation: its input and the
    outputs of its matmuls and attention."""
    h, p, tp = args.dim, workload.compute_bytes, layout.tp
    q, kv = args.n_heads * args.head_dim / tp, args.n_kv_heads * args.head_dim / tp
    saved = RESIDUAL_BYTES * h / layout.seq_shards
    saved += p * (q + 2 * kv) + p * q + 4 * args.n_heads / tp + p * h  # wq/wk/wv, attention, wo
    if args.attn_logit_softcap is not None:
        saved += p * args.n_heads / tp * workload.seq_length
    gated = args.mlp_type == "gated"
    if _moe(args, moe):
        ffn = args.moe_ffn_dim / layout.etp
        saved += p * args.num_experts + args.moe_top_k * p * ((2 if gated else 1) * ffn + h)
        if args.num_shared_experts:
            saved += p * ((2 if gated else 1) * args.num_shared_experts * args.moe_ffn_dim / tp + h)
    else:
        saved += p * ((2 if gated else 1) * args.ffn_dim / tp + h)
    return saved


def head_activation_bytes(args: ModelArgs, layout: Layout, workload: Workload) -> tuple[float, float]:
    """(kept, transient) bytes per local token of the final norm, output layer and loss: the loss
    keeps fp32 log-probabilities; the start of backward adds two fp32 vocabulary-sized gradients.
    Vocabulary-parallel: /tp."""
    vocab = args.vocab_size / layout.tp
    kept = _norm_saved(args, layout, args.dim, RESIDUAL_BYTES) / layout.seq_shards
    kept += _linear_inputs(args.dim, 1, workload) + 4 * vocab + 8
    transient = 8 * vocab
    return kept, transient


FUSED_LOSS_LOGITS_BYTES = 2**30  # ember.train.fused_loss: blocks of up to 1 GiB of fp32 logits (accelerators)


def fused_loss_applies(layout: Layout) -> bool:
    """Whether the trainer's loss is the fused output layer + cross-entropy
    (ember.train.fused_loss): everywhere but tensor-parallel logits and pipeline stages."""
    return layout.tp == 1 and layout.pp == 1


def fused_head_bytes(args: ModelArgs, layout: Layout, workload: Workload, tokens: float) -> tuple[float, float]:
    """(kept, transient) bytes of one micro-batch's final norm, output layer and loss fused
    (ember.train.fused_loss): its forward makes the gradients, kept for backward — the hidden
    states' in fp32 and the output weight's, a whole fp32 [vocab, dim] per micro-batch — while a
    block of logits (fp32 for the softmax), the token-weighted hidden states and, under autocast,
    half-precision copies of the weight and the hidden states live until it returns."""
    h, v, p = args.dim, args.vocab_size, workload.compute_bytes
    rows = min(tokens, max(256, FUSED_LOSS_LOGITS_BYTES // (4 * v)))
    kept = tokens * (_norm_saved(args, layout, h, RESIDUAL_BYTES) + GRAD_BYTES * h) + GRAD_BYTES * v * h
    transient = rows * v * p  # the logits block (turned into its gradient in place)
    transient += tokens * (RESIDUAL_BYTES * h + p * h + 4)  # the normalised hidden states, weighted copy, log p
    if workload.autocast:
        transient += rows * v * (4 + p)  # the fp32 softmax block, the gradient cast back
        transient += p * v * h + 2 * tokens * p * h  # weight and hidden states cast, half-precision gradient
    return kept, transient


def forward_extras(args: ModelArgs, workload: Workload, local_seq: int) -> float:
    """Bytes per micro-batch shared by all layers: RoPE tables, an ALiBi or sliding-window mask."""
    extra = 0.0
    if args.position_type == "rope":
        extra += 2 * RESIDUAL_BYTES * local_seq * args.head_dim
    if args.position_type == "alibi":
        extra += RESIDUAL_BYTES * args.n_heads * local_seq * workload.seq_length
    elif args.sliding_window is not None and workload.seq_length > args.sliding_window:
        extra += local_seq * workload.seq_length
    return extra


def buffer_bytes(args: ModelArgs) -> int:
    """Non-trainable buffers every stage keeps: RoPE cos/sin tables, ALiBi slopes."""
    if args.position_type == "rope":
        return 2 * RESIDUAL_BYTES * args.max_seq_len * args.head_dim
    if args.position_type == "alibi":
        return RESIDUAL_BYTES * args.n_heads
    return 0


def in_flight(args: ModelArgs, layout: Layout, workload: Workload, first: bool) -> float:
    """Micro-batches whose activations a stage holds at its peak (in units of the stage's layers)."""
    m = micro_batches(layout, workload)
    if layout.pp == 1:
        return 1
    if layout.schedule == "gpipe":
        return m
    virtual = layout.virtual_stages(args.n_layers)
    if not first:
        # interleaved 1F1B (torch's warm-up): the last rank runs (v - 1) * pp forward chunks of
        # 1/v of its layers before its first backward, then holds one more
        return min(m * 1.0, ((virtual - 1) * layout.pp + 1) / virtual)
    if virtual > 1:
        penalty = 1 + (layout.pp - 1) / (layout.pp * virtual)
        return min(m * 1.0, layout.pp * penalty)
    return min(m, layout.pp)


# --------------------------------------------------------------------------------- memory


@dataclass
class StageMemory:
    stage: str
    params: Params
    parameters: float = 0
    gradients: float = 0
    optimizer: float = 0
    activations: float = 0
    weight_copies: float = 0  # half-precision casts autocast keeps for backward
    temporaries: float = 0  # the loss's blocks, or backward through a (recomputed, gathered) block
    in_flight: float = 1

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations + self.weight_copies
                + self.temporaries)


@dataclass
class MemoryEstimate:
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)


def _shard_degrees(layout: Layout) -> tuple[int, int]:
    """(dense, expert) data-parallel degrees that ZeRO-1/FSDP shard over."""
    dense = layout.dp
    expert = max(1, layout.dp * layout.cp // layout.ep)
    return dense, expert


def _fsdp_shards(layout: Layout) -> int:
    """Ranks FSDP2 shards a parameter over (ember.parallel.mesh: dp_shard x cp; 0 without FSDP)."""
    if layout.dp * layout.cp == 1:
        return 0
    return (layout.dp_shard if layout.dp_mode != "replicate" else 1) * layout.cp


def _expert_fsdp_shards(layout: Layout) -> int:
    """Ranks FSDP2 shards the expert-parallel weights over (ember.parallel.mesh's expert_fsdp: the
    expert data-parallel ranks, under zero1 / fsdp); 0 where they stay outside FSDP, whole
    (replicate, or a single expert data-parallel rank: the trainer reduces their gradients)."""
    edp = layout.dp * layout.cp // layout.ep
    return edp if layout.ep > 1 and layout.dp_mode != "replicate" and edp > 1 else 0


def _state_bytes(params: Params, block: Params, blocks: Params, layout: Layout,
                 accumulating: bool) -> tuple[float, float, float, float]:
    """(parameters, gradients, optimizer, transient) bytes of the parameter/optimizer state at the
    activation peak (the last micro-batch), as FSDP2 (ember.parallel.fsdp) keeps them; transient:
    what backward through a block adds. `block`: the largest of the stage's blocks, `blocks`: all of them.

    Expert-parallel weights under zero1 / fsdp are FSDP2 units of their own, sharded over the
    expert data-parallel ranks like the rest over dp_shard x cp; under replicate (or with one
    expert data-parallel rank) they stay outside FSDP: whole on each rank with their gradients and
    AdamW state. FSDP2 gathers the other parameters
    into a separate unsharded copy, also over a shard group of one (replicate mode: the model
    twice, an implementation cost DDP would not have)."""
    shards = _fsdp_shards(layout)
    dense, expert = params.dense, params.expert
    block_dense = block.dense
    if layout.ep == 1:  # experts are ordinary FSDP parameters
        dense, expert, block_dense = dense + expert, 0, block_dense + block.expert
    expert_shards = _expert_fsdp_shards(layout)
    # experts outside FSDP (whole, with whole state), and the shard of those FSDP holds
    outside, expert_sharded = (0, expert / expert_shards) if expert_shards else (expert, 0)
    grads_whole = GRAD_BYTES * (dense + expert) if accumulating else 0
    if not shards:  # no FSDP: the parameters themselves, gradients accumulating in place
        return MASTER_BYTES * (dense + expert), grads_whole, ADAM_BYTES * (dense + expert), 0
    sharded = dense / shards
    optimizer = ADAM_BYTES * (sharded + expert_sharded + outside)
    if layout.dp_mode in ("replicate", "zero1"):
        # gathered from the first forward to the last backward; gradients accumulate unsharded and
        # are reduced into their shards after the last backward
        return MASTER_BYTES * (dense + sharded + expert + expert_sharded), grads_whole, optimizer, 0
    # fsdp: what no block owns (embeddings, final norm, output layer: the root group) stays gathered
    # from the first forward to the last backward; in backward one block is gathered (plus the
    # next, prefetched) with its unsharded gradients; the sharded gradients of earlier
    # micro-batches' reduce-scatters
    root = dense - (blocks.dense + (blocks.expert if layout.ep == 1 else 0))
    grads = GRAD_BYTES * (sharded + expert_sharded + (outside if accumulating else 0))
    return (MASTER_BYTES * (sharded + root + expert_sharded + outside), grads, optimizer,
            (2 * MASTER_BYTES + GRAD_BYTES) * (block_dense + (block.expert if expert_shards else 0)))


def estimate_memory(args: ModelArgs, layout: Layout, workload: Workload) -> MemoryEstimate:
    """Peak bytes per device for the first and the last pipeline stage (one stage when pp = 1)."""
    tokens = layout.micro_batch_size * workload.seq_length / layout.cp  # per micro-batch, local
    local_seq = workload.seq_length / layout.cp
    m = micro_batches(layout, workload)

    def full_block(moe: bool) -> float:
        return block_activation_bytes(args, layout, workload, moe)

    def kept_block(moe: bool) -> float:
        if layout.recompute == "none":
            return full_block(moe)
        if layout.recompute == "selective":
            return block_selective_bytes(args, layout, workload, moe)
        return RESIDUAL_BYTES * args.dim / layout.seq_shards

    head_kept, head_transient = head_activation_bytes(args, layout, workload)
    half = workload.compute_bytes if workload.autocast else 0
    estimate = MemoryEstimate()
    roles = [("only", True, True)] if layout.pp == 1 else [("first", True, False), ("last", False, True)]
    for name, first, last in roles:
        params = stage_params(args, layout, first, last)
        # the stage's blocks: all alike, or dense and MoE ones (ModelArgs.moe_layer_pattern)
        kinds = stage_layers(args, layout, first)
        blocks = sum((block_params(args, layout, moe).scaled(count) for moe, count in kinds.items()), Params())
        block = max((block_params(args, layout, moe) for moe in kinds), key=lambda b: b.dense + b.expert)
        flight = in_flight(args, layout, workload, first)
        stage = StageMemory(name, params, in_flight=flight)
        accumulating = m > 1 or layout.pp > 1
        # gradients are resident at the activation peak when earlier micro-batches left them, and
        # (counted in full) when recomputation rebuilds blocks while gradients fill up
        grads_at_peak = accumulating or layout.recompute != "none"
        stage.parameters, stage.gradients, stage.optimizer, gathered = _state_bytes(params, block, blocks, layout,
                                                                                     grads_at_peak)
        stage.parameters += buffer_bytes(args)
        per_micro_batch = tokens * sum(kept_block(moe) * count for moe, count in kinds.items()) \
            + forward_extras(args, workload, local_seq)
        if first:
            per_micro_batch += 8 * tokens  # token ids
        transient = 0.0
        matrices = params.matrices
        if last and fused_loss_applies(layout):
            kept, transient = fused_head_bytes(args, layout, workload, tokens)
            per_micro_batch += kept
            matrices -= head_params(args, layout).matrices  # the fused loss casts it (transient)
        elif last:
            per_micro_batch += tokens * head_kept
            transient = tokens * head_transient
        if layout.pp > 1:
            # the schedule keeps each stage's output until its backward: hidden states (whole
            # sequence under sequence parallelism), or the last stage's logits
            width = args.vocab_size / layout.tp * workload.compute_bytes if last else RESIDUAL_BYTES * args.dim
            per_micro_batch += tokens * width
        stage.activations = flight * per_micro_batch
        # autocast caches one half-precision copy of each matrix until its context exits: the
        # trainer's covers a micro-batch's forward (the matmuls save the copies for backward unless
        # recomputed), or a pipeline step's whole schedule, every micro-batch sharing the copies
        stage.weight_copies = half * matrices
        # backward through a block adds its MLP's hidden gradients; a block being recomputed first
        # adds what it did not keep (and, without a pipeline, casts its matrices again, once the
        # forward's copies are gone). That happens once the loss is done with its temporaries, so
        # the larger of the two counts
        backward = tokens * max(full_block(moe) - kept_block(moe) + block_backward_bytes(args, layout, workload, moe)
                                for moe in kinds) + gathered
        if layout.recompute != "none" and layout.pp == 1:
            backward -= half * (blocks.matrices - block.matrices)
        stage.temporaries = max(transient, backward)
        if not grads_at_peak:
            # one micro-batch, no pipeline: gradients appear as activations are freed
            stage.gradients = 0
            growing_grads = GRAD_BYTES * params.total - stage.activations - stage.weight_copies
            stage.temporaries = max(stage.temporaries, growing_grads)
        estimate.stages.append(stage)
    return estimate


# -------------------------------------------------------------------------- communication


@dataclass
class CommEstimate:
    """Bytes one device sends per optimizer step, by kind of parallelism."""

    dp: float = 0
    tp: float = 0
    pp: float = 0
    ep: float = 0
    cp: float = 0

    @property
    def total(self) -> float:
        return self.dp + self.tp + self.pp + self.ep + self.cp


def _ring(n: int) -> float:
    """Fraction of a buffer each rank sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n


def _data_parallel_bytes(layout: Layout, params: Params, m: int) -> float:
    """Gradient and parameter synchronisation (ember.parallel.fsdp): FSDP2 over the mesh
    (dp_replicate, dp_shard x cp), whose shard group reduce-scatters gradients and all-gathers
    parameters and whose replicas all-reduce their shards; expert-parallel weights are FSDP2 units
    over the expert data-parallel ranks under zero1 / fsdp (the same bytes as an all-reduce once
    per step for zero1, gathered twice and reduced every micro-batch for fsdp), else outside FSDP
    and all-reduced over those ranks once per step."""
    replicas, shards = layout.dp_replicate, layout.dp_shard * layout.cp
    dense, expert = params.dense, params.expert
    if layout.ep == 1:  # without expert parallelism experts are ordinary FSDP parameters
        dense, expert = dense + expert, 0
    _, expert_d = _shard_degrees(layout)
    grad = GRAD_BYTES * dense
    gather = _ring(shards) * grad  # the parameters are fp32, like the gradients
    scatter = _ring(shards) * grad
    across = 2 * _ring(replicas) * grad / shards
    experts = 2 * _ring(expert_d) * GRAD_BYTES * expert
    if layout.dp_mode == "fsdp":  # gathered for forward and again for backward, reduced, every micro-batch
        if _expert_fsdp_shards(layout):
            experts = m * 3 * _ring(expert_d) * GRAD_BYTES * expert
        return m * (2 * gather + scatter + across) + experts
    # replicate / zero1: one gather (free when unsharded) and one reduction per step
    return gather + scatter + across + experts


def _tensor_parallel_block_units(args: ModelArgs, layout: Layout, forwards: int, moe: bool | None = None) -> float:
    """One block's tensor-parallel traffic per micro-batch, in all-reduces of the block's hidden
    states (under sequence parallelism an all-gather + reduce-scatter pair moves the same bytes).

    Attention and a dense MLP each all-reduce their output in every forward pass and their input
    gradient in the backward pass (torchtitan's column/row plan). An MoE block's experts are split
    over tp too (ember.parallel.tensor.ExpertTensorParallel): they all-reduce the top-k routed rows
    (k times the tokens) forward and their gradient backward; under sequence parallelism the block
    also gathers the sequence at its input (forward) and its output gradient (backward), half a
    unit each."""
    per_pass = forwards + 1
    if not _moe(args, moe):
        return 2 * per_pass
    units = per_pass * (1 + args.moe_top_k)
    if args.num_shared_experts:
        units += per_pass
    if layout.sequence_parallel:
        units += 0.5 * per_pass
    return units


def estimate_communication(args: ModelArgs, layout: Layout, workload: Workload) -> CommEstimate:
    comm = CommEstimate()
    m = micro_batches(layout, workload)
    p = workload.compute_bytes
    tokens = layout.micro_batch_size * workload.seq_length / layout.cp
    n_layers = layers_per_stage(args, layout)
    kinds = stage_layers(args, layout, first=layout.pp == 1)  # {is MoE: layers}: mixed models have both
    params = stage_params(args, layout, first=layout.pp == 1, last=True)
    forwards = 2 if layout.recompute == "full" else 1  # full recompute repeats the forward
    comm.dp = _data_parallel_bytes(layout, params, m)
    if layout.tp > 1:
        head = 2 / layout.pp  # the embedding (first stage) and the output layer (last stage), a unit each
        units = sum(count * _tensor_parallel_block_units(args, layout, forwards, moe) for moe, count in kinds.items())
        comm.tp = m * (units + head) \
            * 2 * _ring(layout.tp) * tokens * args.dim * p
    if layout.pp > 1:
        # per micro-batch, each of the pp * v - 1 stage boundaries carries activations one way and
        # their gradients back, spread over the pp ranks
        boundaries = layout.pp * layout.virtual_stages(args.n_layers) - 1
        # (whole: a stage sends its hidden states gathered even under sequence parallelism)
        comm.pp = 2 * m * boundaries / layout.pp * tokens * args.dim * RESIDUAL_BYTES
    if args.num_experts and layout.ep > 1:
        # dispatch (fp32 tokens) and combine (expert outputs), forward and backward
        routed = tokens * args.moe_top_k * args.dim
        comm.ep = m * kinds.get(True, 0) * (forwards + 1) * (RESIDUAL_BYTES + p) * routed * _ring(layout.ep)
    if layout.cp > 1:
        # keys and values all-gathered over the cp ranks (each sends its piece to cp - 1 others) in
        # every forward; the backward pass reduce-scatters their gradients (the same bytes) once
        kv = 2 * tokens * args.n_kv_heads * args.head_dim / layout.tp * p
        comm.cp = m * n_layers * (forwards + 1) * (layout.cp - 1) * kv
    return comm

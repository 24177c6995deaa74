"""The parallel layout of a run: one frozen `Layout`, and every rule about it in one place.

A layout is the degrees (tp, pp, cp, ep and dp = dp_replicate x dp_shard), sequence parallelism,
the pipeline schedule and its virtual stages, and the micro-batches of a step. `ember train`
(through `ember.config.validate`), the device mesh (`ember.parallel.mesh`), the estimates and
`ember plan` (`ember.plan`) and tiny mode all build it and check it here, so they accept and
refuse the same layouts with the same one-line reason.

Two kinds of rules:
- `Layout.resolve(global_batch_size)`: what needs no model (degrees, the world, dp_replicate,
  ep dividing dp x cp, the schedule against virtual stages, 1F1B's micro-batches);
- `Layout.check_model(args, seq_length)`: what this model can be split into (heads, kv heads,
  ffn and vocabulary by tp; layers by pipeline stages; experts by ep; the sequence by cp and sp;
  attention kinds context parallelism cannot run). `args` is read by field name only (an
  `ember.models.ModelArgs` in practice): the config sits below the models in ember's layer order.

Pure arithmetic: nothing here imports torch or starts anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ember.config.schema import ParallelConfig, TrainConfig
from ember.errors import EmberError

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
DP_MODES = ("replicate", "zero1", "fsdp")
RECOMPUTE = ("none", "selective", "full")


def _positive(value, name: str) -> None:
    if value is None or value <= 0:
        raise EmberError(f"{name} must be a positive number, got {value}")


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise EmberError(f"{name} = {value!r} is not one of {', '.join(choices)}")


def schedule_spelling(name: str | None) -> str | None:
    """A schedule name as written (`1F1B`, `interleaved-1f1b`) in ember's one spelling."""
    return None if name is None else name.lower().replace("-", "_")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def data_parallel_size(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> int:
    """The processes left for data parallelism once tp x pp x cp groups are formed."""
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise EmberError(
            f"{world_size} processes do not divide into tensor x pipeline x context parallel = "
            f"{model_parallel}; change the process count or the parallel sizes")
    return world_size // model_parallel


def least_data_parallel_size(parallel: ParallelConfig) -> int:
    """The least data parallelism this layout allows: expert parallelism spreads experts over the
    dp x cp ranks (ep must divide dp x cp), and zero1/fsdp with --dp-replicate R need R | dp."""
    ep, cp = parallel.expert_model_parallel_size, parallel.context_parallel_size
    least = ep // math.gcd(ep, cp)
    if parallel.dp_mode != "replicate":
        least = math.lcm(least, parallel.dp_replicate)
    return least


def least_world_size(parallel: ParallelConfig) -> int:
    """Processes the smallest run of this layout uses: tp x pp x cp x the least dp."""
    p = parallel
    return (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
            * least_data_parallel_size(p))


@dataclass(frozen=True)
class Layout:
    """How one training step is spread over devices.

    `dp_replicate`: with zero1/fsdp, replicas of the sharded group (HSDP; dp_shard = dp /
    dp_replicate); replicate mode replicates over all of dp, so it is dp there.
    `schedule`: None picks Megatron's default (1f1b, interleaved_1f1b with virtual stages).
    `layers_per_virtual_stage`: Megatron's --num-layers-per-virtual-pipeline-stage (how many
    virtual stages that makes depends on the model: `virtual_stages(n_layers)`).
    `micro_batches`: per data-parallel rank and step (gradient accumulation, pipeline micro-batches).
    `expert_tp` and `recompute` are for the estimates: ember's trainer splits experts over tp
    (Megatron's default) and recomputes per --recompute-granularity.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    dp_mode: str = "replicate"
    dp_replicate: int = 1
    sequence_parallel: bool = False
    schedule: str | None = None
    layers_per_virtual_stage: int | None = None
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    micro_batch_size: int = 1
    micro_batches: int = 1
    expert_tp: int | None = None
    recompute: str = "none"

    def __post_init__(self) -> None:
        # Megatron turns sequence parallelism off without tensor parallelism; so does ember
        object.__setattr__(self, "sequence_parallel", bool(self.sequence_parallel and self.tp > 1))
        if self.dp_mode == "replicate":
            object.__setattr__(self, "dp_replicate", self.dp)
        schedule = schedule_spelling(self.schedule)
        if schedule is None:
            schedule = "interleaved_1f1b" if self.layers_per_virtual_stage else "1f1b"
        object.__setattr__(self, "schedule", schedule)

    @classmethod
    def from_config(cls, parallel: ParallelConfig, train: TrainConfig, world_size: int) -> Layout:
        """The layout of `ember train` on `world_size` processes, checked (no model needed).
        A global batch left unset is one micro-batch per data-parallel rank."""
        p = parallel
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "context_parallel_size", "expert_model_parallel_size"):
            _positive(getattr(p, name), f"parallel.{name} (--{name.replace('_', '-')})")
        _positive(p.dp_replicate, "parallel.dp_replicate (--dp-replicate)")
        dp = data_parallel_size(world_size, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                p.context_parallel_size)
        layout = cls(tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size, dp=dp,
                     cp=p.context_parallel_size, ep=p.expert_model_parallel_size, dp_mode=p.dp_mode,
                     dp_replicate=p.dp_replicate, sequence_parallel=p.sequence_parallel,
                     schedule=p.pipeline_schedule, layers_per_virtual_stage=p.num_layers_per_virtual_pipeline_stage,
                     first_stage_layers=p.decoder_first_pipeline_num_layers,
                     last_stage_layers=p.decoder_last_pipeline_num_layers, micro_batch_size=train.micro_batch_size)
        return layout.resolve(train.global_batch_size)

    # ------------------------------------------------------------------ sizes

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp * self.micro_batches

    @property
    def grad_average_size(self) -> int:
        """How many ranks FSDP averages gradients over (dp x cp)."""
        return self.dp * self.cp

    @property
    def etp(self) -> int:
        """The tensor-parallel degree of the experts (Megatron's default: tp)."""
        return self.tp if self.expert_tp is None else self.expert_tp

    @property
    def seq_shards(self) -> int:
        """How many ways the norm regions' tokens are split over TP ranks."""
        return self.tp if self.sequence_parallel else 1

    def virtual_stages(self, n_layers: int) -> int:
        """Pipeline stages per pipeline rank (1 unless interleaved)."""
        if self.pp == 1:
            return 1
        return virtual_stages_per_rank(n_layers, self.pp, self.layers_per_virtual_stage)

    def mesh_degrees(self) -> dict[str, int]:
        """The device mesh's dimensions, outermost first (`ember.parallel.mesh.MESH_ORDER`)."""
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard,
                "cp": self.cp, "tp": self.tp}

    def describe(self) -> str:
        parts = [f"dp {self.dp}"]
        for name in ("tp", "pp", "cp", "ep"):
            if getattr(self, name) > 1:
                parts.append(f"{name} {getattr(self, name)}")
        if self.pp > 1 and self.layers_per_virtual_stage:
            parts.append(f"{self.layers_per_virtual_stage} layers per virtual stage")
        if self.sequence_parallel:
            parts.append("sp")
        return ", ".join(parts)

    # ------------------------------------------------------------------ rules without a model

    def resolve(self, global_batch_size: int | None) -> Layout:
        """This layout running `global_batch_size` samples a step (None: one micro-batch per
        data-parallel rank), with every rule that needs no model checked; raises `EmberError`."""
        for name in ("tp", "pp", "dp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise EmberError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")
        _check_choice(self.dp_mode, DP_MODES, "parallel.dp_mode")
        _positive(self.dp_replicate, "parallel.dp_replicate (--dp-replicate)")
        if self.dp % self.dp_replicate:
            raise EmberError(f"--dp-replicate {self.dp_replicate} does not divide the data-parallel size {self.dp}")
        if (self.dp * self.cp) % self.ep:
            raise EmberError(f"--expert-model-parallel-size {self.ep} must divide data-parallel x context-parallel "
                             f"size {self.dp * self.cp} (experts are sharded over data-parallel ranks); change the "
                             f"sizes or the process count")
        _check_choice(self.schedule, PIPELINE_SCHEDULES, "parallel.pipeline_schedule (--pipeline-schedule)")
        _check_choice(self.recompute, RECOMPUTE, "recompute")
        if self.layers_per_virtual_stage is not None:
            _positive(self.layers_per_virtual_stage, "--num-layers-per-virtual-pipeline-stage")
        pipeline_only = {"--num-layers-per-virtual-pipeline-stage": self.layers_per_virtual_stage,
                         "--decoder-first-pipeline-num-layers": self.first_stage_layers,
                         "--decoder-last-pipeline-num-layers": self.last_stage_layers}
        for flag, value in pipeline_only.items():
            if value is not None and self.pp == 1:
                raise EmberError(f"{flag} needs pipeline parallelism; set --pipeline-model-parallel-size > 1 "
                                 "or drop it")
            if value is not None and value < 0:
                raise EmberError(f"{flag} must be >= 0, got {value}")
        _positive(self.micro_batch_size, "train.micro_batch_size (--micro-batch-size)")
        per_step = self.micro_batch_size * self.dp
        if global_batch_size is None:
            global_batch_size = per_step
        _positive(global_batch_size, "train.global_batch_size (--global-batch-size)")
        if global_batch_size % per_step:
            raise EmberError(
                f"global batch size {global_batch_size} is not divisible by micro batch size "
                f"{self.micro_batch_size} x data-parallel size {self.dp} = {per_step}; "
                f"change --global-batch-size or --micro-batch-size")
        layout = dataclasses.replace(self, micro_batches=global_batch_size // per_step)
        layout._check_pipeline()
        return layout

    def _check_pipeline(self) -> None:
        if self.pp == 1:
            return
        name, pp = self.schedule, self.pp
        if name == "interleaved_1f1b" and not self.layers_per_virtual_stage:
            raise EmberError("--pipeline-schedule interleaved_1f1b needs --num-layers-per-virtual-pipeline-stage")
        if name != "interleaved_1f1b" and self.layers_per_virtual_stage:
            raise EmberError(f"--num-layers-per-virtual-pipeline-stage runs the interleaved_1f1b schedule, not {name}")
        if name == "1f1b" and self.micro_batches < pp:
            raise EmberError(f"1F1B needs at least as many micro-batches per step ({self.micro_batches} = global "
                             f"batch / (micro batch x data-parallel size)) as pipeline stages ({pp}); raise "
                             f"--global-batch-size or lower --micro-batch-size")

    # ------------------------------------------------------------------ rules with a model

    def check_model(self, args, seq_length: int) -> None:
        """Refuse, in one line, what this model cannot be split into (heads or experts by the
        degrees, layers by the pipeline stages, the sequence by tp/cp, micro-batches by the
        schedule). `args`: the model's `ModelArgs`. Runs before any process group exists."""
        if seq_length > args.max_seq_len:
            raise EmberError(f"--seq-length {seq_length} is longer than the model's maximum {args.max_seq_len}; "
                             f"shorten it or raise --max-position-embeddings")
        check_tensor_parallel(args, self.tp, self.sequence_parallel, seq_length // self.cp)
        if self.ep > 1:
            if not args.num_experts:
                raise EmberError(f"--expert-model-parallel-size {self.ep} needs a mixture-of-experts model; "
                                 f"this one has no experts")
            if args.num_experts % self.ep:
                raise EmberError(f"expert parallel size {self.ep} does not divide num_experts {args.num_experts}; "
                                 f"choose --expert-model-parallel-size among {divisors(args.num_experts)}")
        if self.pp > 1:
            virtual = self.virtual_stages(args.n_layers)
            split_layers(args.n_layers, self.pp * virtual, self.first_stage_layers, self.last_stage_layers)
            check_schedule(self.schedule, self.micro_batches, self.pp, virtual)
        check_context_parallel(args, self.cp, seq_length, load_balance=True)


# ---------------------------------------------------------------------------- tensor parallelism


def check_tensor_parallel(args, tp: int, sequence_parallel: bool = False, seq_len: int | None = None) -> None:
    """Refuse, with a one-line reason, a tensor-parallel degree the model cannot be split by
    (`seq_len`: the sequence each context-parallel rank holds)."""
    if tp == 1:
        return

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise EmberError(f"tensor parallelism: {message}")

    need(args.n_heads % tp == 0, f"{args.n_heads} attention heads are not divisible by tp {tp} "
         f"(n_heads {args.n_heads}); choose a --tensor-model-parallel-size that divides them")
    need(args.n_kv_heads % tp == 0, f"{args.n_kv_heads} key/value heads are not divisible by tp {tp} "
         f"(n_kv_heads {args.n_kv_heads}); choose a --tensor-model-parallel-size that divides them "
         f"(ember does not replicate key/value heads)")
    # the vocabulary-parallel embedding and output layer split the rows evenly
    padded = -(-args.vocab_size // tp) * tp
    need(args.vocab_size % tp == 0, f"vocab_size {args.vocab_size} is not divisible by tp {tp}; pad the "
         f"vocabulary with --vocab-size {padded} (--make-vocab-size-divisible-by pads only a --vocab-size or "
         f"a tokenizer's vocabulary: a registry model keeps its own)")
    if args.num_experts:
        need(args.moe_ffn_dim % tp == 0, f"moe_ffn_dim {args.moe_ffn_dim} is not divisible by tp {tp}; "
             "choose a --tensor-model-parallel-size that divides the expert ffn size")
    else:
        need(args.ffn_dim % tp == 0, f"ffn_dim {args.ffn_dim} is not divisible by tp {tp}; "
             "choose a --tensor-model-parallel-size that divides the ffn size")
    if sequence_parallel and seq_len is not None:
        need(seq_len % tp == 0, f"sequence length {seq_len} (per context-parallel rank) is not divisible by "
             f"tp {tp}, as sequence parallelism needs; use a --seq-length that is a multiple of it")


# --------------------------------------------------------------------------- context parallelism


def check_sequence_split(seq_len: int, cp_size: int, load_balance: bool) -> None:
    pieces = 2 * cp_size if load_balance else cp_size
    if seq_len % pieces:
        how = f"2 x context-parallel size {cp_size}" if load_balance else f"context-parallel size {cp_size}"
        raise EmberError(f"context parallelism: sequence length {seq_len} is not divisible by {how}; "
                         f"use a --seq-length that is a multiple of {pieces}")


def check_context_parallel(args, cp_size: int, seq_len: int | None = None, load_balance: bool = True) -> None:
    """Refuse, with a one-line reason, what context parallelism cannot run."""
    if cp_size == 1:
        return
    if args.position_type == "alibi":
        raise EmberError("context parallelism does not support ALiBi attention biases (Bloom); "
                         "set --context-parallel-size 1 for this model")
    if args.attn_logit_softcap is not None:
        raise EmberError("context parallelism does not support soft-capped attention logits "
                         "(attn_logit_softcap, Grok-1); set --context-parallel-size 1 or remove the cap")
    if seq_len is not None:
        check_sequence_split(seq_len, cp_size, load_balance)


# -------------------------------------------------------------------------- pipeline parallelism


def split_layers(n_layers: int, stages: int, first: int | None = None, last: int | None = None) -> list[int]:
    """Layer counts per pipeline stage (virtual stages included), first to last.

    Without `first`/`last` the layers must divide evenly. `first`/`last` (Megatron's
    `--decoder-first-pipeline-num-layers` / `--decoder-last-pipeline-num-layers`) fix the first
    and last stage's counts (which may be 0: a stage with only the embedding or only the output
    head); the other layers must divide evenly over the stages in between, at least one each.
    """
    if stages < 1:
        raise EmberError(f"pipeline stages must be >= 1, got {stages}")
    for name, value in (("first", first), ("last", last)):
        if value is not None and value < 0:
            raise EmberError(f"--decoder-{name}-pipeline-num-layers must be >= 0, got {value}")
    if stages == 1:
        if first is not None or last is not None:
            raise EmberError("--decoder-first/last-pipeline-num-layers need at least 2 pipeline stages")
        return [n_layers]
    fixed = (first or 0) + (last or 0)
    middle = stages - (first is not None) - (last is not None)
    rest = n_layers - fixed
    if rest < 0:
        raise EmberError(f"first/last pipeline stages take {fixed} layers but the model has only {n_layers}")
    if middle == 0:
        if rest:
            raise EmberError(f"first + last pipeline stage layers ({fixed}) must equal num-layers {n_layers} "
                             "with 2 stages")
        return [first, last]
    if rest % middle or rest == 0:
        if first is None and last is None:
            hint = (f"; use --pipeline-model-parallel-size among {divisors(n_layers)}, or set "
                    "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers for an uneven split")
        else:
            hint = "; change the first/last stage layer counts"
        raise EmberError(f"{rest} layers do not split evenly over {middle} pipeline stages "
                         f"(num-layers {n_layers}, {stages} stages){hint}")
    counts = [rest // middle] * middle
    if first is not None:
        counts.insert(0, first)
    if last is not None:
        counts.append(last)
    return counts


def virtual_stages_per_rank(n_layers: int, pp: int, layers_per_virtual_stage: int | None) -> int:
    """Megatron's `--num-layers-per-virtual-pipeline-stage N` as a number of stages per rank."""
    if layers_per_virtual_stage is None:
        return 1
    if layers_per_virtual_stage < 1 or n_layers % (pp * layers_per_virtual_stage):
        raise EmberError(f"--num-layers-per-virtual-pipeline-stage {layers_per_virtual_stage} x pipeline size "
                         f"{pp} must divide num-layers {n_layers}")
    return n_layers // (pp * layers_per_virtual_stage)


def check_schedule(name: str, n_microbatches: int, pp_size: int, stages_per_rank: int) -> None:
    """Reject, with the flag to change, what the schedule cannot run."""
    if n_microbatches < 1:
        raise EmberError(f"the number of micro-batches must be >= 1, got {n_microbatches}")
    if name == "interleaved_1f1b":
        if stages_per_rank < 2:
            raise EmberError("the interleaved 1F1B schedule needs 2 or more virtual stages per pipeline rank; "
                             "set --num-layers-per-virtual-pipeline-stage")
        rounds = max(1, n_microbatches // pp_size)
        if n_microbatches % rounds:
            raise EmberError(f"interleaved 1F1B with pipeline size {pp_size} cannot run {n_microbatches} "
                             f"micro-batches (they must split into {rounds} equal rounds); a multiple of "
                             f"{pp_size} always works (micro-batches = global batch / (micro batch x dp))")
        return
    if stages_per_rank != 1:
        raise EmberError(f"the {name} schedule runs one stage per pipeline rank; use interleaved_1f1b for "
                         "virtual stages")
    if name == "1f1b" and n_microbatches < pp_size:
        raise EmberError(f"1F1B needs at least as many micro-batches ({n_microbatches}) as pipeline stages "
                         f"({pp_size}); raise the global batch size or lower the micro-batch size")

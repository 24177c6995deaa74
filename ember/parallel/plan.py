"""`ember plan`: will this model train on these devices, and with which layout?

    ember plan llama3-70b --nodes 8 --gpus 8 --gpu-mem 64GB --seq-length 8192 --global-batch-size 256 \\
        --tp 8 --pp 8 --sequence-parallel --recompute full

With every degree given (--tp and --pp; --ep/--cp/--dp-mode/--recompute default to 1/replicate/none
there) it evaluates that layout: parameters, gradients, optimizer state and activations per device,
communication per step, and exits 2 with a one-line reason when it does not fit. With some left
open it searches them (tp in 1/2/4/8 within a node, pp dividing the layers, ep dividing the
experts, data parallelism the rest; ZeRO mode and recomputation too) and prints the fastest few
layouts that fit by a rough step-time model. Memory comes from `ember.parallel.estimate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
from dataclasses import dataclass

from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.parallel.estimate import (
    DP_MODES,
    RECOMPUTE,
    CommEstimate,
    Layout,
    MemoryEstimate,
    Workload,
    estimate_communication,
    estimate_memory,
    micro_batches,
)

GIB = 2**30
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Cluster:
    gpus_per_node: int
    nodes: int
    gpu_memory: float  # bytes
    headroom: float = 0.1  # fraction kept free: allocator fragmentation, runtime and NCCL buffers
    tflops: float = 300.0  # achieved dense TFLOP/s per device, for the step-time estimate
    intra_node_gbps: float = 150.0  # GB/s per device inside a node
    inter_node_gbps: float = 20.0  # GB/s per device across nodes

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def usable_memory(self) -> float:
        return self.gpu_memory * (1 - self.headroom)


@dataclass
class Plan:
    layout: Layout
    memory: MemoryEstimate
    comm: CommEstimate
    step_seconds: float

    def fits(self, cluster: Cluster) -> bool:
        return self.memory.worst.total <= cluster.usable_memory


def parse_memory(text: str) -> float:
    """'80GB', '80G', '64GiB', '80' (GiB; GPU memory is sold in binary gigabytes), '512MB'."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GMT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise EmberError(f"--gpu-mem {text!r} is not a size; write e.g. 80GB or 64GiB")
    scale = {"": GIB, "G": GIB, "M": 2**20, "T": 2**40}[match.group(2).upper()]
    return float(match.group(1)) * scale


# ----------------------------------------------------------------------------- validation


def check_layout(args: ModelArgs, layout: Layout, workload: Workload, cluster: Cluster | None = None) -> None:
    """Raise EmberError with a one-line reason when `layout` cannot run this model."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise EmberError(f"layout {layout.describe()}: {message}")

    if cluster is not None:
        need(layout.world_size == cluster.world_size,
             f"tp x pp x dp x cp = {layout.world_size} but there are {cluster.world_size} devices")
    need(args.n_heads % layout.tp == 0, f"{args.n_heads} attention heads are not divisible by tp {layout.tp}")
    need(args.n_kv_heads % layout.tp == 0,
         f"{args.n_kv_heads} key/value heads are not divisible by tp {layout.tp}; use tp <= {args.n_kv_heads}")
    ffn = args.moe_ffn_dim if args.num_experts else args.ffn_dim
    need(ffn % layout.tp == 0, f"ffn width {ffn} is not divisible by tp {layout.tp}")
    chunks = layout.pp * layout.virtual_stages
    need(args.n_layers % chunks == 0,
         f"{args.n_layers} layers do not divide into {layout.pp} pipeline stages"
         + (f" x {layout.virtual_stages} virtual stages" if layout.virtual_stages > 1 else "")
         + f"; use pp among {divisors(args.n_layers)}")
    need(layout.virtual_stages == 1 or layout.pp > 1, "virtual pipeline stages need pp > 1")
    if layout.ep > 1:
        need(args.num_experts > 0, "expert parallelism needs a mixture-of-experts model")
        need(args.num_experts % layout.ep == 0,
             f"{args.num_experts} experts are not divisible by ep {layout.ep}; "
             f"use ep among {divisors(args.num_experts)}")
        need((layout.dp * layout.cp) % layout.ep == 0,
             f"ep {layout.ep} must divide dp x cp = {layout.dp * layout.cp} "
             "(expert parallelism borrows data-parallel ranks)")
    need(workload.global_batch_size % (layout.micro_batch_size * layout.dp) == 0,
         f"global batch {workload.global_batch_size} is not divisible by "
         f"micro-batch {layout.micro_batch_size} x dp {layout.dp}")
    need(workload.seq_length <= args.max_seq_len,
         f"sequence length {workload.seq_length} exceeds the model's max_seq_len {args.max_seq_len}")
    if layout.cp > 1:
        need(args.position_type != "alibi", "context parallelism does not support ALiBi attention")
        need(workload.seq_length % (2 * layout.cp) == 0,
             f"sequence length {workload.seq_length} is not divisible by 2 x cp = {2 * layout.cp}")
    if layout.sequence_parallel and layout.tp > 1:
        need((workload.seq_length // layout.cp) % layout.tp == 0,
             f"sequence parallelism needs the sequence ({workload.seq_length // layout.cp} per cp rank) "
             f"divisible by tp {layout.tp}")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------------------- evaluation


def _group_bandwidth(cluster: Cluster, span: int) -> float:
    """Bytes/s for a group whose ranks lie within `span` consecutive ranks."""
    gbps = cluster.intra_node_gbps if span <= cluster.gpus_per_node or cluster.nodes == 1 else cluster.inter_node_gbps
    return gbps * 1e9


def step_seconds(args: ModelArgs, layout: Layout, workload: Workload, comm: CommEstimate, cluster: Cluster) -> float:
    """A rough step time for ranking layouts: compute at the given TFLOP/s, stretched by the
    pipeline bubble and full recomputation, plus communication not overlapped."""
    tokens = workload.global_batch_size * workload.seq_length
    flops = args.flops_per_token(workload.seq_length) * tokens
    if layout.recompute == "full":
        flops *= 4 / 3  # one more forward
    compute = flops / (layout.world_size * cluster.tflops * 1e12)
    m = micro_batches(layout, workload)
    bubble = 1 + (layout.pp - 1) / (m * layout.virtual_stages)
    # Mesh order pp, dp, cp, tp (tp innermost): a group spans its size times the inner degrees.
    tp_span, cp_span = layout.tp, layout.tp * layout.cp
    dp_span = layout.tp * layout.cp * layout.dp
    seconds = compute * bubble
    seconds += comm.tp / _group_bandwidth(cluster, tp_span)
    seconds += comm.cp / _group_bandwidth(cluster, cp_span)
    seconds += comm.ep / _group_bandwidth(cluster, layout.tp * layout.ep)
    seconds += comm.dp / _group_bandwidth(cluster, dp_span)
    seconds += comm.pp / _group_bandwidth(cluster, layout.world_size)
    return seconds


def evaluate(args: ModelArgs, layout: Layout, workload: Workload, cluster: Cluster) -> Plan:
    memory = estimate_memory(args, layout, workload)
    comm = estimate_communication(args, layout, workload)
    return Plan(layout, memory, comm, step_seconds(args, layout, workload, comm, cluster))


def candidate_layouts(args: ModelArgs, workload: Workload, cluster: Cluster, fixed: dict) -> list[Layout]:
    """Every valid layout with the `fixed` fields (Layout field -> value) held."""
    world = cluster.world_size
    choices = {
        "tp": [fixed["tp"]] if "tp" in fixed else [t for t in TP_CHOICES if t <= cluster.gpus_per_node],
        "pp": [fixed["pp"]] if "pp" in fixed else divisors(args.n_layers),
        "cp": [fixed.get("cp", 1)],
        "ep": [fixed["ep"]] if "ep" in fixed else (divisors(args.num_experts) if args.num_experts else [1]),
        "dp_mode": [fixed["dp_mode"]] if "dp_mode" in fixed else list(DP_MODES),
        "recompute": [fixed["recompute"]] if "recompute" in fixed else list(RECOMPUTE),
    }
    base = {k: v for k, v in fixed.items() if k not in choices}
    layouts = []
    for tp, pp, cp, ep, dp_mode, recompute in itertools.product(*choices.values()):
        if world % (tp * pp * cp):
            continue
        dp = world // (tp * pp * cp)
        if dp == 1 and dp_mode != "replicate" and "dp_mode" not in fixed:
            continue  # ZeRO over one rank is plain replication
        sp = base.get("sequence_parallel", True) and tp > 1
        layout = Layout(**{**base, "tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp": dp, "dp_mode": dp_mode,
                           "recompute": recompute, "sequence_parallel": sp})
        try:
            check_layout(args, layout, workload)
        except EmberError:
            continue
        layouts.append(layout)
    return layouts


def search(args: ModelArgs, workload: Workload, cluster: Cluster, fixed: dict) -> tuple[list[Plan], list[Plan]]:
    """(plans that fit, fastest first; all plans evaluated)."""
    plans = [evaluate(args, layout, workload, cluster) for layout in candidate_layouts(args, workload, cluster, fixed)]
    fitting = sorted((p for p in plans if p.fits(cluster)), key=lambda p: p.step_seconds)
    return fitting, plans


# -------------------------------------------------------------------------------- output


def _memory_unit(nbytes: float) -> tuple[str, float]:
    return ("GiB", GIB) if nbytes >= GIB else ("MiB", 2**20)


def _count_unit(n: float) -> tuple[str, float]:
    return ("B", 1e9) if n >= 1e9 else ("M", 1e6)


def describe_plan(args: ModelArgs, plan: Plan, workload: Workload, cluster: Cluster) -> str:
    layout = plan.layout
    lines = [
        f"layout: {layout.describe()} | dp mode {layout.dp_mode} | recompute {layout.recompute} | "
        f"micro-batch {layout.micro_batch_size} x {micro_batches(layout, workload)} per step | "
        f"{layout.schedule if layout.pp > 1 else 'no pipeline'}",
        f"parameters: {args.num_params() / _count_unit(args.num_params())[1]:.3f} "
        f"{_count_unit(args.num_params())[0]} in the model",
        "",
    ]
    unit, scale = _memory_unit(plan.memory.worst.total)
    count_unit, count_scale = _count_unit(max(s.params.total for s in plan.memory.stages))
    stages = "".join(f"{s.stage + ' stage':>14}" for s in plan.memory.stages)
    lines.append(f"{'memory per device (' + unit + ')':<29}" + stages)
    lines.append(f"{'parameters':<29}"
                 + "".join(f"{s.params.total / count_scale:12.3f} {count_unit}" for s in plan.memory.stages))
    rows = [("  weights (fp32)", "parameters"), ("  gradients (fp32)", "gradients"),
            ("  optimizer (AdamW fp32)", "optimizer"), ("  activations", "activations"),
            ("  half-precision weight casts", "weight_copies"), ("  temporaries", "temporaries"), ("  total", "total")]
    for label, attr in rows:
        lines.append(f"{label:<29}" + "".join(f"{getattr(s, attr) / scale:14.2f}" for s in plan.memory.stages))
    flights = ", ".join(f"{s.stage} {s.in_flight:g}" for s in plan.memory.stages)
    worst = plan.memory.worst
    comm_unit, comm_scale = ("GB", 1e9) if plan.comm.total >= 1e9 else ("MB", 1e6)
    verdict = "fits" if plan.fits(cluster) else "does NOT fit"
    lines += [
        f"  (micro-batches in flight: {flights})",
        f"peak {worst.total / scale:.2f} {unit} on the {worst.stage} stage: {verdict} in "
        f"{cluster.gpu_memory / GIB:.0f} GiB ({cluster.usable_memory / GIB:.1f} usable after "
        f"{cluster.headroom:.0%} headroom)",
        "",
        f"communication per device per step ({comm_unit} sent): " + " | ".join(
            f"{kind} {getattr(plan.comm, kind) / comm_scale:.2f}" for kind in ("dp", "tp", "pp", "ep", "cp", "total")),
        f"rough step time: {plan.step_seconds:.2f} s at {cluster.tflops:g} TFLOP/s per device",
    ]
    return "\n".join(lines)


def plan_table(plans: list[Plan]) -> str:
    header = f"{'tp':>3} {'sp':>3} {'pp':>3} {'dp':>4} {'cp':>3} {'ep':>3} {'dp mode':>9} {'recompute':>10} " \
             f"{'peak GiB':>9} {'comm GB':>9} {'step s':>8}"
    lines = [header]
    for plan in plans:
        lay = plan.layout
        lines.append(f"{lay.tp:>3} {'y' if lay.sequence_parallel else 'n':>3} {lay.pp:>3} {lay.dp:>4} {lay.cp:>3} "
                     f"{lay.ep:>3} {lay.dp_mode:>9} {lay.recompute:>10} {plan.memory.worst.total / GIB:>9.2f} "
                     f"{plan.comm.total / 1e9:>9.1f} {plan.step_seconds:>8.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registered model name (see `ember.models.list_models()`)")
    parser.add_argument("--gpus", type=int, default=8, help="devices per node (default 8)")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpu-mem", default="80GB", help="memory per device, e.g. 80GB or 64GiB (binary GB)")
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--global-batch-size", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int)
    parser.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int)
    parser.add_argument("--ep", "--expert-model-parallel-size", dest="ep", type=int)
    parser.add_argument("--cp", "--context-parallel-size", dest="cp", type=int)
    parser.add_argument("--expert-tensor-parallel-size", dest="expert_tp", type=int,
                        help="TP degree of the experts (default: --tp, as Megatron)")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=None,
                        help="split norm regions over TP ranks (searched layouts use it whenever tp > 1)")
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int,
                        help="interleaved 1F1B with this many layers per virtual stage")
    parser.add_argument("--pipeline-schedule", choices=("1f1b", "gpipe"), default="1f1b")
    parser.add_argument("--dp-mode", choices=DP_MODES, help="replicate, zero1 (distributed optimizer) or fsdp")
    parser.add_argument("--use-distributed-optimizer", action="store_true", help="same as --dp-mode zero1")
    parser.add_argument("--dp-shard", action="store_true", help="same as --dp-mode fsdp")
    parser.add_argument("--recompute", choices=RECOMPUTE, help="activation recomputation (searched when absent)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32")
    parser.set_defaults(precision="bf16")
    parser.add_argument("--memory-headroom", type=float, default=0.1,
                        help="fraction of device memory kept free for the allocator and runtime (default 0.1)")
    parser.add_argument("--tflops", type=float, default=300.0, help="achieved TFLOP/s per device for step times")
    parser.add_argument("--top", type=int, default=5, help="how many layouts a search prints")


def _fixed_fields(args: argparse.Namespace) -> dict:
    fixed: dict = {"micro_batch_size": args.micro_batch_size}
    for name in ("tp", "pp", "ep", "cp", "expert_tp", "recompute"):
        if getattr(args, name) is not None:
            fixed[name] = getattr(args, name)
    modes = [m for m, on in (("zero1", args.use_distributed_optimizer), ("fsdp", args.dp_shard)) if on]
    if args.dp_mode is not None:
        modes.append(args.dp_mode)
    if len(set(modes)) > 1:
        raise EmberError(f"conflicting data-parallel modes {sorted(set(modes))}; give one of --dp-mode, "
                         "--use-distributed-optimizer, --dp-shard")
    if modes:
        fixed["dp_mode"] = modes[0]
    if args.sequence_parallel is not None:
        fixed["sequence_parallel"] = args.sequence_parallel
    fixed["schedule"] = args.pipeline_schedule
    return fixed


def _virtual_stages(model: ModelArgs, fixed: dict, layers_per_chunk: int | None) -> None:
    """Turn --num-layers-per-virtual-pipeline-stage into a virtual-stage count (Megatron's flag)."""
    if not layers_per_chunk:
        return
    if "pp" not in fixed:
        raise EmberError("--num-layers-per-virtual-pipeline-stage needs --pp")
    per_stage = model.n_layers // fixed["pp"]
    if per_stage % layers_per_chunk:
        raise EmberError(f"--num-layers-per-virtual-pipeline-stage {layers_per_chunk} does not divide the "
                         f"{per_stage} layers of each of the {fixed['pp']} pipeline stages")
    fixed["virtual_stages"] = per_stage // layers_per_chunk
    if fixed["virtual_stages"] > 1:
        if fixed["schedule"] == "gpipe":
            raise EmberError("virtual pipeline stages need the 1f1b schedule (interleaved 1F1B), not gpipe")
        fixed["schedule"] = "interleaved"


def run(args: argparse.Namespace) -> int:
    from ember.models import get_model_args

    model = get_model_args(args.model)
    for name in ("gpus", "nodes", "seq_length", "global_batch_size", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise EmberError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cluster = Cluster(args.gpus, args.nodes, parse_memory(args.gpu_mem), headroom=args.memory_headroom,
                      tflops=args.tflops)
    workload = Workload(args.seq_length, args.global_batch_size, args.precision)
    fixed = _fixed_fields(args)
    _virtual_stages(model, fixed, args.num_layers_per_virtual_pipeline_stage)
    print(f"ember plan: {args.model} on {cluster.nodes} node(s) x {cluster.gpus_per_node} devices "
          f"({cluster.gpu_memory / GIB:.0f} GiB each), sequence {workload.seq_length}, global batch "
          f"{workload.global_batch_size}, {workload.precision}")

    single = "tp" in fixed and "pp" in fixed
    if single:
        layout = _explicit_layout(fixed, cluster)
        check_layout(model, layout, workload, cluster)
        plan = evaluate(model, layout, workload, cluster)
        print(describe_plan(model, plan, workload, cluster))
        if not plan.fits(cluster):
            worst = plan.memory.worst
            raise EmberError(
                f"layout {layout.describe()} needs {worst.total / GIB:.1f} GiB per device on the {worst.stage} "
                f"stage, more than the {cluster.usable_memory / GIB:.1f} GiB usable of {args.gpu_mem}; "
                "try recomputation, --use-distributed-optimizer, more pipeline/tensor parallelism or more devices")
        return 0

    fitting, evaluated = search(model, workload, cluster, fixed)
    if not evaluated:
        raise EmberError(f"no valid layout of {args.model} on {cluster.world_size} devices with the given "
                         "degrees and batch sizes; check that the global batch divides by micro-batch x dp")
    if not fitting:
        smallest = min(evaluated, key=lambda p: p.memory.worst.total)
        raise EmberError(
            f"none of {len(evaluated)} layouts fits in {cluster.usable_memory / GIB:.1f} GiB usable per device; "
            f"the smallest ({smallest.layout.describe()}, {smallest.layout.dp_mode}, recompute "
            f"{smallest.layout.recompute}) needs {smallest.memory.worst.total / GIB:.1f} GiB: add devices")
    print(f"{len(fitting)} of {len(evaluated)} layouts fit; the fastest by a rough step-time model:")
    print(plan_table(fitting[: args.top]))
    print()
    print("best layout in detail:")
    print(describe_plan(model, fitting[0], workload, cluster))
    return 0


def _explicit_layout(fixed: dict, cluster: Cluster) -> Layout:
    tp, pp, cp = fixed["tp"], fixed["pp"], fixed.get("cp", 1)
    if cluster.world_size % (tp * pp * cp):
        raise EmberError(f"tp {tp} x pp {pp} x cp {cp} = {tp * pp * cp} does not divide the "
                         f"{cluster.world_size} devices ({cluster.nodes} nodes x {cluster.gpus_per_node})")
    fields = {f.name for f in dataclasses.fields(Layout)}
    values = {k: v for k, v in fixed.items() if k in fields}
    values.setdefault("sequence_parallel", False)
    return Layout(**{**values, "dp": cluster.world_size // (tp * pp * cp)})

"""`ember plan`: will this model train on these devices, and with which layout?

    ember plan llama3-70b --nodes 8 --gpus 8 --gpu-mem 64GB --seq-length 8192 --global-batch-size 256 \\
        --tp 8 --pp 8 --sequence-parallel --recompute full

With every degree given (--tp and --pp; --ep/--cp/--dp-mode/--recompute default to 1/replicate/none
there) it evaluates that layout: parameters, gradients, optimizer state and activations per device,
communication per step, and exits 2 with a one-line reason when it does not fit. With some left
open it searches them (tp in 1/2/4/8 within a node, pp dividing the layers, ep dividing the
experts, data parallelism the rest; ZeRO mode and recomputation too) and prints the fastest few
layouts that fit by a rough step-time model. Memory comes from `ember.parallel.estimate`.

Whether a layout can run at all is decided by `ember.config.layout` alone, the rules `ember train`
applies: the two accept and refuse the same layouts with the same reason. The flags are read by
`ember.commands.plan`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

from ember.config.layout import DP_MODES, RECOMPUTE, Layout, data_parallel_size, divisors
from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.parallel.estimate import (
    CommEstimate,
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


def check_layout(args: ModelArgs, layout: Layout, workload: Workload, cluster: Cluster | None = None) -> Layout:
    """`layout` running `workload`, checked as `ember train` checks it (`Layout.resolve`, then
    `Layout.check_model`): raises EmberError with the trainer's one-line reason; returns the
    layout with its micro-batches per step filled in."""
    if cluster is not None and layout.world_size != cluster.world_size:
        raise EmberError(f"tp x pp x dp x cp = {layout.world_size} but there are {cluster.world_size} devices")
    layout = layout.resolve(workload.global_batch_size)
    layout.check_model(args, workload.seq_length)
    return layout


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
    bubble = 1 + (layout.pp - 1) / (m * layout.virtual_stages(args.n_layers))
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
        try:
            dp = data_parallel_size(cluster.world_size, tp, pp, cp)
        except EmberError:
            continue
        if dp == 1 and dp_mode != "replicate" and "dp_mode" not in fixed:
            continue  # ZeRO over one rank is plain replication
        layout = Layout(**{"sequence_parallel": True, **base, "tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp": dp,
                           "dp_mode": dp_mode, "recompute": recompute})
        try:
            layouts.append(check_layout(args, layout, workload))
        except EmberError:
            continue
    return layouts


def explicit_layout(fixed: dict, cluster: Cluster) -> Layout:
    """The one layout every degree of which is given (data parallelism takes the rest)."""
    dp = data_parallel_size(cluster.world_size, fixed["tp"], fixed["pp"], fixed.get("cp", 1))
    return Layout(**{"sequence_parallel": False, **fixed, "dp": dp})


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




# ---------------------------------------------------------------------------------- report


def explain(model_name: str, cluster: Cluster, workload: Workload, fixed: dict, top: int = 5,
            out: Callable[[str], None] = print, memory_label: str | None = None) -> None:
    """Evaluate the layout `fixed` names (tp and pp given) or search the open degrees, writing the
    report through `out`; raises EmberError with one line when nothing fits. `memory_label`: the
    device memory as the user wrote it, for messages."""
    from ember.models import get_model_args

    model = get_model_args(model_name)
    out(f"ember plan: {model_name} on {cluster.nodes} node(s) x {cluster.gpus_per_node} devices "
        f"({cluster.gpu_memory / GIB:.0f} GiB each), sequence {workload.seq_length}, global batch "
        f"{workload.global_batch_size}, {workload.precision}")
    if "tp" in fixed and "pp" in fixed:
        layout = explicit_layout(fixed, cluster)
        try:
            layout = check_layout(model, layout, workload, cluster)
        except EmberError as err:
            raise EmberError(f"layout {layout.describe()}: {err}") from None
        plan = evaluate(model, layout, workload, cluster)
        out(describe_plan(model, plan, workload, cluster))
        if not plan.fits(cluster):
            worst = plan.memory.worst
            memory = memory_label or f"{cluster.gpu_memory / GIB:g} GiB"
            raise EmberError(
                f"layout {layout.describe()} needs {worst.total / GIB:.1f} GiB per device on the {worst.stage} "
                f"stage, more than the {cluster.usable_memory / GIB:.1f} GiB usable of {memory}; try "
                "recomputation, --use-distributed-optimizer, more pipeline/tensor parallelism or more devices")
        return
    fitting, evaluated = search(model, workload, cluster, fixed)
    if not evaluated:
        raise EmberError(f"no valid layout of {model_name} on {cluster.world_size} devices with the given "
                         "degrees and batch sizes; check that the global batch divides by micro-batch x dp")
    if not fitting:
        smallest = min(evaluated, key=lambda p: p.memory.worst.total)
        raise EmberError(
            f"none of {len(evaluated)} layouts fits in {cluster.usable_memory / GIB:.1f} GiB usable per device; "
            f"the smallest ({smallest.layout.describe()}, {smallest.layout.dp_mode}, recompute "
            f"{smallest.layout.recompute}) needs {smallest.memory.worst.total / GIB:.1f} GiB: add devices")
    out(f"{len(fitting)} of {len(evaluated)} layouts fit; the fastest by a rough step-time model:")
    out(plan_table(fitting[:top]))
    out("")
    out("best layout in detail:")
    out(describe_plan(model, fitting[0], workload, cluster))

"""`ember plan`: the flags; the estimates and the layout search are `ember.plan`'s.

    ember plan llama3-70b --nodes 8 --gpus 8 --gpu-mem 64GB --seq-length 8192 --global-batch-size 256 \\
        --tp 8 --pp 8 --sequence-parallel --recompute full

The layout flags are spelled as `ember train`'s (short forms --tp/--pp/--ep/--cp too), and a
layout they name is checked by the same rules (`ember.config.layout`).
"""

from __future__ import annotations

import argparse

from ember.config.layout import DP_MODES, PIPELINE_SCHEDULES, RECOMPUTE, schedule_spelling
from ember.errors import EmberError
from ember.parallel.estimate import Workload
from ember.plan import Cluster, explain, parse_memory


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registered model name (see `ember models`)")
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
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", dest="layers_per_virtual_stage", type=int,
                        help="interleaved 1F1B with this many layers per virtual stage")
    parser.add_argument("--decoder-first-pipeline-num-layers", dest="first_stage_layers", type=int,
                        help="layers on the first pipeline stage (the rest split evenly)")
    parser.add_argument("--decoder-last-pipeline-num-layers", dest="last_stage_layers", type=int,
                        help="layers on the last pipeline stage (the rest split evenly)")
    parser.add_argument("--pipeline-schedule", dest="schedule", type=schedule_spelling, choices=PIPELINE_SCHEDULES,
                        help="default: 1f1b, or interleaved_1f1b with virtual stages (as ember train)")
    parser.add_argument("--dp-mode", choices=DP_MODES, help="replicate, zero1 (distributed optimizer) or fsdp")
    parser.add_argument("--use-distributed-optimizer", action="store_true", help="same as --dp-mode zero1")
    parser.add_argument("--dp-shard", action="store_true", help="same as --dp-mode fsdp")
    parser.add_argument("--dp-replicate", type=int,
                        help="with zero1/fsdp: replicas of the sharded group (HSDP), as ember train")
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


def fixed_fields(args: argparse.Namespace) -> dict:
    """The `Layout` fields the flags fix; the search varies the others."""
    fixed: dict = {"micro_batch_size": args.micro_batch_size}
    for name in ("tp", "pp", "ep", "cp", "expert_tp", "recompute", "layers_per_virtual_stage", "first_stage_layers",
                 "last_stage_layers", "schedule", "dp_replicate", "sequence_parallel"):
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
    return fixed


def run(args: argparse.Namespace) -> int:
    for name in ("gpus", "nodes", "seq_length", "global_batch_size", "micro_batch_size"):
        if getattr(args, name) < 1:
            raise EmberError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cluster = Cluster(args.gpus, args.nodes, parse_memory(args.gpu_mem), headroom=args.memory_headroom,
                      tflops=args.tflops)
    workload = Workload(args.seq_length, args.global_batch_size, args.precision)
    explain(args.model, cluster, workload, fixed_fields(args), top=args.top, memory_label=args.gpu_mem)
    return 0

"""`ember convert`: checkpoints between Hugging Face, Megatron and ember folders, streamed.

    ember convert --from hf --to ember HF_DIR OUT_DIR
    ember convert --from ember --to hf EMBER_DIR OUT_DIR   (EMBER_DIR may be an `ember train --save` folder)
    ember convert --from megatron --to ember MEGATRON_SAVE_DIR OUT_DIR [--iteration N]
    ember convert --from megatron --to ember MEGATRON_SAVE_DIR SAVE_DIR --load-optim   (weights, Adam
        moments and iteration as an ember training checkpoint: `ember train --load SAVE_DIR` continues the run)
    ember convert --from ember --to megatron EMBER_DIR OUT_DIR [--format torch_dist|legacy]
        [--target-tensor-parallel-size T] [--target-pipeline-parallel-size P] [--target-expert-parallel-size E]
    LoRA (a run with --lora-target-modules, or a PEFT adapter folder):
    ember convert --from ember --to peft SAVE_DIR OUT_DIR              (the run's adapter, for peft)
    ember convert --from ember --to hf|ember SAVE_DIR OUT_DIR --merge-lora        (adapter folded in)
    ember convert --from hf|ember --to hf|ember SRC OUT_DIR --merge-lora ADAPTER_DIR

The conversions themselves are `ember.checkpoint.convert`, `ember.checkpoint.megatron` and
`ember.checkpoint.megatron_export`; this module reads the flags.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ember.checkpoint.convert import convert_hf_to_ember, convert_to_hf, parse_size
from ember.errors import EmberError

_DTYPE_CHOICES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="from_format", choices=["hf", "ember", "megatron"], required=True,
                        help="format of SRC")
    parser.add_argument("--to", dest="to_format", choices=["hf", "ember", "megatron", "peft"], required=True,
                        help="format to write (peft: a LoRA run's adapter folder)")
    parser.add_argument("src", type=Path,
                        help="Hugging Face model folder, ember weight folder, (--from ember) an ember train --save "
                             "folder, or (--from megatron) a Megatron save folder or one of its iter_* folders")
    parser.add_argument("out", type=Path, help="output folder (written atomically)")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest output shard, e.g. 500MB, 2GiB, 5GB (default 5GB)"
    )
    parser.add_argument(
        "--dtype", choices=list(_DTYPE_CHOICES), default="keep", help="cast floating tensors (default: keep, bit-exact)"
    )
    parser.add_argument("--iteration", type=int, default=None,
                        help="--from megatron: the iteration to read (default: latest_checkpointed_iteration.txt)")
    parser.add_argument("--load-optim", action="store_true",
                        help="--from megatron --to ember: write an ember training checkpoint (OUT/latest, "
                             "OUT/iter_N) with the weights (fp32 master copies where saved), Adam's moments and step, "
                             "and the iteration, so `ember train --load OUT` continues the Megatron run; refused in "
                             "one line when the checkpoint holds no optimizer state ember can map (e.g. Megatron's "
                             "distributed optimizer). Without it only the weights are converted and the optimizer "
                             "state is dropped (said so)")
    parser.add_argument("--format", dest="megatron_format", choices=["torch_dist", "legacy"], default="torch_dist",
                        help="--to megatron: Megatron-Core distributed checkpoint (torch_dist, default) or the "
                             "per-rank mp_rank_* files (legacy, --ckpt-format torch)")
    parser.add_argument("--target-tensor-parallel-size", type=int, default=1,
                        help="--to megatron: tensor-parallel size of the written checkpoint (default 1)")
    parser.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                        help="--to megatron: pipeline-parallel size of the written checkpoint (default 1)")
    parser.add_argument("--target-expert-parallel-size", type=int, default=1,
                        help="--to megatron: expert-parallel size of the written checkpoint (MoE models, default 1)")
    parser.add_argument("--merge-lora", nargs="?", const=True, default=None, metavar="ADAPTER_DIR",
                        help="fold LoRA adapters into the weights: those of a LoRA run's SRC, or ADAPTER_DIR's "
                             "(a PEFT adapter folder)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is an earlier output (an ember, Hugging Face or Megatron folder)")


def run(args: argparse.Namespace) -> int:
    merge = getattr(args, "merge_lora", None)
    if merge is not None or args.to_format == "peft":
        return _lora(args, merge)
    if (args.from_format, args.to_format) not in (("hf", "ember"), ("ember", "hf"), ("megatron", "ember"),
                                                  ("ember", "megatron")):
        raise EmberError(f"cannot convert --from {args.from_format} --to {args.to_format}; use hf->ember, "
                         f"ember->hf, megatron->ember or ember->megatron")
    layout = (args.target_tensor_parallel_size, args.target_pipeline_parallel_size, args.target_expert_parallel_size)
    if args.to_format != "megatron" and (layout != (1, 1, 1) or args.megatron_format != "torch_dist"):
        raise EmberError("--format and --target-*-parallel-size describe a Megatron output; use them with --to megatron")
    if getattr(args, "load_optim", False) and (args.from_format, args.to_format) != ("megatron", "ember"):
        raise EmberError("--load-optim imports a Megatron run's optimizer state; use it with --from megatron --to ember")
    if args.iteration is not None and args.from_format != "megatron":
        raise EmberError("--iteration picks a Megatron checkpoint's iteration; use it with --from megatron")
    max_shard = parse_size(args.max_shard_size)
    dtype = _DTYPE_CHOICES[args.dtype]
    started = time.perf_counter()
    try:
        if args.from_format == "megatron":
            return _from_megatron(args, max_shard, dtype, started)
        if args.to_format == "megatron":
            return _to_megatron(args, dtype, started)
        if args.from_format == "hf":
            summary = convert_hf_to_ember(args.src, args.out, max_shard_bytes=max_shard, dtype=dtype,
                                          overwrite=args.force)
        else:
            summary = convert_to_hf(args.src, args.out, max_shard_bytes=max_shard, dtype=dtype, overwrite=args.force)
    except OSError as err:  # a full disk, no permission, a path component that is a file
        where = f" ({err.filename})" if err.filename else ""
        raise EmberError(f"ember convert {args.src} -> {args.out}: {err.strerror or err}{where}") from None
    print(
        f"ember convert: {args.from_format} {summary['family']} -> {args.to_format} {args.out}: "
        f"{summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in {summary['shards']} shard(s), "
        f"{time.perf_counter() - started:.1f}s"
    )
    return 0


def _from_megatron(args: argparse.Namespace, max_shard: int, dtype, started: float) -> int:
    from ember.checkpoint.megatron import convert_megatron_to_ember, describe_megatron_source

    if getattr(args, "load_optim", False):
        from ember.checkpoint.megatron_optim import (NoUsableOptimizerState, convert_megatron_to_training_checkpoint,
                                                     describe_training_import)
        from ember.train.trainer import adam_for_megatron_import

        if dtype is not None:
            raise EmberError("--load-optim writes a training checkpoint in fp32 (the optimizer's precision); drop --dtype")
        try:
            report = convert_megatron_to_training_checkpoint(args.src, args.out, adam_for_megatron_import,
                                                             iteration=args.iteration, overwrite=args.force)
        except NoUsableOptimizerState as err:
            raise EmberError(f"{err}; drop --load-optim to convert the weights only") from None
        print(f"ember convert: {describe_training_import(report)} -> {args.out} (resume with "
              f"`ember train --load {args.out}`), {time.perf_counter() - started:.1f}s")
        return 0
    report = convert_megatron_to_ember(args.src, args.out, iteration=args.iteration, overwrite=args.force,
                                       dtype=dtype, max_shard_bytes=max_shard)
    print(f"ember convert: {describe_megatron_source(report)} -> {args.out} in {report['shards']} shard(s), "
          f"{time.perf_counter() - started:.1f}s")
    return 0


def _to_megatron(args: argparse.Namespace, dtype, started: float) -> int:
    from ember.checkpoint.megatron_export import convert_ember_to_megatron

    report = convert_ember_to_megatron(args.src, args.out, format=args.megatron_format,
                                       tensor_parallel=args.target_tensor_parallel_size,
                                       pipeline_parallel=args.target_pipeline_parallel_size,
                                       expert_parallel=args.target_expert_parallel_size,
                                       overwrite=args.force, dtype=dtype)
    print(f"ember convert: ember {report['family']} -> megatron {report['format']} {args.out} "
          f"(TP {report['tensor_parallel']} x PP {report['pipeline_parallel']} x EP {report['expert_parallel']}): "
          f"{report['tensors']} tensors, "
          f"{report['bytes'] / 1e6:.1f} MB in {report['files']} file(s), {time.perf_counter() - started:.1f}s")
    return 0


def _lora(args: argparse.Namespace, merge) -> int:
    """--to peft and --merge-lora (issue 17)."""
    import tempfile

    from ember.checkpoint.convert import (check_output_folder, convert_ember_to_hf, export_peft_adapter,
                                          merge_lora_weights)

    started = time.perf_counter()
    if args.to_format == "peft":
        if args.from_format != "ember" or merge is not None:
            raise EmberError("--to peft writes a LoRA run's adapter: use --from ember SAVE_DIR, without --merge-lora")
        summary = export_peft_adapter(args.src, args.out, overwrite=args.force)
        print(f"ember convert: {summary['family']} LoRA adapter -> peft {args.out}: {summary['tensors']} tensors, "
              f"{summary['bytes'] / 1e6:.2f} MB, {time.perf_counter() - started:.1f}s")
        return 0
    if args.from_format == "megatron" or args.to_format == "megatron":
        raise EmberError("--merge-lora works --from hf|ember --to hf|ember")
    if args.from_format == "hf" and merge is True:
        raise EmberError("--from hf --merge-lora needs the adapter: --merge-lora ADAPTER_DIR")
    check_output_folder(args.src, args.out)
    dtype = _DTYPE_CHOICES[args.dtype]
    parent = args.out.parent if args.out.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="ember-merge-", dir=parent) as tmp:
        src = args.src
        if args.from_format == "hf":
            convert_hf_to_ember(src, Path(tmp) / "base", dtype=None)
            src = Path(tmp) / "base"
        if args.to_format == "ember":
            merge_lora_weights(src, args.out, merge, overwrite=args.force)
            what = f"{args.out}"
        else:
            merged = merge_lora_weights(src, Path(tmp) / "merged", merge)
            convert_ember_to_hf(merged, args.out, max_shard_bytes=parse_size(args.max_shard_size), dtype=dtype,
                                overwrite=args.force)
            what = f"hf {args.out}"
    print(f"ember convert: {args.from_format} {args.src} + LoRA -> merged {what}, {time.perf_counter() - started:.1f}s")
    return 0

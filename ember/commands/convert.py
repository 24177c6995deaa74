"""`ember convert`: Hugging Face checkpoints <-> ember weight folders, streamed.

    ember convert --from hf --to ember HF_DIR OUT_DIR
    ember convert --from ember --to hf EMBER_DIR OUT_DIR   (EMBER_DIR may be an `ember train --save` folder)

The conversion itself is `ember.checkpoint.convert`; this module reads the flags.
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
    parser.add_argument("--from", dest="from_format", choices=["hf", "ember"], required=True, help="format of SRC")
    parser.add_argument("--to", dest="to_format", choices=["hf", "ember"], required=True, help="format to write")
    parser.add_argument("src", type=Path,
                        help="Hugging Face model folder, ember weight folder, or (--from ember) an ember train --save folder")
    parser.add_argument("out", type=Path, help="output folder (written atomically)")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest output shard, e.g. 500MB, 2GiB, 5GB (default 5GB)"
    )
    parser.add_argument(
        "--dtype", choices=list(_DTYPE_CHOICES), default="keep", help="cast floating tensors (default: keep, bit-exact)"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    if (args.from_format, args.to_format) not in (("hf", "ember"), ("ember", "hf")):
        raise EmberError(f"cannot convert --from {args.from_format} --to {args.to_format}; use hf->ember or ember->hf")
    max_shard = parse_size(args.max_shard_size)
    dtype = _DTYPE_CHOICES[args.dtype]
    started = time.perf_counter()
    if args.from_format == "hf":
        summary = convert_hf_to_ember(args.src, args.out, max_shard_bytes=max_shard, dtype=dtype, overwrite=args.force)
    else:
        summary = convert_to_hf(args.src, args.out, max_shard_bytes=max_shard, dtype=dtype, overwrite=args.force)
    print(
        f"ember convert: {args.from_format} {summary['family']} -> {args.to_format} {args.out}: "
        f"{summary['tensors']} tensors, {summary['bytes'] / 1e6:.1f} MB in {summary['shards']} shard(s), "
        f"{time.perf_counter() - started:.1f}s"
    )
    return 0

"""`ember generate`: text from an ember weight folder or an `ember train --save` folder (the
seeds' predict mode).

    ember generate --load DIR --prompt "Once upon a time" --max-new-tokens 64
    ember generate --load DIR --prompt "..." --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1

Greedy by default; sampling with temperature / top-k / top-p when --temperature > 0. Streams text
to the terminal as tokens arrive. The decoding itself is `ember.generation`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from ember.errors import EmberError

_DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", type=Path, required=True, help="ember weight folder (ember convert --to ember) or an ember train --save folder")
    parser.add_argument(
        "--tokenizer-name-or-path", type=Path, default=None, help="local tokenizer folder (default: LOAD/tokenizer)"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding, whatever the sampling flags say")
    parser.add_argument("--eos-id", type=int, default=None, help="stop token (default: the tokenizer's eos)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep", help="cast weights (default: as stored)")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One line for the first decoding setting out of range (nan fails every comparison here)."""
    if max_new_tokens < 1:
        raise EmberError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EmberError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise EmberError(f"--top-k must be >= 0 (0: all tokens), got {top_k}")
    if not 0 < top_p <= 1:
        raise EmberError(f"--top-p must be in (0, 1] (1: off), got {top_p}")


def run(args: argparse.Namespace) -> int:
    from ember.checkpoint.export import is_training_checkpoint, load_model_from_training_checkpoint
    from ember.checkpoint.weights import load_model, read_manifest
    from ember.generation import TextCodec, generate, stream_text

    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before any file is read
    from_training = is_training_checkpoint(args.load)
    if not from_training:
        read_manifest(args.load)  # a clear error for a folder that is not ember weights, first
    if from_training:  # a `--save` folder of ember train: weights and tokenizer from its checkpoint
        model, trained_tokenizer = load_model_from_training_checkpoint(args.load, args.device, _DTYPES[args.dtype])
        tokenizer_dir = args.tokenizer_name_or_path or trained_tokenizer
    else:
        model = None
        tokenizer_dir = args.tokenizer_name_or_path or args.load / "tokenizer"
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise EmberError(f"no tokenizer folder at {tokenizer_dir}; pass --tokenizer-name-or-path DIR")
    codec = TextCodec(tokenizer_dir)
    if model is None:
        model = load_model(args.load, device=args.device, dtype=_DTYPES[args.dtype])
    prompt_ids = codec.encode(args.prompt)
    if not prompt_ids:
        raise EmberError("the prompt encodes to no tokens; give some text")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device="cpu" if args.device == "cpu" else args.device).manual_seed(args.seed)
    temperature = 0.0 if args.greedy else args.temperature
    eos_id = args.eos_id if args.eos_id is not None else codec.eos_id

    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    tokens = generate(model, prompt_ids, args.max_new_tokens, temperature, args.top_k, args.top_p, eos_id, generator)
    new_ids = stream_text(codec, tokens)
    elapsed = time.perf_counter() - started
    print(f"[{len(new_ids)} tokens in {elapsed:.2f}s, {len(new_ids) / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0

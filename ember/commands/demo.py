"""`ember demo`: the built-in small default, end to end, on this machine's CPU.

Each stage is the same `ember` subcommand a user would run by hand, printed before it runs:

    built-in corpus (standard-library docstrings) -> byte-level BPE tokenizer trained on it
    -> ember preprocess (Megatron .bin/.idx) -> ember data inspect -> ember train (a small Llama,
    CPU, a minute or two) -> ember generate (from the checkpoint) -> ember convert (to Hugging Face)
    -> ember plot (loss curve PNG)
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ember.errors import EmberError


def _ember(argv: list[str]) -> None:
    from ember.commands import run_command

    print(f"\n$ ember {shlex.join(argv)}", flush=True)
    code = run_command(argv)
    if code:
        raise EmberError(f"stage `ember {argv[0]}` failed with exit code {code}")


def add_arguments(parser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where every artefact of the demo goes")
    parser.add_argument("--corpus-mb", type=float, default=None,
                        help="limit the built-in corpus to about this many MB (default: all docstrings, ~2 MB)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--train-iters", type=int, default=200,
                        help="training iterations (200 steps of 1024 tokens: a minute or two on 2 CPU cores)")
    parser.add_argument("--prompt", default="Return the", help="prompt for the generated sample")


def run(args) -> int:
    start = time.perf_counter()
    out = Path(args.output_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, prefix = out / "corpus.jsonl", out / "tokenizer", out / "data" / "corpus"
    corpus_args = ["--max-mb", str(args.corpus_mb)] if args.corpus_mb else []
    _ember(["data", "corpus", "--output", str(corpus), *corpus_args])
    _ember(["tokenizer", "train", "--input", str(corpus), "--output", str(tokenizer),
            "--vocab-size", str(args.vocab_size)])
    _ember(["preprocess", "--input", str(corpus), "--output-prefix", str(prefix),
            "--tokenizer-name-or-path", str(tokenizer), "--append-eod", "--workers", str(args.workers),
            "--log-interval", "500", "--overwrite"])
    _ember(["data", "inspect", f"{prefix}_text_document", "--tokenizer-name-or-path", str(tokenizer)])
    checkpoints, hf = out / "checkpoints", out / "hf"
    every = max(args.train_iters // 3, 1)
    _ember(["train", "--model", "tiny-llama",
            # a little wider and deeper than the test-sized tiny-llama: about 4M parameters
            "--hidden-size", "256", "--num-layers", "4", "--num-attention-heads", "8", "--num-query-groups", "4",
            "--ffn-hidden-size", "704",
            "--data-path", f"{prefix}_text_document", "--split", "98,2,0",
            # 8 x 128 tokens a step: the loss falls from ~8.3 to ~5.5 in 200 steps, in minutes on 2 cores
            "--tokenizer-name-or-path", str(tokenizer), "--seq-length", "128",
            "--micro-batch-size", "8", "--global-batch-size", "8", "--train-iters", str(args.train_iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", str(max(args.train_iters // 20, 1)), "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--save", str(checkpoints), "--save-interval", str(every), "--eval-interval", str(every),
            "--eval-iters", "4", "--log-interval", str(max(args.train_iters // 30, 1)), "--seed", "1234"])
    _ember(["generate", "--load", str(checkpoints), "--prompt", args.prompt, "--max-new-tokens", "48",
            "--temperature", "0.8", "--top-k", "40", "--seed", "0"])
    _ember(["convert", "--from", "ember", "--to", "hf", str(checkpoints), str(hf), "--force"])
    _ember(["plot", str(checkpoints / "logs" / "metrics.jsonl"), "--output", str(out / "loss.png"),
            "--title", "ember demo: tiny Llama on standard-library docstrings"])
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; everything is under {out}/ "
          f"(checkpoints/, hf/ loads with transformers, loss.png)", file=sys.stderr)
    return 0

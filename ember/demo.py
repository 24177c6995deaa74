"""`ember demo`: the built-in small default, end to end, on this machine's CPU.

Each stage is the same `ember` subcommand a user would run by hand, printed before it runs:

    built-in corpus (standard-library docstrings) -> byte-level BPE tokenizer trained on it
    -> ember preprocess (Megatron .bin/.idx) -> ember data inspect
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from ember.errors import EmberError


def _ember(argv: list[str]) -> None:
    from ember.cli import main

    print(f"\n$ ember {shlex.join(argv)}", flush=True)
    code = main(argv)
    if code:
        raise EmberError(f"stage `ember {argv[0]}` failed with exit code {code}")


def add_arguments(parser) -> None:
    parser.add_argument("--output-dir", default="runs/demo", help="where every artefact of the demo goes")
    parser.add_argument("--corpus-mb", type=float, default=None,
                        help="limit the built-in corpus to about this many MB (default: all docstrings, ~2 MB)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)


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
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; everything is under {out}/", file=sys.stderr)
    return 0

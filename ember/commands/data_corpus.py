"""`ember data corpus`: the built-in corpus (text from the Python install) written as jsonl."""

from __future__ import annotations

from pathlib import Path

from ember.data.corpus import KINDS, write_jsonl
from ember.errors import EmberError


def add_arguments(parser) -> None:
    parser.add_argument("--output", required=True, help="jsonl file to write")
    parser.add_argument("--kind", choices=KINDS, default="docstrings",
                        help="docstrings (English prose), source (Python code) or both")
    parser.add_argument("--max-mb", type=float, default=None, help="stop after about this many MB of text")
    parser.add_argument("--root", action="append", default=None,
                        help="walk these folders instead of the standard library (repeatable)")


def run(args) -> int:
    out_dir = Path(args.output).parent
    if not out_dir.is_dir():
        raise EmberError(f"output folder {out_dir} does not exist; create it first")
    max_bytes = None if args.max_mb is None else int(args.max_mb * 1e6)
    roots = [Path(r) for r in args.root] if args.root else None
    documents, size = write_jsonl(args.output, args.kind, max_bytes, roots=roots)
    print(f"wrote {documents} documents, {size / 1e6:.1f} MB of text to {args.output}")
    return 0

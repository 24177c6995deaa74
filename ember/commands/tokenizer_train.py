"""`ember tokenizer train`: a byte-level BPE tokenizer trained locally, saved as a Hugging Face folder."""

from __future__ import annotations

from ember.data.tokenizer_train import train_tokenizer


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, help="file or folder of text records (as for ember preprocess)")
    parser.add_argument("--output", required=True, help="folder to write the tokenizer into")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--json-key", default="text", help="field holding the text")
    parser.add_argument("--max-mb", type=float, default=None, help="train on at most this many MB of text")


def run(args) -> int:
    out = train_tokenizer(input=args.input, output=args.output, vocab_size=args.vocab_size,
                          min_frequency=args.min_frequency, json_key=args.json_key, max_mb=args.max_mb)
    print(f"trained a byte-level BPE tokenizer with {args.vocab_size} tokens into {out}")
    return 0

"""`ember preprocess`: text files -> Megatron `PREFIX_<key>_document.bin/.idx` (Megatron's flags)."""

from __future__ import annotations

import argparse
import sys

from ember.data.handlers import HANDLERS, PROMPT_TYPES
from ember.data.preprocess import Prepared, preprocess
from ember.data.tokenizers import add_tokenizer_arguments


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True,
                        help="a file, folder or glob of .jsonl/.json/.txt/.csv/.parquet/.arrow (jsonl may be "
                             ".gz/.zst); Wikitext .tokens: MindFormers' samples of --seq-length + 1 tokens")
    parser.add_argument("--output-prefix", required=True,
                        help="output path prefix; writes PREFIX_<key>_document.bin/.idx")
    add_tokenizer_arguments(parser)
    parser.add_argument("--handler-name", default="GeneralPretrainHandler", choices=HANDLERS)
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="columns to tokenize, each into its own dataset (pretraining handler)")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    parser.add_argument("--prompt-type", choices=PROMPT_TYPES, default=None,
                        help="prompt template of the instruction handlers (default: alpaca / chatml); "
                             "chat_template: the tokenizer's own Jinja chat template")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--n-subs", type=int, default=1,
                        help="cut the input into N parts processed in parallel and merged (same output)")
    parser.add_argument("--log-interval", type=int, default=10000, help="progress line every N documents")
    parser.add_argument("--pack", action="store_true",
                        help="pack mode (pretrain_eod): documents joined with EOD into --seq-length samples")
    parser.add_argument("--seq-length", type=int, default=None, help="sample length in pack mode")
    parser.add_argument("--seed", type=int, default=None,
                        help="pack mode: shuffle the documents with this seed before packing (default: input order)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output datasets")
    parser.add_argument("--no-fast-encoder", action="store_true",
                        help="always tokenize through the Hugging Face library (slower, same ids)")
    parser.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    # Megatron / MindSpeed-LLM preprocess flags (issue 16, H3)
    group = parser.add_argument_group("Megatron tools/preprocess_data.py flags")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence (NLTK Punkt, installed offline), PREFIX_<key>_sentence")
    group.add_argument("--keep-newlines", action="store_true",
                       help="--split-sentences: keep the newlines after a sentence inside it")
    group.add_argument("--lang", default="english", help="--split-sentences: the Punkt model's language")
    group.add_argument("--partitions", type=int, default=1,
                       help="N parts side by side; documents in Megatron's order (input lines dealt to the parts)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="--partitions: contiguous parts, the input order")
    group.add_argument("--tokenizer-not-use-fast", dest="use_fast_tokenizer", action="store_false",
                       help="transformers' slow (Python) tokenizer, as MindSpeed-LLM's flag")
    group.add_argument("--dataset-impl", choices=("mmap", "lazy", "cached"), default="mmap",
                       help="mmap, the format written (lazy/cached: MindSpeed-LLM writes mmap too)")


def _notices(args) -> None:
    """Flags accepted as the upstream scripts write them that change nothing here: one line each."""
    if args.dataset_impl != "mmap":
        print(f"ember preprocess: --dataset-impl {args.dataset_impl}: writing mmap, the one format megatron-core "
              f"reads (MindSpeed-LLM writes mmap whatever this says)", file=sys.stderr)
    if args.keep_newlines and not args.split_sentences:
        print("ember preprocess: --keep-newlines applies to --split-sentences only (as in Megatron): no effect",
              file=sys.stderr)


def run(args) -> int:
    _notices(args)
    def announce(prepared: Prepared) -> None:
        tokenizer = prepared.tokenizer
        print(f"ember preprocess: {len(prepared.files)} file(s), tokenizer {tokenizer.name} "
              f"(vocab {tokenizer.vocab_size}, {'fast exact BPE' if prepared.fast_encoder else 'Hugging Face'} "
              f"encoder), {args.workers} worker(s), {max(args.n_subs, args.partitions)} part(s)", file=sys.stderr)

    result = preprocess(
        input=args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
        tokenizer_name_or_path=args.tokenizer_name_or_path, tokenizer_model=args.tokenizer_model,
        vocab_file=args.vocab_file, merge_file=args.merge_file, handler_name=args.handler_name,
        json_keys=args.json_keys, append_eod=args.append_eod, prompt_type=args.prompt_type,
        workers=args.workers, n_subs=args.n_subs, pack=args.pack, seq_length=args.seq_length, seed=args.seed,
        strict=args.strict, overwrite=args.overwrite, fast_encoder=not args.no_fast_encoder,
        chunk_size=args.chunk_size, log_interval=args.log_interval, split_sentences=args.split_sentences,
        keep_newlines=args.keep_newlines, lang=args.lang, partitions=args.partitions,
        keep_sequential_samples=args.keep_sequential_samples, use_fast_tokenizer=args.use_fast_tokenizer,
        on_start=announce)
    totals, elapsed = result.totals, result.seconds
    for skip in totals.first_skips:
        print(f"skipped {skip}", file=sys.stderr)
    if totals.skipped:
        print(f"skipped {totals.skipped:,} record(s) in all (--strict makes the first one an error)", file=sys.stderr)
    print(f"done: {totals.documents:,} documents, {totals.tokens:,} tokens in {elapsed:.1f}s "
          f"({totals.tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    for prefix in result.prefixes.values():
        print(f"wrote {prefix}.bin/.idx")
    return 0

"""`ember data inspect PREFIX`: what an indexed dataset holds, at a glance."""

from __future__ import annotations

from ember.data.indexed import IndexedDataset, summarize
from ember.data.tokenizers import add_tokenizer_arguments, tokenizer_from_args


def add_arguments(parser) -> None:
    parser.add_argument("prefix", help="dataset prefix, e.g. data/corpus_text_document")
    parser.add_argument("--show", type=int, default=2, help="decode this many leading documents")
    parser.add_argument("--chars", type=int, default=300, help="characters shown per decoded document")
    add_tokenizer_arguments(parser)


def run(args) -> int:
    dataset = IndexedDataset(args.prefix)
    info = summarize(dataset)
    print(f"dataset   {args.prefix}")
    print(f"documents {info['documents']:,}   sequences {info['sequences']:,}   tokens {info['tokens']:,}   "
          f"dtype {info['dtype']}")
    print(f"tokens per document: mean {info['mean_document_tokens']:.1f}, max {info['max_document_tokens']:,}")
    print("length histogram (tokens per document):")
    widest = max((c for _, _, c in info["histogram"]), default=1)
    for low, high, count in info["histogram"]:
        bar = "#" * max(1, round(40 * count / widest))
        print(f"  {low:>7,}-{high:<7,} {count:>8,} {bar}")
    has_tokenizer = args.tokenizer_name_or_path or args.tokenizer_model or args.vocab_file
    tokenizer = tokenizer_from_args(args) if has_tokenizer else None
    for index in range(min(args.show, dataset.num_documents)):
        ids = dataset.document(index)
        print(f"--- document {index}: {ids.size} tokens")
        if tokenizer is None:
            print("  ids: " + " ".join(str(int(i)) for i in ids[:32]) + (" ..." if ids.size > 32 else ""))
        else:
            text = tokenizer.decode(ids)
            print("  " + text[: args.chars].replace("\n", "\n  ") + (" ..." if len(text) > args.chars else ""))
    return 0

"""`ember data samples`: the training samples a run would see, and a digest to compare tools by.

    ember data samples --data-path "0.3 A 0.7 B" --seq-length 2048 --seed 1234 --split 969,30,1 \\
        --train-samples 100000 [--tokenizer-name-or-path DIR]

prints the split sizes, the first samples (decoded when a tokenizer is given) and
`sha256(train[0:N])`: the digest of the first N train samples' token arrays, each `seq_length + 1`
int64 little-endian values, concatenated. N is the number of train samples the run asks for
(--train-samples, or --train-iters x --global-batch-size) unless --hash-samples says otherwise.
Megatron-LM gives the same digest for the same flags (its GPTDataset's tokens + last label).
"""

from __future__ import annotations

from ember.config.data_spec import SPLIT_NAMES
from ember.data.blending import DEFAULT_MID_LEVEL_SURPLUS, build_datasets, train_valid_test_num_samples
from ember.data.gpt_dataset import samples_digest
from ember.data.tokenizers import add_tokenizer_arguments, tokenizer_from_args
from ember.errors import EmberError


def add_arguments(parser) -> None:
    data = parser.add_argument_group("data (Megatron's flags)")
    data.add_argument("--data-path", nargs="*", help='"PREFIX", "P1 P2" or "W1 P1 W2 P2"')
    data.add_argument("--train-data-path", nargs="*")
    data.add_argument("--valid-data-path", nargs="*")
    data.add_argument("--test-data-path", nargs="*")
    data.add_argument("--split", default=None, help="train,valid,test weights over documents (default 969,30,1)")
    data.add_argument("--seq-length", type=int, required=True)
    data.add_argument("--seed", type=int, default=1234)
    data.add_argument("--data-cache-path", help="folder for index caches (default: cache/ beside the data)")
    data.add_argument("--mid-level-dataset-surplus", type=float, default=DEFAULT_MID_LEVEL_SURPLUS)
    run_group = parser.add_argument_group("run length (decides the number of epochs, hence the order)")
    run_group.add_argument("--train-samples", type=int)
    run_group.add_argument("--train-iters", type=int)
    run_group.add_argument("--global-batch-size", type=int, default=1)
    run_group.add_argument("--eval-interval", type=int, default=1000)
    run_group.add_argument("--eval-iters", type=int, default=100)
    show = parser.add_argument_group("output")
    show.add_argument("--show", type=int, default=3, help="print this many leading train samples")
    show.add_argument("--chars", type=int, default=200, help="characters shown per decoded sample")
    show.add_argument("--hash-samples", type=int, help="digest this many train samples (default: all requested)")
    add_tokenizer_arguments(parser)


def run(args) -> int:
    if not args.train_samples and args.train_iters is None:
        raise EmberError("give --train-samples N or --train-iters N (with --global-batch-size): the "
                         "number of samples requested decides their order")
    sizes = train_valid_test_num_samples(args.train_iters, args.train_samples,
                                         global_batch_size=args.global_batch_size,
                                         eval_interval=args.eval_interval, eval_iters=args.eval_iters)
    datasets = build_datasets(args.data_path, args.split, args.seq_length, args.seed, sizes,
                              train_data_path=args.train_data_path, valid_data_path=args.valid_data_path,
                              test_data_path=args.test_data_path, cache_dir=args.data_cache_path,
                              mid_level_dataset_surplus=args.mid_level_dataset_surplus)
    for name, wanted, dataset in zip(SPLIT_NAMES, sizes, datasets):
        built = "none" if dataset is None else f"{len(dataset):,} samples"
        print(f"{name:<6} requested {wanted if wanted is not None else 'one epoch'}: {built}")
    train = datasets[0]
    has_tokenizer = args.tokenizer_name_or_path or args.tokenizer_model or args.vocab_file
    tokenizer = tokenizer_from_args(args) if has_tokenizer else None
    for index in range(min(args.show, len(train))):
        tokens = train[index]["tokens"]
        print(f"--- train sample {index}: {tokens.size} tokens")
        if tokenizer is None:
            print("  ids: " + " ".join(str(int(t)) for t in tokens[:32]) + (" ..." if tokens.size > 32 else ""))
        else:
            text = tokenizer.decode([int(t) for t in tokens])
            print("  " + repr(text[: args.chars]) + (" ..." if len(text) > args.chars else ""))
    count = args.hash_samples if args.hash_samples is not None else sizes[0]
    if count > len(train):
        raise EmberError(f"--hash-samples {count} exceeds the {len(train)} train samples built")
    print(f"sha256(train[0:{count}]) {samples_digest(train, count)}")
    return 0

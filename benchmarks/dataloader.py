"""Training-data speed: index building over a large dataset, blending, and the loader's tokens/s.

    python benchmarks/dataloader.py [--tokens 100000000] [--seq-length 2048] [--workdir DIR]

Writes a random-token indexed dataset of --tokens tokens (uint16, documents of 1..2*mean tokens)
and prints one comparable line per measurement:

    index-build  tokens=... docs=... samples=... epochs=... seconds=...
    blend-build  datasets=... samples=... seconds=...
    cache-load   samples=... seconds=...
    loader       seq=... micro_batch=... tokens_per_s=...
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from ember.data.blending import blending_indices
from ember.data.gpt_dataset import GPTDataset, build_gpt_indices
from ember.data.index_cache import IndexCache
from ember.data.indexed import IndexedDataset, IndexedDatasetWriter
from ember.data.loader import DataLoader


def write_dataset(prefix: str, tokens: int, mean_length: int, seed: int = 0) -> IndexedDataset:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_length, size=2 * tokens // mean_length + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), tokens) + 1]
    writer = IndexedDatasetWriter(prefix, np.uint16)
    chunk = 1 << 16  # documents per write, to bound memory
    for start in range(0, lengths.size, chunk):
        part = lengths[start:start + chunk]
        writer.add_documents(rng.integers(0, 65000, int(part.sum()), dtype=np.uint16), part)
    writer.finalize()
    return IndexedDataset(prefix)


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--mean-document", type=int, default=1000)
    parser.add_argument("--blend-samples", type=int, default=1_000_000)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--loader-batches", type=int, default=200)
    parser.add_argument("--workdir", help="where to write the dataset (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        prefix = os.path.join(workdir, "bench_text_document")
        indexed, seconds = timed(write_dataset, prefix, args.tokens, args.mean_document)
        print(f"dataset      tokens={indexed.num_tokens} docs={len(indexed)} write_seconds={seconds:.2f}")
        documents = np.arange(len(indexed), dtype=np.int32)
        tokens_per_sample = args.seq_length
        one_epoch = (indexed.num_tokens - 1) // tokens_per_sample
        for seq_length, samples in ((args.seq_length, one_epoch), (args.seq_length, int(one_epoch * 2.5)),
                                    (128, indexed.num_tokens // 128 * 3)):
            indices, seconds = timed(build_gpt_indices, indexed.sequence_lengths, documents, samples,
                                     seq_length, 1234)
            epochs = indices.document_index.size // len(indexed)
            print(f"index-build  tokens={indexed.num_tokens} docs={len(indexed)} seq={seq_length} "
                  f"samples={indices.shuffle_index.size} epochs={epochs} seconds={seconds:.2f}")

        for count in (2, 5):
            weights = np.random.default_rng(count).random(count)
            _, seconds = timed(blending_indices, (weights / weights.sum()).tolist(), args.blend_samples)
            print(f"blend-build  datasets={count} samples={args.blend_samples} seconds={seconds:.2f}")

        cache = IndexCache(os.path.join(workdir, "cache"))
        dataset, seconds = timed(GPTDataset, indexed, (0, len(indexed)), one_epoch * 3, args.seq_length,
                                 1234, "train", cache=cache)
        print(f"cache-build  samples={len(dataset)} seconds={seconds:.2f}")
        dataset, seconds = timed(GPTDataset, indexed, (0, len(indexed)), one_epoch * 3, args.seq_length,
                                 1234, "train", cache=cache)
        print(f"cache-load   samples={len(dataset)} seconds={seconds:.2f} (checksums verified)")

        loader = DataLoader(dataset, args.micro_batch, args.micro_batch, 0, 1, prefetch=4)
        next(loader)  # start the reader thread
        start = time.perf_counter()
        for _ in range(args.loader_batches):
            next(loader)
        seconds = time.perf_counter() - start
        loader.close()
        rate = args.loader_batches * args.micro_batch * args.seq_length / seconds
        print(f"loader       seq={args.seq_length} micro_batch={args.micro_batch} tokens_per_s={rate:,.0f}")


if __name__ == "__main__":
    main()

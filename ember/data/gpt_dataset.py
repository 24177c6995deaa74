"""GPT samples over one indexed dataset, in Megatron's order (`megatron/core/datasets/gpt_dataset.py`).

Three indices define the samples of one split:

- document index: the split's documents repeated once per epoch and shuffled with
  `numpy.random.RandomState(seed)`; when the last epoch contributes fewer than 80% of an
  epoch's samples it is shuffled on its own, so the first epochs keep their full mix;
- sample index: samples are `seq_length + 1` consecutive tokens of the shuffled document
  stream, cut across document boundaries, each starting `seq_length` tokens after the previous
  one (the extra token is the last label and the next sample's first input);
- shuffle index: a permutation of the samples from the same random state (the samples of a
  separate last epoch are permuted among themselves).

The number of epochs is the smallest that yields the requested number of samples, so the order
depends on how many samples a run asks for. Here the sample index is computed with a cumulative
sum and a binary search instead of Megatron's C++ loop; the results are identical.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ember.data.indexed import IndexedDataset
from ember.errors import EmberError

# Samples carry one token more than the sequence length: input = tokens[:-1], labels = tokens[1:].
ADD_EXTRA_TOKEN = 1
# Megatron keeps the last epoch in the global shuffle only if it yields this share of an epoch.
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80


@dataclass(frozen=True)
class GPTIndices:
    document_index: np.ndarray  # int32: sequence ids, one per (epoch, document), shuffled
    sample_index: np.ndarray  # (samples + 1, 2): (position in document_index, token offset) of each start
    shuffle_index: np.ndarray  # the order in which samples are served

    def as_dict(self) -> dict[str, np.ndarray]:
        return {"document_index": self.document_index, "sample_index": self.sample_index,
                "shuffle_index": self.shuffle_index}


def epochs_needed(tokens_per_epoch: int, num_samples: int | None, seq_length: int) -> int:
    """The fewest epochs holding `num_samples * seq_length + 1` tokens (one epoch when None)."""
    if num_samples is None:
        return 1
    wanted = num_samples * seq_length + ADD_EXTRA_TOKEN
    return max(1, -(-wanted // tokens_per_epoch))


def separate_last_epoch(tokens_per_epoch: int, num_epochs: int, num_samples: int, seq_length: int) -> bool:
    """Whether the last epoch is shuffled apart: it is needed for < 80% of its samples."""
    if num_epochs == 1:
        return False
    samples_before_last = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
    samples_from_last = num_samples - samples_before_last
    samples_per_epoch = (tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
    return samples_from_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_last: bool) -> np.ndarray:
    """Documents repeated `num_epochs` times and shuffled in place by `rng` (int32, as Megatron)."""
    if separate_last and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate((first, last))
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int) -> np.ndarray:
    """Where each sample starts: (position in document_index, token offset in that document).

    Sample k covers stream tokens [k * seq_length, (k + 1) * seq_length + 1). Row k + 1 is the
    document and offset of that sample's last token, which is also where sample k + 1 starts —
    Megatron records it that way, so a sample ending exactly at a document's last token points
    into that document, not at offset 0 of the next.
    """
    lengths = sequence_lengths[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if ends.size else 0
    num_samples = (total - ADD_EXTRA_TOKEN) // seq_length
    largest = max(document_index.shape[0], int(sequence_lengths.max()) if sequence_lengths.size else 0)
    dtype = np.int32 if largest <= np.iinfo(np.int32).max else np.int64
    index = np.zeros((max(num_samples, 0) + 1, 2), dtype=dtype)
    if num_samples <= 0:
        return index
    # One past the last token of each sample; its document is the first whose end reaches it.
    stops = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length + ADD_EXTRA_TOKEN
    positions = np.searchsorted(ends, stops, side="left")
    index[1:, 0] = positions
    index[1:, 1] = stops - (ends[positions] - lengths[positions]) - ADD_EXTRA_TOKEN
    return index


def build_shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total)."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(sequence_lengths: np.ndarray, documents: np.ndarray, num_samples: int | None,
                      seq_length: int, seed: int) -> GPTIndices:
    """The three indices of one split, as Megatron's GPTDataset builds them."""
    if seq_length < 1:
        raise EmberError(f"sequence length must be positive, got {seq_length}")
    tokens_per_epoch = int(np.sum(sequence_lengths[documents], dtype=np.int64))
    if tokens_per_epoch == 0:
        # Megatron would loop forever looking for enough epochs.
        raise EmberError("the documents of this split hold no tokens: no samples to cut; add data or "
                         "change --split")
    num_epochs = epochs_needed(tokens_per_epoch, num_samples, seq_length)
    separate = num_samples is not None and separate_last_epoch(tokens_per_epoch, num_epochs, num_samples,
                                                               seq_length)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length)
    total = sample_index.shape[0] - 1
    if separate:
        samples_before_last = ((num_epochs - 1) * tokens_per_epoch - ADD_EXTRA_TOKEN) // seq_length
        shuffle_index = build_shuffle_index(samples_before_last, total, rng)
    else:
        shuffle_index = build_shuffle_index(total, total, rng)
    return GPTIndices(document_index, sample_index, shuffle_index)


def lengths_fingerprint(indexed: IndexedDataset) -> str:
    """A digest of the sequence lengths: the only part of a dataset the indices depend on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(indexed.sequence_lengths).view(np.uint8))
    return f"{len(indexed)}:{indexed.num_tokens}:{digest.hexdigest()}"


class GPTDataset:
    """The samples of one split of one indexed dataset: `dataset[i] == {"tokens": int64[seq_length + 1]}`.

    `document_range` is the split's [begin, end) range of sequence ids; `num_samples=None` builds
    one epoch. With a `cache` (an `index_cache.IndexCache`) the indices are loaded from or saved to
    disk under a name derived from everything they depend on.
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], num_samples: int | None,
                 seq_length: int, seed: int, split_name: str = "train", *, cache=None,
                 fingerprint: str | None = None):
        self.indexed = indexed
        self.path = indexed.prefix
        self.document_range = (int(document_range[0]), int(document_range[1]))
        self.num_samples = num_samples
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.split_name = split_name
        self.description = {
            "kind": "GPTDataset",
            "format": 1,
            "path": os.path.abspath(indexed.prefix),
            "sequence_lengths": fingerprint or lengths_fingerprint(indexed),
            "document_range": list(self.document_range),
            "num_samples": num_samples,
            "seq_length": self.seq_length,
            "seed": self.seed,
            "add_extra_token": ADD_EXTRA_TOKEN,
            "split": split_name,
        }
        if cache is None:
            arrays = self._build()
        else:
            arrays = cache.get_or_build(f"GPTDataset-{split_name}", self.description, self._build,
                                        validate=self._validate)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _build(self) -> dict[str, np.ndarray]:
        documents = np.arange(*self.document_range, dtype=np.int32)
        indices = build_gpt_indices(self.indexed.sequence_lengths, documents, self.num_samples,
                                    self.seq_length, self.seed)
        return indices.as_dict()

    def _validate(self, arrays: dict[str, np.ndarray]) -> bool:
        """Cheap structural checks that catch a cache written for other data or damaged on disk."""
        document_index, sample_index, shuffle_index = (
            arrays["document_index"], arrays["sample_index"], arrays["shuffle_index"])
        if document_index.ndim != 1 or sample_index.ndim != 2 or sample_index.shape[1] != 2:
            return False
        samples = sample_index.shape[0] - 1
        if shuffle_index.shape != (samples,) or (self.num_samples is not None and samples < self.num_samples):
            return False
        if samples == 0:
            return True
        begin, end = self.document_range
        return (int(document_index.min()) >= begin and int(document_index.max()) < end
                and int(shuffle_index.max()) < samples
                and bool(np.all(np.diff(sample_index[:, 0]) >= 0))
                and int(sample_index[-1, 0]) < document_index.shape[0])

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def sample_tokens(self, index: int) -> np.ndarray:
        """The `seq_length + 1` token ids of sample `index` (after shuffling), as int64."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        position = int(self.shuffle_index[index])
        first, first_offset = (int(v) for v in self.sample_index[position])
        last, last_offset = (int(v) for v in self.sample_index[position + 1])
        parts = []
        for i in range(first, last + 1):
            offset = first_offset if i == first else 0
            length = last_offset + ADD_EXTRA_TOKEN - offset if i == last else None
            parts.append(self.indexed.get(int(self.document_index[i]), offset, length))
        return np.concatenate(parts, dtype=np.int64) if len(parts) > 1 else parts[0].astype(np.int64)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"tokens": self.sample_tokens(index)}


def samples_digest(dataset, count: int) -> str:
    """sha256 over the first `count` samples' tokens as int64 little-endian."""
    digest = hashlib.sha256()
    for index in range(count):
        digest.update(np.ascontiguousarray(dataset[index]["tokens"], dtype="<i8").tobytes())
    return digest.hexdigest()

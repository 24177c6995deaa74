"""Fine-tuning samples from instruction data: prompt tokens carry no loss.

On disk (ModelLink's naming, written by `ember preprocess --handler-name ...InstructionHandler`),
one document per example:

    PREFIX_packed_input_ids_document.bin/.idx   token ids
    PREFIX_packed_labels_document.bin/.idx      int32, same lengths: the token id where the model
                                                learns it, -100 where it does not (prompt, system)

A sample has the same shape as a pretraining sample plus explicit targets:

    tokens     int64[seq_length + 1]   the model reads tokens[:-1]
    labels     int64[seq_length]       labels[t] is the target after reading tokens[: t + 1]
    loss_mask  float32[seq_length]     1 where labels[t] is trained, else 0 (and labels[t] = 0)

`pack=True` fills each sample with whole examples in shuffled order until the next one does not
fit (next-fit), then pads (MindSpeed's packed fine-tuning). Each example is isolated: packed samples
also carry

    document_ids  int64[seq_length]   example index within the sample (the padding one more)
    position_ids  int64[seq_length]   positions counting from 0 at every example's start

so that attention stays inside each example (ember.models.documents) and every example sees the
positions and the context it would see alone; the first token of an example is never a target.
`pack=False` puts one example per sample, padded after it (PAI-Megatron-Patch's fine-tuning): causal
attention alone keeps it apart from the padding. Every epoch reshuffles the examples with
`numpy.random.RandomState(seed)`.

An example longer than a sample (`seq_length + 1` tokens) is cut to a window of it: its start
when that keeps a target; otherwise (the prompt alone fills the sample) the prompt is cut from
its start, so that the window ends where the example ends, or gives the prompt's end at most half
the sample when the response is longer than that. A run therefore never trains on a sample whose
targets were all cut away. Building a split counts the examples cut so and those with no target
at all, reports them in one line, and refuses a split with no target anywhere.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ember.data.indexed import IndexedDataset, dataset_exists
from ember.errors import EmberError

INPUT_IDS_SUFFIX = "_packed_input_ids_document"
LABELS_SUFFIX = "_packed_labels_document"
IGNORE_INDEX = -100
# examples scanned for their targets at a time: bounds the memory of that one pass over the labels
SCAN_TOKENS = 1 << 23

logger = logging.getLogger(__name__)


def is_finetune_prefix(prefix: str) -> bool:
    return dataset_exists(prefix + INPUT_IDS_SUFFIX) and dataset_exists(prefix + LABELS_SUFFIX)


class FinetuneSource:
    """The input-id and label datasets of one prefix, checked to describe the same examples."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        if not is_finetune_prefix(prefix):
            raise EmberError(f"fine-tuning dataset {prefix}: expected {prefix}{INPUT_IDS_SUFFIX}.bin/.idx "
                             f"and {prefix}{LABELS_SUFFIX}.bin/.idx")
        self.input_ids = IndexedDataset(prefix + INPUT_IDS_SUFFIX)
        self.labels = IndexedDataset(prefix + LABELS_SUFFIX)
        if not np.array_equal(self.input_ids.sequence_lengths, self.labels.sequence_lengths):
            raise EmberError(f"fine-tuning dataset {prefix}: input ids and labels have different "
                             f"example lengths; re-run `ember preprocess`")
        self.lengths = self.input_ids.sequence_lengths

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def first_targets(self, begin: int, end: int) -> np.ndarray:
        """Per example in [begin, end): the offset of its first trained label after its first token
        (the first token is never a target), or -1 when it has none. One vectorised pass over the
        labels, a bounded slice at a time."""
        lengths = self.lengths[begin:end].astype(np.int64)
        result = np.full(lengths.size, -1, dtype=np.int64)
        if lengths.size == 0:
            return result
        # The index check makes the examples contiguous in the .bin, in order.
        token_starts = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=token_starts[1:])
        base = int(self.labels.sequence_pointers[begin]) // self.labels.dtype.itemsize
        first = 0
        while first < lengths.size:
            last = int(np.searchsorted(token_starts, token_starts[first] + SCAN_TOKENS, side="right")) - 1
            last = min(max(last, first + 1), lengths.size)
            lo, hi = int(token_starts[first]), int(token_starts[last])
            trained = np.asarray(self.labels._data[base + lo:base + hi]) != IGNORE_INDEX
            starts = token_starts[first:last] - lo
            nonempty = lengths[first:last] > 0
            trained[starts[nonempty]] = False
            positions = np.flatnonzero(trained)
            at = np.searchsorted(positions, starts)
            found = at < positions.size
            found[found] = positions[at[found]] < starts[found] + lengths[first:last][found]
            result[first:last][found] = positions[at[found]] - starts[found]
            first = last
        return result


def window_starts(lengths: np.ndarray, first_targets: np.ndarray, capacity: int) -> np.ndarray:
    """Where each example's window of at most `capacity` tokens starts (see the module docstring)."""
    lengths = lengths.astype(np.int64)
    cut = (lengths > capacity) & (first_targets >= capacity)
    keep_end = lengths - capacity
    half_prompt = first_targets - capacity // 2
    return np.where(cut, np.maximum(0, np.minimum(keep_end, half_prompt)), 0)


def pack_next_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Start positions of the bins when examples of `lengths`, in order, fill bins of `capacity`.

    An example that does not fit in the current bin opens a new one; one longer than a bin gets a
    bin to itself (and is cut). Returns starts with a final entry equal to len(lengths).
    """
    starts = [0]
    used = 0
    for i, length in enumerate(np.minimum(lengths, capacity).tolist()):
        if used + length > capacity:
            starts.append(i)
            used = 0
        used += length
    if lengths.size:
        starts.append(int(lengths.size))
    else:
        starts = [0]
    return np.asarray(starts, dtype=np.int64)


class FinetuneDataset:
    """Samples of one split of a fine-tuning prefix; see the module docstring for their shape.

    `num_epochs` fixes the number of epochs; otherwise as many are built as `num_samples` needs
    (one when None). `len()` counts the samples of all built epochs.
    """

    def __init__(self, prefix: str, seq_length: int, seed: int, *, document_range: tuple[int, int] | None = None,
                 num_samples: int | None = None, num_epochs: int | None = None, pack: bool = True,
                 pad_id: int = 0, split_name: str = "train", indexed: FinetuneSource | None = None):
        self.source = indexed if indexed is not None else FinetuneSource(prefix)
        self.path = prefix
        self.seq_length = int(seq_length)
        self.pack = pack
        self.pad_id = int(pad_id)
        begin, end = document_range if document_range is not None else (0, len(self.source))
        examples = np.arange(begin, end, dtype=np.int64)
        if examples.size == 0:
            raise EmberError(f"the {split_name} split of {prefix} holds no examples")
        self.window_start = np.zeros(len(self.source), dtype=np.int64)
        self._check_targets(begin, end, split_name)
        orders, starts, per_epoch = [], [], []
        rng = np.random.RandomState(seed)
        total = offset = 0
        while True:
            order = rng.permutation(examples)
            if pack:
                bins = pack_next_fit(self.source.lengths[order], self.seq_length + 1)
            else:
                bins = np.arange(order.size + 1, dtype=np.int64)
            orders.append(order)
            starts.append(bins[:-1] + offset)
            offset += order.size
            per_epoch.append(bins.size - 1)
            total += bins.size - 1
            epochs = len(per_epoch)
            if num_epochs is not None:
                if epochs >= num_epochs:
                    break
            elif num_samples is None or total >= num_samples:
                break
        self.order = np.concatenate(orders)
        self.sample_starts = np.concatenate(starts + [np.asarray([offset], dtype=np.int64)])
        self.samples_per_epoch = per_epoch
        self.description = {
            "kind": "FinetuneDataset", "format": 1, "path": os.path.abspath(prefix),
            "examples": int(len(self.source)), "document_range": [int(begin), int(end)],
            "num_samples": num_samples, "num_epochs": num_epochs, "seq_length": self.seq_length,
            "seed": int(seed), "pack": pack, "pad_id": self.pad_id, "split": split_name,
        }

    def _check_targets(self, begin: int, end: int, split_name: str) -> None:
        """Choose every example's window, report the examples cut or without targets, and refuse a
        split that has nothing to train on (every loss would be 0 and every gradient empty)."""
        capacity = self.seq_length + 1
        lengths = self.source.lengths[begin:end]
        first = self.source.first_targets(begin, end)
        self.window_start[begin:end] = window_starts(lengths, first, capacity)
        count = end - begin
        no_target = int((first < 0).sum())
        prompt_cut = int((self.window_start[begin:end] > 0).sum())
        self.target_report = {"examples": count, "prompt_cut": prompt_cut, "no_target": no_target}
        where = f"the {split_name} split of {self.path}"
        if no_target == count:
            raise EmberError(f"{where}: none of its {count} examples has a token to train on (every label "
                             f"is -100); re-run `ember preprocess` with an instruction handler, or check "
                             f"the labels")
        if prompt_cut or no_target:
            parts = []
            if prompt_cut:
                parts.append(f"{prompt_cut} of {count} examples have a prompt longer than --seq-length "
                             f"{self.seq_length} allows: their prompts were cut from the start to keep "
                             f"their responses")
            if no_target:
                parts.append(f"{no_target} of {count} examples have no token to train on")
            logger.warning("%s: %s", where, "; ".join(parts))

    def __len__(self) -> int:
        return int(self.sample_starts.shape[0]) - 1

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        capacity = self.seq_length + 1
        tokens = np.full(capacity, self.pad_id, dtype=np.int64)
        # Labels aligned with tokens (HF style); shifted into targets at the end.
        aligned = np.full(capacity, IGNORE_INDEX, dtype=np.int64)
        position = 0
        documents = np.zeros(capacity, dtype=np.int64)
        examples = self.order[self.sample_starts[index]:self.sample_starts[index + 1]].tolist()
        for number, example in enumerate(examples):
            start = int(self.window_start[example])
            length = min(int(self.source.lengths[example]) - start, capacity - position)
            tokens[position:position + length] = self.source.input_ids.get(example, start, length)
            aligned[position:position + length] = self.source.labels.get(example, start, length)
            # The first token of an example follows another example: not something to learn.
            aligned[position] = IGNORE_INDEX
            documents[position:position + length] = number
            position += length
        documents[position:] = len(examples)  # the padding: a document of its own
        targets = aligned[1:]
        trained = targets != IGNORE_INDEX
        sample = {"tokens": tokens, "labels": np.where(trained, targets, 0), "loss_mask": trained.astype(np.float32)}
        if self.pack:
            documents = documents[:-1]  # the model reads tokens[:-1]
            starts = np.flatnonzero(np.diff(documents, prepend=-1))
            sample["document_ids"] = documents
            sample["position_ids"] = np.arange(documents.size) - np.repeat(starts, np.diff(np.append(starts, documents.size)))
        return sample

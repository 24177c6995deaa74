"""Distributed, resumable batches: each data-parallel rank reads its share of every global batch.

The order is Megatron's `MegatronPretrainingSampler`: the run consumes dataset samples 0, 1, 2, ...
in steps of `micro_batch_size * dp_size`; in each step rank r takes the r-th block of
`micro_batch_size`. A global batch is `global_batch_size / (micro_batch_size * dp_size)` such steps,
so global batch k is samples [k * global_batch_size, (k + 1) * global_batch_size) whatever the
layout, and the position (`consumed_samples`) means the same on any number of ranks.

Past the end of the dataset the order wraps around (fine-tuning epochs cycle; pretraining
datasets are built with enough samples for the run).

A background thread reads and collates the next `prefetch` micro-batches, so the training step
finds its batch ready; batches are CPU tensors (pinned with `pin_memory=True`).

Given the model's `vocab_size`, every micro-batch's token ids and targets are checked to lie in
[0, vocab_size): a max and a min per micro-batch, on the reader thread, so the step never meets
an id its embedding does not have (a raw IndexError deep inside the model). Checking per batch
costs O(batch) where a scan of the whole `.bin` at start-up would cost O(dataset) on every run.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ember.data.documents import PackedDocuments, add_packed_documents
from ember.errors import EmberError


def collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Samples -> `input_ids`/`labels` LongTensor[b, L] and `loss_mask` FloatTensor[b, L].

    A sample has `tokens` (L + 1 ids) and optionally `labels`/`loss_mask` for its L predictions;
    without them the labels are tokens[1:] and every prediction counts. `document_ids` and
    `position_ids` (L each, packed fine-tuning examples) are stacked as they are.
    """
    tokens = np.stack([s["tokens"] for s in samples]).astype(np.int64, copy=False)
    batch = {"input_ids": torch.from_numpy(np.ascontiguousarray(tokens[:, :-1]))}
    if "labels" in samples[0]:
        batch["labels"] = torch.from_numpy(np.stack([s["labels"] for s in samples]).astype(np.int64, copy=False))
    else:
        batch["labels"] = torch.from_numpy(np.ascontiguousarray(tokens[:, 1:]))
    if "loss_mask" in samples[0]:
        mask = np.stack([s["loss_mask"] for s in samples]).astype(np.float32, copy=False)
        batch["loss_mask"] = torch.from_numpy(mask)
    else:
        batch["loss_mask"] = torch.ones(batch["labels"].shape, dtype=torch.float32)
    for name in ("document_ids", "position_ids"):  # packed fine-tuning examples (finetune_dataset)
        if name in samples[0]:
            batch[name] = torch.from_numpy(np.stack([s[name] for s in samples]).astype(np.int64, copy=False))
    return batch


def dataset_of_sample(dataset, index: int) -> str:
    """The path of the dataset that sample `index` comes from (through a blend), for error messages."""
    while hasattr(dataset, "dataset_index") and hasattr(dataset, "datasets"):
        index, dataset = (int(dataset.dataset_sample_index[index]),
                          dataset.datasets[int(dataset.dataset_index[index])])
    return str(getattr(dataset, "path", type(dataset).__name__))


def check_token_ids(batch: dict[str, torch.Tensor], vocab_size: int, dataset, indices: list[int]) -> None:
    """Raise a one-line error naming the dataset and the id when a token or target is outside the
    model's vocabulary [0, vocab_size)."""
    for name in ("input_ids", "labels"):
        ids = batch[name]
        if int(ids.max()) < vocab_size and int(ids.min()) >= 0:
            continue
        outside = (ids >= vocab_size) | (ids < 0)
        row = int(outside.any(dim=1).nonzero()[0])
        value = int(ids[row][outside[row]][0])
        raise EmberError(f"{dataset_of_sample(dataset, indices[row])}: sample {indices[row]} holds token id {value}, "
                         f"outside the model's vocabulary of {vocab_size}; the data was tokenized with another "
                         f"tokenizer than the model's (re-run `ember preprocess` with the model's tokenizer, "
                         f"or use a model whose vocabulary covers it)")


class DataLoader:
    """Micro-batches for one data-parallel rank, in Megatron's order, resumable from `consumed_samples`.

    Iterating yields dicts of `input_ids`, `labels` (LongTensor[micro_batch_size, L]) and
    `loss_mask` (FloatTensor[micro_batch_size, L]) without end, plus `position_ids` / `document_ids`
    (LongTensor[micro_batch_size, L]) for packed documents (`packing`, or packed fine-tuning samples). `state_dict()` is the global
    position (rank-independent); `load_state_dict()` continues from it, on any data-parallel size
    whose step divides it (any size at a global-batch boundary).
    """

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, *, consumed_samples: int = 0, prefetch: int = 2, num_workers: int = 0,
                 pin_memory: bool = False, vocab_size: int | None = None, packing: PackedDocuments | None = None):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise EmberError(f"data loader: bad micro batch {micro_batch_size} / data-parallel rank "
                             f"{dp_rank} of {dp_size}")
        step = micro_batch_size * dp_size
        if global_batch_size % step:
            raise EmberError(f"--global-batch-size {global_batch_size} is not a multiple of "
                             f"--micro-batch-size {micro_batch_size} x data-parallel size {dp_size}")
        if len(dataset) == 0:
            raise EmberError("data loader: the dataset has no samples")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.prefetch = max(1, int(prefetch))
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.vocab_size = vocab_size  # when given, every micro-batch's ids are checked against it
        # Megatron's --reset-position-ids / --reset-attention-mask / --eod-mask-loss (data/documents.py)
        self.packing = packing if packing is not None and packing.active else None
        if self.packing is not None:
            self.packing.check()
        self._consumed = 0  # samples the whole run has consumed: where the next micro-batch step starts
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 0 else None
        self._seek(consumed_samples)

    @property
    def step_samples(self) -> int:
        """Samples the run consumes per micro-batch step (all ranks together)."""
        return self.micro_batch_size * self.dp_size

    @property
    def consumed_samples(self) -> int:
        return self._consumed

    def micro_batch_indices(self, consumed_samples: int) -> list[int]:
        """Dataset indices of this rank's micro-batch in the step starting at `consumed_samples`."""
        start = consumed_samples + self.dp_rank * self.micro_batch_size
        size = len(self.dataset)
        return [(start + i) % size for i in range(self.micro_batch_size)]

    def read_micro_batch(self, consumed_samples: int) -> dict[str, torch.Tensor]:
        indices = self.micro_batch_indices(consumed_samples)
        if self._pool is not None:
            samples = list(self._pool.map(self.dataset.__getitem__, indices))
        else:
            samples = [self.dataset[i] for i in indices]
        batch = collate(samples)
        if self.packing is not None:
            batch = add_packed_documents(batch, self.packing)
        if self.vocab_size is not None:
            check_token_ids(batch, self.vocab_size, self.dataset, indices)
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    # -- iteration with a background reader

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._thread is None:
            self._start()
        item = self._queue.get()  # type: ignore[union-attr]
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        position, batch = item
        self._consumed = position + self.step_samples
        return batch

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        # The reader holds the loader only weakly: a loader dropped without close() is collected,
        # and its __del__ stops the thread.
        self._thread = threading.Thread(target=_read_ahead,
                                        args=(weakref.ref(self), self._consumed, self._stop, self._queue),
                                        name="ember-data-loader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background reader; the next batch starts a new one at the current position."""
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __del__(self):
        try:
            self.close()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
        except Exception:  # interpreter shutdown: nothing left to clean
            pass

    # -- position

    def state_dict(self) -> dict[str, int]:
        return {"consumed_samples": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._seek(int(state["consumed_samples"]))

    def _seek(self, consumed_samples: int) -> None:
        if consumed_samples < 0 or consumed_samples % self.step_samples:
            raise EmberError(
                f"cannot resume the data loader at sample {consumed_samples}: not a multiple of "
                f"micro batch {self.micro_batch_size} x data-parallel size {self.dp_size}; resume from a "
                f"checkpoint saved at the end of an iteration")
        self.close()
        self._consumed = consumed_samples


def _read_ahead(loader_ref: weakref.ref, position: int, stop: threading.Event, out: queue.Queue) -> None:
    """Reader thread: put (position, micro-batch) items into `out` until stopped."""
    while not stop.is_set():
        loader = loader_ref()
        if loader is None:
            return
        step = loader.step_samples
        try:
            item = (position, loader.read_micro_batch(position))
        except BaseException as err:  # handed to the consumer, raised there
            item = err
        del loader
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return
        position += step

"""The distributed loader: rank slices add up to the global order; positions resume exactly."""

import threading

import numpy as np
import pytest
import torch

from ember.data.gpt_dataset import GPTDataset
from ember.data.indexed import IndexedDataset, IndexedDatasetWriter
from ember.data.loader import DataLoader, collate
from ember.errors import EmberError

SEQ = 5


class NumberedSamples:
    """Sample i is the tokens [i, i, ..., i]: every batch says which samples it holds."""

    def __init__(self, size, fail_at=None):
        self.size = size
        self.fail_at = fail_at
        self.reads = []

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        if index == self.fail_at:
            raise ValueError(f"cannot read sample {index}")
        self.reads.append(index)
        return {"tokens": np.full(SEQ + 1, index, dtype=np.int64)}


def sample_ids(batch):
    return batch["input_ids"][:, 0].tolist()


def read_global_batches(dataset, gb, mb, dp, count, consumed=0):
    """Run `dp` loaders side by side; return each global batch as the concatenation, per micro
    step, of what every rank read in that step."""
    loaders = [DataLoader(dataset, gb, mb, r, dp, consumed_samples=consumed) for r in range(dp)]
    steps = gb // (mb * dp)
    batches = []
    for _ in range(count):
        batch = []
        for _ in range(steps):
            for loader in loaders:
                batch += sample_ids(next(loader))
        batches.append(batch)
    states = [loader.state_dict() for loader in loaders]
    for loader in loaders:
        loader.close()
    return batches, states


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_rank_slices_make_the_global_batches(dp):
    gb, mb, count = 16, 2, 5
    batches, states = read_global_batches(NumberedSamples(1000), gb, mb, dp, count)
    assert [sample for batch in batches for sample in batch] == list(range(gb * count))
    assert all(state == {"consumed_samples": gb * count} for state in states)


def test_megatron_rank_order_within_a_step():
    # Megatron's sampler: each step takes micro_batch * dp samples; rank r reads the r-th block.
    loaders = [DataLoader(NumberedSamples(100), 12, 3, r, 2) for r in range(2)]
    assert [sample_ids(next(loader)) for loader in loaders] == [[0, 1, 2], [3, 4, 5]]
    assert [sample_ids(next(loader)) for loader in loaders] == [[6, 7, 8], [9, 10, 11]]


@pytest.mark.parametrize("dp_before,dp_after", [(2, 2), (2, 1), (2, 4), (4, 1), (1, 4)])
def test_resume_continues_with_the_next_global_batch(dp_before, dp_after):
    gb, mb = 16, 2
    uninterrupted, _ = read_global_batches(NumberedSamples(1000), gb, mb, 1, 7)
    _, states = read_global_batches(NumberedSamples(1000), gb, mb, dp_before, 3)
    assert len({s["consumed_samples"] for s in states}) == 1
    resumed = [DataLoader(NumberedSamples(1000), gb, mb, r, dp_after) for r in range(dp_after)]
    for loader in resumed:
        loader.load_state_dict(states[0])
    steps = gb // (mb * dp_after)
    after = []
    for _ in range(4 * steps):
        for loader in resumed:
            after += sample_ids(next(loader))
    assert after == [s for batch in uninterrupted[3:] for s in batch]


def test_resume_mid_global_batch_on_the_same_layout():
    gb, mb, dp = 16, 2, 2  # 4 micro steps per global batch
    first = DataLoader(NumberedSamples(1000), gb, mb, 1, dp)
    for _ in range(6):  # one global batch and a half
        next(first)
    state = first.state_dict()
    expected = [sample_ids(next(first)) for _ in range(3)]
    again = DataLoader(NumberedSamples(1000), gb, mb, 1, dp)
    again.load_state_dict(state)
    assert [sample_ids(next(again)) for _ in range(3)] == expected
    with pytest.raises(EmberError, match="resume"):
        DataLoader(NumberedSamples(1000), gb, mb, 0, 8).load_state_dict(state)


def test_prefetch_does_not_count_as_consumed():
    dataset = NumberedSamples(1000)
    loader = DataLoader(dataset, 4, 2, 0, 1, prefetch=3)
    next(loader)
    deadline = threading.Event()
    for _ in range(100):  # let the reader run ahead
        if len(dataset.reads) >= 8:
            break
        deadline.wait(0.05)
    assert len(dataset.reads) > 2  # read ahead of the consumer ...
    assert loader.state_dict() == {"consumed_samples": 2}  # ... but only yielded batches count
    loader.close()


def test_wraps_around_the_dataset():
    loader = DataLoader(NumberedSamples(10), 4, 4, 0, 1)
    assert [sample_ids(next(loader)) for _ in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert loader.state_dict() == {"consumed_samples": 12}


def test_read_errors_reach_the_consumer():
    loader = DataLoader(NumberedSamples(100, fail_at=5), 2, 2, 0, 1)
    next(loader), next(loader)
    with pytest.raises(ValueError, match="sample 5"):
        next(loader)


def test_bad_layouts_are_clear_errors():
    with pytest.raises(EmberError, match="multiple"):
        DataLoader(NumberedSamples(10), 6, 2, 0, 2)
    with pytest.raises(EmberError, match="rank"):
        DataLoader(NumberedSamples(10), 4, 2, 2, 2)
    with pytest.raises(EmberError, match="resume"):
        DataLoader(NumberedSamples(10), 4, 2, 0, 1, consumed_samples=3)


def test_collate_pretraining_and_finetuning_samples():
    tokens = [np.arange(6) + 10 * i for i in range(2)]
    batch = collate([{"tokens": t} for t in tokens])
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["input_ids"], torch.tensor(np.stack([t[:-1] for t in tokens])))
    assert torch.equal(batch["labels"], torch.tensor(np.stack([t[1:] for t in tokens])))
    assert torch.equal(batch["loss_mask"], torch.ones(2, 5))
    samples = [{"tokens": t, "labels": np.arange(5) * 0 + 7, "loss_mask": np.array([0, 1, 1, 0, 1], np.float32)}
               for t in tokens]
    batch = collate(samples)
    assert batch["labels"].tolist() == [[7] * 5] * 2
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 1]] * 2


def test_loader_over_gpt_dataset_reads_its_samples(tmp_path):
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(tmp_path / "d", np.uint16)
    for _ in range(200):
        writer.add_document(rng.integers(0, 5000, rng.integers(1, 40)))
    writer.finalize()
    dataset = GPTDataset(IndexedDataset(tmp_path / "d"), (0, 200), 64, 16, 1)
    for workers in (0, 3):
        loader = DataLoader(dataset, 8, 4, 1, 2, num_workers=workers)
        for step in range(3):
            batch = next(loader)
            first = step * 8 + 4  # rank 1's block of the step
            expected = np.stack([dataset[first + i]["tokens"] for i in range(4)])
            assert torch.equal(batch["input_ids"], torch.from_numpy(expected[:, :-1]))
            assert torch.equal(batch["labels"], torch.from_numpy(expected[:, 1:]))
        loader.close()


def test_dropped_loader_stops_its_reader():
    import gc

    loader = DataLoader(NumberedSamples(1000), 4, 2, 0, 1)
    next(loader)
    thread = loader._thread
    assert thread.is_alive()
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()

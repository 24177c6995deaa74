"""Fine-tuning samples: prompt tokens masked, packed or padded, epochs, and the loader on top."""

import numpy as np
import pytest

from ember.data.blending import build_datasets
from ember.data.finetune_dataset import (
    IGNORE_INDEX,
    INPUT_IDS_SUFFIX,
    LABELS_SUFFIX,
    FinetuneDataset,
    is_finetune_prefix,
)
from ember.data.indexed import IndexedDatasetWriter
from ember.data.loader import DataLoader
from ember.errors import EmberError

MARK = 10000  # every example starts with MARK + its number; no other token is that large
PAD = 3


def make_examples(count, seed=0, max_prompt=8, max_response=12):
    """(ids, labels) per example, labels -100 over the prompt, as the instruction handlers write."""
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(count):
        prompt = np.concatenate([[MARK + k], rng.integers(10, 1000, rng.integers(0, max_prompt))])
        response = rng.integers(10, 1000, rng.integers(1, max_response))
        ids = np.concatenate([prompt, response])
        labels = np.concatenate([np.full(prompt.size, IGNORE_INDEX), response])
        examples.append((ids, labels))
    return examples


def write_finetune(prefix, examples, labels_override=None):
    ids_writer = IndexedDatasetWriter(f"{prefix}{INPUT_IDS_SUFFIX}", np.uint16)
    labels_writer = IndexedDatasetWriter(f"{prefix}{LABELS_SUFFIX}", np.int32)
    for ids, labels in examples:
        ids_writer.add_document(ids)
        labels_writer.add_document(labels if labels_override is None else labels_override(labels))
    ids_writer.finalize()
    labels_writer.finalize()
    return str(prefix)


def expected_targets(pieces, capacity):
    """What a sample holding these (ids, labels) examples must contain, position by position."""
    tokens = np.full(capacity, PAD)
    aligned = np.full(capacity, IGNORE_INDEX)
    at = 0
    for ids, labels in pieces:
        n = min(len(ids), capacity - at)
        tokens[at:at + n] = ids[:n]
        aligned[at:at + n] = labels[:n]
        aligned[at] = IGNORE_INDEX  # never learn an example's first token from what came before
        at += n
    trained = aligned[1:] != IGNORE_INDEX
    return tokens, np.where(trained, aligned[1:], 0), trained.astype(np.float32)


def examples_in(sample):
    return [int(t) - MARK for t in sample["tokens"] if t >= MARK]


@pytest.fixture
def source(tmp_path):
    examples = make_examples(60)
    return write_finetune(tmp_path / "sft", examples), examples


def test_detects_finetune_prefix(source, tmp_path):
    prefix, _ = source
    assert is_finetune_prefix(prefix) and not is_finetune_prefix(str(tmp_path / "other"))


@pytest.mark.parametrize("seq_length", [8, 31])
def test_padded_samples_hold_one_example_each(source, seq_length):
    prefix, examples = source
    dataset = FinetuneDataset(prefix, seq_length, seed=1, pack=False, pad_id=PAD)
    assert len(dataset) == len(examples)
    seen = []
    for i in range(len(dataset)):
        sample = dataset[i]
        (k,) = examples_in(sample)
        seen.append(k)
        tokens, labels, mask = expected_targets([examples[k]], seq_length + 1)
        np.testing.assert_array_equal(sample["tokens"], tokens)
        np.testing.assert_array_equal(sample["labels"], labels)
        np.testing.assert_array_equal(sample["loss_mask"], mask)
        assert sample["tokens"].dtype == np.int64 and sample["loss_mask"].dtype == np.float32
    assert sorted(seen) == list(range(len(examples))) and seen != sorted(seen)  # all, shuffled


def test_exactly_the_response_tokens_are_targets(source):
    prefix, examples = source
    prompt_length = [int(np.sum(labels == IGNORE_INDEX)) for _, labels in examples]
    dataset = FinetuneDataset(prefix, 40, seed=2, pack=True, pad_id=PAD)
    for i in range(len(dataset)):
        sample = dataset[i]
        starts = [p for p, t in enumerate(sample["tokens"]) if t >= MARK]
        trained = np.zeros(len(sample["tokens"]), dtype=bool)  # by token position
        for start in starts:
            k = int(sample["tokens"][start]) - MARK
            stop = min(start + len(examples[k][0]), len(trained))
            trained[start + prompt_length[k]:stop] = True
        # loss_mask[t] weighs the prediction of token t + 1.
        np.testing.assert_array_equal(sample["loss_mask"] == 1, trained[1:])
        np.testing.assert_array_equal(sample["labels"][trained[1:]], sample["tokens"][1:][trained[1:]])


@pytest.mark.parametrize("seq_length", [16, 47])
def test_packed_samples_are_next_fit_bins_of_whole_examples(source, seq_length):
    prefix, examples = source
    capacity = seq_length + 1
    dataset = FinetuneDataset(prefix, seq_length, seed=3, pack=True, pad_id=PAD)
    seen, previous_fill = [], None
    for i in range(len(dataset)):
        sample = dataset[i]
        ks = examples_in(sample)
        assert ks, "every bin holds at least one example"
        seen += ks
        tokens, labels, mask = expected_targets([examples[k] for k in ks], capacity)
        np.testing.assert_array_equal(sample["tokens"], tokens)
        np.testing.assert_array_equal(sample["labels"], labels)
        np.testing.assert_array_equal(sample["loss_mask"], mask)
        fill = sum(min(len(examples[k][0]), capacity) for k in ks)
        assert fill <= capacity
        if previous_fill is not None:  # the next example did not fit in the previous bin
            assert previous_fill + min(len(examples[ks[0]][0]), capacity) > capacity
        previous_fill = fill
    assert sorted(seen) == list(range(len(examples)))
    assert len(dataset) < len(examples)  # packing saved samples


def test_epochs_reshuffle_and_cover_requested_samples(source):
    prefix, examples = source
    one = FinetuneDataset(prefix, 8, seed=4, pack=False)
    more = FinetuneDataset(prefix, 8, seed=4, pack=False, num_samples=len(examples) + 1)
    assert len(more) == 2 * len(examples) and more.samples_per_epoch == [len(examples)] * 2
    first = [examples_in(more[i])[0] for i in range(len(examples))]
    second = [examples_in(more[len(examples) + i])[0] for i in range(len(examples))]
    assert first == [examples_in(one[i])[0] for i in range(len(examples))]
    assert sorted(second) == sorted(first) and second != first
    fixed = FinetuneDataset(prefix, 8, seed=4, pack=True, num_epochs=3)
    assert len(fixed.samples_per_epoch) == 3 and len(fixed) == sum(fixed.samples_per_epoch)
    other_seed = FinetuneDataset(prefix, 8, seed=5, pack=False)
    assert [examples_in(other_seed[i])[0] for i in range(len(examples))] != first


def test_build_datasets_splits_finetune_data(source):
    prefix, examples = source
    train, valid, test = build_datasets(prefix, "80,20,0", 24, 7, [100, 10, 0], pad_id=PAD)
    assert isinstance(train, FinetuneDataset) and isinstance(valid, FinetuneDataset) and test is None
    train_examples = {k for i in range(len(train)) for k in examples_in(train[i])}
    valid_examples = {k for i in range(len(valid)) for k in examples_in(valid[i])}
    assert train_examples == set(range(48)) and valid_examples == set(range(48, 60))
    assert len(train) >= 100 and len(valid) >= 10
    epochs, _, _ = build_datasets(prefix, "80,20,0", 24, 7, [1, 1, 0], finetune_epochs=2)
    assert len(epochs.samples_per_epoch) == 2


def test_mismatched_labels_are_rejected(tmp_path):
    prefix = write_finetune(tmp_path / "bad", make_examples(5), labels_override=lambda labels: labels[:-1])
    with pytest.raises(EmberError, match="different"):
        FinetuneDataset(prefix, 8, seed=0)


def test_pretraining_and_finetuning_data_do_not_mix(source, tmp_path):
    prefix, _ = source
    writer = IndexedDatasetWriter(tmp_path / "plain", np.uint16)
    writer.add_document([1, 2, 3])
    writer.finalize()
    with pytest.raises(EmberError, match="mixes"):
        build_datasets(f"{prefix} {tmp_path / 'plain'}", "1,0,0", 8, 0, [1, 0, 0])


def test_loader_passes_finetune_targets(source):
    prefix, _ = source
    dataset = FinetuneDataset(prefix, 16, seed=1, pack=True, pad_id=PAD)
    loader = DataLoader(dataset, 4, 2, 0, 1)
    batch = next(loader)
    loader.close()
    for row in range(2):
        sample = dataset[row]
        np.testing.assert_array_equal(batch["input_ids"][row].numpy(), sample["tokens"][:-1])
        np.testing.assert_array_equal(batch["labels"][row].numpy(), sample["labels"])
        np.testing.assert_array_equal(batch["loss_mask"][row].numpy(), sample["loss_mask"])

"""Blends, splits and sample counts against Megatron (megatron-core's builder and C++ helpers)."""


import numpy as np
import pytest

from ember.config.data_spec import normalize_weights, parse_data_path, parse_split
from ember.data import blending
from ember.data.blending import (
    blending_indices,
    build_datasets,
    exhaustive_blending_indices,
    split_document_ranges,
    split_matrix,
    train_valid_test_num_samples,
)
from ember.data.indexed import IndexedDatasetWriter
from ember.errors import EmberError
from megatron_reference import assert_same_samples, megatron_datasets

megatron_config = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_config")
megatron_helpers = pytest.importorskip("megatron.core.datasets.helpers")
megatron_utils = pytest.importorskip("megatron.core.datasets.utils")


def as_flag(prefixes, weights):
    """The --data-path string Megatron's blend tuple corresponds to."""
    if weights is None:
        return " ".join(prefixes)
    return " ".join(f"{w} {p}" for w, p in zip(weights, prefixes))


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    made = []
    for i, (count, max_length) in enumerate([(1100, 50), (1050, 20), (1200, 30)]):
        rng = np.random.default_rng(i)
        writer = IndexedDatasetWriter(root / f"d{i}", np.uint16)
        for _ in range(count):
            # Disjoint token ranges per dataset: a mix-up between datasets cannot go unnoticed.
            writer.add_document(rng.integers(1, 1000, rng.integers(1, max_length)) + 1000 * i)
        writer.finalize()
        made.append(str(root / f"d{i}"))
    return made


# -- parsing


def test_parse_data_path_forms():
    assert parse_data_path("0.3 A 0.7 B") == [(0.3, "A"), (0.7, "B")]
    assert parse_data_path(["0.3", "A", "0.7", "B"]) == [(0.3, "A"), (0.7, "B")]
    assert parse_data_path(["0.3 A", "0.7 B"]) == [(0.3, "A"), (0.7, "B")]
    assert parse_data_path("A B") == [(None, "A"), (None, "B")]
    assert parse_data_path("A") == [(None, "A")]
    assert parse_data_path("30 A 70 B") == [(30.0, "A"), (70.0, "B")]
    for bad in ("0.3 A B C", "0.5 A 0.5", "0 A 1 B"):
        with pytest.raises(EmberError):
            parse_data_path(bad)


def test_blend_weights_match_megatron():
    words = ["30", "A", "70", "B", "1e1", "C"]
    theirs = megatron_utils.normalize(megatron_utils.get_blend_from_list(words)[1])
    assert blending.blend_of(parse_data_path(words)) == (["A", "B", "C"], theirs)


@pytest.mark.parametrize("split", ["969,30,1", "99,1", "100,0,0", "0.8, 0.1, 0.1", "1/1/1", "7,0,3"])
def test_split_matches_megatron(split):
    theirs = megatron_config.convert_split_vector_to_split_matrix(megatron_config.parse_and_normalize_split(split))
    assert parse_split(split) == megatron_config.parse_and_normalize_split(split)
    assert split_matrix(parse_split(split)) == theirs
    for documents in (1, 50, 999, 12345):
        expected = [None if b is None else (int(round(b[0] * float(documents))), int(round(b[1] * float(documents))))
                    for b in theirs]
        assert split_document_ranges(documents, split) == expected


def test_bad_split_is_a_clear_error():
    with pytest.raises(EmberError, match="--split"):
        parse_split("0,0,0")


def test_sample_counts_follow_megatron_training_formula():
    # Megatron-LM training.py: train = iters * GB (or --train-samples, with iters = samples // GB);
    # valid = (iters // eval_interval + 1) * eval_iters * GB; test = eval_iters * GB.
    iters, gb, interval, eval_iters = 1000, 8, 300, 10
    expected = (iters * gb, (iters // interval + 1) * eval_iters * gb, eval_iters * gb)
    assert train_valid_test_num_samples(iters, global_batch_size=gb, eval_interval=interval,
                                        eval_iters=eval_iters) == expected
    from_samples = train_valid_test_num_samples(train_samples=iters * gb + 3, global_batch_size=gb,
                                                eval_interval=interval, eval_iters=eval_iters)
    assert from_samples == (iters * gb + 3,) + expected[1:]
    assert train_valid_test_num_samples(10, global_batch_size=4, eval_interval=5, eval_iters=0) == (40, 0, 0)
    with pytest.raises(EmberError):
        train_valid_test_num_samples(global_batch_size=4, eval_interval=5, eval_iters=1)


# -- blending indices


def megatron_blending(weights, size):
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    megatron_helpers.build_blending_indices(dataset_index, sample_index, np.asarray(weights, dtype=np.float64),
                                            len(weights), size, False)
    return dataset_index, sample_index


@pytest.mark.parametrize("weights", [
    [0.3, 0.7], [0.5, 0.5], [1 / 3, 1 / 3, 1 / 3], [0.1, 0.2, 0.3, 0.4], [1.0],
    "random2", "random5", "random17",
])
@pytest.mark.parametrize("size", [0, 1, 7, 20000])
def test_blending_indices_match_megatron(weights, size):
    if isinstance(weights, str):
        count = int(weights.removeprefix("random"))
        weights = np.random.default_rng(count).random(count)
    weights = normalize_weights(weights)
    ours = blending_indices(weights, size)
    theirs = megatron_blending(weights, size)
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(ours[1], theirs[1])
    assert ours[0].dtype == np.int16 and ours[1].dtype == np.int64


@pytest.mark.parametrize("sizes", [[5, 3], [1, 1, 1], [100, 7, 33, 1], [12]])
def test_exhaustive_blending_matches_megatron(sizes):
    total = sum(sizes)
    dataset_index = np.zeros(total, dtype=np.int16)
    sample_index = np.zeros(total, dtype=np.int64)
    megatron_helpers.build_exhaustive_blending_indices(dataset_index, sample_index,
                                                       np.asarray(sizes, dtype=np.int64), len(sizes))
    ours = exhaustive_blending_indices(sizes)
    np.testing.assert_array_equal(ours[0], dataset_index)
    np.testing.assert_array_equal(ours[1], sample_index)


# -- blended datasets end to end


@pytest.mark.parametrize("weights,split,seq_length,seed,sizes", [
    ([0.3, 0.7], "969,30,1", 16, 1234, [300, 40, 8]),
    ([30.0, 70.0], "90,5,5", 24, 7, [1500, 20, 10]),  # many epochs of the small dataset
    ([1.0, 2.0, 3.0], "80,15,5", 8, 3, [500, 50, 20]),
    (None, "90,5,5", 16, 7, [300, 20, 10]),  # weights from the datasets' sizes
    (None, "90,5,5", 12, 5, [100000, 9, 1]),  # capped at the sum of one epoch each
])
def test_blends_match_megatron(prefixes, tmp_path, weights, split, seq_length, seed, sizes):
    paths = prefixes[: 2 if weights is None or len(weights) == 2 else 3]
    reference = megatron_datasets((paths, weights), split, seq_length, seed, sizes)
    ours = build_datasets(as_flag(paths, weights), split, seq_length, seed, sizes, cache_dir=tmp_path)
    assert_same_samples(reference, ours)


def test_single_weighted_prefix_is_a_blend_of_one(prefixes, tmp_path):
    # Megatron builds "1.0 PREFIX" through the blend path (with the surplus), not as a plain dataset.
    reference = megatron_datasets(([prefixes[1]], [1.0]), "90,5,5", 16, 9, [700, 30, 10])
    ours = build_datasets(f"1.0 {prefixes[1]}", "90,5,5", 16, 9, [700, 30, 10], cache_dir=tmp_path)
    assert_same_samples(reference, ours)


def test_per_split_data_paths_match_megatron(prefixes, tmp_path):
    per_split = [(prefixes[:2], [1.0, 2.0]), ([prefixes[2]], None), (prefixes, None)]
    reference = megatron_datasets(None, None, 16, 3, [200, 60, 40], per_split=per_split)
    ours = build_datasets(None, None, 16, 3, [200, 60, 40], cache_dir=tmp_path,
                          train_data_path=as_flag(*per_split[0]), valid_data_path=as_flag(*per_split[1]),
                          test_data_path=as_flag(*per_split[2]))
    assert_same_samples(reference, ours)


def test_per_split_without_test_path(prefixes, tmp_path):
    reference = megatron_datasets(None, None, 16, 3, [50, 10, 10],
                                  per_split=[([prefixes[0]], None), ([prefixes[1]], None), None])
    ours = build_datasets(None, None, 16, 3, [50, 10, 10], cache_dir=tmp_path,
                          train_data_path=prefixes[0], valid_data_path=[prefixes[1]])
    assert_same_samples(reference, ours)


def test_blend_indices_are_cached(prefixes, tmp_path, monkeypatch):
    calls = []
    original = blending.blending_indices
    monkeypatch.setattr(blending, "blending_indices", lambda *a: calls.append(1) or original(*a))
    flag = as_flag(prefixes[:2], [0.4, 0.6])
    first = build_datasets(flag, "90,5,5", 16, 1, [200, 20, 10], cache_dir=tmp_path)
    assert len(calls) == 3
    second = build_datasets(flag, "90,5,5", 16, 1, [200, 20, 10], cache_dir=tmp_path)
    assert len(calls) == 3
    for i in range(len(first[0])):
        np.testing.assert_array_equal(first[0][i]["tokens"], second[0][i]["tokens"])


def test_input_errors_are_clear(prefixes, tmp_path):
    with pytest.raises(EmberError, match="does-not-exist"):
        build_datasets(f"{prefixes[0]} {tmp_path}/does-not-exist", "1,0,0", 8, 1, [1, 0, 0])
    with pytest.raises(EmberError, match="not both"):
        build_datasets(prefixes[0], None, 8, 1, [1, 1, 1], train_data_path=prefixes[1])
    with pytest.raises(EmberError, match="no training data"):
        build_datasets(None, None, 8, 1, [1, 1, 1])


def test_samples_command_digest_matches_megatron(prefixes, tmp_path, capsys):
    import hashlib

    from ember.cli import main

    flag = as_flag(prefixes[:2], [0.25, 0.75])
    # --train-iters 30 x --global-batch-size 4: 120 train samples, valid (30 // 10 + 1) * 2 * 4.
    assert main(["data", "samples", "--data-path", flag, "--seq-length", "16", "--seed", "21", "--split",
                 "90,5,5", "--train-iters", "30", "--global-batch-size", "4", "--eval-interval", "10",
                 "--eval-iters", "2", "--data-cache-path", str(tmp_path), "--show", "2"]) == 0
    output = capsys.readouterr().out
    train = megatron_datasets((prefixes[:2], [0.25, 0.75]), "90,5,5", 16, 21, [120, 32, 8])[0]
    digest = hashlib.sha256()
    for i in range(120):
        sample = train[i]
        tokens = np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()])
        digest.update(tokens.astype("<i8").tobytes())
    assert f"sha256(train[0:120]) {digest.hexdigest()}" in output
    assert "train sample 1" in output and "valid  requested 32" in output

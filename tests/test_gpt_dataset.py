"""GPT samples against Megatron's own GPTDataset (megatron-core): same tokens, same order.

Also the on-disk index caches: reuse, stale and damaged entries, and who builds them on
several ranks.
"""

import threading

import numpy as np
import pytest

from ember.data import gpt_dataset
from ember.data.blending import build_datasets, split_document_ranges
from ember.data.gpt_dataset import GPTDataset, build_sample_index, epochs_needed, separate_last_epoch
from ember.data.index_cache import IndexCache, build_on_one_rank_first
from ember.data.indexed import IndexedDataset, IndexedDatasetWriter
from ember.errors import EmberError
from megatron_reference import assert_same_samples, megatron_datasets, megatron_tokens

pytest.importorskip("megatron.core.datasets.gpt_dataset")
megatron_helpers = pytest.importorskip("megatron.core.datasets.helpers")


def write_dataset(prefix, count, seed, max_length=60, dtype=np.uint16, empty_every=0):
    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, dtype)
    for i in range(count):
        length = 0 if empty_every and i % empty_every == 3 else int(rng.integers(1, max_length))
        writer.add_document(rng.integers(1, 30000, length))
    writer.finalize()
    return str(prefix)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    return {
        "mixed": write_dataset(root / "mixed", 1200, 0, empty_every=97),
        "wide": write_dataset(root / "wide", 300, 1, max_length=200, dtype=np.int32),
        # Every document 8 tokens: samples of 8 or 16 end exactly on document boundaries.
        "even": _even_dataset(root / "even"),
        "root": root,
    }


def _even_dataset(prefix):
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for i in range(1100):
        writer.add_document(np.arange(8) + 8 * i % 60000)
    writer.finalize()
    return str(prefix)


@pytest.mark.parametrize("name,split,seq_length,seed,sizes", [
    ("mixed", "969,30,1", 16, 1234, [100, 20, 5]),
    ("mixed", "969,30,1", 16, 1234, [3000, 200, 5]),  # several epochs
    ("mixed", "80,20", 32, 5, [1000, 3, 5]),
    ("mixed", "1,1,1", 7, 99, [0, 1, 2]),
    ("wide", "90,10,0", 64, 2024, [500, 40, 0]),
    ("even", "969,30,1", 8, 3, [2000, 30, 3]),
    ("even", "969,30,1", 16, 4, [700, 30, 3]),
])
def test_samples_match_megatron(data, tmp_path, name, split, seq_length, seed, sizes):
    reference = megatron_datasets(([data[name]], None), split, seq_length, seed, sizes)
    ours = build_datasets(data[name], split, seq_length, seed, sizes, cache_dir=tmp_path)
    assert_same_samples(reference, ours)


def test_separate_last_epoch_both_ways(data, tmp_path):
    """Sample counts that put the last epoch in and out of the global shuffle, as Megatron does."""
    indexed = IndexedDataset(data["mixed"])
    train_range = split_document_ranges(len(indexed), "969,30,1")[0]
    tokens = int(indexed.sequence_lengths[train_range[0]:train_range[1]].sum())
    seq_length = 32
    per_epoch = (tokens - 1) // seq_length
    seen = set()
    for wanted in (per_epoch + 5, int(per_epoch * 1.95), int(per_epoch * 2.3), per_epoch * 3):
        epochs = epochs_needed(tokens, wanted, seq_length)
        seen.add(separate_last_epoch(tokens, epochs, wanted, seq_length))
        sizes = [wanted, 10, 2]
        reference = megatron_datasets(([data["mixed"]], None), "969,30,1", seq_length, 11, sizes)
        ours = build_datasets(data["mixed"], "969,30,1", seq_length, 11, sizes, cache_dir=tmp_path)
        assert_same_samples(reference[:1], ours[:1])
    assert seen == {True, False}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_index_matches_megatron_helper(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 50, 400).astype(np.int32)
    document_index = rng.permutation(np.tile(np.arange(400, dtype=np.int32), 3))
    seq_length = int(rng.integers(2, 40))
    tokens_per_epoch = int(lengths.sum())
    theirs = megatron_helpers.build_sample_idx(lengths, document_index, seq_length, 3, tokens_per_epoch)
    ours = build_sample_index(lengths, document_index, seq_length)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)


def test_empty_valid_split_gives_none_and_empty_train_fails(data, tmp_path):
    small = write_dataset(tmp_path / "small", 50, 3)
    train, valid, test = build_datasets(small, "969,30,1", 8, 1, [10, 2, 1], cache_dir=tmp_path)
    assert len(train) >= 10 and test is None  # 0.1% of 50 documents rounds to none
    with pytest.raises(EmberError, match="train split"):
        build_datasets(small, "1,999,0", 8, 1, [10, 2, 1], cache_dir=tmp_path)


# -- index caches


def _count_builds(monkeypatch):
    calls = []
    original = gpt_dataset.build_gpt_indices

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", counting)
    return calls


def test_cache_is_reused(data, tmp_path, monkeypatch):
    calls = _count_builds(monkeypatch)
    first = build_datasets(data["mixed"], "969,30,1", 16, 1, [200, 20, 5], cache_dir=tmp_path)
    assert len(calls) == 3 and len(list(tmp_path.glob("*-description.json"))) == 3
    second = build_datasets(data["mixed"], "969,30,1", 16, 1, [200, 20, 5], cache_dir=tmp_path)
    assert len(calls) == 3
    assert isinstance(second[0].shuffle_index, np.memmap)
    for i in range(len(first[0])):
        np.testing.assert_array_equal(first[0][i]["tokens"], second[0][i]["tokens"])
    build_datasets(data["mixed"], "969,30,1", 16, 2, [200, 20, 5], cache_dir=tmp_path)  # other seed
    assert len(calls) == 6


def test_default_cache_folder_is_beside_the_data(tmp_path):
    prefix = write_dataset(tmp_path / "here", 100, 0)
    build_datasets(prefix, "90,10,0", 8, 1, [10, 2, 0])
    assert len(list((tmp_path / "cache").glob("*GPTDataset-train-shuffle_index.npy"))) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete-description", "garbage-description"])
def test_damaged_cache_is_rebuilt(data, tmp_path, monkeypatch, damage):
    first = build_datasets(data["mixed"], "969,30,1", 16, 1, [200, 20, 5], cache_dir=tmp_path)[0]
    expected = [first[i]["tokens"].copy() for i in range(len(first))]
    del first
    target = next(tmp_path.glob("*GPTDataset-train-sample_index.npy"))
    description = next(tmp_path.glob("*GPTDataset-train-description.json"))
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-8])
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[-5] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "delete-description":
        description.unlink()
    else:
        description.write_text("{not json")
    calls = _count_builds(monkeypatch)
    again = build_datasets(data["mixed"], "969,30,1", 16, 1, [200, 20, 5], cache_dir=tmp_path)[0]
    assert len(calls) == 1  # only the damaged train entry was rebuilt
    for i, tokens in enumerate(expected):
        np.testing.assert_array_equal(again[i]["tokens"], tokens)


def test_changed_dataset_makes_cache_stale(tmp_path, monkeypatch):
    prefix = write_dataset(tmp_path / "d", 120, 0)
    build_datasets(prefix, "90,10,0", 8, 1, [30, 3, 0], cache_dir=tmp_path / "c")
    prefix = write_dataset(tmp_path / "d", 120, 1)  # same path, other documents
    calls = _count_builds(monkeypatch)
    reference = megatron_datasets(([prefix], None), "90,10,0", 8, 1, [30, 3, 0])
    ours = build_datasets(prefix, "90,10,0", 8, 1, [30, 3, 0], cache_dir=tmp_path / "c")
    assert len(calls) == 2
    assert_same_samples(reference, ours)


def test_unwritable_cache_folder_is_a_clear_error(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EmberError, match="--data-cache-path"):
        build_datasets(data["mixed"], "969,30,1", 16, 1, [20, 2, 1], cache_dir=blocker / "cache")


def _run_ranks(world_size, ranks_per_node, shared_storage, cache_of_node, data_path, monkeypatch):
    """Build on `world_size` threads acting as ranks; returns (results, builds per rank, errors)."""
    barrier = threading.Barrier(world_size, timeout=60)
    builds = [0] * world_size
    results = [None] * world_size
    errors = [None] * world_size
    original = gpt_dataset.build_gpt_indices
    local = threading.local()

    def counting(*args, **kwargs):
        builds[local.rank] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", counting)

    def rank_main(rank):
        local.rank = rank
        try:
            results[rank] = build_datasets(
                data_path, "969,30,1", 16, 1, [100, 10, 2], cache_dir=cache_of_node(rank // ranks_per_node),
                shared_storage=shared_storage, rank=rank, local_rank=rank % ranks_per_node,
                world_size=world_size, barrier=barrier.wait)
        except Exception as err:  # noqa: BLE001 - collected for the assertions
            errors[rank] = err

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, builds, errors


def test_shared_storage_one_rank_builds(data, tmp_path, monkeypatch):
    results, builds, errors = _run_ranks(4, 2, True, lambda node: tmp_path, data["mixed"], monkeypatch)
    assert errors == [None] * 4
    assert builds == [3, 0, 0, 0]
    for result in results[1:]:
        np.testing.assert_array_equal(result[0].shuffle_index, results[0][0].shuffle_index)


def test_no_shared_storage_first_rank_of_each_node_builds(data, tmp_path, monkeypatch):
    results, builds, errors = _run_ranks(4, 2, False, lambda node: tmp_path / f"node{node}", data["mixed"],
                                         monkeypatch)
    assert errors == [None] * 4
    assert builds == [3, 0, 3, 0]
    np.testing.assert_array_equal(results[3][0].shuffle_index, results[0][0].shuffle_index)


def test_waiting_ranks_fail_cleanly_when_cache_is_not_shared(data, tmp_path, monkeypatch):
    # Shared storage claimed, but each node sees its own folder: node 1 finds nothing.
    _, builds, errors = _run_ranks(4, 2, True, lambda node: tmp_path / f"node{node}", data["mixed"],
                                   monkeypatch)
    assert errors[0] is None and errors[1] is None
    assert all(isinstance(e, EmberError) and "--no-shared-storage" in str(e) for e in errors[2:])


def test_builder_failure_does_not_hang_the_others(tmp_path):
    barrier = threading.Barrier(2, timeout=30)
    outcome = {}

    def construct(may_build):
        if may_build:
            raise EmberError("builder failed")
        return "loaded"

    def rank_main(rank):
        try:
            outcome[rank] = build_on_one_rank_first(construct, rank=rank, local_rank=rank, world_size=2,
                                                    barrier=barrier.wait)
        except EmberError as err:
            outcome[rank] = str(err)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcome == {0: "builder failed", 1: "loaded"}


def test_cache_round_trip_checks_description(tmp_path):
    cache = IndexCache(tmp_path)
    arrays = {"a": np.arange(10, dtype=np.int32), "b": np.ones((3, 2))}
    built = cache.get_or_build("X-train", {"k": 1}, lambda: arrays)
    assert built is arrays
    loaded = cache.load("X-train", {"k": 1})
    np.testing.assert_array_equal(loaded["a"], arrays["a"])
    assert cache.load("X-train", {"k": 2}) is None
    with pytest.raises(EmberError, match="missing or damaged"):
        IndexCache(tmp_path, may_build=False).get_or_build("X-train", {"k": 3}, lambda: arrays)


def test_gpt_dataset_without_cache_equals_cached(data, tmp_path):
    indexed = IndexedDataset(data["wide"])
    plain = GPTDataset(indexed, (0, 250), 300, 32, 5)
    cached = GPTDataset(indexed, (0, 250), 300, 32, 5, cache=IndexCache(tmp_path))
    assert len(plain) == len(cached)
    for i in (0, 7, len(plain) - 1):
        np.testing.assert_array_equal(plain[i]["tokens"], cached[i]["tokens"])


def _gloo_rank(rank, world_size, port, data_path, cache_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        train, _, _ = build_datasets(data_path, "969,30,1", 16, 1, [50, 5, 1], cache_dir=cache_dir,
                                     rank=rank, local_rank=rank, world_size=world_size)
        np.save(f"{out_dir}/rank{rank}.npy", np.stack([train[i]["tokens"] for i in range(len(train))]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_torch_distributed_barrier_by_default(data, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(2, port, data["mixed"], str(tmp_path / "cache"), str(tmp_path)), nprocs=2)
    reference = megatron_datasets(([data["mixed"]], None), "969,30,1", 16, 1, [50, 5, 1])[0]
    expected = np.stack([megatron_tokens(reference, i) for i in range(len(reference))])
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), expected)

"""The indexed-dataset writer/reader against Megatron-LM's own builder and reader (megatron-core)."""

import numpy as np
import pytest

from ember.data.indexed import IndexedDataset, IndexedDatasetWriter, optimal_dtype
from ember.errors import EmberError

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def _documents(seed=0, count=50, vocab=50000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 300)) for _ in range(count)]


@pytest.mark.parametrize("vocab", [1000, 70000])
def test_bytes_match_megatron_builder(tmp_path, vocab):
    import torch

    docs = _documents(vocab=vocab)
    dtype = optimal_dtype(vocab)
    ours = IndexedDatasetWriter(tmp_path / "ours", dtype)
    for i, doc in enumerate(docs):
        if i % 7 == 3:  # some documents made of several sentences
            ours.add_document(doc, [len(doc) // 2, len(doc) - len(doc) // 2])
        else:
            ours.add_document(doc)
    ours.finalize()
    theirs = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for i, doc in enumerate(docs):
        lengths = [len(doc) // 2, len(doc) - len(doc) // 2] if i % 7 == 3 else [len(doc)]
        theirs.add_document(torch.from_numpy(doc), lengths)
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_reader_reads_megatron_files(tmp_path):
    import torch

    docs = _documents(seed=1)
    builder = megatron_indexed.IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_document(torch.from_numpy(doc), [len(doc)])
    builder.finalize(str(tmp_path / "m.idx"))
    ours = IndexedDataset(tmp_path / "m")
    reference = megatron_indexed.IndexedDataset(str(tmp_path / "m"))
    assert len(ours) == len(reference) == len(docs)
    assert ours.dtype == reference.index.dtype
    np.testing.assert_array_equal(ours.document_indices, reference.document_indices)
    for i in (0, 7, len(docs) - 1):
        np.testing.assert_array_equal(ours[i], reference[i])
        np.testing.assert_array_equal(ours.get(i, 1, 3), reference.get(i, 1, 3))
        np.testing.assert_array_equal(ours.document(i), docs[i])


def test_bulk_add_and_merge_equal_one_by_one(tmp_path):
    docs = _documents(seed=2)
    one = IndexedDatasetWriter(tmp_path / "one", np.uint16)
    for doc in docs:
        one.add_document(doc)
    one.finalize()
    part = IndexedDatasetWriter(tmp_path / "part", np.uint16)
    part.add_documents(np.concatenate(docs[:20]), [len(d) for d in docs[:20]])
    part.finalize()
    merged = IndexedDatasetWriter(tmp_path / "merged", np.uint16)
    merged.add_dataset(tmp_path / "part")
    merged.add_documents(np.concatenate(docs[20:]), [len(d) for d in docs[20:]])
    merged.finalize()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"merged.{ext}").read_bytes()


def test_nothing_visible_until_finalize_and_abort_cleans(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    writer.add_document([1, 2, 3])
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "x.idx").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_files_give_clear_errors(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    writer.add_document([1, 2, 3])
    writer.finalize()
    with pytest.raises(EmberError, match="does not exist"):
        IndexedDataset(tmp_path / "missing")
    (tmp_path / "x.bin").write_bytes(b"\x00" * 4)
    with pytest.raises(EmberError, match="inconsistent"):
        IndexedDataset(tmp_path / "x")
    (tmp_path / "x.idx").write_bytes(b"garbage")
    with pytest.raises(EmberError, match="bad header"):
        IndexedDataset(tmp_path / "x")

"""Megatron's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`), written, read and summarised with numpy.

Layout of the `.idx` file, all little-endian, as Megatron-LM's
`megatron/core/datasets/indexed_dataset.py` writes it:

    9 bytes   b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code of the tokens in `.bin` (see DTYPE_CODES)
    u64       sequence count S
    u64       document count D (entries of the document index, including its leading 0)
    i32 x S   sequence lengths, in tokens
    i64 x S   sequence pointers, byte offsets into `.bin`
    i64 x D   document index: sequence indices where each document ends, starting with 0

The `.bin` file is the token ids of every sequence, back to back, in that dtype.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ember.errors import EmberError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
_FIXED_HEADER_SIZE = len(INDEX_HEADER) + 8 + 1 + 8 + 8


def optimal_dtype(vocab_size: int | None) -> type[np.number]:
    """Megatron's choice: uint16 when every id fits below 65500, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def dataset_exists(prefix: str | os.PathLike) -> bool:
    return os.path.exists(bin_path(prefix)) and os.path.exists(idx_path(prefix))


class _GrowableArray:
    """An append-only numpy array that doubles its capacity: no per-item Python lists."""

    def __init__(self, dtype, initial: int = 1024):
        self._data = np.empty(initial, dtype=dtype)
        self._size = 0

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self._data.dtype)
        needed = self._size + values.size
        if needed > self._data.size:
            grown = np.empty(max(needed, 2 * self._data.size), dtype=self._data.dtype)
            grown[: self._size] = self._data[: self._size]
            self._data = grown
        self._data[self._size : needed] = values
        self._size = needed

    def append(self, value) -> None:
        self.extend([value])

    def __len__(self) -> int:
        return self._size

    @property
    def array(self) -> np.ndarray:
        return self._data[: self._size]


class IndexedDatasetWriter:
    """Streams documents into `PREFIX.bin`/`.idx` under temporary names.

    Nothing appears under the final names until `finalize()`: the `.bin` is renamed first and
    the `.idx` last, so an interrupted run never leaves a pair that looks complete.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: type[np.number]):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise EmberError(f"indexed dataset dtype {self.dtype} is not one Megatron can read")
        suffix = f".tmp-{os.getpid()}"
        self._tmp_bin = bin_path(self.prefix) + suffix
        self._tmp_idx = idx_path(self.prefix) + suffix
        self._bin = open(self._tmp_bin, "wb")
        self.sequence_lengths = _GrowableArray(np.int32)
        self.document_indices = _GrowableArray(np.int64)
        self.document_indices.append(0)
        self.num_tokens = 0

    def add_document(self, token_ids, sequence_lengths=None) -> None:
        """Append one document; `sequence_lengths` splits it into sentences (default: one)."""
        array = np.asarray(token_ids, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self.sequence_lengths.extend([array.size] if sequence_lengths is None else sequence_lengths)
        self.document_indices.append(len(self.sequence_lengths))
        self.num_tokens += array.size

    def add_documents(self, flat_tokens, sequence_lengths, sequences_per_document=None) -> None:
        """Append many documents at once, given their tokens back to back.

        `sequences_per_document[d]` says how many of `sequence_lengths` belong to document d
        (default: one sequence each).
        """
        flat = np.asarray(flat_tokens, dtype=self.dtype)
        lengths = np.asarray(sequence_lengths, dtype=np.int64)
        if int(lengths.sum()) != flat.size:
            raise ValueError("sequence lengths do not add up to the number of tokens")
        self._bin.write(memoryview(np.ascontiguousarray(flat)).cast("B"))  # the array's own bytes, no copy
        start = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        if sequences_per_document is None:
            ends = np.arange(start + 1, start + 1 + lengths.size)
        else:
            ends = start + np.cumsum(np.asarray(sequences_per_document, dtype=np.int64))
        self.document_indices.extend(ends)
        self.num_tokens += flat.size

    def add_dataset(self, prefix: str | os.PathLike) -> None:
        """Append a whole finished dataset (used to merge the parts of a parallel run)."""
        part = IndexedDataset(prefix)
        if part.dtype != self.dtype:
            raise EmberError(f"cannot merge {prefix}: dtype {part.dtype}, expected {self.dtype}")
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(part.sequence_lengths)
        self.document_indices.extend(part.document_indices[1:] + offset)
        self.num_tokens += part.num_tokens
        with open(bin_path(prefix), "rb") as src:
            while chunk := src.read(1 << 24):
                self._bin.write(chunk)

    def pack(self, length: int) -> None:
        """Re-cut everything written so far into documents of exactly `length` tokens (the last may
        be shorter). The `.bin` stays as it is: packing only changes the index."""
        full, rest = divmod(self.num_tokens, length)
        self.sequence_lengths = _GrowableArray(np.int32, full + 1)
        self.sequence_lengths.extend(np.full(full, length))
        if rest:
            self.sequence_lengths.append(rest)
        self.document_indices = _GrowableArray(np.int64, len(self.sequence_lengths) + 1)
        self.document_indices.extend(np.arange(len(self.sequence_lengths) + 1))

    def finalize(self) -> None:
        self._bin.close()
        lengths = self.sequence_lengths.array
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = self.document_indices.array
        with open(self._tmp_idx, "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<Q", INDEX_VERSION))
            idx.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            idx.write(struct.pack("<Q", lengths.size))
            idx.write(struct.pack("<Q", documents.size))
            idx.write(lengths.astype("<i4").tobytes())
            idx.write(pointers.astype("<i8").tobytes())
            idx.write(documents.astype("<i8").tobytes())
        # An older .idx must go first, so that at no moment an old .idx sits beside a new .bin.
        if os.path.exists(idx_path(self.prefix)):
            os.remove(idx_path(self.prefix))
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))

    def abort(self) -> None:
        """Close and delete the temporary files (on error or interrupt)."""
        self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)


def check_index(index_file, data_file, lengths: np.ndarray, pointers: np.ndarray, documents: np.ndarray,
                itemsize: int, data_size: int) -> None:
    """Refuse an index whose arrays cannot describe its `.bin`: one vectorised pass over them.

    Megatron's writers (and ember's) store the sequences back to back, so the pointers are the
    running sum of the lengths; the document index starts at 0, never decreases and ends at the
    sequence count. Anything else is a damaged file that would train on wrong samples.
    """
    def bad(what: str, where: np.ndarray) -> EmberError:
        first = int(np.flatnonzero(where)[0])
        return EmberError(f"{index_file} is corrupt: {what} (first at entry {first}, {int(where.sum())} in all); "
                          f"re-run preprocessing")

    if lengths.size:
        negative = lengths < 0
        if negative.any():
            raise bad("negative sequence lengths", negative)
    sizes = lengths.astype(np.int64) * itemsize
    described = int(sizes.sum())
    if data_size != described:
        raise EmberError(f"{data_file} holds {data_size} bytes but its index describes {described}; "
                         f"the pair is inconsistent (re-run preprocessing)")
    if lengths.size:
        outside = (pointers < 0) | (pointers > data_size - sizes)
        if outside.any():
            raise bad(f"sequence pointers past the end of the {data_size}-byte .bin", outside)
        expected = np.zeros_like(sizes)
        np.cumsum(sizes[:-1], out=expected[1:])
        mismatched = pointers != expected
        if mismatched.any():
            raise bad("sequence pointers that do not match the sequence lengths", mismatched)
    if documents.size == 0 or documents[0] != 0 or documents[-1] != lengths.size:
        raise EmberError(f"{index_file} is corrupt: the document index must run from 0 to the sequence "
                         f"count {lengths.size}, got {documents[:1].tolist()}..{documents[-1:].tolist()}; "
                         f"re-run preprocessing")
    decreasing = np.diff(documents) < 0
    if decreasing.any():
        raise bad("a document index that decreases", np.concatenate([[False], decreasing]))


class IndexedDataset:
    """Memory-mapped reader: O(1) random access to sequences and documents, no copies.

    Reads files written by ember or by Megatron-LM. Index `i` is the i-th *sequence*, as in
    Megatron; without sentence splitting every document is one sequence.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        index_file, data_file = Path(idx_path(prefix)), Path(bin_path(prefix))
        for path in (index_file, data_file):
            if not path.exists():
                raise EmberError(f"indexed dataset file {path} does not exist; "
                                 f"pass the prefix without .bin/.idx (e.g. out/corpus_text_document)")
        with open(index_file, "rb") as f:
            head = f.read(_FIXED_HEADER_SIZE)
        if len(head) < _FIXED_HEADER_SIZE or head[: len(INDEX_HEADER)] != INDEX_HEADER:
            raise EmberError(f"{index_file} is not a Megatron indexed dataset index (bad header)")
        version, code, sequence_count, document_count = struct.unpack("<QBQQ", head[len(INDEX_HEADER):])
        if version != INDEX_VERSION or code not in DTYPE_CODES:
            raise EmberError(f"{index_file}: unsupported version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _FIXED_HEADER_SIZE + sequence_count * 12 + document_count * 8
        actual = index_file.stat().st_size
        if actual < expected:
            raise EmberError(f"{index_file} is truncated ({actual} bytes, expected {expected}); "
                             f"re-run preprocessing")
        self._index = np.memmap(index_file, mode="r", dtype=np.uint8)
        offset = _FIXED_HEADER_SIZE
        self.sequence_lengths = np.frombuffer(self._index, "<i4", sequence_count, offset)
        offset += sequence_count * 4
        self.sequence_pointers = np.frombuffer(self._index, "<i8", sequence_count, offset)
        offset += sequence_count * 8
        self.document_indices = np.frombuffer(self._index, "<i8", document_count, offset)
        data_size = data_file.stat().st_size
        check_index(index_file, data_file, self.sequence_lengths, self.sequence_pointers, self.document_indices,
                    self.dtype.itemsize, data_size)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        # np.memmap refuses empty files; an empty dataset simply has no tokens.
        self._data = (np.memmap(data_file, mode="r", dtype=self.dtype) if data_size
                      else np.empty(0, dtype=self.dtype))

    def __len__(self) -> int:
        return self.sequence_lengths.size

    @property
    def num_documents(self) -> int:
        return max(self.document_indices.size - 1, 0)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `index`, from `offset`, `length` of them (default: to its end)."""
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        if length is None:
            length = int(self.sequence_lengths[index]) - offset
        return self._data[start : start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def document(self, index: int) -> np.ndarray:
        """All tokens of document `index` (its sequences joined)."""
        first, last = int(self.document_indices[index]), int(self.document_indices[index + 1])
        if first == last:
            return self._data[:0]
        start = int(self.sequence_pointers[first]) // self.dtype.itemsize
        stop = start + int(self.sequence_lengths[first:last].sum())
        return self._data[start:stop]


def length_histogram(lengths: np.ndarray, bins: int = 8) -> list[tuple[int, int, int]]:
    """(low, high, count) over log-spaced length bins, empty bins left out."""
    if lengths.size == 0:
        return []
    high = max(int(lengths.max()), 1)
    edges = np.unique(np.geomspace(1, high + 1, bins + 1).astype(np.int64))
    counts, edges = np.histogram(lengths, bins=edges)
    return [(int(lo), int(hi) - 1, int(c)) for lo, hi, c in zip(edges, edges[1:], counts) if c]


def summarize(dataset: IndexedDataset) -> dict:
    """Counts, token dtype and the spread of document lengths (what `ember data inspect` shows)."""
    document_lengths = np.add.reduceat(dataset.sequence_lengths.astype(np.int64),
                                       dataset.document_indices[:-1]) if len(dataset) else np.zeros(0)
    return {
        "documents": dataset.num_documents,
        "sequences": len(dataset),
        "tokens": dataset.num_tokens,
        "dtype": str(dataset.dtype),
        "mean_document_tokens": float(document_lengths.mean()) if document_lengths.size else 0.0,
        "max_document_tokens": int(document_lengths.max()) if document_lengths.size else 0,
        "histogram": length_histogram(document_lengths),
    }

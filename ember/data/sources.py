"""Input files as a stream of record chunks: jsonl/json (also .gz/.zst), txt, csv, parquet, arrow.

A *chunk* is up to a few thousand raw records (and, for line formats, about `CHUNK_BYTES` of
them) from one file, tagged with that file and the line (or row) number of its first record.
Chunks are what worker processes receive: raw bytes for line formats (parsed by the worker with
orjson), Arrow tables for columnar formats — never one pickled Python object per document.
Files are streamed; only a `.json` holding one JSON array is read whole (the format gives no way
to stream it without another parser).

For several workers, an uncompressed line file goes out as `LineRange`s instead (`iter_chunks(...,
line_ranges=workers)`): only (file, byte offset, byte length) of about `CHUNK_BYTES` of whole lines,
found by seeking, never reading the lines; each worker reads its range itself (`read_line_range`),
so the input bytes never pass through the main process or a pipe (issue 18).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

LINE_FORMATS = {".jsonl", ".json", ".txt"}
COLUMNAR_FORMATS = {".parquet", ".csv", ".arrow"}
COMPRESSIONS = {".gz", ".zst"}
# A line chunk closes at this many bytes too: with long documents (source files, books) a chunk
# of `chunk_size` lines could be most of the input, leaving one worker busy while the others wait
# (issue 18: 1,024 lines of a 20 MB source corpus were 94% of it). 1 MiB is ~0.1 s of encoding.
CHUNK_BYTES = 1 << 20


@dataclass
class Chunk:
    """Raw records of one file: `lines` (bytes, one record each) or an Arrow `table`."""

    path: str
    first_line: int  # 1-based line (or row) number of the first record, for error messages
    fmt: str  # ".jsonl", ".txt", ".parquet", ...
    lines: list[bytes] | None = None
    table: object | None = None  # pyarrow.Table
    # Whether the first line is the first of its file (a UTF-8 BOM may open it); None: first_line == 1.
    # A chunk read from a LineRange numbers its lines from 1 without being at the start of the file.
    starts_file: bool | None = None

    def __len__(self) -> int:
        return len(self.lines) if self.lines is not None else self.table.num_rows


def file_format(path: Path) -> tuple[str, str | None]:
    """('.jsonl', '.gz') for data.jsonl.gz; ('.parquet', None) for x.parquet."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


MINDRECORD_HINT = ("MindSpore's MindRecord format, which ember does not read; preprocess the text it was made from "
                   "instead, e.g. `ember preprocess --input wiki.train.tokens --tokenizer-type Llama2Tokenizer "
                   "--tokenizer-model tokenizer.model --seq-length 4096 --output-prefix ./dataset/wiki4096` "
                   "(MindFormers' llama_preprocess.py samples)")


def resolve_input_files(input_path: str | os.PathLike) -> list[Path]:
    """The file itself, every supported file of a folder, or of a glob pattern (Megatron's
    `--partitions` input), sorted; a folder holds one format."""
    path = Path(input_path)
    if ".mindrecord" in path.name or path.is_dir() and any(path.glob("*.mindrecord*")):
        raise EmberError(f"--input {path} is {MINDRECORD_HINT}")
    if not path.exists() and any(c in str(input_path) for c in "*?["):
        import glob

        matches = sorted(Path(m) for m in glob.glob(str(input_path)) if Path(m).is_file())
        if not matches:
            raise EmberError(f"--input {input_path} matches no file")
        return [m for pattern_match in matches for m in resolve_input_files(pattern_match)]
    if not path.exists():
        raise EmberError(f"--input {path} does not exist")
    supported = LINE_FORMATS | COLUMNAR_FORMATS
    if path.is_file():
        fmt, _ = file_format(path)
        if fmt not in supported:
            raise EmberError(f"--input {path}: unsupported format {fmt or '(no extension)'}; "
                             f"use one of {', '.join(sorted(supported))} (jsonl/json may be .gz or .zst)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p)[0] in supported)
    if not files:
        raise EmberError(f"--input folder {path} holds no {', '.join(sorted(supported))} files")
    formats = {file_format(p)[0] for p in files}
    if formats - {".json", ".jsonl"} and len(formats) > 1:
        raise EmberError(f"--input folder {path} mixes formats {', '.join(sorted(formats))}; "
                         f"a folder must hold one format")
    return files


class _ZstdReader(io.RawIOBase):
    """A .zst file's frames, decompressed as a stream. Unlike zstandard's stream_reader, a file
    that ends inside a frame (truncated) raises EOFError instead of ending quietly, as gzip does."""

    def __init__(self, path: Path):
        import zstandard

        self._decompressor = zstandard.ZstdDecompressor()
        self._file = open(path, "rb")
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False  # bytes of the current frame were read and it has not ended yet
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._file.read(1 << 20)
            if not compressed:
                if self._in_frame:
                    raise EOFError("the zstd stream ends in the middle of a frame")
                return 0
            while compressed:
                self._pending += self._frame.decompress(compressed)
                self._in_frame = not self._frame.eof
                compressed = self._frame.unused_data if self._frame.eof else b""
                if self._frame.eof:
                    self._frame = self._decompressor.decompressobj()
                    self._in_frame = bool(compressed)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _open_binary(path: Path, compression: str | None):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _is_json_array(path: Path, compression: str | None) -> bool:
    with _open_binary(path, compression) as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[")


def _line_chunks(path: Path, fmt: str, compression: str | None, chunk_size: int,
                 byte_range: tuple[int, int] | None, first_line: int) -> Iterator[Chunk]:
    with _open_binary(path, compression) as f:
        if byte_range is not None:
            f.seek(byte_range[0])
        remaining = None if byte_range is None else byte_range[1] - byte_range[0]
        line_no = first_line
        lines: list[bytes] = []
        size = 0
        for line in f:
            if remaining is not None:
                if remaining <= 0:
                    break
                remaining -= len(line)
            lines.append(line)
            size += len(line)
            if len(lines) == chunk_size or size >= CHUNK_BYTES:
                yield Chunk(str(path), line_no, fmt, lines=lines)
                line_no += len(lines)
                lines, size = [], 0
        if lines:
            yield Chunk(str(path), line_no, fmt, lines=lines)


@dataclass(frozen=True)
class LineRange:
    """Whole lines of an uncompressed line file, by position: what the main process sends a worker
    instead of the lines themselves. `first_line` is the line number of its first line when the
    main process knows it (the first range of a file, or of an --n-subs part), else None: the
    range continues the previous range of the same file, whose line count the main process only
    learns from the worker's result (it does not read the lines); the worker then numbers lines
    from 1 and the main process shifts them (`ember.data.preprocess`)."""

    path: str
    fmt: str  # ".jsonl" or ".txt"
    offset: int
    length: int
    first_line: int | None


# How many bytes at a time the main process reads looking for the end of a range's last line.
_SCAN_BYTES = 1 << 16


def _line_end(fd: int, position: int, end: int) -> int:
    """Where the line holding byte `position` ends (one past its newline), at most `end`."""
    while position < end:
        block = os.pread(fd, min(_SCAN_BYTES, end - position), position)
        if not block:
            return end  # the file is shorter than it was: the reader of the range will say so
        newline = block.find(b"\n")
        if newline >= 0:
            return position + newline + 1
        position += len(block)
    return end


# A file of a few MiB read by many workers would leave most of them idle in ranges of CHUNK_BYTES
# (a 5 MiB file is 5 ranges for 8 workers): ranges are then cut at about a quarter of each
# worker's share of the file (or --n-subs part), but not below this.
MIN_RANGE_BYTES = 64 << 10


def range_bytes(size: int, workers: int) -> int:
    """How many bytes (then to the end of that line) a LineRange covers, for `workers` workers
    reading `size` bytes: CHUNK_BYTES, or less when that would not give every worker ~4 ranges."""
    share = size // (4 * max(workers, 1))
    return max(min(CHUNK_BYTES, share), min(MIN_RANGE_BYTES, CHUNK_BYTES))


def _line_ranges(path: Path, fmt: str, byte_range: tuple[int, int] | None, first_line: int,
                 workers: int) -> Iterator[LineRange]:
    """`LineRange`s that close at the line holding each range's `range_bytes(...)`-th byte (that
    line included): where a line chunk closes, for a file large enough for its workers. Only the
    bytes from there to the next newline are read."""
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        start, end = (0, os.fstat(fd).st_size) if byte_range is None else byte_range
        step = range_bytes(end - start, workers)
        line: int | None = first_line
        while start < end:
            stop = _line_end(fd, start + step - 1, end)
            yield LineRange(str(path), fmt, start, stop - start, line)
            start, line = stop, None


def read_line_range(piece: LineRange) -> Chunk:
    """A worker's read of its range: the range's lines as a Chunk (numbered from 1 when the main
    process does not know its first line number). An unreadable or shrunk file is a one-line error."""
    path = Path(piece.path)
    try:
        with open(path, "rb", buffering=0) as f:
            parts = []
            position, remaining = piece.offset, piece.length
            while remaining > 0:
                block = os.pread(f.fileno(), remaining, position)
                if not block:
                    raise EOFError(f"the file ends at byte {position:,}, but held at least "
                                   f"{piece.offset + piece.length:,} bytes when the run started")
                parts.append(block)
                position += len(block)
                remaining -= len(block)
    except _read_errors() as err:
        raise unreadable(path, err) from None
    data = b"".join(parts)  # one part (the usual case): that bytes object itself, no copy
    # io's line iteration, as _line_chunks reads: lines end at b"\n" only (a lone b"\r" does not end one)
    lines = io.BytesIO(data).readlines() if data else []
    return Chunk(piece.path, piece.first_line or 1, piece.fmt, lines=lines, starts_file=piece.offset == 0)


def _json_array_chunks(path: Path, compression: str | None, chunk_size: int) -> Iterator[Chunk]:
    import orjson
    import pyarrow as pa

    with _open_binary(path, compression) as f:
        try:
            records = orjson.loads(f.read())
        except orjson.JSONDecodeError as err:
            raise EmberError(f"{path}: not valid JSON ({err}); use one JSON object per line (.jsonl)") from err
    if not isinstance(records, list):
        raise EmberError(f"{path}: expected a JSON array of objects or one object per line")
    for start in range(0, len(records), chunk_size):
        part = records[start : start + chunk_size]
        yield Chunk(str(path), start + 1, ".json", table=pa.Table.from_pylist(
            [r if isinstance(r, dict) else {"__malformed__": repr(r)[:80]} for r in part]))


def _arrow_reader(path: Path):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path)))


def _columnar_chunks(path: Path, fmt: str, chunk_size: int, columns: list[str] | None,
                     row_groups: list[int] | None) -> Iterator[Chunk]:
    import pyarrow as pa

    row = 1
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(str(path))
        present = set(parquet.schema_arrow.names)
        cols = [c for c in columns if c in present] if columns else None
        batches = parquet.iter_batches(batch_size=chunk_size, row_groups=row_groups, columns=cols)
        if row_groups:
            row += sum(parquet.metadata.row_group(i).num_rows for i in range(row_groups[0]))
    elif fmt == ".csv":
        import pyarrow.csv as pcsv

        # Strings stay strings: a column of digits must not turn into integers.
        batches = pcsv.open_csv(str(path), read_options=pcsv.ReadOptions(block_size=1 << 22),
                                convert_options=pcsv.ConvertOptions(strings_can_be_null=False,
                                                                    column_types=None))
    else:
        reader = _arrow_reader(path)
        batches = iter(reader.read_next_batch, None) if hasattr(reader, "read_next_batch") else None
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if batches is None else reader
    for batch in batches:
        table = pa.Table.from_batches([batch])
        for start in range(0, table.num_rows, chunk_size):
            part = table.slice(start, chunk_size)
            yield Chunk(str(path), row, fmt, table=part)
            row += part.num_rows


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged, truncated or unreadable input raises: OS errors, a gzip stream that
    ends early (EOFError), zstd and Arrow (parquet, arrow, csv) decoding errors."""
    errors: list[type[BaseException]] = [OSError, EOFError]
    try:
        import pyarrow as pa

        errors.append(pa.ArrowException)
    except ImportError:
        pass
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def unreadable(path: Path, err: BaseException) -> EmberError:
    """The one-line error for an input file that cannot be read."""
    if isinstance(err, OSError) and not isinstance(err, EOFError) and err.strerror:
        return EmberError(f"cannot read --input file {path}: {err.strerror}")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return EmberError(f"cannot read --input file {path}: {detail} (is it truncated or damaged? "
                      f"re-create or re-download it)")


def iter_chunks(files: list[Path], chunk_size: int = 2048, columns: list[str] | None = None,
                part: "InputPart | None" = None, line_ranges: int = 0) -> Iterator[Chunk | LineRange]:
    """Chunks of every file in order; `part` restricts to one contiguous piece (for --n-subs).
    `line_ranges`: how many workers will read uncompressed line files (.jsonl, .txt, .json lines)
    themselves, as `LineRange`s (0: send them lines). A range holds up to CHUNK_BYTES, less when
    the file is small for that many workers (`range_bytes`); `chunk_size` does not cut it.
    A file that cannot be read (truncated, damaged, no permission) is a one-line `EmberError`."""
    read_errors = _read_errors()
    for path in files:
        if part is not None and str(path) not in part.files:
            continue
        try:
            yield from _file_chunks(path, chunk_size, columns, part, line_ranges)
        except read_errors as err:
            raise unreadable(path, err) from None


def _file_chunks(path: Path, chunk_size: int, columns: list[str] | None,
                 part: "InputPart | None", line_ranges: int = 0) -> Iterator[Chunk | LineRange]:
    fmt, compression = file_format(path)
    piece = None if part is None else part.files[str(path)]
    if fmt in (".jsonl", ".txt") or (fmt == ".json" and not _is_json_array(path, compression)):
        byte_range, first_line = (None, 1) if piece is None else (piece[0], piece[1])
        if line_ranges and compression is None:
            yield from _line_ranges(path, ".jsonl" if fmt == ".json" else fmt, byte_range, first_line, line_ranges)
            return
        yield from _line_chunks(path, ".jsonl" if fmt == ".json" else fmt, compression,
                                chunk_size, byte_range, first_line)
    elif fmt == ".json":
        yield from _json_array_chunks(path, compression, chunk_size)
    else:
        yield from _columnar_chunks(path, fmt, chunk_size, columns, None if piece is None else piece[0])


@dataclass
class InputPart:
    """One of --n-subs contiguous pieces of the input: per file, a byte range + first line, or row groups."""

    files: dict[str, tuple]


def split_input(files: list[Path], parts: int) -> list[InputPart]:
    """Cut the input into `parts` contiguous pieces of about equal size, in order.

    Line files (uncompressed) are cut at line boundaries; parquet at row-group boundaries;
    other files are kept whole. Pieces may be fewer than asked when the input is small.
    """
    units: list[tuple[str, tuple, int]] = []  # (file, piece, size)
    read_errors = _read_errors()
    for path in files:
        try:
            units.extend(_units_of(path, parts))
        except read_errors as err:
            raise unreadable(path, err) from None
    return _cut_units(units, parts)


def _units_of(path: Path, parts: int) -> list[tuple[str, tuple, int]]:
    """The pieces one file can be cut into: byte ranges, parquet row groups, or the whole file."""
    fmt, compression = file_format(path)
    size = path.stat().st_size
    if fmt in (".jsonl", ".txt", ".json") and compression is None and not (
            fmt == ".json" and _is_json_array(path, None)):
        return _line_units(path, max(1, parts), size)
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(str(path)).metadata
        return [(str(path), ([i],), meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
    return [(str(path), None, size)]


def _cut_units(units: list[tuple[str, tuple, int]], parts: int) -> list[InputPart]:
    total = sum(u[2] for u in units) or 1
    result: list[InputPart] = []
    current: dict[str, tuple] = {}
    filled = 0
    for name, piece, size in units:
        target = total * (len(result) + 1) / parts
        if current and filled >= target and len(result) < parts - 1:
            result.append(InputPart(current))
            current = {}
        if piece is not None and name in current and current[name] is not None:
            current[name] = _merge_pieces(current[name], piece)
        else:
            current[name] = piece
        filled += size
    if current:
        result.append(InputPart(current))
    return result


def _merge_pieces(a: tuple, b: tuple) -> tuple:
    if isinstance(a[0], list):  # parquet row groups
        return (a[0] + b[0],)
    (start, _), first_line = a
    (_, end), _ = b
    return ((start, end), first_line)


def _line_units(path: Path, parts: int, size: int) -> list[tuple[str, tuple, int]]:
    """Byte ranges of about size/parts bytes ending at newlines, with the first line number of each."""
    cuts = [0]
    with open(path, "rb", buffering=0) as f:
        for k in range(1, parts):
            pos = _line_end(f.fileno(), max(size * k // parts, cuts[-1]), size)  # the next line's start
            if cuts[-1] < pos < size:
                cuts.append(pos)
    cuts.append(size)
    units = []
    line = 1
    with open(path, "rb") as f:
        for start, end in zip(cuts, cuts[1:]):
            units.append((str(path), ((start, end), line), end - start))
            f.seek(start)
            remaining = end - start
            while remaining > 0:
                block = f.read(min(remaining, 1 << 24))
                remaining -= len(block)
                line += block.count(b"\n")
    return units

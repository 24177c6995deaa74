"""Raw chunks -> records (dicts), with every record that cannot be read counted and located;
and the text field of every good record, for tokenizer training."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from ember.data.sources import Chunk, iter_chunks


@dataclass
class Skip:
    """One record left out, and where: `file:line: reason`."""

    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@dataclass
class DecodedChunk:
    path: str = ""
    records: list[dict] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # line/row number of each record
    skips: list[Skip] = field(default_factory=list)
    num_bytes: int = 0


UTF8_BOM = b"\xef\xbb\xbf"


def decode_chunk(chunk: Chunk) -> DecodedChunk:
    out = DecodedChunk(path=chunk.path)
    if chunk.lines is not None:
        out.num_bytes = sum(len(line) for line in chunk.lines)
        # the line number a UTF-8 BOM may open: the file's first line, when this chunk holds it
        bom_line = chunk.first_line if chunk.starts_file else 1 if chunk.starts_file is None else 0
        for offset, raw in enumerate(chunk.lines):
            line_no = chunk.first_line + offset
            if chunk.fmt == ".txt":
                try:
                    out.records.append({"text": raw.rstrip(b"\r\n").decode("utf-8")})
                    out.lines.append(line_no)
                except UnicodeDecodeError:
                    out.skips.append(Skip(chunk.path, line_no, "not valid UTF-8"))
                continue
            if not raw.strip():
                out.skips.append(Skip(chunk.path, line_no, "blank line"))
                continue
            if line_no == bom_line and raw.startswith(UTF8_BOM):  # a file saved with a BOM (PAI reads utf-8-sig)
                raw = raw[len(UTF8_BOM):]
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                reason = "not valid UTF-8" if "utf-8" in str(err).lower() else f"malformed JSON ({err})"
                out.skips.append(Skip(chunk.path, line_no, reason))
                continue
            if not isinstance(record, dict):
                out.skips.append(Skip(chunk.path, line_no, f"expected a JSON object, got {type(record).__name__}"))
                continue
            out.records.append(record)
            out.lines.append(line_no)
    else:
        table = chunk.table
        out.num_bytes = table.nbytes
        for offset, record in enumerate(table.to_pylist()):
            line_no = chunk.first_line + offset
            malformed = record.pop("__malformed__", None)
            if malformed is not None:
                out.skips.append(Skip(chunk.path, line_no, f"expected a JSON object, got {malformed}"))
                continue
            try:  # Arrow reads a CSV column with invalid UTF-8 as binary: decode it row by row
                record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}
            except UnicodeDecodeError:
                out.skips.append(Skip(chunk.path, line_no, "not valid UTF-8"))
                continue
            out.records.append(record)
            out.lines.append(line_no)
    return out


def iter_texts(files: list[Path], key: str = "text") -> Iterator[str]:
    """Just the `key` field of every well-formed record (for tokenizer training)."""
    for chunk in iter_chunks(files, columns=[key]):
        for record in decode_chunk(chunk).records:
            value = record.get(key)
            if isinstance(value, str) and value:
                yield value

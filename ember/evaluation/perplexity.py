"""Perplexity of a model on a dataset: a Megatron indexed dataset (`.bin/.idx` prefix) or raw
text (`.txt`: one document per file; `.jsonl`/`.json`: one document per record; `.parquet`: one
per row), tokenized with the checkpoint's tokenizer and an end-of-document token after each
document, as `ember preprocess --append-eod` writes them.

The documents are read as one token stream, cut into windows of seq_length + 1 tokens that
overlap by one (as Megatron's GPT samples are): every token after the first is predicted exactly
once, with up to seq_length tokens of context from its own window. Perplexity is
exp(total negative log-likelihood / predicted tokens).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import EmberError
from ember.models.transformer import evaluating
from ember.progress import Progress

_LOGITS_CHUNK = 1024  # positions per output-layer call: the full [B, T, vocab] logits never exist at once


@dataclass
class TokenStream:
    """Documents' token ids in order, and how many tokens they hold together."""

    documents: list[np.ndarray] | None
    num_tokens: int
    source: str
    indexed: object | None = None  # an IndexedDataset, read lazily

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.indexed is not None:
            for i in range(self.indexed.num_documents):
                yield self.indexed.document(i)
        else:
            yield from self.documents


def _raw_texts(path: Path, json_key: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as err:
                    raise EmberError(f"{path}:{number}: not a JSON object ({err}); one JSON object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                    raise EmberError(f"{path}:{number}: no text under key {json_key!r}; pass --json-key KEY")
                yield record[json_key]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if json_key not in table.column_names:
            raise EmberError(f"{path}: no column {json_key!r} (columns: {', '.join(table.column_names)}); "
                             "pass --json-key COLUMN")
        yield from (text for text in table.column(json_key).to_pylist() if text)
    else:
        yield path.read_text(encoding="utf-8")


def read_token_stream(data_path: str | Path, tokenizer_dir: str | Path | None = None, json_key: str = "text",
                      append_eod: bool = True) -> TokenStream:
    """The token stream of an indexed dataset prefix, or of a raw text file tokenized here."""
    from ember.data.indexed import IndexedDataset, dataset_exists

    data_path = Path(data_path)
    if dataset_exists(data_path):
        dataset = IndexedDataset(data_path)
        return TokenStream(None, dataset.num_tokens, str(data_path), indexed=dataset)
    if not data_path.is_file():
        raise EmberError(f"--data-path {data_path}: neither an indexed dataset prefix (PREFIX.bin/.idx) "
                         "nor a text/JSONL/parquet file")
    if tokenizer_dir is None:
        raise EmberError(f"--data-path {data_path} is raw text: it needs a tokenizer; pass --tokenizer-name-or-path DIR")
    from ember.data.tokenizers import HFTokenizer

    tokenizer = HFTokenizer(tokenizer_dir)
    eod = tokenizer.eod if append_eod else None
    documents = []
    for text in _raw_texts(data_path, json_key):
        ids = tokenizer.encode(text)
        if eod is not None:
            ids = [*ids, eod]
        if ids:
            documents.append(np.asarray(ids, dtype=np.int64))
    return TokenStream(documents, sum(len(d) for d in documents), str(data_path))


def token_windows(stream: TokenStream, seq_length: int) -> Iterator[np.ndarray]:
    """Windows of seq_length + 1 tokens, each starting at the last token of the previous one."""
    buffer = np.empty(0, dtype=np.int64)
    for document in stream:
        buffer = np.concatenate([buffer, np.asarray(document, dtype=np.int64)])
        while len(buffer) >= seq_length + 1:
            yield buffer[: seq_length + 1]
            buffer = buffer[seq_length:]
    if len(buffer) >= 2:
        yield buffer


def count_windows(num_tokens: int, seq_length: int) -> int:
    return math.ceil((num_tokens - 1) / seq_length) if num_tokens >= 2 else 0


@dataclass
class PerplexityResult:
    nll: float  # summed over predicted tokens, nats
    tokens: int  # predicted tokens
    windows: int
    seconds: float

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def as_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll_per_token": self.mean_nll, "tokens": self.tokens,
                "windows": self.windows, "seconds": round(self.seconds, 3)}


def window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood (fp32 softmax) of windows [B, T+1]: tokens 1..T given their
    prefixes. The output layer runs a chunk of positions at a time through the model's `head` hook."""
    inputs, targets = windows[:, :-1], windows[:, 1:]

    def head(hidden: torch.Tensor, output: nn.Linear) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[1], _LOGITS_CHUNK):
            logits = output(hidden[:, start : start + _LOGITS_CHUNK]).float()
            chunk = targets[:, start : start + _LOGITS_CHUNK]
            total += F.cross_entropy(logits.flatten(0, 1), chunk.flatten(), reduction="sum").double()
        return total

    return model(inputs, head=head)


def evaluate_perplexity(model: nn.Module, stream: TokenStream, seq_length: int, batch_size: int = 8,
                        max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    if seq_length < 1 or batch_size < 1:
        raise EmberError(f"--seq-length and --batch-size must be >= 1 (got {seq_length}, {batch_size})")
    max_len = getattr(model.args, "max_seq_len", None)
    if max_len and seq_length > max_len and model.args.position_type in ("rope", "learned"):
        raise EmberError(f"--seq-length {seq_length} exceeds the model's max_seq_len {max_len}; pass --seq-length {max_len}")
    total = count_windows(stream.num_tokens, seq_length)
    if max_windows is not None:
        total = min(total, max_windows)
    if total == 0:
        raise EmberError(f"{stream.source} holds {stream.num_tokens} tokens: nothing to predict (need at least 2)")
    device = next(model.parameters()).device
    bar = Progress("perplexity", total, "windows", every=0.5, final=True) if progress else None
    nll, tokens, done = 0.0, 0, 0
    started = time.perf_counter()
    batch: list[np.ndarray] = []

    def run(rows: list[np.ndarray]) -> None:
        nonlocal nll, tokens, done
        ids = torch.as_tensor(np.stack(rows), dtype=torch.long, device=device)
        nll += float(window_nll(model, ids))
        tokens += ids.numel() - ids.shape[0]
        done += len(rows)
        if bar:
            bar.update(len(rows))

    try:
        with evaluating(model), torch.inference_mode():
            for window in token_windows(stream, seq_length):
                if done + len(batch) >= total:
                    break
                if batch and len(window) != len(batch[0]):  # only the last window is shorter
                    run(batch)
                    batch = []
                batch.append(window)
                if len(batch) == batch_size:
                    run(batch)
                    batch = []
            if batch:
                run(batch)
    finally:
        if bar:
            bar.close()
    return PerplexityResult(nll, tokens, done, time.perf_counter() - started)

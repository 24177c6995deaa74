"""PAI's raw json fine-tuning files, tokenized once before training into a cache.

PAI-Megatron-Patch's `run_finetune_megatron_bloom.sh` passes `--train-data X.json --valid-data
Y.json` and tokenizes those files while training. ember trains on tokenized prefixes, so a
`--train-data/--valid-data/--test-data(-path)` that names a `.json`/`.jsonl` file is tokenized
here, before any rank starts (`ember launch` and `ember train` resolve the configuration first),
with `PaiFinetuneHandler` (PAI's Bloom `{"text"}` records; Alpaca records otherwise), into

    <--data-cache-path, else the run's --output-dir/--save>/tokenized/<name>-<key>/data_packed_*_document

and the configuration names that prefix instead. `key` hashes the file (absolute path, size,
modification time), the tokenizer (its settings and its files' sizes and times) and the handler,
so a second run reuses the folder and a changed file or tokenizer is tokenized again.

- Once, however many processes ask: a lock file per cache folder; the others wait, then reuse.
- Atomic: written in `<folder>.tmp-<pid>`, a `complete.json` (the key and the files' sizes)
  written last, then renamed into place. A folder without it, or whose files do not match it
  (damaged, cut short), is removed and tokenized again; so are temporary folders a killed run left.
- Bad records are skipped and counted (as `ember preprocess` does), named in the notice line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ember.errors import EmberError
from ember.file_lock import exclusive

RAW_SUFFIXES = (".json", ".jsonl")
HANDLER = "PaiFinetuneHandler"
CACHE_FOLDER = "tokenized"
COMPLETE = "complete.json"
PREFIX_NAME = "data"
FORMAT = 1  # bump when what is written for the same input changes
SPLIT_FIELDS = ("train_data_path", "valid_data_path", "test_data_path")
# files larger than this are tokenized by several processes
PARALLEL_BYTES = 8 << 20


def is_raw_json(path: str) -> bool:
    return path.lower().endswith(RAW_SUFFIXES)


def _quiet_rank() -> bool:
    """A rank of a launched job: the launcher (RANK unset) has said it already."""
    return os.environ.get("RANK") is not None


def _print_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def tokenize_raw_json_data(config, notice: Callable[[str], None] | None = None) -> None:
    """Replace every json file among the config's split data paths by its tokenized prefix,
    tokenizing it first unless a complete tokenization is cached. In place."""
    d = config.data
    if not any(is_raw_json(word) for name in SPLIT_FIELDS for word in getattr(d, name)):
        return
    notice = notice or _print_notice
    spec = (d.tokenizer_type or "PretrainedFromHF", d.tokenizer_name_or_path, d.tokenizer_model, d.vocab_file,
            d.merge_file)
    root = cache_root(config)
    prefixes: dict[str, str] = {}  # a file named twice (train and valid) is looked at once
    for name in SPLIT_FIELDS:
        flag = "--" + name.replace("_", "-")
        words = getattr(d, name)
        for word in words:
            if is_raw_json(word) and word not in prefixes:
                prefixes[word] = tokenized_prefix(word, flag, spec, root, notice)
        setattr(d, name, [prefixes.get(word, word) for word in words])


def cache_root(config) -> Path:
    """<data cache path or the run's output folder>/tokenized; the system's temporary folder without either."""
    base = config.data.data_cache_path or config.output_dir
    if base:
        return Path(base) / CACHE_FOLDER
    return Path(tempfile.gettempdir()) / f"ember-{CACHE_FOLDER}"


def cache_key(path: Path, spec: tuple) -> str:
    stat = path.stat()
    described = {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                 "tokenizer": [_describe_file(item) for item in spec], "handler": HANDLER, "format": FORMAT}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _describe_file(item):
    """A tokenizer setting, with the sizes and times of the files it names (a folder: its files)."""
    if not isinstance(item, str) or not os.path.exists(item):
        return item
    path = Path(item).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return [str(path)] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def tokenized_prefix(source: str, flag: str, spec: tuple, root: Path,
                     notice: Callable[[str], None]) -> str:
    """The prefix of `source`'s tokenization under `root`, made now unless complete there."""
    path = Path(source)
    if not path.is_file():
        raise EmberError(f"{flag} {source}: no such file (a json file of fine-tuning records, which ember "
                         f"tokenizes once before training); check the path")
    key = cache_key(path, spec)
    folder = root / f"{path.stem}-{key}"
    prefix = str(folder / PREFIX_NAME)
    with exclusive(root / f"{folder.name}.lock", "the tokenized-data folder",
                   "give --data-cache-path (or --save) a writable folder"):
        if is_complete(folder, key):
            if not _quiet_rank():
                notice(f"{flag} {source}: using its tokens from {folder} (tokenized before)")
            return prefix
        for leftover in [folder, *root.glob(f"{folder.name}.tmp-*")]:  # damaged, cut short, or a killed run's
            shutil.rmtree(leftover, ignore_errors=True)
        staging = root / f"{folder.name}.tmp-{os.getpid()}"
        staging.mkdir()
        try:
            totals = _tokenize(path, str(staging / PREFIX_NAME), spec, flag)
            _write_complete(staging, key, source, totals)
            os.rename(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    skipped = ""
    if totals.skipped:
        skipped = f"; skipped {totals.skipped:,} bad record(s), the first: {totals.first_skips[0]}"
    notice(f"{flag} {source}: tokenized {totals.documents:,} records ({totals.tokens:,} tokens, {HANDLER}) "
           f"into {folder}{skipped}")
    return prefix


def _tokenize(path: Path, output_prefix: str, spec: tuple, flag: str):
    from ember.data.preprocess import preprocess

    big = path.stat().st_size > PARALLEL_BYTES
    try:
        result = preprocess(input=path, output_prefix=output_prefix, tokenizer_type=spec[0],
                            tokenizer_name_or_path=spec[1], tokenizer_model=spec[2], vocab_file=spec[3],
                            merge_file=spec[4], handler_name=HANDLER,
                            workers=max(1, min(8, os.cpu_count() or 1)) if big else 1,
                            log_interval=10_000 if big else None)
    except EmberError as err:
        raise EmberError(f"{flag} {path}: {err}") from None
    return result.totals


def _dataset_files(folder: Path) -> list[Path]:
    from ember.data.finetune_dataset import INPUT_IDS_SUFFIX, LABELS_SUFFIX

    return [folder / f"{PREFIX_NAME}{suffix}{ext}" for suffix in (INPUT_IDS_SUFFIX, LABELS_SUFFIX)
            for ext in (".bin", ".idx")]


def _write_complete(folder: Path, key: str, source: str, totals) -> None:
    record = {"key": key, "source": str(Path(source).resolve()), "handler": HANDLER,
              "records": totals.documents, "tokens": totals.tokens, "skipped": totals.skipped,
              "files": {p.name: p.stat().st_size for p in _dataset_files(folder)}}
    (folder / COMPLETE).write_text(json.dumps(record, indent=1))


def is_complete(folder: Path, key: str) -> bool:
    """Whether `folder` holds a whole tokenization of `key`: its record written last, every file
    of the size recorded, and the datasets readable as one fine-tuning prefix."""
    try:
        record = json.loads((folder / COMPLETE).read_text())
        if record.get("key") != key:
            return False
        for file in _dataset_files(folder):
            if file.stat().st_size != record["files"][file.name]:
                return False
        from ember.data.finetune_dataset import FinetuneSource

        FinetuneSource(str(folder / PREFIX_NAME))
    except (OSError, ValueError, KeyError, TypeError, EmberError):
        return False
    return True



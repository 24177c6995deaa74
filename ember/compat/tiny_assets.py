"""The built-in assets of EMBER_TINY runs: a small corpus of standard-library docstrings, a byte-level
BPE tokenizer trained on it, and Megatron datasets made from it (pretraining parts, Alpaca-style
instruction data).

`prepare()` builds them once into `EMBER_TINY_CACHE` (default `~/.cache/ember/tiny`) under a file
lock, so many ranks or runs may ask at once. It is the explicit step a command runs before tiny
mode's config translation (`ember.compat.tiny`), which only needs the paths. Data-preparation
scripts use `ember tiny --shell`, which prints the paths as shell variables.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

CACHE_ENV = "EMBER_TINY_CACHE"
VOCAB_SIZE = 512
CORPUS_MB = 0.3
PRETRAIN_PARTS = 4  # distinct datasets available to a blended --data-path
# Bumped whenever the assets change, so an old cache is never mistaken for a current one.
ASSETS_VERSION = "1"


@dataclass(frozen=True)
class TinyAssets:
    root: Path

    @property
    def corpus(self) -> Path:  # {"text": ...} per line
        return self.root / "corpus.jsonl"

    @property
    def alpaca(self) -> Path:  # {"instruction", "input", "output", "text"} per line
        return self.root / "alpaca.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrain(self) -> str:
        return str(self.root / "data" / "corpus_text_document")

    def pretrain_part(self, index: int) -> str:
        return str(self.root / "data" / f"part{index % PRETRAIN_PARTS}_text_document")

    @property
    def finetune(self) -> str:
        """Prefix of `PREFIX_packed_{input_ids,labels}_document` (what --train-data-path takes)."""
        return str(self.root / "data" / "alpaca")

    def shell(self) -> str:
        names = {"TINY_DIR": self.root, "TINY_CORPUS": self.corpus, "TINY_ALPACA": self.alpaca,
                 "TINY_TOKENIZER": self.tokenizer, "TINY_DATA_PATH": self.pretrain,
                 "TINY_FINETUNE_DATA_PATH": self.finetune}
        return "".join(f"{name}={shlex.quote(str(value))}\n" for name, value in names.items())


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ember", "tiny")
    return Path(base) / f"v{ASSETS_VERSION}"


def prepare(root: str | os.PathLike | None = None) -> TinyAssets:
    """The built-in tiny assets, made on first use. Safe to call from many processes at once:
    the first takes a lock and builds, the others wait and then find a finished marker."""
    assets = TinyAssets(Path(root) if root is not None else cache_root())
    marker = assets.root / "complete"
    if marker.is_file():
        return assets
    try:
        assets.root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmberError(f"cannot create the tiny-assets folder {assets.root} ({err.strerror}); "
                         f"set {CACHE_ENV} to a writable folder") from None
    with open(assets.root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.is_file():
            _build(assets)
            marker.write_text("ok\n")
    return assets


@contextlib.contextmanager
def _logged(log, what: str):
    """One build stage, its console output kept in the build log; a failure names the log."""
    log.write(f"# {what}\n")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except EmberError as err:
        raise EmberError(f"preparing the tiny assets: {what} failed ({err}); see {log.name}") from None
    finally:
        log.write(out.getvalue())


def _build(assets: TinyAssets) -> None:
    import orjson

    from ember.data.corpus import write_jsonl
    from ember.data.preprocess import preprocess
    from ember.data.tokenizer_train import train_tokenizer

    (assets.root / "data").mkdir(exist_ok=True)
    with open(assets.root / "build.log", "w", encoding="utf-8") as log:
        write_jsonl(assets.corpus, max_bytes=int(CORPUS_MB * 1e6))
        documents = [orjson.loads(line)["text"] for line in assets.corpus.read_bytes().splitlines()]
        parts = [[] for _ in range(PRETRAIN_PARTS)]
        for index, text in enumerate(documents):
            parts[index % PRETRAIN_PARTS].append(text)
        for index, texts in enumerate(parts):
            path = assets.root / f"part{index}.jsonl"
            path.write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))
        assets.alpaca.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _instruction_records(documents)))
        with _logged(log, "training the tokenizer"):
            train_tokenizer(input=assets.corpus, output=assets.tokenizer, vocab_size=VOCAB_SIZE)
        common = dict(tokenizer_name_or_path=str(assets.tokenizer), workers=1, overwrite=True)
        with _logged(log, "preprocessing the corpus"):
            preprocess(input=assets.corpus, output_prefix=str(assets.root / "data" / "corpus"), append_eod=True,
                       **common)
            for index in range(PRETRAIN_PARTS):
                preprocess(input=assets.root / f"part{index}.jsonl",
                           output_prefix=str(assets.root / "data" / f"part{index}"), append_eod=True, **common)
        with _logged(log, "preprocessing the instruction data"):
            preprocess(input=assets.alpaca, output_prefix=assets.finetune,
                       handler_name="AlpacaStyleInstructionHandler", **common)


def _instruction_records(documents: list[str]) -> list[dict[str, str]]:
    """Alpaca-style records from the corpus: continue a docstring from its first paragraph."""
    records = []
    for text in documents:
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        for first, second in zip(paragraphs[0::2], paragraphs[1::2]):
            prompt, answer = first[:200], second[:300]
            records.append({"instruction": "Continue this passage of Python documentation.",
                            "input": prompt, "output": answer,
                            "text": f"{prompt}\n{answer}"})
    return records

"""The built-in corpus: real English text already on every machine that has Python.

It is made at run time from the installed standard library — the docstrings of every module,
class and function (prose), and optionally the source files themselves — walked in sorted order,
so the same Python install always yields the same corpus. The repository carries no text.
"""

from __future__ import annotations

import ast
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import orjson

from ember.errors import EmberError

KINDS = ("docstrings", "source", "both")


def python_source_files(roots: list[Path] | None = None) -> Iterator[Path]:
    """Every .py file under the standard library (or `roots`), sorted, site-packages excluded."""
    if roots is None:
        roots = [Path(sysconfig.get_paths()["stdlib"])]
    for root in roots:
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "__pycache__"))
            for name in sorted(files):
                if name.endswith(".py"):
                    yield Path(directory) / name


def docstrings_of(source: str) -> list[str]:
    """Module, class and function docstrings of one source file, in file order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    nodes = [tree] + [n for n in ast.walk(tree)
                      if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = (ast.get_docstring(n, clean=True) for n in nodes)
    return [d for d in docs if d and len(d) > 40]


def iter_documents(kind: str = "docstrings", max_bytes: int | None = None,
                   roots: list[Path] | None = None) -> Iterator[str]:
    """Yield one document per source file: its docstrings joined, its source, or both."""
    if kind not in KINDS:
        raise EmberError(f"unknown corpus kind {kind!r}; choose one of {', '.join(KINDS)}")
    produced = 0
    for path in python_source_files(roots):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts = []
        if kind in ("docstrings", "both"):
            parts.append("\n\n".join(docstrings_of(source)))
        if kind in ("source", "both"):
            parts.append(source)
        text = "\n\n".join(p for p in parts if p).strip()
        if not text:
            continue
        yield text
        produced += len(text.encode("utf-8"))
        if max_bytes is not None and produced >= max_bytes:
            return


def write_jsonl(path: str | os.PathLike, kind: str = "docstrings", max_bytes: int | None = None,
                key: str = "text", roots: list[Path] | None = None) -> tuple[int, int]:
    """Write the corpus as `{"text": ...}` lines (atomically); returns (documents, bytes)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    documents = size = 0
    with open(tmp, "wb") as out:
        for text in iter_documents(kind, max_bytes, roots):
            out.write(orjson.dumps({key: text}) + b"\n")
            documents += 1
            size += len(text.encode("utf-8"))
    os.replace(tmp, path)
    return documents, size

"""Shared fixtures: a small slice of the built-in corpus and a tokenizer trained on it, made once per session.

Running the suite: `pytest` runs everything (what .ci/run does). Tests marked `slow` (several
seconds each on a 2-core machine: multi-process runs, whole training runs) are part of it; while
working, `pytest -m "not slow"` runs the rest in a fraction of the time, and `pytest -m slow`
only them. fp32 comparisons take their tolerance from tests/tolerances.py."""

import atexit
import os
import shutil
import tempfile

import pytest

# Tests run on 2 cores next to other processes: keep libraries from oversubscribing them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")
# OpenMP threads that finish first otherwise spin waiting for the others; when a core is taken by
# another process that spinning stalls every tiny op (the model tests ran 1.4x slower on a busy
# 2-core machine). Set before torch is imported, as OMP_NUM_THREADS.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# Tiny runs of the seed scripts (EMBER_TINY) train 10 iterations by default, so a person sees the
# loss fall; the tests check the plumbing, and 3 iterations do that in a third of the time.
os.environ.setdefault("EMBER_TINY_ITERS", "3")
# `ember preprocess` keeps FastBPE's rank tables in a cache (~/.cache/ember by default): the suite
# and the processes it starts use one of their own, removed at the end.
if "EMBER_FAST_BPE_CACHE" not in os.environ:
    os.environ["EMBER_FAST_BPE_CACHE"] = tempfile.mkdtemp(prefix="ember-tests-fast-bpe-")
    atexit.register(shutil.rmtree, os.environ["EMBER_FAST_BPE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory):
    """About 400 KB of standard-library docstrings as {"text": ...} lines."""
    from ember.data.corpus import write_jsonl

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_jsonl(path, kind="docstrings", max_bytes=400_000)
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_jsonl):
    """A byte-level BPE tokenizer (2048 tokens) trained on the corpus, as a Hugging Face folder."""
    from ember.data.records import iter_texts
    from ember.data.tokenizer_train import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    return train_bpe_tokenizer(iter_texts([corpus_jsonl]), out, vocab_size=2048)

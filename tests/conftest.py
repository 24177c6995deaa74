"""Shared fixtures: a small slice of the built-in corpus and a tokenizer trained on it, made once per session."""

import os

import pytest

# Tests run on 2 cores next to other processes: keep libraries from oversubscribing them.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "2")


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

"""Faults in the data path: samples with nothing to train on, corrupt `.idx` files, token ids
outside the vocabulary, preprocess workers that die, and damaged or unreadable inputs.

Each case ends in correct behaviour or a one-line `EmberError`: never a hang, a traceback, or
a run that reports success while training on nothing.
"""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import read_metrics, train_config, write_token_dataset
from ember.cli import main as ember
from ember.data.finetune_dataset import INPUT_IDS_SUFFIX, LABELS_SUFFIX, FinetuneDataset
from ember.data.indexed import IndexedDataset, IndexedDatasetWriter
from ember.data.loader import DataLoader
from ember.errors import EmberError
from ember.train import Trainer, run_training

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


def write_finetune(prefix, examples) -> str:
    ids_writer = IndexedDatasetWriter(f"{prefix}{INPUT_IDS_SUFFIX}", np.uint16)
    labels_writer = IndexedDatasetWriter(f"{prefix}{LABELS_SUFFIX}", np.int32)
    for ids, labels in examples:
        ids_writer.add_document(ids)
        labels_writer.add_document(labels)
    ids_writer.finalize()
    labels_writer.finalize()
    return str(prefix)


def instruction(prompt_length, response_length, start=10):
    ids = np.arange(start, start + prompt_length + response_length)
    labels = np.concatenate([np.full(prompt_length, IGNORE), ids[prompt_length:]])
    return ids, labels


def one_line_error(capsys) -> str:
    """The error line (after any progress or announcement lines), checked to be the only one."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# --------------------------------------------------------------------------- nothing to train on


@pytest.mark.parametrize("pack", [True, False])
def test_prompt_longer_than_the_sample_keeps_the_response(tmp_path, caplog, pack):
    """Old: the window always started at the prompt, so a 40-token prompt in a 16-token sample
    left every target cut away (loss 0 on every step)."""
    prefix = write_finetune(tmp_path / "sft", [instruction(40, 20, start=100 * k) for k in range(1, 5)])
    seq_length = 16
    dataset = FinetuneDataset(prefix, seq_length, seed=1, pack=pack)
    assert dataset.target_report == {"examples": 4, "prompt_cut": 4, "no_target": 0}
    assert "4 of 4 examples have a prompt longer than --seq-length 16" in caplog.text
    for index in range(len(dataset)):
        sample = dataset[index]
        mask = sample["loss_mask"].astype(bool)
        # the prompt's last 8 tokens, then the response: 9 targets in the 17-token window
        assert mask.sum() == seq_length + 1 - (seq_length + 1) // 2
        # each target is the token that follows, as in the source example
        np.testing.assert_array_equal(sample["labels"][mask], sample["tokens"][1:][mask])


def test_short_response_window_ends_with_the_example(tmp_path):
    prefix = write_finetune(tmp_path / "sft", [instruction(30, 3)])
    sample = FinetuneDataset(prefix, 16, seed=1, pack=False)[0]
    np.testing.assert_array_equal(sample["tokens"], np.arange(10 + 33 - 17, 10 + 33))
    assert sample["loss_mask"].sum() == 3


def test_split_without_any_target_is_refused(tmp_path):
    examples = [(np.arange(10, 20), np.full(10, IGNORE)) for _ in range(3)]
    prefix = write_finetune(tmp_path / "sft", examples)
    with pytest.raises(EmberError, match="none of its 3 examples has a token to train on"):
        FinetuneDataset(prefix, 16, seed=1)


def test_examples_without_targets_are_counted(tmp_path, caplog):
    examples = [instruction(4, 6), (np.arange(10, 20), np.full(10, IGNORE)), instruction(3, 5)]
    prefix = write_finetune(tmp_path / "sft", examples)
    dataset = FinetuneDataset(prefix, 16, seed=1)
    assert dataset.target_report["no_target"] == 1
    assert "1 of 3 examples have no token to train on" in caplog.text


def test_global_batch_without_loss_tokens_is_skipped_and_counted(tmp_path):
    """Old: a batch whose every target is masked still took an AdamW step (momentum, weight
    decay) and logged a loss of 0."""
    examples = [instruction(4, 6), (np.arange(10, 20), np.full(10, IGNORE))]
    prefix = write_finetune(tmp_path / "sft", examples)
    argv = ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", prefix, "--split", "100,0,0",
            "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "1", "--train-iters", "4",
            "--lr", "1e-2", "--log-interval", "1", "--eval-iters", "0", "--output-dir", str(tmp_path / "out"),
            "--no-tensorboard"]
    stream = io.StringIO()
    trainer = Trainer(train_config(argv), stream=stream).setup()
    try:
        empty = [i for i in range(4) if trainer.train_ds[i % len(trainer.train_ds)]["loss_mask"].sum() == 0]
        assert empty, "the test needs an empty sample among the first four"
        before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        batches = trainer._next_micro_batches(iter([_batch(trainer.train_ds, empty[0])]))
        trainer.train_step(batches)
        after = trainer.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "an empty batch moved the weights"
    finally:
        trainer.close()
    result = run_training(train_config(argv), stream=stream)
    assert all(np.isnan(result.losses[i + 1]) for i in empty)
    train, _ = read_metrics(tmp_path / "out")
    assert train[4]["skipped_iterations"] == len(empty)
    assert "no loss token in the global batch" in stream.getvalue()


def _batch(dataset, index):
    from ember.data.loader import collate

    return collate([dataset[index]])


# --------------------------------------------------------------------------- corrupt .idx


def _corrupt(prefix: Path, field: str, value) -> None:
    """Overwrite one entry of the .idx arrays (see ember.data.indexed for the layout)."""
    idx = Path(f"{prefix}.idx")
    data = bytearray(idx.read_bytes())
    header = 9 + 8 + 1
    sequences, documents = struct.unpack_from("<QQ", data, header)
    lengths_at = header + 16
    pointers_at = lengths_at + 4 * sequences
    documents_at = pointers_at + 8 * sequences
    kind, entry = field.split(":")
    entry = int(entry)
    if kind == "length":
        struct.pack_into("<i", data, lengths_at + 4 * entry, value)
    elif kind == "pointer":
        struct.pack_into("<q", data, pointers_at + 8 * entry, value)
    else:
        struct.pack_into("<q", data, documents_at + 8 * entry, value)
    idx.write_bytes(bytes(data))


@pytest.mark.parametrize("field, value, message", [
    ("pointer:2", 10**9, "pointers past the end"),
    ("pointer:1", -8, "pointers past the end"),
    ("pointer:2", 2, "do not match the sequence lengths"),
    ("length:1", -3, "negative sequence lengths"),
    ("document:2", 0, "decreases"),
    ("document:4", 9, "document index must run from 0 to the sequence count"),
])
def test_corrupt_index_is_refused_when_opened(tmp_path, field, value, message):
    """Old: these passed every check; a run trained on wrong samples and crashed much later."""
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    for length in (5, 7, 3, 6):
        writer.add_document(np.arange(length))
    writer.finalize()
    if field == "length:1":  # keep the token total: the .bin size check alone would not see it
        _corrupt(tmp_path / "x", "length:2", 3 + 7 + 3)
    _corrupt(tmp_path / "x", field, value)
    with pytest.raises(EmberError, match=message) as caught:
        IndexedDataset(tmp_path / "x")
    assert str(tmp_path / "x.idx") in str(caught.value) and "\n" not in str(caught.value)


def test_swapped_lengths_that_keep_the_total_are_refused(tmp_path):
    writer = IndexedDatasetWriter(tmp_path / "x", np.uint16)
    for length in (5, 7):
        writer.add_document(np.arange(length))
    writer.finalize()
    _corrupt(tmp_path / "x", "length:0", 7)
    _corrupt(tmp_path / "x", "length:1", 5)
    with pytest.raises(EmberError, match="do not match the sequence lengths"):
        IndexedDataset(tmp_path / "x")


# --------------------------------------------------------------------------- ids outside the vocabulary


def test_token_id_outside_the_vocabulary_names_dataset_and_id(tmp_path):
    from ember.data.blending import build_datasets

    good = write_token_dataset(tmp_path / "good", seed=1, vocab=100)
    bad_prefix = tmp_path / "bad"
    writer = IndexedDatasetWriter(bad_prefix, np.uint16)
    for _ in range(40):
        writer.add_document(np.concatenate([np.arange(30), [700]]))
    writer.finalize()
    train, _, _ = build_datasets([str(good), str(bad_prefix)], "100,0,0", 16, 1, [64])
    loader = DataLoader(train, 4, 4, vocab_size=512)
    with pytest.raises(EmberError, match=r"bad: sample \d+ holds token id 700, outside the model's "
                                         r"vocabulary of 512") as caught:
        for _ in range(16):
            next(loader)
    assert "\n" not in str(caught.value)
    loader.close()


def test_training_on_ids_outside_the_vocabulary_stops_with_one_line(tmp_path, capsys):
    """Old: a raw IndexError from the embedding."""
    data = write_token_dataset(tmp_path / "tokens", seed=2, vocab=600)
    argv = ["train", "--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data),
            "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3",
            "--eval-iters", "0", "--output-dir", str(tmp_path / "out"), "--no-tensorboard"]
    assert ember(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "outside the model's vocabulary of 512" in err and str(data) in err


# --------------------------------------------------------------------------- preprocess workers that die

KILLER = textwrap.dedent("""
    import os, signal, sys
    import ember.data.preprocess as pre

    parent = os.getpid()
    target = sys.argv[1]
    original = getattr(pre, target)

    def dies_in_a_child(*args, **kwargs):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(pre, target, dies_in_a_child)
    from ember.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _run_killed(tmp_path, target, corpus_jsonl, tokenizer_dir, *flags):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    (tmp_path / "out").mkdir()
    command = [sys.executable, str(script), target, "preprocess", "--input", str(corpus_jsonl),
               "--output-prefix", str(tmp_path / "out" / "k"), "--tokenizer-name-or-path", str(tokenizer_dir),
               *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # its own process group: on a hang (the old behaviour) the run and its workers are all killed
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("ember preprocess hung after one of its processes was killed")
    return process.returncode, stderr, sorted(os.listdir(tmp_path / "out"))


def test_dead_worker_stops_preprocess(tmp_path, corpus_jsonl, tokenizer_dir):
    """Old: multiprocessing.Pool replaced the killed worker and the parent waited forever."""
    code, stderr, left = _run_killed(tmp_path, "_handle_chunk", corpus_jsonl, tokenizer_dir, "--workers", "2",
                                     "--chunk-size", "16")
    assert code == 2, stderr
    assert "worker process died" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert left == []


def test_dead_part_process_stops_preprocess(tmp_path, corpus_jsonl, tokenizer_dir):
    """Old: the parent waited forever on the killed part's queue."""
    # killed at its first chunk, when its writers' temporary files already exist
    code, stderr, left = _run_killed(tmp_path, "decode_chunk", corpus_jsonl, tokenizer_dir, "--n-subs", "2")
    assert code == 2, stderr
    assert "died (killed by SIGKILL)" in stderr.splitlines()[-1] and "Traceback" not in stderr
    assert left == []


def test_next_run_removes_what_a_killed_run_left(tmp_path, corpus_jsonl, tokenizer_dir, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [f"o_text_document.bin.tmp-{dead.pid}", f"o_text_document.idx.tmp-{dead.pid}",
             f"o_text_document.sub-tmp-{dead.pid}-0.bin", f"o_text_document.sub-tmp-{dead.pid}-1.bin.tmp-1",
             f"o_text_document.unpacked-tmp-{dead.pid}.idx"]
    alive = f"o_text_document.bin.tmp-{os.getppid()}"  # a run still going keeps its files
    for name in [*stale, alive, "o_text_document.notes"]:
        (tmp_path / name).write_bytes(b"x")
    assert ember(["preprocess", "--input", str(corpus_jsonl), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-name-or-path", str(tokenizer_dir)]) == 0
    assert f"removed {len(stale)} temporary file(s)" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == sorted([alive, "o_text_document.bin", "o_text_document.idx",
                                                   "o_text_document.notes"])


# --------------------------------------------------------------------------- damaged or unreadable inputs


def _records(count=50) -> bytes:
    return b"".join(json.dumps({"text": f"record number {i} with some words"}).encode() + b"\n"
                    for i in range(count))


def _damaged_inputs(tmp_path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    files = {}
    data = gzip.compress(_records(2000))
    files["gz"] = tmp_path / "a.jsonl.gz"
    files["gz"].write_bytes(data[: len(data) // 2])
    data = zstandard.ZstdCompressor().compress(_records(2000))
    files["zst"] = tmp_path / "b.jsonl.zst"
    files["zst"].write_bytes(data[: len(data) // 2])
    table = pa.table({"text": [f"row {i}" for i in range(500)]})
    pq.write_table(table, tmp_path / "c.parquet")
    data = (tmp_path / "c.parquet").read_bytes()
    files["parquet"] = tmp_path / "c.parquet"
    files["parquet"].write_bytes(data[:100] + b"\x00" * (len(data) - 200) + data[-100:])
    with pa.ipc.new_file(str(tmp_path / "d.arrow"), table.schema) as writer:
        writer.write_table(table)
    data = (tmp_path / "d.arrow").read_bytes()
    files["arrow"] = tmp_path / "d.arrow"
    files["arrow"].write_bytes(data[: len(data) // 2])
    return files


@pytest.mark.parametrize("kind", ["gz", "zst", "parquet", "arrow"])
@pytest.mark.parametrize("flags", [[], ["--n-subs", "2"]])
def test_damaged_input_gives_one_line(tmp_path, tokenizer_dir, capsys, kind, flags):
    """Old: EOFError, ZstdError or ArrowInvalid tracebacks."""
    path = _damaged_inputs(tmp_path)[kind]
    code = ember(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-name-or-path", str(tokenizer_dir), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert f"cannot read --input file {path}" in err[-1] and "Traceback" not in "\n".join(err)
    assert not list(tmp_path.glob("o_*"))


def test_csv_row_with_invalid_utf8_is_skipped_and_counted(tmp_path, tokenizer_dir, capsys):
    """Old: Arrow read the whole column as binary and every row, good ones too, was skipped as
    'not text'."""
    path = tmp_path / "e.csv"
    path.write_bytes(b"text\nfine words\n\xff\xfe broken utf-8\nmore words\n")
    assert ember(["preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-name-or-path", str(tokenizer_dir)]) == 0
    assert "e.csv:2: not valid UTF-8" in capsys.readouterr().err
    assert IndexedDataset(tmp_path / "o_text_document").num_documents == 2


def test_every_record_rejected_is_not_a_success(tmp_path, tokenizer_dir, capsys):
    """Old: rc 0 and an empty dataset."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"other": 1}\n{"text": ""}\nnot json\n')
    for flags in ([], ["--n-subs", "2"], ["--workers", "2"]):
        code = ember(["preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "o"),
                      "--tokenizer-name-or-path", str(tokenizer_dir), *flags])
        assert code == 2
        err = capsys.readouterr().err.strip()
        # counted once (old, with --n-subs: twice), the first in input order
        assert "every record of" in err.splitlines()[-1] and "was skipped (3 in all; the first: " in err
        assert "bad.jsonl:1: missing key 'text'" in err
        assert not list(tmp_path.glob("o_*"))
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert ember(["preprocess", "--input", str(empty), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-name-or-path", str(tokenizer_dir)]) == 2
    assert "holds no records" in one_line_error(capsys)


def test_output_write_failure_gives_one_line(tmp_path, corpus_jsonl, tokenizer_dir, capsys, monkeypatch):
    """Old: a raw OSError (disk full) traceback."""
    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._tmp_bin)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", disk_full)
    assert ember(["preprocess", "--input", str(corpus_jsonl), "--output-prefix", str(tmp_path / "o"),
                  "--tokenizer-name-or-path", str(tokenizer_dir)]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert os.listdir(tmp_path) == []


def test_plot_skips_bad_metrics_lines(tmp_path, capsys):
    """Old: one bad line (a run killed mid-write, a non-object, a non-UTF-8 byte) stopped the plot."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_bytes(b'{"iteration": 1, "loss": 5.0}\n[1, 2]\n{"iteration": 2, "loss": "x"}\n'
                        b'\xff\xfe\n{"iteration": 3, "loss": 4.0, "eval_loss": 4.5}\n{"iteration": 4, "lo')
    assert ember(["plot", str(metrics), "--output", str(tmp_path / "loss.png")]) == 0
    captured = capsys.readouterr()
    assert "skipped 4 unreadable line(s)" in captured.err and "first: line 2" in captured.err
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_plot_unwritable_output_and_folder_input_give_one_line(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 1, "loss": 5.0}\n')
    (tmp_path / "file").write_text("x")
    assert ember(["plot", str(metrics), "--output", str(tmp_path / "file" / "loss.png")]) == 2
    assert "cannot write --output" in one_line_error(capsys)
    assert ember(["plot", str(tmp_path), "--output", str(tmp_path / "loss.png")]) == 2
    assert "is a folder" in one_line_error(capsys)


def test_an_os_error_on_a_user_path_is_one_line(tmp_path, capsys):
    """Any command: an OSError on a path the user gave (here a folder where a file is written) ends
    in one line and exit 2, not a traceback (ember.cli)."""
    from ember.cli import main

    assert main(["data", "corpus", "--output", str(tmp_path), "--max-mb", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ember data: error: ") and "\n" not in err and "Traceback" not in err

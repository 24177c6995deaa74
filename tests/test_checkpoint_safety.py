"""Checkpoints that cannot run code or spread corruption, and outputs that never delete their source.

- a planted DCP `.metadata` (or a pickled object in a shard) runs nothing in `ember train --load`,
  `ember generate --load` or `ember convert --from ember`: each refuses with one line;
- damaged bytes in a shard are found by the checksums: the automatic resume takes the previous
  checkpoint with a notice, an explicit `--load DIR/iter_N` names the bad file;
- NaN weights are never saved, so they never become `latest` nor prune good checkpoints;
- `ember convert --force` replaces only an earlier output, never SRC or a folder holding it;
- write and read failures (a file as --save, a full disk, a non-UTF-8 `latest`, a truncated
  train_state.json) are one-line errors.
"""

import errno
import io
import os
import pickle
import shutil

import pytest
import torch

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import train_config, write_token_dataset
from test_train_checkpoint import _model_and_optimizer
from ember.checkpoint.training import (CHECKSUMS, Checkpointer, CorruptCheckpointError, CheckpointRef,
                                       find_checkpoint, load_training_state, training_state_dict,
                                       usable_checkpoint, write_checksums)
from ember.cli import main as ember
from ember.errors import EmberError
from ember.train import run_training


class _RunsCode:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _train_args(data, save, iters, tokenizer_dir, extra=()):
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "5e-3",
            "--log-interval", "1", "--eval-iters", "0", "--save", str(save), "--save-interval", "1",
            "--tokenizer-name-or-path", str(tokenizer_dir), "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("safety") / "tokens", seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, tokenizer_dir):
    """A tiny Llama trained 3 iterations, a checkpoint after each."""
    save = tmp_path_factory.mktemp("safety") / "save"
    run_training(train_config(_train_args(data, save, 3, tokenizer_dir)), stream=io.StringIO())
    return save


def _copy(trained, tmp_path):
    return shutil.copytree(trained, tmp_path / "save")


def _one_line_error(capsys, command):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"ember {command}: error:") and "Traceback" not in "\n".join(err), err
    return err[-1]


# --------------------------------------------------------------------------- no code runs on load


def test_planted_metadata_runs_no_code_in_train_generate_or_convert(trained, data, tokenizer_dir, tmp_path, capsys):
    save = _copy(trained, tmp_path)
    marker = tmp_path / "marker"
    (save / "iter_0000003" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    write_checksums(save / "iter_0000003")  # an attacker rewrites the checksums too
    commands = {
        "train": _train_args(data, tmp_path / "new", 4, tokenizer_dir, ["--load", str(save)]),
        "generate": ["--load", str(save), "--prompt", "Return the", "--max-new-tokens", "2", "--greedy"],
        "convert": ["--from", "ember", "--to", "hf", str(save), str(tmp_path / "hf")],
    }
    for command, argv in commands.items():
        assert ember([command, *argv]) == 2, command
        line = _one_line_error(capsys, command)
        assert ".metadata" in line and "refusing" in line, line
        assert not marker.exists(), f"ember {command} ran code from the checkpoint"


def test_a_pickled_object_in_a_shard_runs_no_code(tmp_path):
    """DCP stores non-tensor values (optimizer hyper-parameters) as pickles inside the shards."""
    import torch.distributed.checkpoint as dcp

    model, optimizer = _model_and_optimizer(0)
    state = training_state_dict(model, optimizer)
    marker = tmp_path / "marker"
    state["optimizer"]["param_groups.0.weight.lr"] = _RunsCode(marker)
    dcp.save(state, checkpoint_id=str(tmp_path / "iter_0000001"), no_dist=True)
    (tmp_path / "iter_0000001" / "train_state.json").write_text("{}")
    with pytest.raises(EmberError, match="cannot load checkpoint"):
        load_training_state(CheckpointRef(tmp_path / "iter_0000001", "training"), *_model_and_optimizer(1))
    assert not marker.exists()


# --------------------------------------------------------------------------- corruption does not spread


def _damage(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = os.urandom(64)
    path.write_bytes(bytes(raw))


def test_a_damaged_shard_is_named_and_the_previous_checkpoint_taken(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    saver = Checkpointer(tmp_path)
    for iteration in (1, 2, 3):
        saver.save(iteration, model, optimizer, {"state": {"iteration": iteration}})
    assert (tmp_path / "iter_0000003" / CHECKSUMS).is_file()
    shard = next((tmp_path / "iter_0000003").glob("*.distcp"))
    _damage(shard)

    notices = []
    ref = usable_checkpoint(find_checkpoint(tmp_path), notices.append)  # automatic: through `latest`
    assert ref.iteration == 2
    assert len(notices) == 1 and str(shard) in notices[0] and "iter_0000002" in notices[0]

    with pytest.raises(CorruptCheckpointError) as info:  # named by the user: an error, with a way out
        usable_checkpoint(find_checkpoint(tmp_path / "iter_0000003"), notices.append)
    assert str(shard) in str(info.value) and "checksum" in str(info.value)
    assert str(tmp_path / "iter_0000002") in str(info.value)


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(
        trained, data, tokenizer_dir, tmp_path):
    save = _copy(trained, tmp_path)
    _damage(next((save / "iter_0000003").glob("*.distcp")))
    out = io.StringIO()
    result = run_training(train_config(_train_args(data, save, 4, tokenizer_dir)), stream=out)
    log = out.getvalue()
    assert "is damaged" in log and "resuming from the previous checkpoint iter_0000002" in log, log
    assert all(loss == loss for loss in result.losses.values()) and min(result.losses) == 3
    assert find_checkpoint(save).iteration == 4


def test_nan_weights_are_never_published_nor_prune(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    saver = Checkpointer(tmp_path, keep_last=1)
    saver.save(1, model, optimizer, {"state": {}})
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(EmberError, match="NaN or Inf at iteration 2: checkpoint not saved"):
        saver.save(2, model, optimizer, {"state": {}})
    assert find_checkpoint(tmp_path).iteration == 1 and (tmp_path / "iter_0000001").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "latest"]


def test_a_checkpoint_without_checksums_loads_with_a_notice(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    Checkpointer(tmp_path).save(1, model, optimizer, {"state": {}})
    (tmp_path / "iter_0000001" / CHECKSUMS).unlink()  # saved by an older ember
    notices = []
    ref = usable_checkpoint(find_checkpoint(tmp_path), notices.append)
    assert ref.iteration == 1 and len(notices) == 1 and "not checked" in notices[0]
    other, other_optimizer = _model_and_optimizer(1)
    load_training_state(ref, other, other_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


# --------------------------------------------------------------------------- one-line errors


def test_save_to_a_file_or_below_one_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EmberError, match="is a file, not a folder"):
        Checkpointer(tmp_path / "file")
    with pytest.raises(EmberError, match="Not a directory"):
        Checkpointer(tmp_path / "file" / "save")


def test_a_full_disk_during_save_is_an_error_and_latest_stays(tmp_path, monkeypatch):
    import torch.distributed.checkpoint.filesystem as dcp_files

    model, optimizer = _model_and_optimizer(0)
    saver = Checkpointer(tmp_path)
    saver.save(1, model, optimizer, {"state": {}})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_files, "_write_item", disk_full)
    with pytest.raises(EmberError, match="No space left on device"):  # DCP's CheckpointException is no Exception
        saver.save(2, model, optimizer, {"state": {}})
    assert find_checkpoint(tmp_path).iteration == 1


def test_unreadable_latest_and_train_state_are_errors(tmp_path, capsys):
    model, optimizer = _model_and_optimizer(0)
    Checkpointer(tmp_path).save(1, model, optimizer, {"state": {}})
    (tmp_path / "latest").write_bytes(b"\xff\xfe iter")
    with pytest.raises(EmberError, match="not UTF-8"):
        find_checkpoint(tmp_path)
    for command in (["generate", "--load", str(tmp_path), "--prompt", "x"],
                    ["convert", "--from", "ember", "--to", "hf", str(tmp_path), str(tmp_path.parent / "hf")]):
        assert ember(command) == 2
        assert "latest (not UTF-8 text)" in _one_line_error(capsys, command[0])
    (tmp_path / "latest").write_text("iter_0000001\n")
    state = tmp_path / "iter_0000001" / "train_state.json"
    state.write_text(state.read_text()[:5])  # truncated
    with pytest.raises(CorruptCheckpointError, match="train_state.json is damaged"):
        usable_checkpoint(find_checkpoint(tmp_path / "iter_0000001"), print)
    (tmp_path / "iter_0000001" / CHECKSUMS).unlink()
    with pytest.raises(CorruptCheckpointError, match="train_state.json: not valid JSON"):
        find_checkpoint(tmp_path).train_state()


def test_a_missing_shard_is_an_error_not_a_traceback(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    Checkpointer(tmp_path).save(1, model, optimizer, {"state": {}})
    (tmp_path / "iter_0000001" / CHECKSUMS).unlink()
    next((tmp_path / "iter_0000001").glob("*.distcp")).unlink()
    with pytest.raises(EmberError, match="cannot load checkpoint"):
        load_training_state(find_checkpoint(tmp_path), *_model_and_optimizer(1))


# --------------------------------------------------------------------------- convert --force


def test_convert_force_never_deletes_its_source(tmp_path, capsys):
    from ember.checkpoint.weights import save_ember_weights
    from ember.models import Transformer, get_model_args

    args = get_model_args("tiny-llama", vocab_size=128)
    weights = save_ember_weights(Transformer(args), args, tmp_path / "root" / "weights", family="llama")
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("keep me")
    refused = {
        str(weights): "is the source",
        str(tmp_path / "root"): "holds the source",
        str(unrelated): "is not an earlier export",
    }
    for out, message in refused.items():
        assert ember(["convert", "--from", "ember", "--to", "hf", str(weights), out, "--force"]) == 2
        assert message in _one_line_error(capsys, "convert")
    assert (weights / "ember_model.json").is_file() and (unrelated / "thesis.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert ember(["convert", "--from", "ember", "--to", "hf", str(weights), str(tmp_path / "file"), "--force"]) == 2
    assert "is a file" in _one_line_error(capsys, "convert")
    # --force replaces an earlier output
    for _ in range(2):
        assert ember(["convert", "--from", "ember", "--to", "hf", str(weights), str(tmp_path / "hf"), "--force"]) == 0
    hf = str(tmp_path / "hf")
    assert ember(["convert", "--from", "hf", "--to", "ember", hf, hf, "--force"]) == 2
    assert "is the source" in _one_line_error(capsys, "convert")
    assert (tmp_path / "hf" / "config.json").is_file()


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_train_state_is_truncated(
        trained, data, tokenizer_dir, tmp_path):
    save = _copy(trained, tmp_path)
    state = save / "iter_0000003" / "train_state.json"
    state.write_text(state.read_text()[:100])
    out = io.StringIO()
    result = run_training(train_config(_train_args(data, save, 4, tokenizer_dir)), stream=out)
    assert "train_state.json is damaged" in out.getvalue() and "iter_0000002 instead" in out.getvalue()
    assert min(result.losses) == 3 and find_checkpoint(save).iteration == 4

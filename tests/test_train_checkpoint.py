"""Checkpoint files: complete or absent, `latest`, `--keep-last`, leftovers of killed runs, RNG."""

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from ember.checkpoint.training import (Checkpointer, capture_rng_state, find_checkpoint, list_checkpoints,
                                       load_training_state, restore_rng_state, verify_checkpoint)
from ember.errors import EmberError


def _model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_save_keep_last_latest_and_reload(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    saver = Checkpointer(tmp_path, keep_last=2)
    for iteration in (1, 2, 3):
        saver.save(iteration, model, optimizer, {"state": {"iteration": iteration}})
    assert [i for i, _ in list_checkpoints(tmp_path)] == [2, 3]
    ref = find_checkpoint(tmp_path)
    assert ref.kind == "training" and ref.iteration == 3 and ref.train_state()["state"]["iteration"] == 3
    assert (ref.path / "rng" / "rank_00000.pt").is_file()

    other, other_optimizer = _model_and_optimizer(1)
    load_training_state(ref, other, other_optimizer)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    saved = optimizer.state_dict()["state"]
    for key, values in other_optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(value, saved[key][name])


def test_leftovers_of_a_killed_run_are_replaced(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    Checkpointer(tmp_path).save(2, model, optimizer, {"state": {}})
    (tmp_path / ".iter_0000004.tmp").mkdir()          # killed while writing
    (tmp_path / "iter_0000004").mkdir()               # killed after the rename, before `latest`
    (tmp_path / "iter_0000004" / "junk").write_text("x")
    assert find_checkpoint(tmp_path).iteration == 2    # `latest` decides, not the folder names
    saver = Checkpointer(tmp_path)
    assert not (tmp_path / ".iter_0000004.tmp").exists()
    saver.save(4, model, optimizer, {"state": {}})
    assert not (tmp_path / "iter_0000004" / "junk").exists()
    assert find_checkpoint(tmp_path).iteration == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_async_save_publishes_when_complete(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    saver = Checkpointer(tmp_path, async_save=True)
    saver.save(5, model, optimizer, {"state": {}})
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training goes on while the save is written: it must not see this
    saver.wait()
    ref = find_checkpoint(tmp_path)
    assert verify_checkpoint(ref) is None  # checksums.json written before the rename, and right
    other, _ = _model_and_optimizer(1)
    load_training_state(ref, other, None)
    for a, b in zip(expected, other.parameters()):
        assert torch.equal(a, b)


def test_missing_or_broken_checkpoints_say_so(tmp_path):
    assert find_checkpoint(tmp_path) is None
    model, optimizer = _model_and_optimizer(0)
    Checkpointer(tmp_path / "saved").save(2, model, optimizer, {"state": {}})
    (tmp_path / "saved" / "latest").unlink()  # killed before `latest` was first written
    assert find_checkpoint(tmp_path / "saved").iteration == 2
    (tmp_path / "iter_0000003").mkdir()  # not a checkpoint: no DCP metadata
    assert find_checkpoint(tmp_path) is None
    (tmp_path / "latest").write_text("iter_0000003\n")
    with pytest.raises(EmberError, match="missing or incomplete"):
        find_checkpoint(tmp_path)
    weights = tmp_path / "converted"
    weights.mkdir()
    (weights / "ember_model.json").write_text(json.dumps({}))
    assert find_checkpoint(weights).kind == "weights"


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]

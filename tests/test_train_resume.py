"""Checkpoints and faults: a run killed with SIGKILL (or stopped by SIGTERM) and resumed continues
with exactly the losses of a run that never stopped; a checkpoint resumes on another number of
data-parallel ranks; async saves, `latest` and `--keep-last` leave only complete checkpoints."""

import signal
from pathlib import Path

import pytest

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import read_metrics, run_ranks, train_config, write_token_dataset
from ember.checkpoint.training import find_checkpoint, list_checkpoints
from ember.train import run_training

ITERS = 10
LAYOUT = ["--use-distributed-optimizer"]  # 2 ranks, ZeRO-1: optimizer state sharded in the checkpoint


def _argv(data, out, extra=()):
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3",
            "--lr-warmup-iters", "2", "--min-lr", "3e-4", "--log-interval", "1", "--eval-interval", "2",
            "--eval-iters", "1", "--split", "90,10,0", "--output-dir", str(out), "--no-tensorboard", *extra]


def _train(data, out, extra=(), nprocs=2, **kwargs):
    return run_ranks(["-m", "ember.commands.train", *_argv(data, out, extra)], nprocs, timeout=240, **kwargs)


def _latest_iteration(save: Path) -> int:
    ref = find_checkpoint(save)
    return ref.iteration if ref else 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", seed=1)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _train(data, out, LAYOUT)
    assert result.returncode == 0, result.output[-3000:]
    return read_metrics(out)


@pytest.fixture(scope="module")
def killed_run(data, tmp_path_factory):
    """The same run, SIGKILLed once it has a checkpoint (saving asynchronously, keeping 2)."""
    out = tmp_path_factory.mktemp("killed")
    save = out / "ckpt"
    extra = [*LAYOUT, "--save", str(save), "--save-interval", "2", "--async-save", "--keep-last", "2"]
    result = _train(data, out, extra, stop_when=lambda: _latest_iteration(save) >= 2)
    assert result.killed, "the run ended before it could be killed: " + result.output[-2000:]
    killed_at = _latest_iteration(save)
    assert 2 <= killed_at < ITERS
    return out, save, killed_at, extra


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_losses(data, uninterrupted, killed_run):
    out, save, killed_at, extra = killed_run
    resumed = _train(data, out, [*extra, "--load", str(save)])
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resumed from {save / f'iter_{killed_at:07d}'}" in resumed.outputs[0]
    train, evals = read_metrics(out)
    ref_train, ref_evals = uninterrupted
    assert sorted(train) == list(range(1, ITERS + 1))
    for it in range(killed_at + 1, ITERS + 1):
        # bit-for-bit: same model, optimizer, loader position and RNG as if never stopped
        assert train[it]["loss"] == ref_train[it]["loss"], it
        assert train[it]["grad_norm"] == ref_train[it]["grad_norm"], it
        assert train[it]["lr"] == ref_train[it]["lr"], it
    for it in evals:
        assert evals[it]["eval_loss"] == ref_evals[it]["eval_loss"], it
    # --keep-last 2 with a `latest` pointer; nothing half-written is left behind
    assert [i for i, _ in list_checkpoints(save)] == [ITERS - 2, ITERS]
    assert (save / "latest").read_text().strip() == f"iter_{ITERS:07d}"
    assert not [p for p in save.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_resume_on_four_ranks_hybrid_sharded(data, uninterrupted, killed_run, tmp_path):
    """A ZeRO-1 checkpoint from 2 ranks resumes on 4 ranks as 2 replicas x 2 shards (DCP reshards)."""
    _, save, killed_at, _ = killed_run
    step = save / f"iter_{killed_at:07d}"
    if not step.exists():  # keep-last may have pruned it after the resumed run; take the oldest left
        killed_at, step = list_checkpoints(save)[0]
    result = _train(data, tmp_path, ["--use-distributed-optimizer", "--dp-replicate", "2", "--load", str(step)],
                    nprocs=4)
    assert result.returncode == 0, result.output[-3000:]
    train, _ = read_metrics(tmp_path)
    ref_train, _ = uninterrupted
    assert sorted(train) == list(range(killed_at + 1, ITERS + 1))
    for it in train:
        assert train[it]["loss"] == pytest.approx(ref_train[it]["loss"], rel=2e-5), it


@pytest.mark.slow
def test_sigterm_saves_and_stops_then_one_process_resumes(data, uninterrupted, tmp_path):
    save = tmp_path / "ckpt"
    extra = [*LAYOUT, "--save", str(save)]
    metrics = tmp_path / "logs" / "metrics.jsonl"
    stopped = _train(data, tmp_path, extra, stop_signal=signal.SIGTERM,
                     stop_when=lambda: metrics.exists() and metrics.read_text().count('"loss"') >= 2)
    assert stopped.returncodes == [0, 0], stopped.output[-3000:]
    assert "ember train: sigterm at iteration" in stopped.outputs[0]
    stop_iteration = int(stopped.outputs[0].split("sigterm at iteration")[1].split()[0])
    assert 2 <= stop_iteration < ITERS
    assert _latest_iteration(save) == stop_iteration
    train, _ = read_metrics(tmp_path)
    assert max(train) == stop_iteration

    # the 2-rank checkpoint, resumed by a single process, follows the 2-rank run
    out = tmp_path / "one"
    result = run_training(train_config(_argv(data, out, ["--load", str(save)])))
    assert result.iteration == ITERS
    resumed, _ = read_metrics(out)
    ref_train, _ = uninterrupted
    assert sorted(resumed) == list(range(stop_iteration + 1, ITERS + 1))
    for it in resumed:
        assert resumed[it]["loss"] == pytest.approx(ref_train[it]["loss"], rel=2e-5), it

"""Checkpoints reshard across layouts: a run trained at TP2 x PP2 (4 processes, sequence parallel)
and saved with DCP (asynchronously) resumes at TP1 x PP4, at DP4 (ZeRO-1) and in one process, and the next step's
loss, gradient norm and evaluation loss are those of the TP2 x PP2 run that went on uninterrupted.

The model is a tiny Qwen3 with 4 layers: tied embeddings (the pipeline's last stage holds a copy
of the embedding as its output head, with its own optimizer state, and DP4 holds one matrix for
both), q/k norms (replicated weights with partial gradients under sequence parallelism), vocab-
and head-sharded matrices under TP. The next step depends on the AdamW moments as much as on the
weights, so a checkpoint that lost or misplaced optimizer state fails the comparison.

Tolerance: as in test_train_layouts (same reasons: fp32 sums in another order): rel 1e-5 on the
losses, 1e-4 on the gradient norm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import read_metrics, run_ranks, train_config, write_token_dataset  # noqa: E402

SAVED_AT, ITERS = 2, 3
LOSS_REL, NORM_REL = 1e-5, 1e-4
TP2_PP2 = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"]


def _argv(data, out, extra=()):
    return ["--model", "tiny-qwen3", "--num-layers", "4", "--vocab-size", "512", "--data-path", str(data),
            "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--min-lr", "3e-4", "--weight-decay", "0.1", "--clip-grad", "0.5",
            "--log-interval", "1", "--eval-interval", str(ITERS), "--eval-iters", "1", "--split", "90,10,0",
            "--output-dir", str(out), "--no-tensorboard", "--no-compile", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", seed=5)


@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory):
    """TP2 x PP2 for 3 iterations, saving at 2 (and 3), asynchronously: the uninterrupted reference."""
    out = tmp_path_factory.mktemp("tp2pp2")
    save = out / "ckpt"
    result = run_ranks(["-m", "ember.commands.train", *_argv(data, out, [*TP2_PP2, "--save", str(save), "--save-interval",
                                                                  str(SAVED_AT), "--async-save"])], 4, timeout=300)
    assert result.returncode == 0, result.output[-4000:]
    checkpoint = save / f"iter_{SAVED_AT:07d}"
    assert (checkpoint / ".metadata").is_file()
    return read_metrics(out), checkpoint


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("layout, nprocs, flags", [
    ("tp1xpp4", 4, ["--pipeline-model-parallel-size", "4"]),
    ("dp4", 4, ["--use-distributed-optimizer"]),
    ("one-process", 1, []),
])
def test_resume_on_another_layout_continues_the_run(data, saved_run, tmp_path, layout, nprocs, flags):
    (train, evals), checkpoint = saved_run
    argv = _argv(data, tmp_path, [*flags, "--load", str(checkpoint)])
    if nprocs == 1:
        from ember.train import run_training

        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_training(train_config(argv))
        finally:
            torch.set_num_threads(threads)
    else:
        result = run_ranks(["-m", "ember.commands.train", *argv], nprocs, timeout=300)
        assert result.returncode == 0, result.output[-4000:]
        assert f"resumed from {checkpoint}" in result.outputs[0]
    resumed, resumed_evals = read_metrics(tmp_path)
    assert sorted(resumed) == [ITERS], layout  # it started at the checkpoint's iteration
    assert resumed[ITERS]["loss"] == pytest.approx(train[ITERS]["loss"], rel=LOSS_REL), layout
    assert resumed[ITERS]["grad_norm"] == pytest.approx(train[ITERS]["grad_norm"], rel=NORM_REL), layout
    assert resumed[ITERS]["lr"] == train[ITERS]["lr"]
    assert resumed_evals[ITERS]["eval_loss"] == pytest.approx(evals[ITERS]["eval_loss"], rel=LOSS_REL), layout
    # the step from the checkpoint changed the loss: equal losses are not those of untrained weights
    assert abs(train[ITERS]["loss"] - train[1]["loss"]) > 1e-3

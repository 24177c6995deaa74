"""Data parallelism on gloo: 2 and 4 processes (replicate, ZeRO-1, full shard; a dense and an
MoE model; launched directly or by `ember train --nproc-per-node`) train with the losses of one
process on the same global batch."""

import os
import signal
import subprocess
import sys

import pytest

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import free_port, read_metrics, run_ranks, train_config, write_token_dataset
from ember.train import run_training

ITERS = 4
pytestmark = pytest.mark.slow  # every test starts processes: see tests/conftest.py


def _argv(data, out, extra=()):
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", str(ITERS), "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--min-lr", "3e-4", "--weight-decay", "0.1", "--clip-grad", "0.5",
            "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--split", "90,10,0",
            "--output-dir", str(out), "--no-tensorboard", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One process, eight micro-batches of gradient accumulation per step."""
    out = tmp_path_factory.mktemp("single")
    result = run_training(train_config(_argv(data, out)))
    assert result.iteration == ITERS
    return read_metrics(out)


@pytest.mark.parametrize("nprocs, extra", [
    (2, ["--use-distributed-optimizer", "--overlap-grad-reduce"]),  # ZeRO-1, per-block reduction
    (4, ["--use-torch-fsdp2"]),                                   # full sharding
])  # hybrid sharding (--dp-replicate) runs in test_train_resume, resuming on 4 ranks
def test_data_parallel_losses_match_one_process(data, reference, tmp_path, nprocs, extra):
    result = run_ranks(["-m", "ember.commands.train", *_argv(data, tmp_path, extra)], nprocs, timeout=240)
    assert result.returncode == 0, result.output[-3000:]
    _assert_same_run(read_metrics(tmp_path), reference)


def test_ember_train_launches_torchrun_replicated(data, tmp_path):
    """`ember train --nproc-per-node 2` checks the config, then runs torchrun: replicate mode, on a
    model with tied input and output embeddings (one matrix, two gradient contributions)."""
    tied = ["--model", "tiny-qwen3"]
    reference = run_training(train_config(_argv(data, tmp_path / "one", tied)))
    assert reference.iteration == ITERS
    command = [sys.executable, "-m", "ember.cli", "train", "--nproc-per-node", "2", "--master-port",
               str(free_port()), *_argv(data, tmp_path, tied)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-3000:]
    assert "2 process(es) on cpu (dp 2, replicate)" in output
    _assert_same_run(read_metrics(tmp_path), read_metrics(tmp_path / "one"))


def test_moe_model_matches_one_process(data, tmp_path):
    """tiny-mixtral (load-balancing loss on): 2 ZeRO-1 ranks follow one process."""
    moe = ["--model", "tiny-mixtral"]
    run_training(train_config(_argv(data, tmp_path / "one", moe)))
    result = run_ranks(["-m", "ember.commands.train", *_argv(data, tmp_path / "two", [*moe, "--use-distributed-optimizer"])],
                       2, timeout=240)
    assert result.returncode == 0, result.output[-3000:]
    _assert_same_run(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"))


def _assert_same_run(run, reference):
    train, evals = run
    ref_train, ref_evals = reference
    assert sorted(train) == sorted(ref_train) == list(range(1, ITERS + 1))
    for it in train:
        assert train[it]["loss"] == pytest.approx(ref_train[it]["loss"], rel=2e-5, abs=2e-6), it
        assert train[it]["grad_norm"] == pytest.approx(ref_train[it]["grad_norm"], rel=1e-4), it
        assert train[it]["lr"] == ref_train[it]["lr"]
        assert train[it]["consumed_samples"] == ref_train[it]["consumed_samples"]
    # the weights moved: later losses differ from the first, so agreement is not trivial
    assert abs(ref_train[ITERS]["loss"] - ref_train[1]["loss"]) > 1e-3
    assert sorted(evals) == sorted(ref_evals) == [2, 4]
    for it in evals:
        assert evals[it]["eval_loss"] == pytest.approx(ref_evals[it]["eval_loss"], rel=2e-5), it


def test_sharded_converted_weights_reach_every_rank(data, tmp_path):
    """`--load CONVERTED` on 2 ranks (full sharding, tied embeddings): rank 0 reads the weight
    files one at a time and broadcasts each, and the run's losses are those of one process
    started from the same folder."""
    from ember.models import Transformer, get_model_args
    from ember.checkpoint.weights import save_ember_weights

    args = get_model_args("tiny-qwen3", vocab_size=512)
    source = Transformer(args)
    source.init_weights(seed=321)
    folder = save_ember_weights(source, args, tmp_path / "converted", family="qwen3", max_shard_bytes=40_000)
    assert len(list(folder.glob("*.safetensors"))) > 3  # several files, the embedding in its own
    load = ["--load", str(folder), "--finetune"]
    argv = [a for a in _argv(data, tmp_path / "one", load) if a not in ("--model", "tiny-llama")]
    run_training(train_config(argv))
    argv = [a for a in _argv(data, tmp_path / "two", [*load, "--use-torch-fsdp2"]) if a not in ("--model", "tiny-llama")]
    result = run_ranks(["-m", "ember.commands.train", *argv], 2, timeout=240)
    assert result.returncode == 0, result.output[-3000:]
    _assert_same_run(read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one"))


def test_a_broken_converted_folder_stops_every_rank(data, tmp_path):
    """Rank 0 alone reads converted weights; when a file is missing, every rank stops with the
    same one-line error instead of waiting for weights that never come."""
    from ember.models import Transformer, get_model_args
    from ember.checkpoint.weights import save_ember_weights

    args = get_model_args("tiny-qwen3", vocab_size=512)
    source = Transformer(args)
    folder = save_ember_weights(source, args, tmp_path / "converted", family="qwen3", max_shard_bytes=40_000)
    sorted(folder.glob("*.safetensors"))[-1].unlink()
    argv = [a for a in _argv(data, tmp_path / "two", ["--load", str(folder), "--finetune"])
            if a not in ("--model", "tiny-llama")]
    result = run_ranks(["-m", "ember.commands.train", *argv], 2, timeout=120)
    assert result.returncode != 0 and not result.killed, result.output[-3000:]
    assert all("safetensors" in out and "Traceback" not in out for out in result.outputs), result.output[-3000:]

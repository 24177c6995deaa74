"""The console of multi-process runs: each warning once (rank 0, with the ranks that raised it),
no FSDP2 "returned a view tensor" warning at a pipeline x expert-parallel layout (its cause, the
pipeline's aux-loss hook returning a view of the stage output, is gone), and streamed text that
reaches a launcher in whole lines.

References: the single-process run (losses and gradient norms of PP2 x EP2 under FSDP2 equal its
own), torchrun's own log tailer (`tail_logfile`, which prefixes what it reads with the rank)."""

from __future__ import annotations

import io
import re
import threading
from pathlib import Path

import pytest

from dist_utils import read_metrics, run_ranks, train_config, write_token_dataset
from ember.commands.predict import WholeLines
from ember.train.console import RankWarnings, describe_ranks

ROOT = Path(__file__).resolve().parents[1]
ITERS = 3
# FSDP2 needs data parallelism (dp 2); the pipeline's aux-loss hook needs a MoE model on PP stages
LAYOUT = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--use-torch-fsdp2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", seed=5)


def _argv(data, out, *extra) -> list[str]:
    return ["--model", "tiny-mixtral", "--num-layers", "4", "--vocab-size", "512", "--data-path", str(data),
            "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--clip-grad", "0.5", "--log-interval", "1", "--eval-iters", "0",
            "--output-dir", str(out), "--no-tensorboard", "--no-compile", *extra]


@pytest.mark.slow  # 4 processes and a single-process reference
def test_pp2_ep2_fsdp_run_warns_once_and_trains_like_one_process(data, tmp_path):
    result = run_ranks(["-m", "ember.commands.train", *_argv(data, tmp_path / "run", *LAYOUT)], 4, timeout=400,
                       cwd=ROOT)
    assert result.returncode == 0, result.output[-5000:]
    assert "returned a view tensor" not in result.output  # FSDP2's warning: its cause is removed
    assert "This is suboptimal" not in result.output  # DTensor's, understood and silenced
    # every warning of every rank is printed at most once, by rank 0, saying which ranks had it
    for rank, text in enumerate(result.outputs[1:], start=1):
        assert not re.search(r"warn", text, re.IGNORECASE), f"rank {rank} printed: {text[-2000:]}"
    shown = [line for line in result.outputs[0].splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    assert len(shown) == len(set(shown)), shown
    assert all(line.startswith("warning (") for line in shown), shown

    from ember.train import run_training

    reference = run_training(train_config(_argv(data, tmp_path / "reference")), stream=io.StringIO())
    assert reference.iteration == ITERS
    train, _ = read_metrics(tmp_path / "run")
    ref, _ = read_metrics(tmp_path / "reference")
    assert sorted(train) == sorted(ref) == list(range(1, ITERS + 1))
    for it in ref:  # tolerances of tests/test_train_layouts.py (fp32 sums in another order)
        assert train[it]["loss"] == pytest.approx(ref[it]["loss"], rel=1e-5), it
        assert train[it]["grad_norm"] == pytest.approx(ref[it]["grad_norm"], rel=1e-4), it


def test_without_a_process_group_a_rank_prints_its_own_warnings_once(capsys):
    sink = RankWarnings(2, 4, emit=lambda text: pytest.fail("only rank 0 prints for the others"))
    sink.pending = ["UserWarning: x (a.py:1)", "UserWarning: x (a.py:1)"]
    sink.flush()  # a failing run: no process group to compare notes over
    assert sink.pending == [] and capsys.readouterr().err == "warning (rank 2): UserWarning: x (a.py:1)\n"
    assert describe_ranks([0, 1, 2, 3], 4) == "all 4 ranks"
    assert describe_ranks([3], 4) == "rank 3" and describe_ranks([1, 3], 4) == "ranks 1, 3"


def test_streamed_text_reaches_torchrun_in_whole_lines(tmp_path):
    """torchrun's tailer reads each rank's log with readline and prefixes what it gets; pieces
    written through WholeLines never leave it half a line, so every prefix starts a line."""
    from torch.distributed.elastic.multiprocessing.tail_log import tail_logfile

    log = tmp_path / "rank0.log"
    shown = io.StringIO()
    finished = threading.Event()
    with open(log, "w") as target:
        tailer = threading.Thread(target=tail_logfile, args=("[rank0]:", str(log), shown, finished, 0.001),
                                  kwargs={"log_line_filter": lambda line: True})
        tailer.start()
        stream = WholeLines(target)
        pieces = ["Return the", " value", " of the\nfunction", " call.", "\n", "Second", " prompt"]
        for piece in pieces:
            stream.write(piece)
            stream.flush()
            assert log.read_text() == "" or log.read_text().endswith("\n")
            finished.wait(0.01)  # the tailer polls while generation "runs"
        stream.close_line()
    finished.set()
    tailer.join(5)
    assert shown.getvalue() == "[rank0]:Return the value of the\n[rank0]:function call.\n[rank0]:Second prompt\n"

"""A node lost mid-run, on loopback: two `ember launch` agents (two "nodes", one process each)
train together through torchelastic's c10d rendezvous; node 1 is lost (its rank and its agent
SIGKILLed while the ranks are in the middle of the run) and started again; the job goes on from
the last checkpoint and ends with the losses of an uninterrupted run (one process, same global
batch, in this test process).

When run as a module (`python -m test_elastic stall MARKER ARGS`, PYTHONPATH=tests) this file is
the rank of the lost node: after logging STALL_AFTER it writes MARKER and waits to be killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launch import _env, _free_port, _train_args
from test_launch_faults import _alive, _children

STALL_AFTER = 3  # the lost node's rank stops after this iteration (a checkpoint exists at 2)
TRAIN_ITERS = 6
TIMEOUT = 150


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from dist_utils import write_token_dataset

    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", documents=150)


def _agent(tmp_path: Path, port: int, node: int, train_args: list[str], log: str, **env) -> subprocess.Popen:
    argv = [sys.executable, "-m", "ember.cli", "launch", "--nnodes", "2", "--node-rank", str(node),
            "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--rdzv-backend", "c10d", "--rdzv-id", "elastic-test", "--max-restarts", "1", "--timeout", "60",
            "--log-dir", f"node{node}/logs", "--module", "test_elastic", "--", "stall", *train_args]
    with open(tmp_path / log, "w") as out:
        return subprocess.Popen(argv, cwd=tmp_path, env=_env(**env), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(_children(current))
    return found


def _kill_tree(pid: int) -> None:
    """A lost node: every process of it at once, with no chance to save or say goodbye."""
    for member in reversed(_tree(pid)):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for(condition, timeout: float, what: str, processes) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        if any(p.poll() is not None for p in processes):
            raise AssertionError(f"an agent ended while waiting for {what}: {[p.returncode for p in processes]}")
        time.sleep(0.1)


def _dry_run(argv: list[str], capsys) -> str:
    import argparse

    from ember.commands.launch import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--dry-run", *argv])) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_node_range_goes_to_torchrun_as_an_elastic_c10d_job(token_data, tmp_path, monkeypatch, capsys):
    """`--nnodes MIN:MAX` becomes torchrun's elastic form, as torchrun's own parser reads it."""
    import shlex

    from torch.distributed.run import config_from_args, parse_args

    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "EMBER_TINY", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    args = _train_args(token_data, tmp_path / "run", "--data-cache-path", str(tmp_path / "cache"))
    command = shlex.split(_dry_run(["--nnodes", "1:2", "--nproc-per-node", "1", "--master-addr", "10.0.0.1",
                                    "--master-port", "29400", "--rdzv-id", "job7", "--", *args], capsys))
    flags = [flag for flag in command[command.index("torch.distributed.run") + 1:command.index("-m", 3)]
             if not flag.startswith("--log-dir")]  # (torchrun's parser would make the folder)
    config, _, _ = config_from_args(parse_args([*flags, "train.py"]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 2, 1)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "10.0.0.1:29400", "job7")


def test_every_node_count_of_the_range_is_checked(token_data, tmp_path, monkeypatch, capsys):
    """Global batch 6 fits 3 nodes x 2 processes but not 2 x 2: refused before anything starts."""
    from ember.errors import EmberError

    for name in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "EMBER_TINY", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    args = _train_args(token_data, tmp_path / "run", "--data-cache-path", str(tmp_path / "cache"),
                       "--micro-batch-size", "1", "--global-batch-size", "6")
    with pytest.raises(EmberError, match=r"--nnodes 2:3: with 2 node\(s\): global batch size 6 is not divisible"):
        _dry_run(["--nnodes", "2:3", "--nproc-per-node", "2", "--", *args], capsys)
    _dry_run(["--nnodes", "3", "--nproc-per-node", "2", "--", *args], capsys)  # the fixed size alone is fine


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
def test_lost_node_rejoins_and_the_run_ends_with_the_uninterrupted_losses(tmp_path, token_data):
    from dist_utils import read_metrics, train_config
    from ember.train import run_training

    out, marker = tmp_path / "run", tmp_path / "stalled"
    args = _train_args(token_data, out, "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                       "--train-iters", str(TRAIN_ITERS), "--data-cache-path", str(tmp_path / "cache"))
    port = _free_port()
    agents, started = [], time.monotonic()
    try:
        agents.append(_agent(tmp_path, port, 0, args, "node0.log"))
        agents.append(_agent(tmp_path, port, 1, args, "node1.log", EMBER_TEST_STALL_FILE=marker))
        _wait_for(marker.exists, TIMEOUT, f"node 1's rank to reach iteration {STALL_AFTER}", agents)
        lost = _tree(agents[1].pid)
        _kill_tree(agents[1].pid)
        agents[1].wait(10)
        # SIGKILLed processes still take a moment to exit (freeing their memory) on a busy machine
        _wait_for(lambda: not [pid for pid in lost if _alive(pid)], 30, "node 1's killed processes to exit", [])
        agents[1] = _agent(tmp_path, port, 1, args, "node1.rejoined.log")  # the node comes back
        for agent in agents:
            agent.wait(max(TIMEOUT - (time.monotonic() - started), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for agent in agents:
            if agent.poll() is None:
                _kill_tree(agent.pid)
                agent.wait()
    logs = {name: (tmp_path / name).read_text() for name in ("node0.log", "node1.log", "node1.rejoined.log")
            if (tmp_path / name).exists()}
    assert [agent.returncode for agent in agents] == [0, 0], json.dumps(logs, indent=1)[-6000:]
    print(f"elastic run with a lost node: {time.monotonic() - started:.1f} s")

    resumed, _ = read_metrics(out)
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in records if "loss" in r and "eval_loss" not in r]
    assert iterations.count(STALL_AFTER) == 2 or iterations.count(STALL_AFTER + 1) == 2, iterations  # redone
    single = tmp_path / "single"
    run_training(train_config(_train_args(token_data, single, "--train-iters", str(TRAIN_ITERS),
                                          "--data-cache-path", str(tmp_path / "single-cache"))))
    reference, _ = read_metrics(single)
    assert sorted(resumed) == sorted(reference) == list(range(1, TRAIN_ITERS + 1))
    for iteration, record in reference.items():
        assert resumed[iteration]["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-6), iteration


# --------------------------------------------------------------------------- the lost node's rank


def _stall_worker(marker: str, train_argv: list[str]) -> int:
    """ember.train, except that it stops (as a hung or dying node would) after STALL_AFTER."""
    from ember.commands.train import main
    from ember.train import trainer

    original = trainer.Trainer._log

    def log_then_stall(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.state.iteration == STALL_AFTER:
            Path(marker).write_text(str(os.getpid()))
            while True:
                time.sleep(1)

    trainer.Trainer._log = log_then_stall
    return main(train_argv)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    assert mode == "stall"
    stall_file = os.environ.pop("EMBER_TEST_STALL_FILE", "")
    if stall_file and not os.path.exists(stall_file):
        sys.exit(_stall_worker(stall_file, rest))
    from ember.commands.train import main

    sys.exit(main(rest))

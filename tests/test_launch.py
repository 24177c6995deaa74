"""`ember launch`: the seeds' launch variables, per-rank logs, two nodes on one machine, node-local
data caches, and elastic restarts that resume from the last checkpoint.

Multi-process tests pick free ports, run every launcher in its own process group with a timeout,
and kill whatever is left. When run as a module (`python -m test_launch MODE ...`, PYTHONPATH=tests)
this file is also the worker the launcher starts in the environment and restart tests.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TIMEOUT = 240


def _launch_parser() -> argparse.ArgumentParser:
    from ember.commands.launch import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def _torchrun_view(plan):
    """torchrun's own reading of the flags ember launch hands it (the independent reference)."""
    from torch.distributed.run import parse_args

    return parse_args([*plan.torchrun_flags(), "-m", plan.module, *plan.train_args])


# --------------------------------------------------------------------------- reading the command line


def test_seed_variables_give_the_torchrun_layout(monkeypatch):
    from ember.commands.launch import plan_from_args

    seed = {"GPUS_PER_NODE": "8", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6001", "NNODES": "2", "NODE_RANK": "1"}
    for key, value in seed.items():
        monkeypatch.setenv(key, value)
    plan = plan_from_args(_launch_parser().parse_args(["--", "--model", "tiny-llama"]))
    view = _torchrun_view(plan)
    assert (view.nproc_per_node, view.nnodes, view.node_rank) == ("8", "2", 1)
    assert (view.master_addr, view.master_port) == ("10.1.2.3", 6001)
    assert plan.world_size == int(seed["GPUS_PER_NODE"]) * int(seed["NNODES"])
    assert view.training_script_args == ["--model", "tiny-llama"]
    # flags beat the environment
    plan = plan_from_args(_launch_parser().parse_args(["--nproc-per-node", "2", "--node-rank", "0", "--", "x"]))
    assert (plan.nproc_per_node, plan.node_rank, plan.nnodes) == (2, 0, 2)


def test_msrun_positional_form():
    """MindFormers: "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN TIMEOUT."""
    from ember.commands.launch import plan_from_args

    command = "run_mindformer.py --config c.yaml --train_dataset_dir d --use_parallel True --run_mode train"
    args = _launch_parser().parse_args(["--msrun", command, "64", "8", "10.0.0.1", "8118", "3", "out/msrun_log",
                                        "False", "300"])
    plan = plan_from_args(args)
    view = _torchrun_view(plan)
    assert (view.nproc_per_node, view.nnodes, view.node_rank, view.master_port) == ("8", "8", 3, 8118)
    assert view.rdzv_conf == "timeout=300"
    assert (plan.log_dir, plan.join, plan.world_size) == ("out/msrun_log", False, 64)
    assert plan.train_args == command.split()[1:]  # run_mindformer.py is ember's trainer
    single = plan_from_args(_launch_parser().parse_args(["--msrun", command, "8"]))
    assert (single.nproc_per_node, single.nnodes, single.node_rank, single.join) == (8, 1, 0, True)


@pytest.mark.parametrize("argv, message", [
    (["--nnodes", "2", "--node-rank", "2", "--", "x"], "NODE_RANK 2 is outside 0..1"),
    (["--msrun", "run_mindformer.py", "12", "8"], "not a multiple of LOCAL_WORKER"),
    (["--msrun", "run_mindformer.py", "8", "8", "localhost", "8118", "0", "log", "False", "300", "extra"],
     "takes at most 8"),
])
def test_bad_layouts_are_reported(argv, message):
    from ember.errors import EmberError
    from ember.commands.launch import plan_from_args

    with pytest.raises(EmberError, match=message):
        plan_from_args(_launch_parser().parse_args(argv))


# --------------------------------------------------------------------------- running launchers


def _free_port() -> int:
    from dist_utils import free_port

    return free_port()


def _env(**extra) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    for key in ("EMBER_TINY", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GPUS_PER_NODE", "NNODES", "NODE_RANK"):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_launchers(commands: list[tuple[list[str], dict[str, str]]], cwd: Path,
                  timeout: float = TIMEOUT) -> list[tuple[int | str, str]]:
    """Start every `ember launch` command at once (the nodes of one job); wait for all of them.
    Each runs in its own process group, killed whole past the timeout."""
    processes = []
    for index, (argv, env) in enumerate(commands):
        log = open(cwd / f"launcher{index}.log", "w+")
        process = subprocess.Popen([sys.executable, "-m", "ember.cli", "launch", *argv], cwd=cwd, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append((process, log))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for process, log in processes:
            try:
                code: int | str = process.wait(max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                code = "timeout"
            log.seek(0)
            results.append((code, log.read()))
    finally:
        for process, log in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
            log.close()
    return results


@pytest.mark.slow
def test_ranks_get_the_world_nccl_settings_and_their_own_log(tmp_path):
    """Two nodes of one process each: RANK/WORLD_SIZE/MASTER_* as torchrun gives them, NCCL_*
    passed through, and each rank's stdout and stderr together in LOG_DIR/worker_<rank>.log."""
    port = _free_port()
    commands = []
    for node in range(2):
        env = _env(GPUS_PER_NODE=1, NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   NCCL_DEBUG="INFO", NCCL_IB_HCA="mlx5")
        commands.append((["--log-dir", f"logs{node}", "--module", "test_launch", "--", "env", str(tmp_path)], env))
    results = run_launchers(commands, tmp_path, timeout=120)
    assert [code for code, _ in results] == [0, 0], results
    seen = {}
    for node in range(2):
        (log,) = (tmp_path / f"logs{node}").glob("worker_*.log")
        record = json.loads((tmp_path / f"env_{log.stem.split('_')[1]}.json").read_text())
        seen[record["RANK"]] = record
        text = log.read_text()
        assert f"stdout of rank {record['RANK']}" in text and f"stderr of rank {record['RANK']}" in text
    assert sorted(seen) == ["0", "1"]
    for record in seen.values():
        assert record["WORLD_SIZE"] == "2" and record["MASTER_PORT"] == str(port)
        assert record["NCCL_DEBUG"] == "INFO" and record["NCCL_IB_HCA"] == "mlx5"


@pytest.mark.slow
def test_msrun_join_false_returns_while_the_job_runs_on(tmp_path):
    """msrun's JOIN=False: the launcher returns at once; the job runs in the background, its ranks
    logging to LOG_DIR."""
    import re

    port = _free_port()
    results = run_launchers([(["--module", "test_launch", "--msrun", f"run_mindformer.py env {tmp_path}", "1", "1",
                               "127.0.0.1", str(port), "0", "msrun_log", "False", "60"], _env())], tmp_path, timeout=60)
    (code, output), = results
    assert code == 0, output
    pid = int(re.search(r"background \(pid (\d+)\)", output).group(1))
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "env_0.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "env_0.json").is_file(), (tmp_path / "msrun_log" / "launcher_node0.log").read_text()
        while "stdout of rank 0" not in _read(tmp_path / "msrun_log" / "worker_0.log") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "stdout of rank 0" in _read(tmp_path / "msrun_log" / "worker_0.log")
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_config_errors_stop_before_any_rank_starts(tmp_path):
    results = run_launchers([(["--nproc-per-node", "2", "--master-port", str(_free_port()), "--",
                               "--model", "tiny-llama", "--data-path", "missing_text_document",
                               "--train-iters", "2"], _env())], tmp_path, timeout=60)
    (code, output), = results
    assert code == 2 and "missing_text_document" in output and "ember launch: error" in output
    assert not (tmp_path / "logs").exists()  # no rank ever started


# --------------------------------------------------------------------------- two nodes, one machine


def _train_args(data: str, out: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", data, "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4", "--lr", "3e-3",
            "--log-interval", "1", "--split", "100,0,0", "--output-dir", str(out), "--no-tensorboard",
            "--seed", "7", *extra]


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from dist_utils import write_token_dataset

    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", documents=150)


def _cache_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*-description.json")) if folder.is_dir() else []


def _two_nodes(tmp_path: Path, train_args, **env) -> list[tuple[int | str, str]]:
    port = _free_port()
    commands = []
    for node in range(2):
        node_env = _env(GPUS_PER_NODE=1, NNODES=2, NODE_RANK=node, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)
        commands.append((["--log-dir", f"node{node}/logs", "--", *train_args(node)], node_env))
    return run_launchers(commands, tmp_path)


@pytest.mark.slow
def test_two_nodes_train_together_each_with_its_own_cache(tmp_path, token_data):
    """Two launcher invocations (NODE_RANK 0 and 1, loopback master) train one model; with
    --no-shared-storage each node builds the index cache in its own folder. The losses are those
    of one process doing the same global batch."""
    from dist_utils import read_metrics, train_config
    from ember.train import run_training

    out = tmp_path / "run"
    results = _two_nodes(tmp_path, lambda node: _train_args(
        token_data, out, "--no-shared-storage", "--data-cache-path", str(tmp_path / f"node{node}" / "cache")))
    assert [code for code, _ in results] == [0, 0], results
    for node in range(2):
        assert _cache_entries(tmp_path / f"node{node}" / "cache"), f"node {node} built no cache"
    two_nodes, _ = read_metrics(out)

    single = tmp_path / "single"
    run_training(train_config(_train_args(token_data, single, "--data-cache-path", str(tmp_path / "single-cache"))))
    reference, _ = read_metrics(single)
    assert sorted(two_nodes) == sorted(reference) == [1, 2, 3, 4]
    for iteration, record in reference.items():
        assert two_nodes[iteration]["loss"] == pytest.approx(record["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_with_shared_storage_only_one_node_builds(tmp_path, token_data):
    """Shared storage (the default): global rank 0 builds the cache; the other node only reads it.
    Given a folder of its own it finds nothing there, builds nothing, and says what to pass."""
    out = tmp_path / "run"
    results = _two_nodes(tmp_path, lambda node: _train_args(
        token_data, out, "--data-cache-path", str(tmp_path / f"node{node}" / "cache")))
    assert all(code != 0 and code != "timeout" for code, _ in results), results
    assert "ember launch: rank 1 (exit 2) failed" in results[1][1], results[1][1]
    assert "Traceback" not in results[1][1]  # the launcher reports, it does not crash
    assert _cache_entries(tmp_path / "node0" / "cache")
    assert not _cache_entries(tmp_path / "node1" / "cache")
    node1_log = (tmp_path / "node1" / "logs" / "worker_1.log").read_text()
    assert "--no-shared-storage" in node1_log


# --------------------------------------------------------------------------- elastic restart

KILL_AFTER = 3  # the killed rank dies right after logging this iteration (a checkpoint exists at 2)


@pytest.mark.slow
def test_killed_rank_is_restarted_and_training_resumes(tmp_path, token_data):
    """--max-restarts 1: rank 1 is SIGKILLed mid-run (after iteration 3; checkpoint at 2); the
    launcher restarts both ranks, which resume from iteration 2 by themselves and finish. The
    iteration done twice has the same loss both times (the resume is exact)."""
    out = tmp_path / "run"
    args = _train_args(token_data, out, "--save", str(tmp_path / "ckpt"), "--save-interval", "2",
                       "--train-iters", "6", "--data-cache-path", str(tmp_path / "cache"))
    results = run_launchers([(["--nproc-per-node", "2", "--master-port", str(_free_port()), "--max-restarts", "1",
                               "--module", "test_launch", "--", "crash", *args], _env())], tmp_path)
    (code, output), = results
    assert code == 0, output
    logs = tmp_path / "logs"
    assert (logs / "worker_1.restart1.log").is_file(), sorted(p.name for p in logs.iterdir())
    assert "resumed from" in (logs / "worker_0.restart1.log").read_text()
    losses: dict[int, list[float]] = {}
    for line in (out / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses.setdefault(record["iteration"], []).append(record["loss"])
    assert sorted(losses) == list(range(1, 7))
    assert len(losses[KILL_AFTER]) == 2 and losses[KILL_AFTER][0] == pytest.approx(losses[KILL_AFTER][1], rel=1e-6)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "iter_0000006"


# --------------------------------------------------------------------------- the workers


def _env_worker(folder: str) -> None:
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NCCL_DEBUG", "NCCL_IB_HCA")
    rank = os.environ["RANK"]
    Path(folder, f"env_{rank}.json").write_text(json.dumps({k: os.environ.get(k) for k in keys}))
    print(f"stdout of rank {rank}", flush=True)
    print(f"stderr of rank {rank}", file=sys.stderr, flush=True)


def _crash_worker(train_argv: list[str]) -> int:
    """ember.train, except that on the first attempt rank 1 kills itself after logging KILL_AFTER."""
    from ember.train import trainer
    from ember.commands.train import main

    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        original = trainer.Trainer._log

        def log_then_die(self, *args, **kwargs):
            original(self, *args, **kwargs)
            if self.state.iteration == KILL_AFTER:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.Trainer._log = log_then_die
    return main(train_argv)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "env":
        _env_worker(rest[0])
        sys.exit(0)
    sys.exit(_crash_worker(rest))

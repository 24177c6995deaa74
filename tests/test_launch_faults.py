"""`ember launch` when things go wrong: a killed launcher takes its ranks down, rendezvous faults end
in one line that says what to do, layout errors stop `ember train --nproc-per-node` before any
process starts, and a failed run's last line is its first failed rank's own error.

Every launcher runs in its own process group with a timeout; the ranks (torchelastic starts each
in a session of its own) are recorded and killed by pid if anything is left. When run as a module
(`python -m test_launch_faults fail ARGS`, PYTHONPATH=tests) this file is also the worker of the
failed-run test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_launch import _env, _free_port, _train_args, run_launchers

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    from dist_utils import write_token_dataset

    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", documents=150)


def _last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --------------------------------------------------------------------------- a killed launcher


def _children(pid: int) -> set[int]:
    """The direct children of `pid` (every thread's), from /proc."""
    found: set[int] = set()
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.update(int(child) for child in (task / "children").read_text().split())
    except OSError:
        pass
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("iter_*")) if folder.is_dir() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_killing_the_launcher_stops_its_ranks(tmp_path, token_data, sig):
    """A launcher killed (SIGKILL: no handler runs) or told to stop (SIGTERM, SIGHUP: a closed
    terminal) while its two ranks train: every rank is gone soon after, and no checkpoint appears
    after that (today a SIGKILLed launcher leaves them training and saving as orphans)."""
    ckpt = tmp_path / "ckpt"
    args = _train_args(token_data, tmp_path / "run", "--train-iters", "100000", "--save", str(ckpt),
                       "--save-interval", "5", "--data-cache-path", str(tmp_path / "cache"))
    log = open(tmp_path / "launcher.log", "w+")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "launch", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         "--", *args], cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ranks: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        worker_log = tmp_path / "logs" / "worker_0.log"
        while time.monotonic() < deadline and launcher.poll() is None:
            ranks |= _children(launcher.pid)
            if len(ranks) == 2 and "iteration" in (worker_log.read_text() if worker_log.is_file() else ""):
                break
            time.sleep(0.2)
        log.seek(0)
        assert len(ranks) == 2 and launcher.poll() is None, f"the ranks never started training:\n{log.read()}"
        os.kill(launcher.pid, sig)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in ranks if _alive(pid)]
        assert not left, f"ranks {left} outlived the launcher (signal {sig.name})"
        launcher.wait(30)
        saved = _checkpoints(ckpt)
        time.sleep(2)
        assert _checkpoints(ckpt) == saved, "a checkpoint appeared after the ranks stopped"
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        launcher.wait()
        log.close()


def _descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        children = _children(todo.pop())
        todo.extend(children - found)
        found |= children
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_killing_train_nproc_stops_torchrun_and_its_ranks(tmp_path, token_data):
    """`ember train --nproc-per-node 2` starts torchrun itself; SIGKILLed, it takes torchrun and
    both ranks with it (before, torchrun and the ranks trained on as orphans)."""
    ckpt = tmp_path / "ckpt"
    args = _train_args(token_data, tmp_path / "run", "--train-iters", "100000", "--save", str(ckpt),
                       "--save-interval", "5", "--data-cache-path", str(tmp_path / "cache"), "--log-interval", "1")
    log = open(tmp_path / "train.log", "w+")
    train = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "train", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         *args], cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    spawned: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and train.poll() is None:
            spawned |= _descendants(train.pid)
            log.seek(0)
            if len(spawned) >= 3 and "iteration" in log.read():
                break
            time.sleep(0.2)
        log.seek(0)
        assert len(spawned) >= 3 and train.poll() is None, f"training never started:\n{log.read()}"
        os.kill(train.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in spawned if _alive(pid)]
        assert not left, f"processes {left} outlived ember train"
        # the ranks' configuration file, which the killed `ember train` could not remove: the next
        # start removes it (once the pid names no process: reaped)
        train.wait(30)
        written = list(Path(tempfile.gettempdir()).glob(f"ember-train-*-{train.pid}-*.yaml"))
        assert written, "ember train wrote no configuration file for its ranks"
        from ember.commands.launch_torchrun import remove_stale_rank_configs

        remove_stale_rank_configs()
        assert not [path for path in written if path.exists()]
    finally:
        for pid in spawned:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        train.wait()
        log.close()


_WRITE_AND_WAIT = """
import sys, time
from ember.commands.launch_torchrun import write_rank_config
from ember.config import Config
print(write_rank_config(Config(), sys.argv[1]), flush=True)
time.sleep(120)
"""


def test_ranks_config_of_a_killed_train_is_removed_by_the_next_start(tmp_path):
    """`ember train --nproc-per-node` hands its ranks the configuration in a file that a SIGKILLed
    `ember train` leaves behind; the next start removes the files of processes that are gone (the
    process table is the reference: a process started, killed and reaped here) and only those."""
    from ember.commands.launch_torchrun import remove_stale_rank_configs, write_rank_config
    from ember.config import Config

    writer = subprocess.Popen([sys.executable, "-c", _WRITE_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        orphan = Path(writer.stdout.readline().strip())
        assert orphan.parent == tmp_path and orphan.is_file()
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert orphan.is_file()  # SIGKILL: nothing removed it
    live = Path(write_rank_config(Config(), tmp_path))  # this process's own run, still going
    other = tmp_path / orphan.name.replace("ember-train-", "ember-train-otherhost_", 1)  # another machine's
    other.write_text(orphan.read_text())
    assert remove_stale_rank_configs(tmp_path) == [orphan]
    assert not orphan.exists() and live.is_file() and other.is_file()


# --------------------------------------------------------------------------- rendezvous


def _launch_one(tmp_path: Path, argv: list[str], timeout: float = 60, **env) -> tuple[int | str, str]:
    (result,) = run_launchers([(argv, _env(**env))], tmp_path, timeout=timeout)
    return result


def _quick_run(tmp_path: Path, token_data: str) -> list[str]:
    return _train_args(token_data, tmp_path / "run", "--train-iters", "2")


def test_unresolvable_master_addr_is_one_line(tmp_path, token_data):
    """Today torchelastic retries an address that does not resolve until the join timeout (600 s
    by default), then prints a traceback."""
    started = time.monotonic()
    code, output = _launch_one(tmp_path, ["--nproc-per-node", "1", "--", *_quick_run(tmp_path, token_data)],
                               NNODES=2, NODE_RANK=1, MASTER_ADDR="no-such-host.invalid", MASTER_PORT=_free_port())
    assert code == 2, output
    assert _last_line(output).startswith("ember launch: error: MASTER_ADDR 'no-such-host.invalid' does not resolve")
    assert "--master-addr" in _last_line(output) and "Traceback" not in output
    assert time.monotonic() - started < 45
    assert not (tmp_path / "logs").exists()


def test_busy_master_port_names_it(tmp_path, token_data):
    """Node 0's MASTER_PORT is taken by another process: one line naming the port and the flag."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _launch_one(tmp_path, ["--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                                              "--master-port", str(port), "--", *_quick_run(tmp_path, token_data)])
    assert code == 2, output
    line = _last_line(output)
    assert line.startswith(f"ember launch: error: MASTER_PORT {port} cannot be used"), output
    assert "--master-port" in line and "Traceback" not in output


def test_missing_node_ends_at_the_join_timeout(tmp_path, token_data):
    """NNODES=2 with only node 0 started: it says once how long it waits, and after --timeout
    seconds ends with one line saying which nodes to start (today: silence, then a traceback)."""
    started = time.monotonic()
    code, output = _launch_one(tmp_path, ["--nproc-per-node", "1", "--timeout", "3", "--",
                                          *_quick_run(tmp_path, token_data)],
                               NNODES=2, NODE_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    assert code == 2, output
    assert output.count("waiting up to 3 s for 2 nodes at 127.0.0.1:") == 1, output
    assert _last_line(output).startswith("ember launch: error: only 1 of 2 nodes joined"), output
    assert "NODE_RANK 1" in _last_line(output) and "Traceback" not in output
    assert time.monotonic() - started < 45


def test_node_without_node_zero_ends_at_the_join_timeout(tmp_path, token_data):
    """Node 1 started alone: one line after --timeout seconds, without torch's C++ stack traces."""
    code, output = _launch_one(tmp_path, ["--nproc-per-node", "1", "--timeout", "3", "--",
                                          *_quick_run(tmp_path, token_data)],
                               NNODES=2, NODE_RANK=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    assert code == 2, output
    assert _last_line(output).startswith("ember launch: error: could not reach node 0 at 127.0.0.1:"), output
    assert "Traceback" not in output and "frame #" not in output


# --------------------------------------------------------------------------- layout errors, before any process


def _model_split_by_tp(tmp_path: Path, token_data: str) -> list[str]:
    """tiny-llama with one attention head, on tensor parallelism 2."""
    return [*_quick_run(tmp_path, token_data), "--num-attention-heads", "1", "--num-query-groups", "1",
            "--tensor-model-parallel-size", "2"]


def test_train_nproc_reports_layout_errors_before_starting(tmp_path, token_data):
    """`ember train --nproc-per-node 2`: a model the layout cannot split is refused in one line
    before torchrun starts (today every rank reports it and torchrun adds its traceback)."""
    argv = [sys.executable, "-m", "ember.cli", "train", "--nproc-per-node", "2",
            "--master-port", str(_free_port()), *_model_split_by_tp(tmp_path, token_data)]
    result = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120,
                            start_new_session=True)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert output.strip() == ("ember train: error: tensor parallelism: 1 attention heads are not divisible by "
                              "tp 2 (n_heads 1); choose a --tensor-model-parallel-size that divides them"), output


def test_launch_reports_layout_errors_before_starting(tmp_path, token_data):
    code, output = _launch_one(tmp_path, ["--nproc-per-node", "2", "--master-port", str(_free_port()), "--",
                                          *_model_split_by_tp(tmp_path, token_data)])
    assert code == 2, output
    assert _last_line(output).startswith("ember launch: error: tensor parallelism: 1 attention heads"), output
    assert "Traceback" not in output and not (tmp_path / "logs").exists()


# --------------------------------------------------------------------------- a failed run


def test_failed_run_ends_with_the_first_ranks_error(tmp_path, token_data):
    """Rank 1 stops with an EmberError (rank 0 then waits for it in vain): the launcher's last line
    names rank 1 and gives its one-line error, not only "see logs"."""
    code, output = _launch_one(tmp_path, ["--nproc-per-node", "2", "--master-port", str(_free_port()),
                                          "--module", "test_launch_faults", "--", "fail",
                                          *_quick_run(tmp_path, token_data)], timeout=120)
    assert code == 1, output
    line = _last_line(output)
    assert line.startswith("ember launch: rank 1 (exit 2) failed: planted failure on rank 1;"), output
    assert "logs/worker_1" in line


# --------------------------------------------------------------------------- the worker


def _fail_worker(train_argv: list[str]) -> int:
    """ember train, except that rank 1 fails at setup with an EmberError."""
    from ember.commands.train import main
    from ember.errors import EmberError
    from ember.train import trainer

    if os.environ.get("RANK") == "1":
        def fail(self):
            raise EmberError("planted failure on rank 1")

        trainer.Trainer.setup = fail
    return main(train_argv)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    assert mode == "fail", mode
    sys.exit(_fail_worker(rest))

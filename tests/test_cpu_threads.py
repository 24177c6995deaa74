"""CPU thread choice: busy cores measured from /proc/stat, left out unless told otherwise."""

import io
import os
import subprocess
import sys
import time

import pytest
import torch

from dist_utils import train_config, write_token_dataset
from ember.errors import EmberError
from ember.train import cpu_threads
from ember.train.cpu_threads import _cpu_times, busy_cpus, choose_cpu_threads
from ember.train.trainer import Trainer

STAT = """cpu  100 0 50 1000 10 0 0 0 0 0
cpu0 60 0 30 500 5 0 0 0 0 0
cpu1 40 0 20 500 5 0 0 0 0 0
intr 12345
"""


def test_proc_stat_parsing(tmp_path):
    path = tmp_path / "stat"
    path.write_text(STAT)
    assert _cpu_times({0, 1}, str(path)) == {0: (90, 595), 1: (60, 565)}
    assert _cpu_times({1}, str(path)) == {1: (60, 565)}


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs /proc/stat")
def test_a_spinning_process_shows_as_a_busy_core():
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cpus(window_s=0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.7 <= busy <= len(os.sched_getaffinity(0)) + 0.01


def test_busy_cpus_without_proc_stat(tmp_path):
    assert busy_cpus(window_s=0.0, stat_path=str(tmp_path / "missing")) is None


@pytest.mark.parametrize("requested, current, busy, cores, threads", [
    (3, 2, 1.9, 2, 3),        # --cpu-threads wins
    (None, 2, None, 2, 2),    # unknown load: as set
    (None, 2, 0.3, 2, 2),     # both cores free
    (None, 2, 1.0, 2, 1),     # one busy: one thread
    (None, 2, 2.0, 2, 1),     # all busy: still one
    (None, 8, 3.4, 16, 8),    # busy cores beyond the threads: nothing to lower
    (None, 16, 3.6, 16, 12),
])
def test_choose_cpu_threads(requested, current, busy, cores, threads):
    choice = choose_cpu_threads(requested, current, busy, cores=cores)
    assert choice.threads == threads
    if threads < current and requested is None:
        assert "--cpu-threads" in choice.reason


def _trainer(tmp_path, *extra):
    data = write_token_dataset(tmp_path / "tokens", seed=1)
    argv = ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "16",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--eval-iters", "0",
            "--output-dir", str(tmp_path / "out"), "--no-tensorboard", *extra]
    return Trainer(train_config(argv), stream=io.StringIO())


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_trainer_leaves_out_busy_cores(tmp_path, monkeypatch, restore_threads):
    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda: float(cores - 1))  # one core left free
    trainer = _trainer(tmp_path).setup()
    try:
        assert torch.get_num_threads() == 1
        assert "1 thread(s) each (other work keeps" in trainer._banner()
    finally:
        trainer.close()


def test_trainer_respects_cpu_threads_and_omp_num_threads(tmp_path, monkeypatch, restore_threads):
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda: pytest.fail("measured though told the count"))
    trainer = _trainer(tmp_path, "--cpu-threads", "1").setup()
    try:
        assert torch.get_num_threads() == 1 and "--cpu-threads" in trainer._banner()
    finally:
        trainer.close()
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    (tmp_path / "again").mkdir()
    trainer = _trainer(tmp_path / "again").setup()
    try:
        assert torch.get_num_threads() == 2 and "OMP_NUM_THREADS" in trainer._banner()
    finally:
        trainer.close()


def test_cpu_threads_must_be_positive(tmp_path):
    with pytest.raises(EmberError, match="cpu-threads"):
        _trainer(tmp_path, "--cpu-threads", "0")


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "200000 100000\n"}, 2.0),                                   # cgroup v2, 2 cores
    ({"cpu.max": "max 100000\n"}, None),                                     # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),                                                              # no cgroup files
])
def test_cgroup_cpu_quota(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cpu_threads.cgroup_cpu_quota(str(tmp_path)) == quota


def test_trainer_keeps_to_a_container_cpu_quota(tmp_path, monkeypatch, restore_threads):
    torch.set_num_threads(4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "cgroup_cpu_quota", lambda: 1.5)
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda: pytest.fail("the host's load counted under a quota"))
    trainer = _trainer(tmp_path).setup()
    try:
        assert torch.get_num_threads() == 1 and "CPU quota of 1.5" in trainer._banner()
    finally:
        trainer.close()

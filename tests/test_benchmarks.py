"""The benchmark scripts run end to end (tiny sizes), and their two sides train the same model:
ember's Trainer and the Hugging Face loop give the same loss curve from the same weights."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", line))


@pytest.mark.slow
@pytest.mark.parametrize("loss, processes", [("fused", "separate"), ("plain", "one")])
def test_train_cpu_sides_agree(loss, processes):
    """Each side in its own process (the default) or both in one: the same model either way."""
    out = _run("train_cpu.py", "--shape", "tiny", "--steps", "4", "--per-round", "2", "--warmup", "1",
               "--threads", "1", "--loss", loss, "--processes", processes)
    (line,) = [line for line in out.splitlines() if line.startswith("train_cpu ")]
    fields = _fields(line)
    assert float(fields["ember_tokens_per_s"]) > 0 and float(fields["hf_tokens_per_s"]) > 0
    assert float(fields["loss_max_diff"]) < 1e-4  # fp32: both sides train the same model
    assert fields["loss"] == loss and fields["processes"] == processes
    assert fields["timed_steps"] == "3"


@pytest.mark.slow
def test_a_side_that_fails_is_reported_and_no_process_is_left(monkeypatch):
    """alternate_in_processes: a side whose process fails says why in the parent's error, and the
    other side's process is stopped too."""
    import multiprocessing

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from compare_training import alternate_in_processes
    from train_cpu import SHAPES

    with pytest.raises(RuntimeError, match="unknown side 'nope'"):
        alternate_in_processes(["ember", "nope"], SHAPES["tiny"], 2, warmup=1, per_round=1, threads=1)
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_train_gpu_smoke_runs_on_this_machine():
    out = _run("train_gpu.py", "--smoke", "--steps", "2", "--warmup", "1", "--sides", "ember", "hf", "ember-fp8")
    sides = {_fields(line).get("side") for line in out.splitlines() if line.startswith("train_gpu ")}
    assert {"ember", "hf"} <= sides
    (agreement,) = [line for line in out.splitlines() if "loss_max_diff side=hf" in line]
    assert float(re.search(r"ember: (\S+)", agreement).group(1)) < 1e-2  # bf16 autocast on both sides


@pytest.mark.slow
def test_checkpoint_benchmark_runs():
    out = _run("checkpoint.py", "--shape", "tiny", "--repeats", "1", "--async-steps", "1", "--threads", "1")
    (line,) = [line for line in out.splitlines() if line.startswith("checkpoint ")]
    fields = _fields(line)
    assert float(fields["size_mb"]) > 0 and float(fields["save_s"]) > 0 and float(fields["load_s"]) > 0


@pytest.mark.slow
def test_cpu_threads_benchmark_times_both_counts():
    out = _run("cpu_threads.py", "--steps", "2", "--busy", "0", "1")
    lines = [_fields(line) for line in out.splitlines() if line.startswith("cpu_threads ")]
    cores = int(lines[0]["cores"])
    assert {line["busy_cores"] for line in lines} == {"0", "1"}
    assert all(float(line["step_ms"]) > 0 for line in lines)
    if cores == 2:  # one core spinning: the choice is one thread, timed beside two
        busy = [line for line in lines if line["busy_cores"] == "1"]
        assert {(line["threads"], line["chosen"]) for line in busy} == {("2", "0"), ("1", "1")}


@pytest.mark.slow
def test_init_memory_benchmark_runs():
    out = _run("init_memory.py", "--layers", "2", "--dim", "128")
    lines = {_fields(line)["way"]: _fields(line) for line in out.splitlines() if line.startswith("init_memory ")}
    assert set(lines) == {"whole", "parts"}
    assert all(float(line["peak_rss_mb"]) > 0 for line in lines.values())

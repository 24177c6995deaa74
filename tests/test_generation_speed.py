"""benchmarks/generate_cpu.py runs end to end on the tiny shape and finds ember's greedy tokens
identical to transformers' generate, at batch 1 and for a left-padded batch. No speed is asserted
(the machine is shared); the figures are in benchmarks/RESULTS.md with their command."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "generate_cpu.py"


@pytest.mark.slow
def test_generate_cpu_benchmark_runs_and_sides_agree():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--batch", "1", "3", "--rounds", "1",
                             "--new-tokens", "12", "--threads", "1"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("generate_cpu ")]
    fields = [dict(re.findall(r"(\w+)=(\S+)", line)) for line in lines]
    assert [f["batch"] for f in fields] == ["1", "3"]
    for f in fields:
        assert f["tokens_identical"] == "1"
        assert float(f["ember_tokens_per_s"]) > 0 and float(f["hf_tokens_per_s"]) > 0

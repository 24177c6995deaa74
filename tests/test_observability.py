"""Observability: Megatron's --profile flags (torch.profiler traces and a summary), Weights & Biases
with the records metrics.jsonl gets, memory figures, and the console line.

References: the Chrome trace torch.profiler writes (its ProfilerStep#N and operator events are
counted against what the summary and the flags say); wandb's own offline run file, read back
with wandb's protobuf schema, against metrics.jsonl; Megatron's console-line field names."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest
import torch

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import read_metrics, train_config, write_token_dataset
from ember.errors import EmberError
from ember.train import run_training
from ember.train.metrics import MetricsLogger, format_train_line, memory_record
from ember.train.profiling import RunProfiler
from ember.train.trackers import build_trackers


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", seed=2)


def _argv(data, out, *extra, iters=4):
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(iters), "--lr", "2e-3",
            "--log-interval", "1", "--eval-iters", "0", "--output-dir", str(out), "--no-tensorboard", *extra]


# --------------------------------------------------------------------------- profiling


@pytest.mark.slow  # a training run
def test_profile_writes_a_chrome_trace_of_the_asked_steps_and_a_summary(data, tmp_path):
    """--profile-step-start 1 --profile-step-end 3 profiles iterations 2 and 3 (Megatron's count):
    the trace torch wrote holds exactly those steps, one optimizer step each, and the summary's
    call counts are the trace's."""
    stream = io.StringIO()
    run_training(train_config(_argv(data, tmp_path, "--profile", "--profile-step-start", "1",
                                    "--profile-step-end", "3")), stream=stream)
    trace = json.loads((tmp_path / "profile" / "rank0.pt.trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = sorted(e["name"] for e in events if e["name"].startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]
    assert sum(e["name"].startswith("Optimizer.step#AdamW") for e in events) == 2
    summary = (tmp_path / "profile" / "summary_rank0.txt").read_text()
    assert summary.startswith("profile of rank 0, iterations 2-3")
    mm = next(line.split() for line in summary.splitlines() if line.split()[0] == "aten::mm")
    assert int(mm[1]) == sum(e["name"] == "aten::mm" for e in events)
    assert "communication" in summary and "host syncs" in summary
    assert summary.strip() in stream.getvalue()  # printed at the end of training


@pytest.mark.parametrize("flags, message", [
    (["--profile-step-start", "3", "--profile-step-end", "3"], "need 0 <= start < end"),
    (["--profile-step-start", "10", "--profile-step-end", "12"], "past the run's last iteration"),
    (["--profile-ranks", "first"], "give rank numbers"),
])
def test_profile_window_mistakes_are_one_line_errors(data, tmp_path, flags, message):
    config = train_config(_argv(data, tmp_path, "--profile", *flags))
    with pytest.raises(EmberError, match=message) as err:
        RunProfiler(config, 0, torch.device("cpu"), train_iters=4)
    assert "\n" not in str(err.value)


def test_profile_needs_a_folder(data):
    argv = [a for a in _argv(data, "x", "--profile", "--profile-step-start", "0", "--profile-step-end", "1")]
    at = argv.index("--output-dir")
    del argv[at:at + 2]
    with pytest.raises(EmberError, match="--profile needs --save or --output-dir"):
        RunProfiler(train_config(argv), 0, torch.device("cpu"), train_iters=4)


def test_memory_history_on_cpu_is_one_line_and_nothing_else(data, tmp_path):
    notices = []
    profiler = RunProfiler(train_config(_argv(data, tmp_path, "--record-memory-history")), 0,
                           torch.device("cpu"), train_iters=4, notice=notices.append)
    assert len(notices) == 1 and "need a CUDA device" in notices[0] and "\n" not in notices[0]
    with profiler.step(1):
        pass
    assert profiler.finish() is None and not (tmp_path / "profile").exists()


# --------------------------------------------------------------------------- trackers


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, values, step):
        self.calls.append((step, dict(values)))

    def finish(self):
        self.calls.append(("finish", None))


def test_tracker_gets_what_metrics_jsonl_gets(data, tmp_path, monkeypatch):
    """Through a stand-in `wandb` module (the real one is checked below when installed): every
    numeric value of every metrics.jsonl record, at step = iteration, offline unless asked."""
    calls, inits = [], []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: inits.append(kw) or _FakeRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_training(train_config(_argv(data, tmp_path, "--wandb-project", "p", "--wandb-exp-name", "tiny",
                                    "--eval-iters", "1", "--eval-interval", "2", iters=3)), stream=io.StringIO())
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert inits[0]["project"] == "p" and inits[0]["name"] == "tiny"
    assert inits[0]["dir"] == str(tmp_path / "wandb") and inits[0]["config"]["train"]["train_iters"] == 3
    assert calls[-1] == ("finish", None)
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["iteration"], {k: v for k, v in r.items() if k != "iteration" and isinstance(v, (int, float))
                                  and not isinstance(v, bool)}) for r in records]
    assert calls[:-1] == expected
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= {k for _, v in calls[:-1] for k in v}


def test_missing_wandb_is_a_one_line_error(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(EmberError, match="pip install wandb") as err:
        build_trackers(train_config(_argv(data, tmp_path, "--wandb-project", "p")))
    assert "\n" not in str(err.value)


def _wandb_records(run_file) -> list:
    """The records of a wandb run file: LevelDB-log framing (32 KiB blocks of 7-byte-headed
    chunks) after a 7-byte ':W&B' header, each record a protobuf of wandb's own schema."""
    from wandb.proto import wandb_internal_pb2

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    records, position, chunks, block = [], 7, b"", 32768
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(raw[position + 4:position + 6], "little"), raw[position + 6]
        chunks += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            records.append(record)
    return records


def _wandb_history(run_file, timeout: float = 60.0) -> list[dict]:
    """The history rows, once wandb's service process has written the run's exit record (it
    writes the file after run.finish() returns)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.mark.slow  # a training run and wandb's service process
def test_wandb_offline_run_holds_the_metrics_jsonl_values(data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_training(train_config(_argv(data, tmp_path, "--wandb-project", "ember-test", "--eval-iters", "1",
                                    "--eval-interval", "2", iters=3)), stream=io.StringIO())
    run_file = next((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    by_step: dict[int, dict] = {}
    for row in _wandb_history(run_file):
        by_step.setdefault(row["_step"], {}).update(row)
    train, evals = read_metrics(tmp_path)
    assert sorted(by_step) == sorted(train)
    for iteration, record in train.items():
        assert by_step[iteration]["loss"] == pytest.approx(record["loss"], rel=1e-12)
        assert by_step[iteration]["grad_norm"] == pytest.approx(record["grad_norm"], rel=1e-12)
    assert by_step[2]["eval_loss"] == pytest.approx(evals[2]["eval_loss"], rel=1e-12)


# --------------------------------------------------------------------------- memory and the console line


def test_memory_record_of_one_process():
    record = memory_record(torch.device("cpu"))
    assert record["memory_gib"] == record["max_memory_gib"] > 0
    assert "max_memory_reserved_gib" not in record and "memory_gib_per_rank" not in record


def _record(**changes):
    record = {"iteration": 1234, "consumed_samples": 1234 * 1024, "consumed_tokens": 1234 * 1024 * 8192,
              "iteration_time_ms": 12345.6, "lr": 2.5e-4, "loss": 2.3456789, "loss_scale": 65536.0,
              "grad_norm": 0.8123, "skipped_iterations": 3, "tokens_per_s": 679_000.0,
              "tokens_per_s_per_device": 10_600.0, "tflops": 412.3, "mfu": 0.417, "memory_gib": 61.234,
              "max_memory_gib": 63.5, "max_memory_reserved_gib": 70.25}
    record.update(changes)
    return record


def test_default_line_fits_100_columns_with_the_device_figures():
    gpu = format_train_line(_record(skipped_iterations=0), 100_000)
    assert len(gpu) <= 100, gpu
    assert "MFU 41.7%" in gpu and "mem 64/70G" in gpu and "eta 14d02h" in gpu and "tok/s" not in gpu
    assert "skipped 3" in format_train_line(_record(), 100_000)
    cpu_record = _record(mfu=None, tflops=0.0, loss_scale=1.0, skipped_iterations=0, max_memory_gib=1.234)
    del cpu_record["max_memory_reserved_gib"]  # what a CPU run's record holds
    cpu = format_train_line(cpu_record, 100_000)
    assert len(cpu) <= 100, cpu
    assert "TFLOP" not in cpu and "MFU" not in cpu and "679.0k tok/s" in cpu and "rss 1.23G" in cpu


def test_megatron_line_is_kept_behind_log_format(data, tmp_path):
    line = format_train_line(_record(), 100_000, "megatron")
    for field in ("iteration     1234/  100000", "elapsed time per iteration (ms): 12345.6", "lm loss: 2.345679E+00",
                  "learning rate: 2.500000E-04", "grad norm: 0.812", "TFLOP/s/device: 412.3"):
        assert field in line
    assert train_config(_argv(data, tmp_path, "--log-format", "megatron")).logging.log_format == "megatron"
    with pytest.raises(EmberError, match="--log-format"):
        MetricsLogger(None, enabled=True, log_format="json")


def test_memory_snapshot_on_out_of_memory(data, tmp_path, monkeypatch):
    """The CUDA path without a GPU: torch's recorder and dumper stood in for, an OOM in a step."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: calls.append(("record", kw)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", lambda path: calls.append(("dump", path)))
    profiler = RunProfiler(train_config(_argv(data, tmp_path, "--record-memory-history")), 3,
                           torch.device("cuda", 0), train_iters=4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with profiler.step(2):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert calls == [("record", {"max_entries": 100_000}),
                     ("dump", str(tmp_path / "profile" / "memory" / "snapshot_rank3.pickle"))]


def test_summary_of_a_gpu_profile_splits_communication_and_counts_syncs(tmp_path):
    """On a GPU the table ranks device time; NCCL kernels are communication, the runtime's
    synchronize calls are host syncs (events shaped as torch.profiler's key_averages() rows)."""
    from ember.train.profiling import summarize

    def event(key, count, device_us):
        return types.SimpleNamespace(key=key, count=count, self_device_time_total=device_us, self_cpu_time_total=1.0)

    events = [event("ProfilerStep#11", 2, 0.0), event("sm90_xmma_gemm_bf16", 400, 6000.0),
              event("ncclDevKernel_AllGather_RING_LL", 40, 1500.0), event("ncclDevKernel_ReduceScatter", 40, 500.0),
              event("cudaStreamSynchronize", 6, 0.0), event("aten::_local_scalar_dense", 6, 0.0),
              event("flash_fwd_kernel", 64, 2000.0)]
    text = summarize(events, rank=0, first=11, last=12, device=torch.device("cuda", 0), folder=tmp_path)
    rows = {line[:60].strip(): line[60:].split() for line in text.splitlines()[2:]}
    assert rows["sm90_xmma_gemm_bf16"] == ["400", "6.00", "60.0%"]
    assert rows["communication (collectives, send/recv)"] == ["2.00", "20.0%"]
    assert rows["compute and everything else"] == ["8.00", "80.0%"]
    assert "ProfilerStep#11" not in rows
    assert "host syncs (synchronize calls: .item(), .tolist(), copies to the host): 6 in 2 step(s)" in text


def test_progress_of_a_long_evaluation():
    from ember.progress import Progress

    shown, now = [], [0.0]
    progress = Progress("validation", 100, "batches", shown.append, every=30, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = 9.0 * done  # 9 s a batch: a line every 4 batches (36 s >= 30 s), and the last
        progress.update()
    progress.close()
    assert shown[0] == "validation: 4/100 batches, 0.1 batches/s, ETA 14m24s, 36s so far"
    assert len(shown) == 25 + 1 and shown[-1] == "validation: 100/100 batches, 0.1 batches/s, 15m00s so far"
    quiet = []
    short = Progress("validation", 3, "batches", quiet.append, every=30, clock=lambda: 0.0)
    short.update(3)
    short.close()
    assert quiet == []  # a quick evaluation prints only its result


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_profile_memory_figures_and_snapshot(data, tmp_path):
    """On a GPU: the trace holds CUDA kernels, the table ranks device time, the record carries the
    peak reserved memory, and --record-memory-history dumps a snapshot at the window's end."""
    import pickle

    stream = io.StringIO()
    run_training(train_config(_argv(data, tmp_path, "--profile", "--profile-step-start", "1",
                                    "--profile-step-end", "3", "--record-memory-history")), stream=stream)
    trace = json.loads((tmp_path / "profile" / "rank0.pt.trace.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])
    summary = (tmp_path / "profile" / "summary_rank0.txt").read_text()
    assert "self device time" in summary and "host syncs (synchronize calls" in summary
    train, _ = read_metrics(tmp_path)
    assert 0 < train[4]["max_memory_gib"] <= train[4]["max_memory_reserved_gib"]
    assert train[4]["max_memory_gib"] == pytest.approx(torch.cuda.max_memory_allocated() / 2**30, rel=0.5)
    snapshot = pickle.loads((tmp_path / "profile" / "memory" / "snapshot_rank0.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]
    console = stream.getvalue()
    assert "mem " in console and ("MFU" in console or "TFLOP/s" in console)

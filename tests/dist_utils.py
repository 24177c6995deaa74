"""Run N gloo processes for a test: the environment torchrun would give them, a free port, a hard
timeout, and no process left behind whatever happens.

    result = run_ranks(["-m", "ember.commands.train", "--model", "tiny-llama", ...], nprocs=2, timeout=120)
    assert result.returncode == 0, result.output

Each rank is `python ARGS` with RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, in its own
session so that the whole group can be killed. Rank outputs are collected in files (a pipe that
nobody reads could block a chatty rank).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RanksResult:
    returncodes: list[int | None]
    outputs: list[str]
    killed: bool = False  # stopped by `stop_when` or the timeout

    @property
    def returncode(self) -> int:
        """0 when every rank succeeded, else the first non-zero code (None counts as -9)."""
        for code in self.returncodes:
            if code != 0:
                return -9 if code is None else code
        return 0

    @property
    def output(self) -> str:
        return "\n".join(f"--- rank {r} ---\n{text}" for r, text in enumerate(self.outputs))


def _kill(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def run_ranks(args: list[str], nprocs: int, *, timeout: float = 180.0, cwd: str | os.PathLike | None = None,
              env: dict[str, str] | None = None, stop_when: Callable[[], bool] | None = None,
              stop_signal: int = signal.SIGKILL, poll: float = 0.02) -> RanksResult:
    """Start `python ARGS` as ranks 0..nprocs-1 and wait for all of them.

    `stop_when`, polled while they run, sends `stop_signal` to every rank once it returns True (a
    test's "kill the job here"). Past `timeout` seconds every rank is killed and the result says so.
    """
    port = free_port()
    base = dict(os.environ)
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(nprocs),
                 "LOCAL_WORLD_SIZE": str(nprocs), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                 "PYTHONUNBUFFERED": "1"})
    base.update(env or {})
    with tempfile.TemporaryDirectory(prefix="ember-ranks-") as logs:
        processes, files = [], []
        try:
            for rank in range(nprocs):
                rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0")
                log = open(Path(logs) / f"rank{rank}.txt", "w+")
                files.append(log)
                processes.append(subprocess.Popen([sys.executable, *args], cwd=cwd, env=rank_env, stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True))
            killed = _wait(processes, timeout, stop_when, stop_signal, poll)
        finally:
            for process in processes:
                if process.poll() is None:
                    _kill(process)
                    process.wait()
        outputs = []
        for log in files:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    return RanksResult([p.returncode for p in processes], outputs, killed)


def _wait(processes, timeout, stop_when, stop_signal, poll) -> bool:
    deadline = time.monotonic() + timeout
    stopped = False
    while any(p.poll() is None for p in processes):
        if time.monotonic() > deadline:
            for process in processes:
                _kill(process)
            stopped = True
            break
        if stop_when is not None and stop_when():
            for process in processes:
                _kill(process, stop_signal)
            stop_when = None
            stopped = True
        if any(p.returncode not in (None, 0) for p in processes) and not stopped:
            # one rank failed: the others would wait on it in a collective until the timeout
            time.sleep(2.0)
            for process in processes:
                if process.poll() is None:
                    _kill(process)
            break
        time.sleep(poll)
    for process in processes:
        process.wait()
    return stopped


# --------------------------------------------------------------------------- training-run helpers


def write_token_dataset(prefix: str | os.PathLike, documents: int = 120, vocab: int = 500, seed: int = 0,
                        low: int = 0) -> str:
    """An indexed dataset of random token ids in [low, low + vocab), documents of 10-150 tokens."""
    import numpy as np

    from ember.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    for _ in range(documents):
        writer.add_document(rng.integers(low, low + vocab, int(rng.integers(10, 150))))
    writer.finalize()
    return str(prefix)


def write_finetune_dataset(prefix: str | os.PathLike, examples: int = 40, seed: int = 3, low: int = 0) -> str:
    """Instruction examples as `ember preprocess` writes them: a prompt of 3-11 tokens (labels -100)
    then a response of 2-9 tokens (labels = the tokens), token ids in [low, 500)."""
    import numpy as np

    from ember.data.indexed import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    ids = IndexedDatasetWriter(f"{prefix}_packed_input_ids_document", np.uint16)
    labels = IndexedDatasetWriter(f"{prefix}_packed_labels_document", np.int32)
    for _ in range(examples):
        prompt = rng.integers(low, 500, int(rng.integers(3, 12)))
        response = rng.integers(low, 500, int(rng.integers(2, 10)))
        ids.add_document(np.concatenate([prompt, response]))
        labels.add_document(np.concatenate([np.full(prompt.size, -100), response]))
    ids.finalize()
    labels.finalize()
    return str(prefix)


def read_metrics(output_dir: str | os.PathLike) -> tuple[dict[int, dict], dict[int, dict]]:
    """(training records, validation records) of a run's logs/metrics.jsonl, by iteration; a
    resumed run's later record of an iteration wins (the final validation, after training, wins
    over the one at the same iteration in the loop). The test-split record is left out."""
    import json

    train, evals = {}, {}
    path = Path(output_dir) / "logs" / "metrics.jsonl"
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "test_loss" in record:
            continue
        (evals if "eval_loss" in record else train)[record["iteration"]] = record
    return train, evals


def train_config(argv: list[str]):
    """The Config `ember train ARGV` would run (for in-process runs of the trainer)."""
    import argparse

    from ember.commands.train import add_arguments
    from ember.compat import config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))



@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Torch ops on one thread for a module's in-process runs (import this fixture into the module):
    on a machine shared with other jobs, tiny models run many times faster than with threads
    spinning for a busy core."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded_stages(model_name: str, overrides: dict, cut: bool, seed: int):
    """A tiny ember model initialised from `seed`, whole ([model]) or cut as two pipeline stages
    ([layer 0 with the embeddings, layer 1 with the final norm and output layer]); the parallel
    tests' common starting point."""
    import copy

    import torch

    from ember.models import Transformer, get_model_args

    torch.manual_seed(seed)
    model = Transformer(get_model_args(model_name, **overrides))
    model.init_weights(seed=seed)
    if not cut:
        return [model]
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    first.norm = first.output = None
    del first.layers["1"]
    last.tok_embeddings = last.pos_embeddings = last.embedding_norm = None
    del last.layers["0"]
    return [first, last]


def masked_batch(vocab: int, seed: int, batch: int, seq: int):
    """(inputs, labels, loss_mask) of random tokens, about a quarter of the loss mask off."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    loss_mask = (torch.rand(batch, seq, generator=generator) > 0.25).float()
    return tokens[:, :-1], tokens[:, 1:], loss_mask


# ------------------------------------------ one Trainer step per case, on every rank (plan tests)


def run_trainer_cases(script: str, data: str, out: Path, which: str, nprocs: int, timeout: float = 300) -> list[dict]:
    """Run `python SCRIPT DATA OUT WHICH` on `nprocs` gloo ranks (the script's `__main__` calls
    `trainer_cases_on_rank`) and return each rank's results, rank by rank."""
    import json

    repo = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = run_ranks([script, data, str(out), which], nprocs, timeout=timeout, cwd=repo, env=env)
    assert result.returncode == 0, result.output[-4000:]
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nprocs)]


def trainer_cases_on_rank(cases: dict, argv_of: Callable[..., list[str]], out_dir: str,
                          measure: Callable[..., dict]) -> None:
    """One rank of `run_trainer_cases`: for each case `name: (model, flags, global_batch)`, a
    `Trainer` (what `ember train` runs) set up from `argv_of(out, model, flags, global_batch)` and
    `measure(trainer, steps, global_batch)` -> a JSON-able dict, `steps` the micro-batches of its
    first two steps; writes {name: dict} to OUT_DIR/rank{r}.json."""
    import io
    import json

    import torch
    import torch.distributed as dist

    from ember.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for name, (model, flags, global_batch) in cases.items():
        trainer = Trainer(train_config(argv_of(os.path.join(out_dir, name), model, flags, global_batch)),
                          stream=io.StringIO()).setup()
        steps = [trainer._next_micro_batches(trainer.train_batches) for _ in range(2)]
        results[name] = measure(trainer, steps, global_batch)
        trainer.close()
    Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()

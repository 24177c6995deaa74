"""Every parallel layout trains like one process: `ember train` under DP2, TP2, TP2+SP, PP2 (1F1B,
GPipe, interleaved), EP2, CP2, TP2xPP2, TP2xEP2 and DP2xTP2 gives, step by step, the losses, the
gradient norms (what clipping uses) and the evaluation loss of a single-process run of the same
global batches — for a tiny Llama (GQA), a tiny Qwen3 (q/k norms, tied embeddings) and a tiny
Mixtral (MoE, top-2 of 4 experts, load-balancing loss).

Each layout is one spawn of N processes running `ember train`'s real rank entry (`ember.commands.train.main`:
flag parsing, validation, the trainer) once per model inside one process group, so the whole path
is tested with one process start per layout. The single-process references run in this process.

Tolerance (fp32). A layout computes the same numbers in a different order: row-parallel matmuls
sum partial products over tp ranks, sequence/context parallelism splits the sums behind norm
weight gradients, the vocab-parallel cross-entropy reduces a max and a sum-exp over ranks, FSDP
averages gradients over N ranks and the loss is scaled back by N, pipeline stages add the tied
embedding's two gradients separately. Each reorders fp32 additions (~1e-7 relative). Measured
over 5 AdamW steps: losses agree to <= 2e-7 relative, gradient norms to <= 6e-6 (AdamW divides by
sqrt(v), so gradient components near zero move weights by up to ~lr when their last bits differ,
and the norm sees it). Hence rel 1e-5 on losses and evaluation losses and 1e-4 on gradient norms:
>10x the noise, while every real error we know of is far larger (a lost gradient contribution,
a wrong normaliser, an unscaled expert gradient, a dropped aux loss or token moves the loss by
>= 1e-4 or the gradient norm by > 1e-2 within 5 steps at lr 3e-3). bf16 / fp16 (loss-scaled)
runs compare with their single-process bf16 / fp16 runs at 2e-2: their rounding depends on the
order too.

DP2 x TP2 takes its layout from a YAML config file (the `parallel:` section) rather than flags.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import read_metrics, run_ranks, train_config, write_token_dataset  # noqa: E402

ITERS = 5
LOSS_REL, NORM_REL, LOW_PRECISION_REL = 1e-5, 1e-4, 2e-2
MODELS = {"llama": "tiny-llama", "qwen3": "tiny-qwen3", "moe": "tiny-mixtral"}
ALL = tuple(MODELS)

# layout -> (processes, flags, {model: extra flags})
LAYOUTS = {
    "dp2": (2, ["--use-distributed-optimizer"], {m: [] for m in ALL}),
    "tp2": (2, ["--tensor-model-parallel-size", "2"], {m: [] for m in ALL}),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
               {"qwen3": [], "moe": [], "llama-bf16": ["--bf16"]}),
    "pp2-1f1b": (2, ["--pipeline-model-parallel-size", "2"],
                 {"llama": [], "qwen3": [], "moe": ["--decoder-first-pipeline-num-layers", "1"],
                  "llama-gpipe": ["--pipeline-schedule", "gpipe"], "qwen3-fp16": ["--fp16"]}),
    "pp2-interleaved": (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
                        {m: [] for m in ALL}),
    "ep2": (2, ["--expert-model-parallel-size", "2"], {"moe": []}),
    "cp2": (2, ["--context-parallel-size", "2"], {m: [] for m in ALL}),
    "tp2xpp2": (4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel"],
                {"qwen3": []}),
    "tp2xep2": (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"],
                {"moe": []}),
    # as a YAML file
    "dp2xtp2": (4, {"parallel": {"tensor_model_parallel_size": 2, "dp_mode": "zero1"}}, {"llama": []}),
}


def argv(data, out, model: str, extra=()) -> list[str]:
    # 4 layers: two pipeline stages of two virtual stages; global batch 4 of micro-batches of 1:
    # enough micro-batches for 1F1B on 2 stages, 2 per rank under 2-way data parallelism
    return ["--model", model, "--num-layers", "4", "--vocab-size", "512", "--data-path", str(data),
            "--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
            "--lr", "3e-3", "--lr-warmup-iters", "1", "--min-lr", "3e-4", "--weight-decay", "0.1",
            "--clip-grad", "0.5", "--log-interval", "1", "--eval-interval", str(ITERS), "--eval-iters", "1",
            "--split", "90,10,0", "--output-dir", str(out), "--no-tensorboard", "--no-compile",
            "--initial-loss-scale", "4096", *extra]  # fp16: a scale that does not overflow here


def _model_and_flags(key: str, extra: list[str]) -> tuple[str, list[str]]:
    """'llama-bf16' -> (tiny-llama, extra); the reference shares the precision flags."""
    return MODELS[key.split("-")[0]], extra


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", seed=3)


@pytest.fixture(scope="module")
def references(data, tmp_path_factory):
    """Single-process runs, made on first use: (model, precision flags) -> metrics."""
    import torch

    from ember.train import run_training

    cache: dict[tuple, tuple] = {}

    def get(model: str, extra: list[str]):
        precision = tuple(f for f in extra if f in ("--bf16", "--fp16"))
        key = (model, precision)
        if key not in cache:
            out = tmp_path_factory.mktemp("reference")
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                result = run_training(train_config(argv(data, out, model, precision)))
            finally:
                torch.set_num_threads(threads)
            assert result.iteration == ITERS
            cache[key] = read_metrics(out)
        return cache[key]

    return get


@pytest.mark.slow  # starts processes: see tests/conftest.py
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_like_one_process(layout, data, references, tmp_path):
    nprocs, flags, runs = LAYOUTS[layout]
    if isinstance(flags, dict):
        import yaml

        (tmp_path / "layout.yaml").write_text(yaml.safe_dump(flags))
        flags = ["--config", str(tmp_path / "layout.yaml")]
    plan = []
    for key, extra in runs.items():
        model, extra = _model_and_flags(key, extra)
        plan.append((key, model, extra, tmp_path / key))
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps([argv(data, out, model, [*flags, *extra]) for _, model, extra, out in plan]))
    result = run_ranks([__file__, str(spec)], nprocs, timeout=420, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.output[-5000:]
    for key, model, extra, out in plan:
        rel = LOW_PRECISION_REL if {"--bf16", "--fp16"} & set(extra) else LOSS_REL
        _assert_same_run(read_metrics(out), references(model, extra), rel, f"{layout} {key}")


def _assert_same_run(run, reference, rel: float, what: str) -> None:
    train, evals = run
    ref_train, ref_evals = reference
    assert sorted(train) == sorted(ref_train) == list(range(1, ITERS + 1)), what
    for it in train:
        assert train[it]["loss"] == pytest.approx(ref_train[it]["loss"], rel=rel), (what, it)
        norm_rel = max(NORM_REL, rel)
        assert train[it]["grad_norm"] == pytest.approx(ref_train[it]["grad_norm"], rel=norm_rel), (what, it)
        assert train[it]["consumed_samples"] == ref_train[it]["consumed_samples"], (what, it)
    # training moved the weights: agreement over the steps is not trivial
    assert abs(ref_train[ITERS]["loss"] - ref_train[1]["loss"]) > 1e-3, what
    assert sorted(evals) == sorted(ref_evals) == [ITERS], what
    assert evals[ITERS]["eval_loss"] == pytest.approx(ref_evals[ITERS]["eval_loss"], rel=rel), what


# --------------------------------------------------------------------------- impossible layouts


@pytest.mark.parametrize("world, flags, model, message", [
    (2, ["--tensor-model-parallel-size", "2", "--num-query-groups", "1"], "tiny-llama", "n_kv_heads 1"),
    (4, ["--tensor-model-parallel-size", "4", "--num-attention-heads", "2", "--num-query-groups", "2"], "tiny-llama",
     "n_heads 2"),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "31"], "tiny-llama",
     "sequence length 31"),
    (2, ["--context-parallel-size", "2", "--seq-length", "30"], "tiny-llama", "multiple of 4"),
    (2, ["--context-parallel-size", "2"], "tiny-bloom", "ALiBi"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "3"], "tiny-llama", "do not split evenly"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], "tiny-llama",
     "must divide num-layers 4"),
    (2, ["--expert-model-parallel-size", "2", "--num-experts", "3"], "tiny-mixtral", "does not divide num_experts 3"),
    (2, ["--expert-model-parallel-size", "2"], "tiny-llama", "needs a mixture-of-experts model"),
    (4, ["--pipeline-model-parallel-size", "2", "--global-batch-size", "2"], "tiny-llama", "1F1B needs at least"),
    (4, ["--tensor-model-parallel-size", "2", "--global-batch-size", "3"], "tiny-llama",
     "not divisible by micro batch size 1 x data-parallel size 2"),
    (6, ["--tensor-model-parallel-size", "4"], "tiny-llama", "do not divide into tensor x pipeline x context"),
    (2, ["--expert-model-parallel-size", "4"], "tiny-mixtral", "must divide data-parallel x context-parallel"),
])
def test_impossible_layouts_fail_before_any_process_group(data, tmp_path, monkeypatch, world, flags, model, message):
    """One line naming the problem, raised by the trainer before it starts the process group."""
    import torch.distributed as dist

    from ember.errors import EmberError
    from ember.train.trainer import Trainer

    argv_ = ["--model", model, "--num-layers", "4", "--data-path", data, "--seq-length", "32",
             "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "1", "--no-tensorboard",
             "--output-dir", str(tmp_path / "out"), *flags]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(EmberError) as info:
        Trainer(train_config(argv_)).setup()
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- the rank driver


def _drive(spec_path: str) -> int:
    """One rank: every run of the spec, through `ember train`'s entry, in one process group."""
    import torch
    import torch.distributed as dist

    from ember.commands.train import main

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for run_argv in json.loads(Path(spec_path).read_text()):
            code = main(run_argv)
            if code:
                return code
        dist.barrier()  # every run finished on every rank: safe to tear the group down
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(_drive(sys.argv[1]))

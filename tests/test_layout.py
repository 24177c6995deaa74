"""`ember plan` and `ember train` accept and refuse the same parallel layouts, for the same reason.

Both build one `ember.config.layout.Layout` and check it by the same rules: the sweep below runs
registry models (dense, MoE, ALiBi, soft-capped, tied, tiny and full size) through layouts of every
kind (tp, pp with virtual and uneven stages, cp, ep, dp modes with HSDP replicas, sequence
parallelism, schedules, batch splits) and compares

- `ember plan MODEL --tp .. --pp ..`'s verdict: its exit code and one-line error, with
- `ember train`'s: the config validation the trainer runs at construction, then the model checks
  it runs before any process group (`Layout.check_model` on the model args it resolves).

Plus the Layout's own arithmetic (dp replicate x shard, schedule spellings, the least data
parallelism tiny mode uses).
"""

from __future__ import annotations

import contextlib
import io
import itertools

import pytest
from dist_utils import train_config

from ember.cli import main
from ember.config import ParallelConfig, TrainConfig, validate
from ember.config.layout import Layout, least_data_parallel_size, least_world_size
from ember.errors import EmberError

MODELS = ["gpt2", "tiny-llama", "tiny-mixtral", "tiny-bloom", "tiny-grok1", "tiny-qwen3", "llama2-7b",
          "mixtral-8x7b", "grok1-40b", "bloom-7b1"]

# (processes, flags): the same flags go to `ember plan` (with --gpus = processes) and `ember train`
LAYOUTS = [
    (1, []),
    (2, []),
    (3, []),
    (2, ["--tensor-model-parallel-size", "2"]),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (4, ["--tensor-model-parallel-size", "4", "--sequence-parallel"]),
    (3, ["--tensor-model-parallel-size", "3"]),
    (8, ["--tensor-model-parallel-size", "8"]),
    (6, ["--tensor-model-parallel-size", "4"]),
    (2, ["--pipeline-model-parallel-size", "2"]),
    (3, ["--pipeline-model-parallel-size", "3"]),
    (4, ["--pipeline-model-parallel-size", "4"]),
    (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "gpipe"]),
    (2, ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "interleaved-1f1b"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"]),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
         "--pipeline-schedule", "gpipe"]),
    (3, ["--pipeline-model-parallel-size", "3", "--decoder-first-pipeline-num-layers", "0"]),
    (2, ["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "1"]),
    (1, ["--num-layers-per-virtual-pipeline-stage", "1"]),
    (2, ["--context-parallel-size", "2"]),
    (4, ["--context-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--expert-model-parallel-size", "2"]),
    (4, ["--expert-model-parallel-size", "4"]),
    (2, ["--expert-model-parallel-size", "4"]),
    (3, ["--expert-model-parallel-size", "3"]),
    (4, ["--expert-model-parallel-size", "2", "--context-parallel-size", "2"]),
    (4, ["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2"]),
    (4, ["--use-distributed-optimizer"]),
    (4, ["--use-distributed-optimizer", "--dp-replicate", "2"]),
    (6, ["--use-torch-fsdp2", "--dp-replicate", "4"]),
    (8, ["--use-torch-fsdp2", "--dp-replicate", "2", "--tensor-model-parallel-size", "2"]),
    (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
         "--use-distributed-optimizer"]),
    (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
         "--expert-model-parallel-size", "2"]),
]

# (sequence length, global batch, micro batch)
BATCHES = [(64, 8, 1), (30, 8, 1), (64, 6, 2), (64, 2, 1), (512, 8, 1)]

# `ember plan`'s flags for train's dp-mode spellings
PLAN_SPELLING = {"--use-torch-fsdp2": "--dp-shard"}


def plan_verdict(model: str, world: int, flags: list[str], seq: int, batch: int, micro: int) -> str | None:
    """None when `ember plan` accepts the layout (memory is plentiful), else its error's reason."""
    plan_flags = [PLAN_SPELLING.get(f, f) for f in flags]
    for degree in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        if degree not in plan_flags:  # both given: evaluate this layout, not a search
            plan_flags += [degree, "1"]
    argv = ["plan", model, "--gpus", str(world), "--gpu-mem", "1000TB", "--seq-length", str(seq),
            "--global-batch-size", str(batch), "--micro-batch-size", str(micro), *plan_flags]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    if code == 0:
        return None
    line = err.getvalue().strip()
    assert code == 2 and "\n" not in line, line
    prefix = "ember plan: error: "
    assert line.startswith(prefix), line
    reason = line[len(prefix):]
    # a layout that exists but cannot run is named first: "layout dp 1, tp 2: REASON"
    return reason.split(": ", 1)[1] if reason.startswith("layout ") else reason


def train_verdict(model: str, world: int, flags: list[str], seq: int, batch: int, micro: int) -> str | None:
    """None when `ember train` on `world` processes gets past every layout check, else its reason:
    the checks the trainer runs before any process group (`Trainer.__init__`, then `setup`)."""
    from ember.train import model_setup

    argv = ["--model", model, "--data-path", "unused", "--train-iters", "1", "--seq-length", str(seq),
            "--global-batch-size", str(batch), "--micro-batch-size", str(micro), *flags]
    try:
        config = validate(train_config(argv), world_size=world, check_paths=False)
        layout = Layout.from_config(config.parallel, config.train, world)
        args = model_setup.resolve_model_args(config, None)
        layout.check_model(args, config.data.seq_length)
    except EmberError as err:
        assert "\n" not in str(err)
        return str(err)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_plan_and_train_agree_on_every_layout(model):
    accepted = refused = 0
    for (world, flags), (seq, batch, micro) in itertools.product(LAYOUTS, BATCHES):
        trained = train_verdict(model, world, flags, seq, batch, micro)
        planned = plan_verdict(model, world, flags, seq, batch, micro)
        assert planned == trained, f"{model} on {world} processes {flags} seq {seq} batch {batch}x{micro}"
        accepted += trained is None
        refused += trained is not None
    assert accepted and refused  # the sweep has both kinds for every model


def test_gpt2_at_tp2_is_refused_by_both_with_advice_that_works():
    """GPT-2's 50257-token vocabulary does not split over 2 ranks: both refuse, and the advice
    (--vocab-size, which a registry model honours) makes the layout train."""
    reason = train_verdict("gpt2", 2, ["--tensor-model-parallel-size", "2"], 1024, 8, 1)
    assert reason == plan_verdict("gpt2", 2, ["--tensor-model-parallel-size", "2"], 1024, 8, 1)
    assert "vocab_size 50257" in reason and "--vocab-size 50258" in reason
    assert train_verdict("gpt2", 2, ["--tensor-model-parallel-size", "2", "--vocab-size", "50258"], 1024, 8, 1) is None


def test_layout_arithmetic():
    layout = Layout(dp=8, dp_mode="fsdp", dp_replicate=2, tp=2, sequence_parallel=True)
    assert (layout.dp_replicate, layout.dp_shard, layout.world_size) == (2, 4, 16)
    assert Layout(dp=8).mesh_degrees() == {"pp": 1, "dp_replicate": 8, "dp_shard": 1, "cp": 1, "tp": 1}
    assert Layout(tp=1, sequence_parallel=True).sequence_parallel is False  # as Megatron: no sp without tp
    assert Layout(pp=2, layers_per_virtual_stage=1).schedule == "interleaved_1f1b"
    assert Layout(pp=2, schedule="GPipe").schedule == "gpipe"
    resolved = Layout(pp=2, dp=2, micro_batch_size=2).resolve(16)
    assert resolved.micro_batches == 4 and resolved.global_batch_size == 16
    assert Layout(dp=4, micro_batch_size=2).resolve(None).global_batch_size == 8
    with pytest.raises(EmberError, match="1F1B needs at least"):
        Layout(pp=4, dp=1).resolve(2)


@pytest.mark.parametrize("values, least_dp, least_world", [
    ({}, 1, 1),
    ({"expert_model_parallel_size": 4}, 4, 4),
    ({"expert_model_parallel_size": 4, "context_parallel_size": 2}, 2, 4),
    ({"expert_model_parallel_size": 2, "tensor_model_parallel_size": 2}, 2, 4),
    ({"dp_mode": "fsdp", "dp_replicate": 2, "pipeline_model_parallel_size": 2}, 2, 4),
])
def test_least_layout_is_a_valid_one(values, least_dp, least_world):
    """Tiny mode runs a layout on the fewest processes it allows; the Layout accepts that many."""
    parallel = ParallelConfig(**values)
    assert least_data_parallel_size(parallel) == least_dp
    assert least_world_size(parallel) == least_world
    Layout.from_config(parallel, TrainConfig(global_batch_size=8 * least_dp), least_world)

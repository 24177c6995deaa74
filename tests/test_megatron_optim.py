"""A Megatron run continued in ember (`ember.checkpoint.megatron_optim`), proven against megatron-core
0.16.1 itself: tests/megatron_checkpoints.py trains a Llama-style GPTModel at TP 2 x PP 2 for 3 steps with
megatron-core's optimizer (its parameter groups, FP32Optimizer over torch AdamW, its LR/weight-decay
scheduler), saves it with the optimizer the way Megatron-LM does (torch_dist and per-rank files), takes
one more step on a fixed batch and records the logits. ember imports weights + Adam moments + step +
iteration, its trainer takes the same step, and the logits must match megatron-core's; the same step
with a fresh optimizer must not. Also: --no-load-optim continues at iteration N with a fresh
optimizer, and checkpoints without (mappable) optimizer state are refused in one line. The same four
processes then train a GPT-2 model (biases and norms off the buffer's 64-element alignment) at TP 2 x
DP 2 with megatron-core's DDP and DistributedOptimizer (Adam's state
sharded over data-parallel ranks) and save it as Megatron-LM 0.16 does; ember continues that run too.
"""

from __future__ import annotations

import copy
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_checkpoints  # noqa: E402  (tests/ is on sys.path, like dist_utils)
from dist_utils import single_thread  # noqa: E402,F401  (autouse fixture: one torch thread)

from ember.checkpoint.megatron_optim import NoUsableOptimizerState, legacy_parameter_names  # noqa: E402
from ember.errors import EmberError  # noqa: E402

STEPS = 3  # megatron-core's Adam steps before the save: the checkpoint is iteration 3


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    """torch_dist/ and legacy/ saves of one megatron-core model with its optimizer, and reference_optim.pt;
    the same under bf16/ for a bf16 model (Float16Optimizer: fp32 master weights); and under
    distributed/, the same four processes as TP 2 x DP 2 with the distributed optimizer (see
    `distributed_saves`)."""
    root = tmp_path_factory.mktemp("megatron-optim") / "llama"
    return megatron_checkpoints.build(root, "llama", 2, 2, optim_steps=STEPS, with_bf16=True,
                                      with_distributed_optimizer=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from dist_utils import write_token_dataset

    return write_token_dataset(tmp_path_factory.mktemp("tokens") / "tokens", documents=20, vocab=100)


def _trainer(load: Path, out: Path, data: str, *extra: str):
    from dist_utils import train_config

    from ember.train import Trainer

    stream = io.StringIO()
    config = train_config(["--load", str(load), "--save", str(out), "--data-path", data, "--seq-length", "12",
                           "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "10",
                           "--split", "100,0,0", "--eval-iters", "0", "--no-tensorboard", "--no-compile",
                           "--clip-grad", "0", "--lr", "0.01", "--lr-decay-style", "constant", *extra])
    return Trainer(config, stream=stream).setup(), stream.getvalue()


def _step_and_logits(trainer, reference: dict) -> torch.Tensor:
    """ember's trainer takes megatron-core's extra step (same batch, LR; clip off), then its logits."""
    from ember.train.optim import set_lr

    tokens = reference["train_tokens"]
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(tokens[:, 1:].shape)}
    set_lr(trainer.optimizer, reference["optim"]["lr"])
    trainer.model.train()
    trainer.train_step([batch])
    with torch.no_grad():
        return trainer.model.eval()(reference["tokens"])


def _tolerance(reference: torch.Tensor) -> float:
    """fp32: megatron-core's TP-split matmuls and torch's foreach AdamW against ember's whole matmuls
    and fused AdamW differ in reduction order only (~1e-7 relative per op; measured 3e-7 of the largest
    logit); 1e-5 of the largest logit, as the weight conversion tests."""
    return 1e-5 * reference.abs().max().item()


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch_dist", "legacy"])
def test_ember_continues_megatron_run_as_megatron_core_does(saves, data, tmp_path, ckpt_format):
    reference = torch.load(saves / "reference_optim.pt")
    trainer, said = _trainer(saves / ckpt_format, tmp_path / "run", data)
    try:
        assert f"continuing Megatron's run at iteration {STEPS}" in said and "Adam moments (step 3" in said
        assert trainer.state.iteration == STEPS and trainer.state.consumed_samples == STEPS * megatron_checkpoints.BATCH
        group = trainer.optimizer.param_groups[0]  # Megatron's Adam settings, not ember's defaults
        assert (group["betas"], group["eps"]) == ((0.9, 0.95), 1e-8) and group["weight_decay"] == 0.1
        assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {float(STEPS)}
        logits = _step_and_logits(trainer, reference)
    finally:
        trainer.close()
    assert logits.shape == reference["logits"].shape
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=_tolerance(reference["logits"]))


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch_dist", "legacy"])
def test_bf16_run_continues_from_its_fp32_master_weights(saves, data, tmp_path, ckpt_format):
    """A bf16 Megatron run (Float16Optimizer): ember takes the fp32 master weights, which round to
    the bf16 model weights (those the weight conversion reads, to megatron-core's logits) but are
    more exact, and the moments; its fp32 step then lands near megatron-core's bf16 step."""
    from ember.checkpoint.megatron import convert_megatron_to_ember
    from ember.checkpoint.weights import load_ember_weights

    src = saves / "bf16" / ckpt_format
    reference = torch.load(saves / "bf16" / "reference_optim.pt")
    convert_megatron_to_ember(src, tmp_path / "bf16-weights")
    _, bf16_weights = load_ember_weights(tmp_path / "bf16-weights")
    trainer, said = _trainer(src, tmp_path / "run", data)
    try:
        assert "weights (its fp32 master copies)" in said and trainer.state.iteration == STEPS
        weights = trainer.model.state_dict()
        for name, rounded in bf16_weights.items():
            assert rounded.dtype == torch.bfloat16 and torch.equal(weights[name].to(torch.bfloat16), rounded), name
            assert not torch.equal(weights[name], rounded.float()), name  # not the bf16 copies
        logits = _step_and_logits(trainer, reference)
    finally:
        trainer.close()
    # megatron-core's step ran in bf16 (2^-8 relative per op): 5% of the largest logit, where a
    # fresh optimizer's step is off by about half of it
    scale = reference["logits"].abs().max().item()
    assert (logits - reference["logits"]).abs().max().item() < 0.05 * scale


@pytest.mark.slow
def test_no_load_optim_continues_at_iteration_n_with_a_fresh_optimizer(saves, data, tmp_path):
    reference = torch.load(saves / "reference_optim.pt")
    trainer, said = _trainer(saves / "torch_dist", tmp_path / "run", data, "--no-load-optim")
    try:
        assert "Adam moments are dropped" in said and f"iteration {STEPS}" in said
        assert trainer.state.iteration == STEPS and not trainer.optimizer.state
        logits = _step_and_logits(trainer, reference)
    finally:
        trainer.close()
    # the moments matter: without them the same step lands far from megatron-core's
    assert (logits - reference["logits"]).abs().max().item() > 1000 * _tolerance(reference["logits"])


def _without_optimizer(save_dir: Path, out: Path) -> Path:
    """The per-rank files as Megatron-LM writes them with --no-save-optim (no 'optimizer' entries)."""
    shutil.copytree(save_dir, out)
    for path in out.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        del state["optimizer"], state["opt_param_scheduler"]
        torch.save(state, path)
    return out


@pytest.mark.slow
def test_checkpoint_without_optimizer_state_is_refused_unless_no_load_optim(saves, data, tmp_path):
    src = _without_optimizer(saves / "legacy", tmp_path / "no-optim")
    _assert_refused_unless_no_load_optim(src, data, tmp_path, r"iteration 3 without optimizer state .*holds no "
                                                              r"optimizer state.*add --finetune.*or --no-load-optim")


def _assert_refused_unless_no_load_optim(src: Path, data: str, tmp_path: Path, message: str) -> None:
    """`ember train --load src` is refused in one line matching `message`; with --no-load-optim it
    continues at Megatron's iteration and says the optimizer state was dropped."""
    with pytest.raises(EmberError, match=message) as refused:
        _trainer(src, tmp_path / "refused", data)
    assert "\n" not in str(refused.value)
    trainer, said = _trainer(src, tmp_path / "run", data, "--no-load-optim")
    try:
        assert trainer.state.iteration == STEPS and "dropped" in said
    finally:
        trainer.close()


def test_unmappable_legacy_layouts_are_refused(saves):
    """The index -> parameter map is rebuilt only for Megatron's standard grouping, every count and
    shape checked; another grouping (decoupled LR, --lr-mult) or a mismatch is refused in one line."""
    path = next((saves / "legacy").glob("iter_*/mp_rank_00_000/model_optim_rng.pt"))  # TP rank 0, first stage
    state = torch.load(path, weights_only=False)
    names = legacy_parameter_names(state, path)
    groups = state["optimizer"]["param_groups"]
    assert [names[i] for i in groups[1]["params"][:2]] == ["decoder.layers.0.input_layernorm.weight",
                                                           "decoder.layers.0.pre_mlp_layernorm.weight"]
    assert names[groups[0]["params"][0]] == "embedding.word_embeddings.weight"
    for change, message in [
        (lambda s: s["optimizer"]["param_groups"][0].update(lr_mult=2.0), "not Megatron's standard grouping"),
        (lambda s: s["optimizer"]["param_groups"][1]["params"].pop(), r"group 1 holds \d+ parameters where"),
        (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), "moments of shape"),
        (lambda s: s["optimizer"]["state"].pop(2), "no Adam moments"),
    ]:
        changed = copy.deepcopy(state)
        change(changed)
        with pytest.raises(NoUsableOptimizerState, match=message):
            legacy_parameter_names(changed, path)


@pytest.mark.slow
def test_convert_command_load_optim(saves, tmp_path, capsys):
    """`ember convert --from megatron --to ember --load-optim` writes an ember save folder that
    resumes at the Megatron iteration; plain conversion says the optimizer state is not imported."""
    from ember.checkpoint.training import find_checkpoint
    from ember.cli import main

    out = tmp_path / "resume"
    assert main(["convert", "--from", "megatron", "--to", "ember", str(saves / "torch_dist"), str(out),
                 "--load-optim"]) == 0
    line = capsys.readouterr().out
    assert "Adam moments (step 3" in line and f"ember train --load {out}" in line
    ref = find_checkpoint(out)
    assert ref.kind == "training" and ref.iteration == STEPS and ref.train_state()["has_optimizer"]
    assert not list(ref.path.glob("rng/*"))  # no RNG state: each rank of the resumed run derives its own
    assert main(["convert", "--from", "megatron", "--to", "ember", str(saves / "torch_dist"), str(out),
                 "--load-optim"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["convert", "--from", "megatron", "--to", "ember", str(saves / "legacy"), str(tmp_path / "w")]) == 0
    assert "not imported: optimizer" in capsys.readouterr().out
    assert main(["convert", "--from", "ember", "--to", "hf", str(out), str(tmp_path / "hf"), "--load-optim"]) == 2
    assert "--load-optim" in capsys.readouterr().err
    no_optim = _without_optimizer(saves / "legacy", tmp_path / "no-optim")
    assert main(["convert", "--from", "megatron", "--to", "ember", str(no_optim), str(tmp_path / "x"), "--load-optim"]) == 2
    assert "holds no optimizer state" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------ Megatron's distributed optimizer
@pytest.fixture(scope="module")
def distributed_saves(saves):
    """A GPT-2 TP 2 x DP 2 run with megatron-core's DDP and DistributedOptimizer (Adam's state sharded over
    the two data-parallel ranks), saved as Megatron-LM 0.16 does: torch_dist-dp_reshardable/ (its
    default), torch_dist-fully_reshardable/ (--dist-ckpt-optim-fully-reshardable) and legacy/
    (model_optim_rng.pt + distrib_optim.pt per rank); reference_optim.pt after one more step."""
    return saves / "distributed"


@pytest.mark.slow
@pytest.mark.parametrize("form", ["torch_dist-dp_reshardable", "torch_dist-fully_reshardable", "legacy"])
def test_ember_continues_a_distributed_optimizer_run_as_megatron_core_does(distributed_saves, data, tmp_path, form):
    reference = torch.load(distributed_saves / "reference_optim.pt")
    trainer, said = _trainer(distributed_saves / form, tmp_path / "run", data)
    try:
        assert "Adam moments (step 3" in said and trainer.state.iteration == STEPS
        assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {float(STEPS)}
        logits = _step_and_logits(trainer, reference)
    finally:
        trainer.close()
    # each data-parallel rank took half the batch and DDP averaged the gradients: the mean over the
    # whole batch, ember's step on it; the same tolerance as without the distributed optimizer
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=_tolerance(reference["logits"]))


def _with_swapped_buffers(save: Path, out: Path) -> Path:
    """A copy of a dp_reshardable save in which model-parallel ranks 0 and 1 (tensor-parallel ranks
    0 and 1) trade their optimizer buffers: each rank's 'param' slices then hold the other rank's
    share of the split weights, as a wrong rank -> buffer mapping would read them."""
    import dataclasses
    import pickle

    shutil.copytree(save, out)
    path = next(out.glob("iter_*/.metadata"))
    metadata = pickle.loads(path.read_bytes())

    def swap(fqn: str) -> str:
        for a, b in (("dp_group_idx_0.", "dp_group_idx_X."), ("dp_group_idx_1.", "dp_group_idx_0."),
                     ("dp_group_idx_X.", "dp_group_idx_1.")):
            fqn = fqn.replace(a, b)
        return fqn

    metadata.state_dict_metadata = {swap(k): v for k, v in metadata.state_dict_metadata.items()}
    metadata.storage_data = {dataclasses.replace(k, fqn=swap(k.fqn)): v for k, v in metadata.storage_data.items()}
    path.write_bytes(pickle.dumps(metadata))
    return out


@pytest.mark.slow
def test_distributed_optimizer_buffers_that_fail_the_check_are_refused(distributed_saves, tmp_path, monkeypatch):
    """ember maps the distributed optimizer's flat buffers only when every parameter's master slice
    is that weight, and refuses in one line what fails: dp_reshardable buffers of the wrong ranks,
    a layer order other than the run's (only the Transformer Engine spec's for this local-spec run),
    and a distrib_optim.pt shifted by one alignment step."""
    from ember.checkpoint import megatron_distributed_optim
    from ember.checkpoint.megatron import locate_megatron_checkpoint
    from ember.checkpoint.megatron_optim import optimizer_state_summary

    def summary(folder: Path) -> str:
        said = optimizer_state_summary(locate_megatron_checkpoint(folder, None))
        assert said is not None and "\n" not in said
        return said

    dp_reshardable = distributed_saves / "torch_dist-dp_reshardable"
    assert optimizer_state_summary(locate_megatron_checkpoint(dp_reshardable, None)) is None
    said = summary(_with_swapped_buffers(dp_reshardable, tmp_path / "swapped"))
    assert "'dp_reshardable' state, whose buffers are not laid out as ember rebuilds" in said
    assert re.search(r"local spec: tensor-parallel rank 0's 'param' slice for \S+ (of layer \S+ )?is not that weight",
                     said), said
    assert "--dist-ckpt-optim-fully-reshardable" in said and "--ckpt-format torch" in said
    te_only = {"transformer_engine": megatron_distributed_optim._LAYER_ORDERS["transformer_engine"]}
    monkeypatch.setattr(megatron_distributed_optim, "_LAYER_ORDERS", te_only)
    said = summary(dp_reshardable)
    # in buffer order (reversed), the TE order first differs at the last layer's input norm, which it
    # puts where the local spec has linear_proj (GPT-2: the norm's bias comes first)
    assert "transformer_engine spec: tensor-parallel rank 0's 'param' slice for input_layernorm.bias of layer 3 " \
           "is not that weight" in said, said
    monkeypatch.undo()
    shifted = shutil.copytree(distributed_saves / "legacy", tmp_path / "shifted")
    path = next(shifted.glob("iter_*/mp_rank_01/distrib_optim.pt"))
    saved = torch.load(path, weights_only=False)
    for flat in saved[0].values():
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            flat[kind] = torch.roll(flat[kind], 64)
    torch.save(saved, path)
    assert "is not laid out as ember rebuilds" in summary(shifted)


@pytest.fixture(scope="module")
def bucketed_saves(saves):
    """The distributed-optimizer run of `distributed_saves` again with --overlap-grad-reduce
    --ddp-bucket-size 8401 (megatron_checkpoints.BUCKETED): megatron-core's DDP cuts each rank's
    gradient buffer into eleven buckets and reduce-scatters each one as its gradients are ready."""
    return saves / "distributed-buckets"


def _bucket_sizes(save: Path) -> list[int]:
    """Model-parallel rank 0's bucket sizes in a 'dp_reshardable' save, in bucket order."""
    from torch.distributed.checkpoint import FileSystemReader

    from ember.checkpoint.megatron_distributed_optim import BUCKET_FQN

    metadata = FileSystemReader(str(save / f"iter_{STEPS:07d}")).read_metadata()
    sizes = {}
    for fqn, item in metadata.state_dict_metadata.items():
        match = BUCKET_FQN.match(fqn)
        if match and match.group(1) == "0" and match.group(5) == "param":
            sizes[int(match.group(4))] = int(item.size[0])
    return [sizes[bucket] for bucket in sorted(sizes)]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["torch_dist-dp_reshardable", "legacy"])
def test_ember_continues_a_run_with_several_gradient_buckets(bucketed_saves, data, tmp_path, form):
    """Buckets restart the 64-element alignment: a bucket that ends after a 96-element bias moves
    every later parameter in the flat state, so the one-bucket layout cannot read these saves."""
    sizes = _bucket_sizes(bucketed_saves / "torch_dist-dp_reshardable")
    assert len(sizes) > 1 and any(size % 64 for size in sizes), sizes
    reference = torch.load(bucketed_saves / "reference_optim.pt")
    trainer, said = _trainer(bucketed_saves / form, tmp_path / "run", data)
    try:
        assert "Adam moments (step 3" in said and trainer.state.iteration == STEPS
        logits = _step_and_logits(trainer, reference)
    finally:
        trainer.close()
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=_tolerance(reference["logits"]))


@pytest.mark.slow
def test_fully_reshardable_state_of_several_buckets_is_refused(bucketed_saves, data, tmp_path):
    """megatron-core 0.16.1's 'fully_reshardable' save of a bucketed buffer stores other parameters'
    state under each name (it warns so while saving): ember finds a master copy that is not its weight
    and refuses the optimizer state in one line, naming the saves it can read; the weights still load."""
    _assert_refused_unless_no_load_optim(
        bucketed_saves / "torch_dist-fully_reshardable", data, tmp_path,
        r"holds a master copy of \S+ .*that is not that weight \(megatron-core misplaces .*--overlap-grad-reduce\)"
        r".*'dp_reshardable' save")


def _synthetic_torch_dist_save(save_dir: Path, args, nan_in: str | None = None) -> int:
    """A torch_dist save of `args`'s model with random fp32 weights and Adam moments where Megatron-LM's
    non-distributed optimizer puts them (`optimizer.state.exp_avg.<tensor>`, parameter groups and step in
    common.pt), written one tensor at a time; returns the bytes of weights and moments. Made here rather
    than by megatron-core: a memory bound needs a model far larger than a group, which megatron-core on
    CPU would take minutes to train (the format is the one the tests above get from megatron-core).
    `nan_in`: a Megatron tensor name whose weight holds a NaN."""
    import argparse

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    from ember.checkpoint.megatron_export import megatron_args_from_ember, megatron_tensors
    from ember.models.hf import ember_state_shapes

    ember = ember_state_shapes(args)
    shapes = {(key if layer is None else f"decoder.layers.{layer}.{key}"): tuple(t.shape) for layer, key, t in
              megatron_tensors(args, lambda name: torch.empty(ember[name][0], device="meta"))}
    state = {prefix + name: torch.zeros(()).expand(shape) for name, shape in shapes.items()
             for prefix in ("", "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq.")}

    class RandomTensors(DefaultSavePlanner):  # each tensor made as it is written
        def resolve_data(self, write_item):
            values = torch.rand(state[write_item.index.fqn].shape) * 1e-2
            if write_item.index.fqn == nan_in:
                values.view(-1)[-1] = float("nan")
            return values

    folder = save_dir / "iter_0000005"
    # one file per tensor: DCP's writer keeps a file's tensors alive until it closes the file
    dcp.save(state, storage_writer=FileSystemWriter(folder, single_file_per_rank=False), planner=RandomTensors(),
             no_dist=True)
    namespace: argparse.Namespace = megatron_args_from_ember(args, 1, 1, "torch_dist")
    decayed = [name for name, shape in shapes.items() if len(shape) > 1]
    group = {"lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False, "lr": 1e-3, "betas": (0.9, 0.95),
             "eps": 1e-8, "amsgrad": False}
    groups = [{**group, "params": list(range(len(decayed))), "wd_mult": 1.0, "weight_decay": 0.1},
              {**group, "params": list(range(len(decayed), len(shapes))), "wd_mult": 0.0, "weight_decay": 0.0}]
    optimizer = {"optimizer": {"param_groups": groups, "state": {"common_step": 5}}}
    common = {"args": namespace, "iteration": 5, "checkpoint_version": 3.0, "optimizer": optimizer}
    torch.save(common, folder / "common.pt")
    (save_dir / "latest_checkpointed_iteration.txt").write_text("5")
    return sum(torch.Size(shape).numel() for shape in shapes.values()) * 4 * 3


_MEASURED_IMPORT = """
import sys
import torch.distributed.checkpoint, ember.checkpoint.training, ember.checkpoint.weights, ember.models.hf
from ember.checkpoint.megatron_optim import convert_megatron_to_training_checkpoint
from ember.train.trainer import adam_for_megatron_import

def status(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on
before = status("VmRSS:")
convert_megatron_to_training_checkpoint(sys.argv[1], sys.argv[2], adam_for_megatron_import)
print(status("VmHWM:") - before)
"""


def test_optimizer_import_holds_a_tensor_group_not_the_model(tmp_path):
    """The import writes the training checkpoint as it reads the Megatron one: the memory it adds to
    the process is a fixed overhead and a few tensor groups (SwiGLU's fc1 with its moments: 17 MB
    here), about the same for 4 layers as for 16 (measured: +37 MiB), where the old import, which
    built the model and its optimizer, grew by 590 MiB for the 387 MiB that 12 more layers' weights
    and moments take (and a DCP writer that keeps what it wrote, by 415 MiB)."""
    import subprocess
    import sys

    from ember.models.args import ModelArgs

    added, state_bytes = {}, {}
    for layers in (4, 16):
        args = ModelArgs(vocab_size=4096, dim=512, n_layers=layers, n_heads=8, n_kv_heads=2, ffn_dim=1408,
                         max_seq_len=256)
        src, out = tmp_path / f"megatron-{layers}", tmp_path / f"out-{layers}"
        state_bytes[layers] = _synthetic_torch_dist_save(src, args)
        done = subprocess.run([sys.executable, "-c", _MEASURED_IMPORT, str(src), str(out)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr[-2000:]
        assert (out / "latest").read_text().strip() == "iter_0000005"
        added[layers] = int(done.stdout.split()[-1])
        shutil.rmtree(src), shutil.rmtree(out)
    grown, more_state = added[16] - added[4], state_bytes[16] - state_bytes[4]
    assert grown < more_state / 4, (f"the import added {added[4] / 2**20:.0f} MiB for 4 layers, "
                                    f"{added[16] / 2**20:.0f} MiB for 16, whose weights and moments are "
                                    f"{more_state / 2**20:.0f} MiB more")


def test_optimizer_import_refuses_nan_weights_and_writes_nothing(tmp_path):
    """A weight holding NaN (a diverged run's last save) stops the streamed import in one line, before
    the checkpoint gets its name: no half-written checkpoint is left to resume."""
    from ember.checkpoint.megatron_optim import convert_megatron_to_training_checkpoint
    from ember.models.args import ModelArgs
    from ember.train.trainer import adam_for_megatron_import

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    _synthetic_torch_dist_save(tmp_path / "megatron", args, nan_in="decoder.layers.1.mlp.linear_fc2.weight")
    with pytest.raises(EmberError, match=r"layers\.1\.feed_forward\.w2\.weight holds NaN or Inf; nothing imported"):
        convert_megatron_to_training_checkpoint(tmp_path / "megatron", tmp_path / "out", adam_for_megatron_import)
    assert not any((tmp_path / "out").iterdir())

"""Megatron checkpoints -> ember (`ember.checkpoint.megatron`), proven on checkpoints megatron-core
0.16.1 itself writes (tests/megatron_checkpoints.py: a GPTModel over gloo on CPU, saved with
`dist_checkpointing.save` and in the per-rank layout of Megatron-LM's training loop): ember's logits
from the converted weights must equal megatron-core's forward on the same tokens.

Cases: {Llama (RMSNorm, SwiGLU, RoPE, GQA, no bias, untied), GPT-2 (LayerNorm, GELU, learned
positions, biases, tied), Qwen3 (qk-layernorm, head_dim apart, tied)} x {torch_dist, per-rank
files} x {TP 2 x PP 2, TP 2}, plus the legacy model's names, and the refusals: classes outside the
allow-list (never executed), incomplete or inconsistent checkpoints, iterations that are not there.
Mixture of experts: a Mixtral-style megatron-core model at TP 2 and TP 2 x EP 2, both formats,
round trips through ember's export at several TP/PP/EP layouts, and megatron-core loading the export.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

import megatron_checkpoints  # noqa: E402  (tests/ is on sys.path, like dist_utils)
from dist_utils import single_thread  # noqa: E402,F401  (autouse fixture: one torch thread)

from ember.checkpoint.megatron import (  # noqa: E402
    convert_megatron_to_ember,
    fuse_qkv,
    is_megatron_checkpoint,
    locate_megatron_checkpoint,
    model_args_from_megatron,
    split_qkv,
)
from ember.checkpoint.weights import load_model, read_manifest  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.models.args import ModelArgs  # noqa: E402

# (family, tensor-parallel, pipeline-parallel): each built once, saved in both formats
BUILDS = {"llama": (2, 2), "gpt2": (2, 2), "qwen3": (2, 1)}


@pytest.fixture(scope="module")
def megatron_saves(tmp_path_factory):
    """family -> folder with torch_dist/ and legacy/ save folders of one megatron-core model."""
    root = tmp_path_factory.mktemp("megatron")
    return {family: megatron_checkpoints.build(root / family, family, tp, pp) for family, (tp, pp) in BUILDS.items()}


def assert_same_logits(save_dir: Path, ember_dir: Path) -> None:
    reference = torch.load(save_dir / "reference.pt")
    model = load_model(ember_dir).eval()
    with torch.no_grad():
        logits = model(reference["tokens"])
    assert_logits_close(logits, reference["logits"])


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 logits equal to 1e-5 of their largest magnitude (the tolerance every comparison here uses)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0.3  # random norms and biases: a misplaced tensor moves the logits by about this
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "legacy"])
@pytest.mark.parametrize("family", list(BUILDS))
def test_megatron_core_checkpoint_gives_megatron_logits(megatron_saves, tmp_path, family, ckpt_format):
    save_dir = megatron_saves[family] / ckpt_format
    report = convert_megatron_to_ember(save_dir, tmp_path / "ember")
    tp, pp = BUILDS[family]
    assert (report["format"], report["naming"], report["iteration"]) == (ckpt_format, "mcore", 7)
    assert (report["tensor_parallel"], report["pipeline_parallel"]) == (tp, pp)
    assert report["family"] == family
    manifest = read_manifest(tmp_path / "ember")
    assert manifest["source"]["kind"] == "megatron" and manifest["source"]["format"] == ckpt_format
    assert_same_logits(save_dir, tmp_path / "ember")


def test_rank_folder_layouts_are_the_ones_megatron_writes(megatron_saves):
    assert sorted(p.name for p in (megatron_saves["llama"] / "legacy/iter_0000007").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert sorted(p.name for p in (megatron_saves["qwen3"] / "legacy/iter_0000007").iterdir()) == [
        "mp_rank_00", "mp_rank_01"]
    dist_files = {p.name for p in (megatron_saves["llama"] / "torch_dist/iter_0000007").iterdir()}
    assert {".metadata", "common.pt", "metadata.json"} <= dist_files
    assert any(name.endswith(".distcp") for name in dist_files)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_legacy_model_names(megatron_saves, tmp_path, family):
    """`language_model.encoder.layers.N.self_attention.query_key_value.weight` & co, nested dicts,
    the tied head's `word_embeddings_for_head` on the last stage (gpt2, PP 2)."""
    save_dir = megatron_checkpoints.with_legacy_model_names(megatron_saves[family] / "legacy", tmp_path / "legacy")
    report = convert_megatron_to_ember(save_dir, tmp_path / "ember")
    assert report["naming"] == "legacy"
    assert_same_logits(save_dir, tmp_path / "ember")


def test_fused_norm_names_of_per_rank_files(megatron_saves, tmp_path):
    """Transformer-Engine specs save the norms inside the next linear (`linear_qkv.layer_norm_weight`,
    `linear_fc1.layer_norm_weight`): the same tensors under those names convert the same."""
    save_dir = tmp_path / "fused"
    shutil.copytree(megatron_saves["gpt2"] / "legacy", save_dir)
    renames = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_", "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    for path in save_dir.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        model = {}
        for name, tensor in state["model"].items():
            for old, new in renames.items():
                name = name.replace(old, new)
            model[name] = tensor
        state["model"] = model
        torch.save(state, path)
    convert_megatron_to_ember(save_dir, tmp_path / "ember")
    assert_same_logits(save_dir, tmp_path / "ember")


def test_iteration_folders(megatron_saves, tmp_path):
    save_dir = megatron_saves["qwen3"] / "torch_dist"
    assert is_megatron_checkpoint(save_dir) and is_megatron_checkpoint(save_dir / "iter_0000007")
    assert not is_megatron_checkpoint(tmp_path)
    # an iteration folder on its own, and --iteration
    assert locate_megatron_checkpoint(save_dir / "iter_0000007").iteration == 7
    assert locate_megatron_checkpoint(save_dir, iteration=7).folder == save_dir / "iter_0000007"
    with pytest.raises(EmberError, match=r"iter_0000008 does not exist; .* holds iter_0000007"):
        locate_megatron_checkpoint(save_dir, iteration=8)
    # a release folder, named by the tracker file
    release = tmp_path / "release_save"
    release.mkdir()
    os.symlink(save_dir / "iter_0000007", release / "release")
    (release / "latest_checkpointed_iteration.txt").write_text("release\n")
    report = convert_megatron_to_ember(release, tmp_path / "ember")
    assert report["iteration"] == "release"
    assert_same_logits(save_dir, tmp_path / "ember")
    # no tracker: say which iterations there are
    untracked = tmp_path / "untracked"
    untracked.mkdir()
    os.symlink(save_dir / "iter_0000007", untracked / "iter_0000007")
    with pytest.raises(EmberError, match="no latest_checkpointed_iteration.txt .* holds iter_0000007; pass --iteration"):
        locate_megatron_checkpoint(untracked)
    assert locate_megatron_checkpoint(untracked, iteration=7).format == "torch_dist"


def test_output_dtype_and_existing_output(megatron_saves, tmp_path):
    save_dir = megatron_saves["qwen3"] / "legacy"
    convert_megatron_to_ember(save_dir, tmp_path / "ember", dtype=torch.bfloat16)
    model = load_model(tmp_path / "ember")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(EmberError, match="already exists"):
        convert_megatron_to_ember(save_dir, tmp_path / "ember")
    convert_megatron_to_ember(save_dir, tmp_path / "ember", overwrite=True)


# ----------------------------------------------------------------------------- refusals
class _Marker:
    """Unpickling this would create a folder: the tests check that it never appears."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _rewrite_rank_files(save_dir: Path, change) -> None:
    for path in save_dir.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        change(state)
        torch.save(state, path)


def test_args_holding_other_classes_are_refused_unexecuted(megatron_saves, tmp_path):
    save_dir = tmp_path / "evil"
    shutil.copytree(megatron_saves["qwen3"] / "legacy", save_dir)
    marker = tmp_path / "pwned"
    _rewrite_rank_files(save_dir, lambda state: setattr(state["args"], "hook", _Marker(str(marker))))
    with pytest.raises(EmberError, match=r"holds a posix\.mkdir object, which is not among the classes") as err:
        convert_megatron_to_ember(save_dir, tmp_path / "ember")
    assert "\n" not in str(err.value)
    assert not marker.exists() and not (tmp_path / "ember").exists()


def test_distributed_metadata_holding_other_classes_is_refused_unexecuted(megatron_saves, tmp_path):
    save_dir = tmp_path / "evil"
    shutil.copytree(megatron_saves["qwen3"] / "torch_dist", save_dir)
    marker = tmp_path / "pwned"
    metadata = save_dir / "iter_0000007" / ".metadata"
    with open(metadata, "rb") as f:
        loaded = pickle.load(f)
    loaded.planner_data = _Marker(str(marker))
    metadata.write_bytes(pickle.dumps(loaded))
    with pytest.raises(EmberError, match=r"\.metadata is not DCP checkpoint metadata \(.*posix\.mkdir is not part of"):
        convert_megatron_to_ember(save_dir, tmp_path / "ember")
    assert not marker.exists()


def test_common_pt_holding_other_classes_is_refused_unexecuted(megatron_saves, tmp_path):
    save_dir = tmp_path / "evil"
    shutil.copytree(megatron_saves["qwen3"] / "torch_dist", save_dir)
    marker = tmp_path / "pwned"
    common = save_dir / "iter_0000007" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["extra"] = _Marker(str(marker))
    torch.save(state, common)
    with pytest.raises(EmberError, match=r"common\.pt: holds a posix\.mkdir object"):
        convert_megatron_to_ember(save_dir, tmp_path / "ember")
    assert not marker.exists()


def test_missing_rank_file_and_missing_chunk_file(megatron_saves, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(megatron_saves["llama"] / "legacy", legacy)
    shutil.rmtree(legacy / "iter_0000007" / "mp_rank_01_001")
    with pytest.raises(EmberError, match="mp_rank_01_001 is missing"):
        convert_megatron_to_ember(legacy, tmp_path / "ember")
    dist = tmp_path / "dist"
    shutil.copytree(megatron_saves["llama"] / "torch_dist", dist)
    victim = sorted((dist / "iter_0000007").glob("*.distcp"))[-1]
    victim.unlink()
    with pytest.raises(EmberError, match=f"{victim.name}: cannot read .* the checkpoint is incomplete"):
        convert_megatron_to_ember(dist, tmp_path / "ember")
    assert not (tmp_path / "ember").exists()


def test_args_that_disagree_with_the_weights(megatron_saves, tmp_path):
    save_dir = tmp_path / "wrong"
    shutil.copytree(megatron_saves["qwen3"] / "legacy", save_dir)
    _rewrite_rank_files(save_dir, lambda state: setattr(state["args"], "num_layers", 5))
    with pytest.raises(EmberError, match=r"tensor decoder\.layers\.4\.input_layernorm\.weight is missing"):
        convert_megatron_to_ember(save_dir, tmp_path / "ember")
    shutil.rmtree(save_dir)
    shutil.copytree(megatron_saves["qwen3"] / "legacy", save_dir)
    _rewrite_rank_files(save_dir, lambda state: setattr(state["args"], "num_layers", 3))
    with pytest.raises(EmberError, match=r"decoder\.layers\.3\..* is not part of the model the saved args describe"):
        convert_megatron_to_ember(save_dir, tmp_path / "ember")
    shutil.rmtree(save_dir)
    shutil.copytree(megatron_saves["qwen3"] / "legacy", save_dir)
    _rewrite_rank_files(save_dir, lambda state: state.pop("args"))
    with pytest.raises(EmberError, match="holds no saved 'args'"):
        convert_megatron_to_ember(save_dir, tmp_path / "ember")


# ----------------------------------------------------------------------------- pieces
def _namespace(**changes) -> argparse.Namespace:
    base = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, group_query_attention=False,
                num_query_groups=1, kv_channels=16, max_position_embeddings=32, position_embedding_type="rope",
                normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True, untie_embeddings_and_output_weights=True,
                add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False, padded_vocab_size=256,
                rotary_base=10000, num_experts=None)
    base.update(changes)
    return argparse.Namespace(**base)


def test_args_mapping():
    family, args = model_args_from_megatron(_namespace())
    assert family == "llama"
    assert (args.n_kv_heads, args.mlp_type, args.activation, args.tie_embeddings, args.qkv_bias) == (4, "gated", "silu", False, False)
    # num_query_groups counts only with group_query_attention (Megatron keeps its default of 1)
    assert model_args_from_megatron(_namespace(group_query_attention=True, num_query_groups=2))[1].n_kv_heads == 2
    _, qwen2 = model_args_from_megatron(_namespace(add_qkv_bias=True))
    assert (qwen2.qkv_bias, qwen2.attn_out_bias, qwen2.mlp_bias) == (True, False, False)
    _, scaled = model_args_from_megatron(_namespace(use_rope_scaling=True, rope_scaling_factor=32.0))
    assert scaled.rope_scaling["factor"] == 32.0 and scaled.rope_scaling["type"] == "llama3"
    _, gpt = model_args_from_megatron(_namespace(position_embedding_type="learned_absolute", normalization="LayerNorm",
                                                 swiglu=False, openai_gelu=True, add_bias_linear=True,
                                                 untie_embeddings_and_output_weights=False))
    assert (gpt.activation, gpt.mlp_bias, gpt.tie_embeddings, gpt.position_type) == ("gelu_tanh", True, True, "learned")
    for changes, message in ((dict(num_experts=8, moe_shared_expert_intermediate_size=256), "shared experts"),
                             (dict(rotary_percent=0.5), "partial RoPE"),
                             (dict(position_embedding_type="xpos"), "xpos is not supported"),
                             (dict(embed_layernorm=True), "embedding layernorm .* RMSNorm"),
                             (dict(padded_vocab_size=None), "padded_vocab_size")):
        with pytest.raises(EmberError, match=message):
            model_args_from_megatron(_namespace(**changes))


def test_qkv_interleaving_per_query_group():
    args = ModelArgs(dim=16, n_heads=4, n_kv_heads=2, head_dim=2, n_layers=1, vocab_size=8, ffn_dim=8)
    rows = torch.arange(2 * (2 + 2) * 2, dtype=torch.float32)[:, None]  # 2 groups x (2 q + k + v) x head_dim 2
    q, k, v = split_qkv(args, rows)
    assert q.flatten().tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert k.flatten().tolist() == [4, 5, 12, 13]
    assert v.flatten().tolist() == [6, 7, 14, 15]
    assert torch.equal(fuse_qkv(args, q, k, v), rows)


def test_ember_convert_from_megatron_command(megatron_saves, tmp_path, capsys):
    """`ember convert --from megatron --to ember` runs the conversion and says what it read; its
    output never replaces the source."""
    from ember.cli import main
    from ember.checkpoint.weights import read_manifest

    src = megatron_saves["llama"] / "torch_dist"
    out = tmp_path / "converted"
    assert main(["convert", "--from", "megatron", "--to", "ember", str(src), str(out)]) == 0
    line = capsys.readouterr().out
    assert "megatron torch_dist" in line and "-> ember llama" in line
    assert read_manifest(out)["model_args"]["n_layers"] > 0
    assert main(["convert", "--from", "megatron", "--to", "ember", str(src), str(src.parent), "--force"]) == 2
    assert "holds the source" in capsys.readouterr().err
    assert src.is_dir()
    assert main(["convert", "--from", "hf", "--to", "ember", str(src), str(out), "--iteration", "3"]) == 2
    assert "--iteration" in capsys.readouterr().err


# ------------------------------------------------------------------- ember train --load MEGATRON_DIR
def _train_config(load: Path, out: Path, data: Path, *extra: str):
    from dist_utils import train_config

    return train_config(["--load", str(load), "--save", str(out), "--data-path", str(data), "--seq-length", "12",
                         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
                         "--split", "100,0,0", "--eval-iters", "0", "--no-tensorboard", "--no-compile", *extra])


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "legacy"])
def test_train_load_megatron_starts_from_its_weights(megatron_saves, tmp_path, ckpt_format):
    """A Megatron user's `--load` works as in Megatron: an iteration checkpoint with --finetune (and a
    release one without) is converted once into the run's folder and training starts from exactly
    its weights (megatron-core's logits); without --finetune, ember refuses in one line instead of
    silently dropping the optimizer state Megatron would resume with."""
    from dist_utils import write_token_dataset

    from ember.train import Trainer

    src = megatron_saves["llama"] / ckpt_format
    data = write_token_dataset(tmp_path / "tokens", documents=20, vocab=100)
    with pytest.raises(EmberError, match=r"iteration 7.*add --finetune"):
        Trainer(_train_config(src, tmp_path / "refused", data)).setup()

    reference = torch.load(src / "reference.pt")
    for run in ("first", "again"):  # the second finds the import and reuses it
        stream = io.StringIO()
        trainer = Trainer(_train_config(src, tmp_path / "run", data, "--finetune"), stream=stream).setup()
        assert ("imported into" if run == "first" else "imported before") in stream.getvalue()
        with torch.no_grad():
            logits = trainer.model.eval()(reference["tokens"])
        trainer.close()
        assert_logits_close(logits, reference["logits"])
    assert read_manifest(tmp_path / "run" / "megatron_import" / "iter_0000007")["source"]["iteration"] == 7

    release = tmp_path / "release"  # what HF -> Megatron converters write
    shutil.copytree(src / "iter_0000007", release / "release")
    (release / "latest_checkpointed_iteration.txt").write_text("release")
    trainer = Trainer(_train_config(release, tmp_path / "from-release", data)).setup()
    with torch.no_grad():
        logits = trainer.model.eval()(reference["tokens"])
    trainer.close()
    assert_logits_close(logits, reference["logits"])


# ----------------------------------------------------------------------------- ember -> megatron
def _same_ember_weights(a: Path, b: Path) -> None:
    from ember.checkpoint.weights import load_ember_weights

    args_a, state_a = load_ember_weights(a)
    args_b, state_b = load_ember_weights(b)
    assert args_a.to_dict() == args_b.to_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype and torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("layout", [("legacy", 2, 2), ("torch_dist", 2, 2), ("legacy", 1, 4), ("torch_dist", 1, 1),
                                    ("legacy", 2, 1)])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_round_trip_megatron_ember_megatron_ember_is_bit_exact(megatron_saves, tmp_path, family, layout):
    from ember.checkpoint.megatron_export import convert_ember_to_megatron

    ckpt_format, tp, pp = layout
    convert_megatron_to_ember(megatron_saves[family] / "legacy", tmp_path / "ember1")
    report = convert_ember_to_megatron(tmp_path / "ember1", tmp_path / "megatron", ckpt_format, tp, pp)
    assert (report["format"], report["tensor_parallel"], report["pipeline_parallel"]) == (ckpt_format, tp, pp)
    back = convert_megatron_to_ember(tmp_path / "megatron", tmp_path / "ember2")
    assert (back["format"], back["tensor_parallel"], back["pipeline_parallel"]) == (ckpt_format, tp, pp)
    _same_ember_weights(tmp_path / "ember1", tmp_path / "ember2")


@pytest.mark.parametrize("ckpt_format", ["legacy", "torch_dist"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_megatron_core_loads_ember_export_and_gives_ember_logits(megatron_saves, tmp_path, family, ckpt_format):
    """megatron-core itself loads ember's export at TP 2 x PP 2 (legacy: each rank's
    model_optim_rng.pt with load_state_dict(strict=True); torch_dist: dist_checkpointing.load of
    the model's sharded_state_dict, then strict load_state_dict) and its forward gives ember's logits."""
    from ember.checkpoint.megatron_export import convert_ember_to_megatron

    convert_megatron_to_ember(megatron_saves[family] / "legacy", tmp_path / "ember")
    convert_ember_to_megatron(tmp_path / "ember", tmp_path / "save", ckpt_format, 2, 2)
    assert (tmp_path / "save" / "latest_checkpointed_iteration.txt").read_text() == "0"
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(megatron_saves[family] / "legacy" / "reference.pt", work / "reference.pt")
    loaded = megatron_checkpoints.load_with_megatron(work, tmp_path / "save", family, 2, 2, ckpt_format)
    model = load_model(tmp_path / "ember").eval()
    with torch.no_grad():
        ember_logits = model(loaded["tokens"])
    assert_logits_close(loaded["logits"], ember_logits)


def test_ember_convert_to_megatron_command_and_refusals(megatron_saves, tmp_path, capsys):
    from ember.checkpoint.megatron_export import convert_ember_to_megatron
    from ember.cli import main

    ember_dir = tmp_path / "ember"
    convert_megatron_to_ember(megatron_saves["llama"] / "legacy", ember_dir)
    out = tmp_path / "megatron"
    assert main(["convert", "--from", "ember", "--to", "megatron", str(ember_dir), str(out), "--format", "legacy",
                 "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"]) == 0
    assert "-> megatron legacy" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "iter_0000000").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    state = torch.load(out / "iter_0000000/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
    assert (state["args"].tensor_model_parallel_size, state["args"].pipeline_model_parallel_size) == (2, 2)
    # an existing output needs --force; then it is replaced whole (atomically)
    assert main(["convert", "--from", "ember", "--to", "megatron", str(ember_dir), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--from", "ember", "--to", "megatron", str(ember_dir), str(out), "--force"]) == 0
    assert (out / "iter_0000000" / ".metadata").is_file() and not (out / "iter_0000000" / "mp_rank_00_000").exists()
    # --force replaces an earlier export only, never an unrelated folder
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    with pytest.raises(EmberError, match="is not an earlier export"):
        convert_ember_to_megatron(ember_dir, unrelated, overwrite=True)
    assert (unrelated / "keep.txt").read_text() == "mine"
    # never over the source; layouts that do not divide the model; flags for the other direction
    with pytest.raises(EmberError, match="holds the source"):
        convert_ember_to_megatron(ember_dir, tmp_path, overwrite=True)
    with pytest.raises(EmberError, match="does not divide the 2 query groups"):
        convert_ember_to_megatron(ember_dir, tmp_path / "tp4", tensor_parallel=4)
    with pytest.raises(EmberError, match="does not divide the 4 layers"):
        convert_ember_to_megatron(ember_dir, tmp_path / "pp3", pipeline_parallel=3)
    assert not (tmp_path / "tp4").exists() and not (tmp_path / "pp3").exists()
    assert main(["convert", "--from", "ember", "--to", "hf", str(ember_dir), str(tmp_path / "hf"),
                 "--target-tensor-parallel-size", "2"]) == 2
    assert "--to megatron" in capsys.readouterr().err
    # expert parallelism needs experts: this dense model is refused in one line
    assert main(["convert", "--from", "ember", "--to", "megatron", str(ember_dir), str(tmp_path / "ep2"),
                 "--target-expert-parallel-size", "2"]) == 2
    assert "expert" in capsys.readouterr().err and not (tmp_path / "ep2").exists()


# ----------------------------------------------------------------------------- mixture of experts
# Mixtral-style megatron-core GPTModel (tests/megatron_checkpoints.py "mixtral": 4 SwiGLU experts,
# top-2 softmax router, SequentialMLP of the local spec, all-gather dispatcher, aux loss 0), built
# at (tensor-parallel, expert-parallel); world = TP x EP (EP ranks are data-parallel ranks).
MOE_BUILDS = {"tp2": (2, 1), "tp2_ep2": (2, 2)}


@pytest.fixture(scope="module")
def moe_saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron_moe")
    return {name: megatron_checkpoints.build(root / name, "mixtral", tp, 1, ep=ep) for name, (tp, ep) in MOE_BUILDS.items()}


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "legacy"])
@pytest.mark.parametrize("build", list(MOE_BUILDS))
def test_megatron_core_moe_checkpoint_gives_megatron_logits(moe_saves, tmp_path, build, ckpt_format):
    save_dir = moe_saves[build] / ckpt_format
    report = convert_megatron_to_ember(save_dir, tmp_path / "ember")
    tp, ep = MOE_BUILDS[build]
    assert (report["format"], report["tensor_parallel"], report["expert_parallel"]) == (ckpt_format, tp, ep)
    assert report["family"] == "mixtral"
    args = ModelArgs.from_dict(read_manifest(tmp_path / "ember")["model_args"])
    assert (args.num_experts, args.moe_top_k, args.moe_ffn_dim, args.moe_gating, args.moe_renormalize) == (
        4, 2, 48, "softmax", True)
    assert_same_logits(save_dir, tmp_path / "ember")


def test_moe_rank_folders_are_the_ones_megatron_writes(moe_saves):
    """Megatron-LM's get_checkpoint_name: mp_rank_TT_EEE with expert parallelism and no pipeline."""
    assert sorted(p.name for p in (moe_saves["tp2_ep2"] / "legacy/iter_0000007").iterdir()) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    state = torch.load(moe_saves["tp2_ep2"] / "legacy/iter_0000007/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    assert "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight" in state["model"]
    assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in state["model"]


def test_moe_same_model_from_every_layout_and_format(moe_saves, tmp_path):
    """The EP 2 save's two formats convert to the same bits (experts of rank 1 land at 2, 3)."""
    convert_megatron_to_ember(moe_saves["tp2_ep2"] / "legacy", tmp_path / "a")
    convert_megatron_to_ember(moe_saves["tp2_ep2"] / "torch_dist", tmp_path / "b")
    _same_ember_weights(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("layout", [("legacy", 2, 1, 2), ("torch_dist", 2, 1, 2), ("legacy", 2, 2, 4),
                                    ("legacy", 1, 2, 2), ("legacy", 1, 1, 1), ("torch_dist", 1, 1, 1)])
def test_moe_round_trip_megatron_ember_megatron_ember_is_bit_exact(moe_saves, tmp_path, layout):
    from ember.checkpoint.megatron_export import convert_ember_to_megatron

    ckpt_format, tp, pp, ep = layout
    convert_megatron_to_ember(moe_saves["tp2_ep2"] / "legacy", tmp_path / "ember1")
    report = convert_ember_to_megatron(tmp_path / "ember1", tmp_path / "megatron", ckpt_format, tp, pp, expert_parallel=ep)
    assert report["expert_parallel"] == ep
    if ckpt_format == "legacy":
        assert report["files"] == tp * pp * ep
    back = convert_megatron_to_ember(tmp_path / "megatron", tmp_path / "ember2")
    assert (back["tensor_parallel"], back["pipeline_parallel"], back["expert_parallel"]) == (tp, pp, ep)
    _same_ember_weights(tmp_path / "ember1", tmp_path / "ember2")


@pytest.mark.parametrize("layout", [("legacy", 2, 1, 2), ("torch_dist", 2, 1, 2), ("legacy", 1, 2, 2)])
def test_megatron_core_loads_ember_moe_export_and_gives_ember_logits(moe_saves, tmp_path, layout):
    """megatron-core builds the MoE GPTModel at TP x PP x EP, loads ember's export (strict) and its
    forward gives ember's logits."""
    from ember.checkpoint.megatron_export import convert_ember_to_megatron

    ckpt_format, tp, pp, ep = layout
    convert_megatron_to_ember(moe_saves["tp2_ep2"] / "legacy", tmp_path / "ember")
    convert_ember_to_megatron(tmp_path / "ember", tmp_path / "save", ckpt_format, tp, pp, expert_parallel=ep)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(moe_saves["tp2_ep2"] / "legacy" / "reference.pt", work / "reference.pt")
    loaded = megatron_checkpoints.load_with_megatron(work, tmp_path / "save", "mixtral", tp, pp, ckpt_format, ep=ep)
    model = load_model(tmp_path / "ember").eval()
    with torch.no_grad():
        ember_logits = model(loaded["tokens"])
    assert_logits_close(loaded["logits"], ember_logits)


def test_moe_args_mapping_and_refusals():
    moe = dict(num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01)
    _, args = model_args_from_megatron(_namespace(**moe))
    assert (args.num_experts, args.moe_top_k, args.moe_ffn_dim, args.moe_aux_loss_coef) == (8, 2, 32, 0.01)
    assert (args.moe_gating, args.moe_renormalize) == ("softmax", True)
    _, pre = model_args_from_megatron(_namespace(**moe, moe_router_pre_softmax=True))
    assert pre.moe_renormalize is False
    _, sigmoid = model_args_from_megatron(_namespace(**moe, moe_router_score_function="sigmoid"))
    assert (sigmoid.moe_gating, sigmoid.moe_renormalize) == ("sigmoid", True)
    _, unbalanced = model_args_from_megatron(_namespace(**moe, moe_router_load_balancing_type="none"))
    assert unbalanced.moe_aux_loss_coef == 0.0
    assert model_args_from_megatron(_namespace(**{**moe, "moe_ffn_hidden_size": None}))[1].moe_ffn_dim == 128
    for changes, message in ((dict(moe_router_load_balancing_type="seq_aux_loss"), "seq_aux_loss is not supported"),
                             (dict(moe_router_enable_expert_bias=True), "expert bias"),
                             (dict(moe_router_num_groups=2), "group-limited"),
                             (dict(moe_router_topk_scaling_factor=2.5), "top-k scaling"),
                             (dict(add_bias_linear=True), "experts with biases")):
        with pytest.raises(EmberError, match=message) as err:
            model_args_from_megatron(_namespace(**moe, **changes))
        assert "\n" not in str(err.value)


def test_moe_tensor_names():
    from ember.checkpoint.megatron import canonical_name

    # per-rank SequentialMLP, per-rank TEGroupedMLP (names only: no TE here), distributed stacked / singleton
    assert canonical_name("decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight") == (
        3, "mlp.experts.local1.linear_fc1.weight")
    assert canonical_name("decoder.layers.3.mlp.experts.linear_fc2.weight5") == (3, "mlp.experts.local5.linear_fc2.weight")
    assert canonical_name("decoder.layers.mlp.experts.experts.linear_fc1.weight") == (-1, "mlp.experts.*.linear_fc1.weight")
    assert canonical_name("decoder.layers.mlp.experts.experts.6.linear_fc2.weight") == (-1, "mlp.experts.6.linear_fc2.weight")
    assert canonical_name("decoder.layers.0.mlp.router.weight") == (0, "mlp.router.weight")
    with pytest.raises(EmberError, match="legacy GroupedMLP"):
        canonical_name("decoder.layers.0.mlp.experts.weight1")


def test_moe_export_refusals(moe_saves, tmp_path):
    from ember.checkpoint.megatron_export import convert_ember_to_megatron, megatron_args_from_ember

    convert_megatron_to_ember(moe_saves["tp2"] / "legacy", tmp_path / "ember")
    with pytest.raises(EmberError, match="--target-expert-parallel-size 3 does not divide the 4 experts"):
        convert_ember_to_megatron(tmp_path / "ember", tmp_path / "ep3", expert_parallel=3)
    assert not (tmp_path / "ep3").exists()
    args = ModelArgs.from_dict(read_manifest(tmp_path / "ember")["model_args"])
    with pytest.raises(EmberError, match="shared experts"):
        megatron_args_from_ember(args.replace(num_shared_experts=1), 1, 1, "legacy")
    with pytest.raises(EmberError, match="needs a mixture-of-experts model"):
        megatron_args_from_ember(args.replace(num_experts=0, moe_ffn_dim=None), 1, 1, "legacy", expert_parallel=2)
    namespace = megatron_args_from_ember(args, 2, 1, "torch_dist", expert_parallel=2)
    assert (namespace.num_experts, namespace.moe_router_topk, namespace.moe_ffn_hidden_size) == (4, 2, 48)
    assert (namespace.expert_model_parallel_size, namespace.moe_router_pre_softmax) == (2, False)

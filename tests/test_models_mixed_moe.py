"""Models mixing dense and MoE layers (issue 16's --moe-layer-freq / --first-k-dense-replace,
issue 15's Megatron conversion), each against an independent reference:

- transformers' Qwen3-MoE (mlp_only_layers, decoder_sparse_step): ember's logits from the
  converted weights, and the export back, bit-exact, loaded by transformers;
- megatron-core 0.16.1 (tests/megatron_checkpoints.py "mixed": moe_layer_freq [0,1,1,0], TP 1 x
  PP 2, both formats): ember's logits after `convert --from megatron`, the export round trips, and
  megatron-core loading ember's export (strict) and giving ember's logits;
- the model built from ModelArgs (parameter counts, per pipeline stage as `ember plan` counts);
- a single-process run (EP2: the dense layer replicated, the MoE layer's experts split);
- Megatron's own pattern semantics for the flags (its get_gpt_decoder_layer_specs: N -> layer i is
  MoE when i % N == 0; a list is taken as is), written out here as expected lists.

This file is also the EP2 rank worker: `python tests/test_models_mixed_moe.py OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import single_thread  # noqa: E402,F401  (autouse fixture: one torch thread)
from ember.errors import EmberError  # noqa: E402
from ember.models import ModelArgs, Transformer, get_model_args  # noqa: E402
from ember.models.args import moe_layer_pattern  # noqa: E402
from tolerances import assert_fp32_close, backward_terms, forward_terms, loss_terms, rms  # noqa: E402

MIXED = "tiny-qwen3-moe"  # layer 0 dense, layer 1 MoE


# ------------------------------------------------------------------------------ the pattern
@pytest.mark.parametrize("freq,first_k,layers,expected", [
    (None, None, 4, None), (1, None, 4, None), ("1", None, 4, None),
    (2, None, 4, [1, 0, 1, 0]), ("2", None, 5, [1, 0, 1, 0, 1]),  # Megatron: i % N == 0
    ("([0]*1+[1]*3)", None, 4, [0, 1, 1, 1]), ("[0,1,1,1]", None, 4, [0, 1, 1, 1]),
    ("([1]*4)", None, 4, None), ("[0]*2 + [1,0]", None, 4, [0, 0, 1, 0]), ([0, 1], None, 2, [0, 1]),
    (None, 1, 4, [0, 1, 1, 1]), (2, 1, 4, [0, 0, 1, 0]),  # MindSpeed: dense below K, then the frequency
    ("-1", -1, 4, None),  # MindSpeed's grok1 script: i >= -1 and i % -1 == 0, every layer MoE
    ("'([0]*1+[1]*3)'", None, 4, [0, 1, 1, 1]),  # quoted once more by a script
])
def test_pattern_forms(freq, first_k, layers, expected):
    assert moe_layer_pattern(freq, layers, first_k) == expected


@pytest.mark.parametrize("freq,first_k,message", [
    ("[0,1]", None, "one 0 .dense. or 1 .MoE. per layer, 4 in all"),
    ("[0,2,1,1]", None, "one 0 .dense. or 1 .MoE. per layer"),
    ("__import__('os').system('true')", None, "not an int or a list pattern"),
    ("[1]*10**9", None, "not an int or a list pattern"),
    ("[1]*100000*100000", None, "not an int or a list pattern"),  # no huge list is ever built
    ("[1.0]*4", None, "not an int or a list pattern"),
    ("0", None, "must not be 0"),
    ("[True]*4", None, "not an int or a list pattern"),
    (None, 5, "--first-k-dense-replace 5: more than the 4 layers"),
])
def test_malformed_patterns_are_one_line_errors(freq, first_k, message):
    with pytest.raises(EmberError, match=message) as err:
        moe_layer_pattern(freq, 4, first_k)
    assert "\n" not in str(err.value)


def _flags_args(*argv: str, checkpoint_args: ModelArgs | None = None) -> ModelArgs:
    from ember.compat.megatron import add_config_arguments, apply_flags
    from ember.config import Config
    from ember.models.from_config import model_args_from_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = Config()
    apply_flags(config, parser.parse_args(list(argv)))
    return model_args_from_config(config, checkpoint_args=checkpoint_args)


FLAG_MODEL = ("--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--vocab-size", "128",
              "--num-experts", "4", "--moe-ffn-hidden-size", "32", "--ffn-hidden-size", "96", "--seq-length", "64",
              "--swiglu")


def test_megatron_flags_reach_the_model():
    args = _flags_args(*FLAG_MODEL, "--moe-layer-freq", "([0]*1+[1]*3)")
    assert (args.moe_layer_pattern, args.ffn_dim, args.moe_ffn_dim) == ([0, 1, 1, 1], 96, 32)
    model = Transformer(args)
    assert [layer.moe is not None for layer in model.layers.values()] == [False, True, True, True]
    assert model.layers["0"].feed_forward.w1.out_features == 96  # dense: --ffn-hidden-size
    assert model.layers["1"].moe.experts.w1.shape == (4, 32, 64)  # experts: --moe-ffn-hidden-size
    assert _flags_args(*FLAG_MODEL, "--moe-layer-freq", "2", "--first-k-dense-replace", "1").moe_layer_pattern == [0, 0, 1, 0]
    assert _flags_args(*FLAG_MODEL, "--moe-layer-freq", "1").moe_layer_pattern is None
    # a registry model: the layer count is the model's
    assert _flags_args("--model", "tiny-mixtral", "--first-k-dense-replace", "1", "--seq-length", "64",
                       "--vocab-size", "512").moe_layer_pattern == [0, 1]
    with pytest.raises(EmberError, match="--num-layers 4: tiny-qwen3-moe mixes dense and MoE layers"):
        _flags_args("--model", MIXED, "--num-layers", "4", "--seq-length", "64", "--vocab-size", "512")
    assert _flags_args("--model", MIXED, "--num-layers", "4", "--moe-layer-freq", "2", "--seq-length", "64",
                       "--vocab-size", "512").moe_layer_pattern == [1, 0, 1, 0]
    # a checkpoint decides the architecture: the same pattern passes, another one is refused
    mixed = get_model_args(MIXED)
    assert _flags_args("--moe-layer-freq", "[0,1]", "--seq-length", "64", checkpoint_args=mixed) == mixed
    with pytest.raises(EmberError, match="moe_layer_pattern.*differ from the checkpoint"):
        _flags_args("--moe-layer-freq", "1", "--seq-length", "64", checkpoint_args=mixed)
    for bad, message in ((["--moe-layer-freq", "[0,1]"], "4 in all"), (["--moe-layer-freq", "eval('1')"], "list pattern")):
        with pytest.raises(EmberError, match=message) as err:
            _flags_args(*FLAG_MODEL, *bad)
        assert "\n" not in str(err.value)


def test_model_args_round_trip_and_old_files():
    mixed = get_model_args(MIXED)
    assert ModelArgs.from_dict(json.loads(json.dumps(mixed.to_dict()))) == mixed
    old = get_model_args("tiny-mixtral").to_dict()
    del old["moe_layer_pattern"]  # written before the field existed
    assert ModelArgs.from_dict(old) == get_model_args("tiny-mixtral")
    assert get_model_args("tiny-mixtral", moe_layer_pattern=[1, 1]).moe_layer_pattern is None  # all MoE: as before
    for changes, message in ((dict(moe_layer_pattern=[0, 1, 1]), "one 0 .dense. or 1 .MoE. per layer .2."),
                             (dict(num_experts=0, moe_ffn_dim=None), "needs num_experts")):
        with pytest.raises(EmberError, match=message):
            mixed.replace(**changes)


def test_parameter_counts_per_model_and_per_pipeline_stage():
    """ModelArgs.num_params and `ember plan`'s stage counts against the built model."""
    from ember.config.layout import Layout
    from ember.parallel.estimate import estimate_communication, stage_params

    args = get_model_args(MIXED, moe_layer_pattern=[0, 1, 1, 0], n_layers=4)
    model = Transformer(args)
    count = lambda keep: sum(p.numel() for n, p in model.named_parameters() if keep(n))  # noqa: E731
    assert args.num_params() == count(lambda n: True)
    assert stage_params(args, Layout(), first=True, last=True).total == args.num_params()
    first = stage_params(args, Layout(pp=2), first=True, last=False)  # layers 0 (dense) and 1 (MoE)
    assert first.total == count(lambda n: n.startswith(("tok_embeddings", "layers.0.", "layers.1.")))
    last = stage_params(args, Layout(pp=2), first=False, last=True)
    assert last.total == count(lambda n: n.startswith(("layers.2.", "layers.3.", "norm", "output")))
    active = args.num_active_params()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    assert active == args.num_params() - args.vocab_size * args.dim - experts * (1 - args.moe_top_k / args.num_experts)
    # expert-parallel traffic: only the two MoE layers route tokens
    from ember.parallel.estimate import Workload

    workload = Workload(seq_length=64, global_batch_size=8)
    all_moe = estimate_communication(args.replace(moe_layer_pattern=None), Layout(ep=2, dp=2), workload).ep
    assert estimate_communication(args, Layout(ep=2, dp=2), workload).ep == pytest.approx(all_moe / 2)


# ------------------------------------------------------------------------- transformers' Qwen3-MoE
def test_family_of_weights_without_a_model_name():
    """Weights converted from a Megatron checkpoint carry no registry name: the Hugging Face family
    comes from the architecture (Qwen3-MoE's q/k norms, Mixtral otherwise)."""
    from ember.checkpoint.export import infer_family

    assert infer_family(get_model_args(MIXED)) == "qwen3_moe"
    assert infer_family(get_model_args("tiny-mixtral")) == "mixtral"
    assert infer_family(get_model_args("tiny-mixtral", moe_layer_pattern=[0, 1])) == "mixtral"  # refused at export


def test_qwen3_moe_matches_transformers_and_exports_bit_exact(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from ember.checkpoint.convert import convert_ember_to_hf, convert_hf_to_ember
    from ember.checkpoint.weights import load_model
    from ember.models.hf import hf_config_from_args

    config = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[0], decoder_sparse_step=2, norm_topk_prob=True)
    torch.manual_seed(0)
    theirs = transformers.Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows
        for name, param in theirs.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    theirs.save_pretrained(tmp_path / "hf")
    convert_hf_to_ember(tmp_path / "hf", tmp_path / "ember")
    ours = load_model(tmp_path / "ember").eval()
    assert ours.args.moe_layer_pattern == [0, 1, 0, 1]  # layer 0 listed, layers 0 and 2 off the step
    assert (ours.args.ffn_dim, ours.args.moe_ffn_dim, ours.args.moe_renormalize) == (48, 24, True)
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(tokens).logits
        assert_fp32_close(ours(tokens), expected, terms=forward_terms(ours.args, 12))

    convert_ember_to_hf(tmp_path / "ember", tmp_path / "back")
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["mlp_only_layers"] == [0, 2]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected)
    # Mixtral has every layer MoE: a mixed model is refused in one line, not exported wrong
    with pytest.raises(EmberError, match="moe_layer_pattern") as err:
        hf_config_from_args(ours.args.replace(qk_norm=False, ffn_dim=24), "mixtral")
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------- megatron-core
@pytest.fixture(scope="module")
def mixed_save(tmp_path_factory):
    """megatron-core's 'mixed' GPTModel (moe_layer_freq [0,1,1,0]) at TP 1 x PP 2, saved both ways."""
    pytest.importorskip("megatron.core")
    import megatron_checkpoints

    return megatron_checkpoints.build(tmp_path_factory.mktemp("megatron_mixed") / "save", "mixed", 1, 2)


def _logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    assert scale > 0.3  # random norms: a misplaced tensor moves the logits by about this
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * scale)


def _same_weights(a: Path, b: Path) -> None:
    from ember.checkpoint.weights import load_ember_weights

    (_, left), (_, right) = load_ember_weights(a), load_ember_weights(b)
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.slow  # starts processes: see tests/conftest.py
def test_megatron_core_mixed_checkpoint_converts_and_exports(mixed_save, tmp_path):
    import megatron_checkpoints

    from ember.checkpoint.megatron import convert_megatron_to_ember, model_args_from_megatron
    from ember.checkpoint.megatron_export import convert_ember_to_megatron
    from ember.checkpoint.weights import load_model

    reference = torch.load(mixed_save / "legacy" / "reference.pt")
    for ckpt_format in ("legacy", "torch_dist"):
        report = convert_megatron_to_ember(mixed_save / ckpt_format, tmp_path / ckpt_format)
        assert (report["format"], report["pipeline_parallel"]) == (ckpt_format, 2)
        model = load_model(tmp_path / ckpt_format).eval()
        assert model.args.moe_layer_pattern == [0, 1, 1, 0]
        assert (model.args.ffn_dim, model.args.moe_ffn_dim) == (96, 48)
        with torch.no_grad():
            _logits_close(model(reference["tokens"]), reference["logits"])
    _same_weights(tmp_path / "legacy", tmp_path / "torch_dist")

    # ember -> Megatron -> ember, bit-exact, in the layouts megatron-core writes for mixed models
    for ckpt_format, tp, pp, ep in (("torch_dist", 1, 1, 1), ("legacy", 1, 2, 2)):
        out = tmp_path / f"{ckpt_format}{tp}{pp}{ep}"
        convert_ember_to_megatron(tmp_path / "legacy", out, ckpt_format, tp, pp, expert_parallel=ep)
        convert_megatron_to_ember(out, tmp_path / f"back{tp}{pp}{ep}")
        _same_weights(tmp_path / "legacy", tmp_path / f"back{tp}{pp}{ep}")
    # megatron-core builds the mixed model itself, loads ember's export (strict) and gives ember's logits
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(mixed_save / "legacy" / "reference.pt", work / "reference.pt")
    loaded = megatron_checkpoints.load_with_megatron(work, tmp_path / "torch_dist111", "mixed", 1, 1, "torch_dist")
    with torch.no_grad():
        _logits_close(loaded["logits"], load_model(tmp_path / "legacy").eval()(loaded["tokens"]))

    # the saved args' forms: an int frequency, and MindSpeed's first-k-dense-replace
    saved = vars(torch.load(mixed_save / "legacy/iter_0000007/mp_rank_00_000/model_optim_rng.pt",
                            weights_only=False)["args"])
    for changes, pattern in ((dict(moe_layer_freq=2), [1, 0, 1, 0]), (dict(moe_layer_freq=1, first_k_dense_replace=1), [0, 1, 1, 1])):
        assert model_args_from_megatron({**saved, **changes})[1].moe_layer_pattern == pattern


# ---------------------------------------------------------------------- expert parallelism (EP2)
EP, STEPS, SEED, BATCH, SEQ = 2, 2, 1234, 2, 16


def _build() -> Transformer:
    torch.manual_seed(SEED)
    model = Transformer(get_model_args(MIXED))
    model.init_weights(seed=SEED)
    return model


def _batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED + 1)
    tokens = [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator) for _ in range(EP)]
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def _loss(model: Transformer, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)) + model.aux_loss(), logits


def _optimizer(model: Transformer) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)


def rank_main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ember.parallel.experts import apply_expert_parallel, expert_parameters

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = _build()
    apply_expert_parallel(model, init_device_mesh("cpu", (EP,), mesh_dim_names=("ep",)))
    optimizer = _optimizer(model)
    inputs, labels = _batches(model.args.vocab_size)[rank]
    experts = {id(p) for p in expert_parameters(model)}
    result = {"losses": [], "sharded": sorted(n for n, p in model.named_parameters() if id(p) in experts)}
    for step in range(STEPS):
        optimizer.zero_grad()
        loss, logits = _loss(model, inputs, labels)
        loss.backward()
        # data parallelism over the EP group: replicated gradients averaged; expert gradients
        # arrive summed over both ranks through the all-to-all backward, divided like the trainer does
        for param in model.parameters():
            if id(param) not in experts:
                dist.all_reduce(param.grad)
            param.grad.div_(EP)
        losses = [torch.zeros(()) for _ in range(EP)]
        dist.all_gather(losses, loss.detach())
        result["losses"].append([x.item() for x in losses])
        if step == 0:
            result["logits"] = logits.detach()
            result["grads"] = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                               for n, p in model.named_parameters()}
        optimizer.step()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow  # starts processes: see tests/conftest.py
def test_ep2_training_of_a_mixed_model_matches_single_process(tmp_path):
    from dist_utils import run_ranks

    result = run_ranks([__file__, str(tmp_path)], nprocs=EP, timeout=180)
    assert result.returncode == 0, result.output[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(EP)]

    model = _build()  # the reference: both micro-batches in one process, gradients accumulated
    optimizer = _optimizer(model)
    reference = {"losses": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = []
        for index, (inputs, labels) in enumerate(_batches(model.args.vocab_size)):
            loss, logits = _loss(model, inputs, labels)
            (loss / EP).backward()
            losses.append(loss.item())
            if step == 0:
                reference[f"logits{index}"] = logits.detach()
        if step == 0:
            reference["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        reference["losses"].append(losses)
        optimizer.step()

    args = model.args
    # only the MoE layer's experts are sharded; the dense layer stays whole on each rank
    assert ranks[0]["sharded"] == ["layers.1.moe.experts.w1", "layers.1.moe.experts.w2", "layers.1.moe.experts.w3"]
    for rank, result in enumerate(ranks):
        assert_fp32_close(result["logits"], reference[f"logits{rank}"], terms=forward_terms(args, SEQ))
    for step in range(STEPS):
        assert ranks[0]["losses"][step] == pytest.approx(reference["losses"][step], abs=1e-5), f"step {step}"
    terms = backward_terms(loss_terms(args, SEQ, EP * BATCH * SEQ), tokens=EP * BATCH * SEQ)
    scale = rms(*reference["grads"].values())
    assert ranks[0]["grads"].keys() == reference["grads"].keys()
    for name, expected in reference["grads"].items():
        assert_fp32_close(ranks[0]["grads"][name], expected, terms=terms, min_scale=scale,
                          msg=lambda m, n=name: f"{n}: {m}")


if __name__ == "__main__":
    rank_main(sys.argv[1])

"""LoRA fine-tuning against the `peft` library on the Hugging Face model.

From the same base weights (a transformers Llama saved with save_pretrained and converted by
`ember convert`) and the same adapters (the folder peft's save_pretrained wrote, read by ember):
the losses and every adapter gradient of several AdamW steps equal those of the peft-wrapped
transformers model; the adapter ember writes loads in peft and gives the same logits; ember's merge
equals peft's merge_and_unload (also through `ember convert --merge-lora`, to a Hugging Face
folder). The trainer: a LoRA run from converted weights keeps the base frozen, its adapter exported
with `ember convert --to peft` gives peft the logits ember's own generate path computes, and a
tensor-parallel run (adapters split like their layers) follows one process.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from dist_utils import read_metrics, run_ranks, single_thread, train_config, write_token_dataset  # noqa: E402,F401
from ember.checkpoint.peft_adapter import load_peft_adapter, save_peft_adapter  # noqa: E402
from ember.checkpoint.weights import load_model  # noqa: E402
from ember.cli import main  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.models.lora import add_adapters, make_spec, resolve_targets  # noqa: E402
from tolerances import assert_fp32_close, backward_terms, forward_terms, loss_terms, rms  # noqa: E402

VOCAB, SEQ = 160, 24
R, ALPHA = 4, 8.0
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# ember -> HF module leaf, written out here rather than taken from ember's table
HF_LEAF = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
           "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
           "feed_forward.w2": "mlp.down_proj"}


def _peft_name(ember_name: str) -> str:
    """layers.0.attention.wq.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"""
    _, layer, parent, leaf, factor, _ = ember_name.split(".")
    return f"base_model.model.model.layers.{layer}.{HF_LEAF[parent + '.' + leaf]}.{factor}.default.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformers Llama (weights far from init), saved and converted to ember weights."""
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            (param.normal_(0.0, 0.1) if param.dim() >= 2 else param.add_(torch.randn_like(param) * 0.1))
    model.save_pretrained(root / "hf")
    assert main(["convert", "--from", "hf", "--to", "ember", str(root / "hf"), str(root / "ember")]) == 0
    # peft's own adapters (A and B both random: every gradient is non-zero from the first step)
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=HF_TARGETS, init_lora_weights=False))
    wrapped.save_pretrained(root / "adapter_init")
    return root, model


def _hf_base(root):
    model = transformers.LlamaForCausalLM.from_pretrained(root / "hf")
    model.config._attn_implementation = "eager"
    return model


def _loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def test_lora_training_matches_peft(base, tmp_path):
    root, _ = base
    reference = peft.PeftModel.from_pretrained(_hf_base(root), root / "adapter_init", is_trainable=True)
    model = load_model(root / "ember")
    spec, adapters = load_peft_adapter(root / "adapter_init", "llama", model.args)  # the folder peft wrote
    assert spec == make_spec(R, ALPHA, 0.0, ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    add_adapters(model, spec)
    model.load_state_dict(adapters, strict=False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trained) == sorted(adapters) and len(trained) == 2 * 7 * 2  # base frozen: no grad, no state
    peft_params = dict(reference.named_parameters())
    assert sum(p.requires_grad for p in peft_params.values()) == len(trained)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-6)
    ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2, eps=1e-6)
    assert len(opt.param_groups[0]["params"]) == len(trained)
    generator = torch.Generator().manual_seed(3)
    terms = loss_terms(model.args, seq_len=SEQ, tokens=2 * (SEQ - 1))
    losses = []
    for step in range(4):
        tokens = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
        loss, ref_loss = _loss(model(tokens), tokens), _loss(reference(input_ids=tokens).logits, tokens)
        loss.backward(), ref_loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=2e-6 * (step + 1)), step
        grads = {name: model.get_parameter(name).grad for name in trained}
        scale = rms(*grads.values())
        grad_terms = backward_terms(terms, 2 * (SEQ - 1)) * (step + 1)
        for name, grad in grads.items():
            assert_fp32_close(grad, peft_params[_peft_name(name)].grad, terms=grad_terms, min_scale=scale,
                              msg=lambda m: f"step {step} {name}: {m}")
        opt.step(), ref_opt.step(), opt.zero_grad(), ref_opt.zero_grad()
        losses.append(loss.item())
    assert abs(losses[-1] - losses[0]) > 1e-2  # training moved the adapters: agreement is not trivial

    # the adapter ember writes loads in peft, with the same logits
    trained_adapters = {n: model.get_parameter(n).detach() for n in trained}
    save_peft_adapter(tmp_path / "adapter", trained_adapters, spec, "llama", model.args)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R and sorted(config["target_modules"]) == sorted(HF_TARGETS)
    loaded = peft.PeftModel.from_pretrained(_hf_base(root), tmp_path / "adapter").eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=generator)
    with torch.no_grad():
        ours, theirs = model(tokens), loaded(input_ids=tokens).logits
    assert theirs.abs().max() > 0.5
    assert_fp32_close(ours, theirs, terms=forward_terms(model.args, SEQ) * 2)
    assert (ours - _hf_base(root)(input_ids=tokens).logits).abs().max() > 1e-2  # the adapter matters

    # merge: ember convert --merge-lora (HF base + PEFT adapter -> HF folder) == peft's merge_and_unload
    from safetensors.torch import load_file

    merged = loaded.merge_and_unload().state_dict()
    out = tmp_path / "merged_hf"
    assert main(["convert", "--from", "hf", "--to", "hf", str(root / "hf"), str(out),
                 "--merge-lora", str(tmp_path / "adapter")]) == 0
    written = {}
    for path in out.glob("*.safetensors"):
        written.update(load_file(str(path)))
    for name, tensor in merged.items():
        key = "model.embed_tokens.weight" if name == "lm_head.weight" and name not in written else name
        assert torch.allclose(written[key], tensor, rtol=1e-6, atol=1e-7), name
    assert not torch.equal(written["model.layers.0.self_attn.q_proj.weight"],
                           _hf_base(root).state_dict()["model.layers.0.self_attn.q_proj.weight"])


def _argv(root, data, out, extra=()):
    return ["--load", str(root / "ember"), "--finetune", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-2",
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--split", "90,10,0",
            "--save", str(out), "--no-tensorboard", "--lora-r", str(R), "--lora-alpha", str(ALPHA),
            "--lora-target-modules", "q_proj", "v_proj", "linear_proj", "linear_fc1", "down_proj", *extra]


@pytest.mark.slow
def test_trainer_lora_run_exports_to_peft_and_tensor_parallel_follows(base, tmp_path):
    from ember.checkpoint.export import load_model_from_training_checkpoint, read_training_checkpoint
    from ember.train import run_training

    root, _ = base
    data = write_token_dataset(tmp_path / "tokens", vocab=VOCAB)
    result = run_training(train_config(_argv(root, data, tmp_path / "one")))
    assert result.iteration == 3
    # the base weights did not move; the adapters did (B starts at zero, as in peft)
    _, state, _ = read_training_checkpoint(tmp_path / "one")
    _, converted = __import__("ember.checkpoint.weights", fromlist=["x"]).load_ember_weights(root / "ember")
    assert all(torch.equal(state[name], tensor) for name, tensor in converted.items())
    assert state["layers.1.feed_forward.w2.lora_B.weight"].abs().max() > 0
    assert "layers.0.attention.wk.lora_A.weight" not in state  # k_proj was not targeted

    # the run wrote its adapter as a PEFT folder (as `ember convert --to peft` does from the checkpoint):
    # peft loads it onto the HF model, and the logits are those of ember generate's model
    from safetensors.torch import load_file

    assert main(["convert", "--from", "ember", "--to", "peft", str(tmp_path / "one"), str(tmp_path / "adapter")]) == 0
    written = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(written) == sorted(exported) and len(written) == 2 * 2 * 6  # q v o gate up down, 2 layers
    assert all(torch.equal(written[name], exported[name]) for name in written)
    loaded = peft.PeftModel.from_pretrained(_hf_base(root), tmp_path / "one" / "adapter").eval()
    ours, _ = load_model_from_training_checkpoint(tmp_path / "one")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = loaded(input_ids=tokens).logits
        assert_fp32_close(ours(tokens), expected, terms=forward_terms(ours.args, SEQ) * 2)
        # ember generate --load WEIGHTS --lora-load ADAPTER runs the same model
        from ember.generation import attach_peft_adapter

        plain = load_model(root / "ember").eval()
        attach_peft_adapter(plain, tmp_path / "adapter", "llama")
        assert_fp32_close(plain(tokens), expected, terms=forward_terms(ours.args, SEQ) * 2)

    # two tensor-parallel ranks (sequence parallel): column-parallel layers split B, row-parallel A
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    two = run_ranks(["-m", "ember.commands.train", *_argv(root, data, tmp_path / "two", tp2)], 2, timeout=240)
    assert two.returncode == 0, two.output[-3000:]
    got, want = read_metrics(tmp_path / "two")[0], read_metrics(tmp_path / "one")[0]
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for it in want:
        assert got[it]["loss"] == pytest.approx(want[it]["loss"], rel=2e-5), it
        assert got[it]["grad_norm"] == pytest.approx(want[it]["grad_norm"], rel=1e-4), it
    # the adapter folder the two ranks wrote (each split adapter gathered) is the one process's
    written_two = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert sorted(written_two) == sorted(written)
    for name, tensor in written.items():
        assert torch.allclose(written_two[name], tensor, rtol=1e-4, atol=1e-6), name


def test_flags_and_names(tmp_path):
    config = train_config(["--model", "tiny-llama", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.05",
                           "--lora-target-modules", "linear_qkv", "linear_fc1", "--lora-load", "ad", "lora.r=4"])
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (4, 16.0, 0.05)
    assert config.lora.target_modules == ["linear_qkv", "linear_fc1"] and config.lora.adapter == "ad"
    assert resolve_targets(["linear_qkv", "linear_fc1"]) == ("wq", "wk", "wv", "w1", "w3")
    assert resolve_targets(["model.layers.0.mlp.down_proj", "o_proj", "wq"]) == ("wq", "wo", "w2")
    assert resolve_targets(["c_attn", "c_proj"]) == ("wq", "wk", "wv", "wo", "w2")
    with pytest.raises(EmberError, match="unknown module 'qproj'"):
        resolve_targets(["qproj"])
    from ember.models import get_model_args
    from ember.models.lora import check_model

    with pytest.raises(EmberError, match="MoE expert layers"):
        check_model(get_model_args("tiny-mixtral"), make_spec(4, 8, 0, ["linear_fc1"]))
    with pytest.raises(EmberError, match="--lora-r must be a positive"):
        make_spec(0, 8, 0, ["wq"])


@pytest.mark.slow
def test_lora_load_starts_from_a_peft_folder_and_bf16_base_changes_nothing(base, tmp_path):
    from safetensors.torch import load_file

    from ember.train import run_training
    from ember.train.trainer import Trainer

    root, _ = base
    data = write_token_dataset(tmp_path / "tokens", vocab=VOCAB)
    # --lora-load: the trainer starts from the folder peft wrote (every adapter, by HF name)
    argv = [a for a in _argv(root, data, tmp_path / "load") if a not in ("q_proj", "v_proj", "linear_proj",
                                                                        "linear_fc1", "down_proj")]
    argv += ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--lora-load", str(root / "adapter_init")]
    trainer = Trainer(train_config(argv)).setup()
    try:
        theirs = load_file(str(root / "adapter_init" / "adapter_model.safetensors"))
        ours = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert len(ours) == len(theirs) == 28
        for name, param in ours.items():
            assert torch.equal(param.detach(), theirs[_peft_name(name).replace(".default", "")]), name
    finally:
        trainer.close()
    with pytest.raises(EmberError, match="not the one the flags describe"):
        Trainer(train_config([*argv, "--lora-r", "8", "--save", str(tmp_path / "r8")])).setup()

    # --lora-base-bf16 under --bf16: autocast rounds the frozen weights to bf16 anyway, so the run is the same
    runs = {}
    for name, extra in (("fp32_base", []), ("bf16_base", ["--lora-base-bf16"])):
        run_training(train_config(_argv(root, data, tmp_path / name, ["--bf16", *extra])))
        runs[name] = read_metrics(tmp_path / name)[0]
    assert [r["loss"] for r in runs["fp32_base"].values()] == [r["loss"] for r in runs["bf16_base"].values()]
    # a LoRA run's checkpoint never loads without its adapters (their training would be lost silently)
    argv = _argv(root, data, tmp_path / "continued")
    argv = argv[2:argv.index("--lora-r")] + ["--load", str(tmp_path / "fp32_base")]
    with pytest.raises(EmberError, match="saved by a LoRA run"):
        Trainer(train_config(argv)).setup()
    trainer = Trainer(train_config(_argv(root, data, tmp_path / "dtypes", ["--bf16", "--lora-base-bf16"]))).setup()
    try:
        params = dict(trainer.model.named_parameters())
        assert params["layers.0.attention.wq.weight"].dtype == torch.bfloat16  # frozen, adapted
        assert params["layers.0.attention.wk.weight"].dtype == torch.bfloat16  # frozen, not adapted
        assert params["layers.0.attention.wq.lora_A.weight"].dtype == torch.float32
        assert params["tok_embeddings.weight"].dtype == params["norm.weight"].dtype == torch.float32
    finally:
        trainer.close()
    with pytest.raises(EmberError, match="add --bf16"):
        run_training(train_config(_argv(root, data, tmp_path / "no_bf16", ["--lora-base-bf16"])))

"""`ember convert`: bit-exact round trips, exports transformers loads, sharding, the input
layouts found in the wild, the ember weight folder API and the errors users see."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from ember.checkpoint.convert import convert_ember_to_hf, convert_hf_to_ember, parse_size  # noqa: E402
from ember.checkpoint.weights import (  # noqa: E402
    load_ember_weights,
    load_model,
    read_safetensors_header,
    save_ember_weights,
)
from ember.cli import main  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.models import Transformer, get_model_args  # noqa: E402

VOCAB = 96
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_LIKE)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LLAMA_LIKE, tie_word_embeddings=True)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=16)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=8)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=3)),
    "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    ),
}


def _save_hf(family: str, folder, dtype=torch.float32, **save_kwargs):
    torch.manual_seed(0)
    model = MODELS[family]().to(dtype).eval()
    model.save_pretrained(folder, **save_kwargs)
    return model


def _hf_tensors(folder) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


@pytest.mark.parametrize("family", list(MODELS))
def test_round_trip_is_bit_exact_and_loads_in_transformers(family, tmp_path):
    # bf16 weights: the round trip must keep the dtype and every bit
    original = _save_hf(family, tmp_path / "hf", dtype=torch.bfloat16)
    assert _convert("--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "ember") == 0
    assert _convert("--from", "ember", "--to", "hf", tmp_path / "ember", tmp_path / "back") == 0
    before, after = _hf_tensors(tmp_path / "hf"), _hf_tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name

    # loaded the same way, the original folder and the exported one are the same model
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(reloaded) is type(original)
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, reference(tokens).logits)


def test_sharded_input_and_output(tmp_path):
    _save_hf("mixtral", tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert _convert("--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "ember", "--max-shard-size", "50KB") == 0
    shards = sorted((tmp_path / "ember").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "ember" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    # every shard is a valid safetensors file of at most 50KB of data (one big tensor may exceed)
    for path in shards:
        header = read_safetensors_header(path)
        assert sum(e.nbytes for e in header) <= 50_000 or len(header) == 1
        load_file(path)
    assert _convert("--from", "ember", "--to", "hf", tmp_path / "ember", tmp_path / "back", "--max-shard-size", "70KB") == 0
    assert torch.equal(
        torch.cat([t.flatten() for _, t in sorted(_hf_tensors(tmp_path / "hf").items())]),
        torch.cat([t.flatten() for _, t in sorted(_hf_tensors(tmp_path / "back").items())]),
    )
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")


def test_pytorch_bin_and_base_model_names(tmp_path):
    """GPT-2 as published: pytorch_model.bin, names without `transformer.`, attention-mask
    buffers in the file."""
    model = _save_hf("gpt2", tmp_path / "ref")
    state = {k.removeprefix("transformer."): v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    shutil.copy(tmp_path / "ref" / "config.json", tmp_path / "hf" / "config.json")
    assert _convert("--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "ember") == 0
    ember = load_model(tmp_path / "ember").eval()
    tokens = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(ember(tokens), model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_transformers5_fused_mixtral_layout_is_accepted(tmp_path):
    """A Mixtral state_dict saved from memory by transformers 5 (fused experts, mlp.gate)."""
    model = _save_hf("mixtral", tmp_path / "ref")
    (tmp_path / "hf").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "hf" / "model.safetensors")
    shutil.copy(tmp_path / "ref" / "config.json", tmp_path / "hf" / "config.json")
    convert_hf_to_ember(tmp_path / "hf", tmp_path / "ember")
    convert_hf_to_ember(tmp_path / "ref", tmp_path / "ember-ref")
    _, fused = load_ember_weights(tmp_path / "ember")
    _, reference = load_ember_weights(tmp_path / "ember-ref")
    assert fused.keys() == reference.keys()
    assert all(torch.equal(fused[k], reference[k]) for k in fused)


def test_tokenizer_files_travel_both_ways(tmp_path):
    _save_hf("llama", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    convert_hf_to_ember(tmp_path / "hf", tmp_path / "ember")
    assert (tmp_path / "ember" / "tokenizer" / "tokenizer.json").read_text() == '{"fake": true}'
    convert_ember_to_hf(tmp_path / "ember", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer_config.json").read_text() == '{"eos_token": "</s>"}'


def test_export_of_a_registry_model_with_llama3_rope(tmp_path):
    """A model that never came from HF (no source config.json) exports to a config
    transformers reads back as the same architecture, rope scaling included."""
    args = get_model_args(
        "tiny-llama",
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 32
        },
    )
    model = Transformer(args).eval()
    model.init_weights(seed=0)
    save_ember_weights(model, args, tmp_path / "ember", family="llama", max_shard_bytes=100_000)
    convert_ember_to_hf(tmp_path / "ember", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.rope_parameters["rope_type"] == "llama3"
    tokens = torch.randint(0, args.vocab_size, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


def test_ember_weight_folder_round_trip(tmp_path):
    args = get_model_args("tiny-qwen2")
    model = Transformer(args)
    model.init_weights(seed=1)
    save_ember_weights(model, args, tmp_path / "w", family="qwen2", max_shard_bytes=30_000, source={"note": "test"})
    manifest = json.loads((tmp_path / "w" / "ember_model.json").read_text())
    assert manifest["format"] == "ember-weights" and manifest["version"] == 1 and manifest["family"] == "qwen2"
    loaded_args, state = load_ember_weights(tmp_path / "w")
    assert loaded_args == args
    assert "output.weight" not in state  # tied: stored once
    reloaded = load_model(tmp_path / "w")
    assert reloaded.output.weight is reloaded.tok_embeddings.weight
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), model(tokens))


def test_save_is_atomic(tmp_path):
    args = get_model_args("tiny-llama")
    state = Transformer(args).state_dict()
    state.pop("norm.weight")
    with pytest.raises(EmberError, match="missing tensor norm.weight"):
        save_ember_weights(state, args, tmp_path / "w", family="llama")
    assert not (tmp_path / "w").exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# errors: one clear line through the CLI, naming the tensor
def _cli_error(capsys, *argv) -> str:
    capsys.readouterr()  # drop what save_pretrained printed
    assert _convert(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ember convert: error:") and "\n" not in err
    return err


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    err = _cli_error(capsys, "--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out")
    assert "unknown architecture MambaForCausalLM" in err and "llama" in err


def test_missing_tensor(tmp_path, capsys):
    _save_hf("llama", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    err = _cli_error(capsys, "--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out")
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(tmp_path, capsys):
    _save_hf("bloom", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    name = "transformer.h.0.mlp.dense_4h_to_h.weight"
    tensors[name] = tensors[name][:, :100].contiguous()
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    err = _cli_error(capsys, "--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out")
    assert "shape mismatch for tensor transformer.h.0.mlp.dense_4h_to_h.weight" in err
    assert "[32, 100]" in err and "[32, 128]" in err


def test_unexpected_tensor(tmp_path, capsys):
    _save_hf("llama", tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    err = _cli_error(capsys, "--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out")
    assert "unexpected tensor model.layers.0.self_attn.q_norm.weight" in err


def test_existing_output_needs_force(tmp_path, capsys):
    _save_hf("llama", tmp_path / "hf")
    assert _convert("--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out") == 0
    (tmp_path / "out" / "keep.txt").write_text("x")  # an earlier output: --force may replace it
    err = _cli_error(capsys, "--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out")
    assert "--force" in err
    assert _convert("--from", "hf", "--to", "ember", tmp_path / "hf", tmp_path / "out", "--force") == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_export_errors(tmp_path, capsys):
    args = get_model_args("tiny-grok1")
    save_ember_weights(Transformer(args), args, tmp_path / "grok", family="grok1")
    err = _cli_error(capsys, "--from", "ember", "--to", "hf", tmp_path / "grok", tmp_path / "out")
    assert "grok1" in err and "no Hugging Face architecture" in err
    args = get_model_args("tiny-llama", qk_norm=True)
    save_ember_weights(Transformer(args), args, tmp_path / "qk", family="llama")
    err = _cli_error(capsys, "--from", "ember", "--to", "hf", tmp_path / "qk", tmp_path / "out")
    assert "qk_norm" in err
    err = _cli_error(capsys, "--from", "ember", "--to", "hf", tmp_path, tmp_path / "out")
    assert "not an ember weight folder" in err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size("1234") == 1234
    with pytest.raises(EmberError):
        parse_size("lots")

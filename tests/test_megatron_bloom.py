"""Bloom Megatron checkpoints as PAI-Megatron-Patch writes them -> ember, and back.

No megatron-core model has ALiBi, so the reference here is Hugging Face's `BloomForCausalLM`: a
tiny random one (every weight, norm scale and bias random) is laid out in Megatron's per-rank
files the way PAI-Megatron-Patch does (`write_pai_bloom` below), converted by `ember convert
--from megatron`, and ember's logits must equal transformers' on the same tokens.

`write_pai_bloom` follows PAI's published code (github.com/alibaba/Pai-Megatron-Patch), read, not copied:
- "release": its HF -> Megatron converter,
  toolkits/model_checkpoints_convertor/bloom/checkpoint_reshaping_and_interoperability.py
  (commit ee4409b05f1e525ef13d32a4c65c4e39064955ed, convert_checkpoint_from_transformers_to_megatron):
  OUT/release/mp_rank_TT[_PPP]/model_optim_rng.pt = {'model', 'checkpoint_version': 3.0, 'args': a
  types.SimpleNamespace of sizes with tokenizer_type 'BloomTokenizer'}; the vocabulary padded to a
  multiple of 128 x TP by repeating the last row; 'model.language_model.embedding' holding the flat keys
  'word_embeddings.weight' (split on rows), 'word_embeddings.norm.weight/bias' (copied) on stage 0;
  'model.language_model.encoder' holding 'layers.L.<HF module>.weight|bias' (L local to the stage;
  query_key_value copied in HF's [per head: q, k, v] order, split on rows with dense_h_to_4h; dense
  and dense_4h_to_h split on columns; norms copied), 'final_layernorm.*' and
  'model.word_embeddings_for_head.weight' on the last stage;
- "training": what its Bloom training saves (megatron_patch/model/bloom/{gpt_model,language_model,
  layers,transformer}.py at commit bced6aae5aa63279382d264597cb6acb83a844d1, Megatron-LM's legacy
  save_checkpoint, examples/bloom/run_pretrain_megatron_bloom.sh's flags and megatron_patch/arguments.py
  at 52505d5d4ab65a5794cafad6030d6c8968130ad0): OUT/iter_0000001/... = {'args': argparse.Namespace
  with --position-embedding-type alibi --embed-layernorm and the rest of its fields, 'checkpoint_version':
  3.0, 'iteration': 1, 'model': state_dict_for_save_checkpoint()}, nested: {'language_model':
  {'embedding': {'word_embeddings': {'weight', 'norm.weight', 'norm.bias'}}, 'encoder': {...}},
  'word_embeddings_for_head': {'weight'} on the last stage with pipeline parallelism}. (Its optimizer
  and RNG entries are left out here.)
"""

from __future__ import annotations

import argparse
import io
import math
import types
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dist_utils import single_thread  # noqa: E402,F401  (autouse fixture: one torch thread)

from ember.checkpoint.megatron import convert_megatron_to_ember, model_args_from_megatron  # noqa: E402
from ember.checkpoint.megatron_export import convert_ember_to_megatron  # noqa: E402
from ember.checkpoint.weights import load_ember_weights, load_model, read_manifest  # noqa: E402
from ember.errors import EmberError  # noqa: E402

HF_VOCAB = 250  # padded to 256 (a multiple of 128 x TP for TP 1 and 2), as PAI's converter does
LAYERS, HIDDEN, HEADS = 4, 64, 4
TP_SPLIT_ROWS = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
                 "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
TP_SPLIT_COLUMNS = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")


@pytest.fixture(scope="module")
def bloom():
    """(HF state dict, tokens, HF logits) of a tiny random Bloom, every tensor random."""
    config = transformers.BloomConfig(vocab_size=HF_VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                      layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                parameter.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.1)
        tokens = torch.randint(0, HF_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
        logits = model(tokens).logits
    return {k: v.clone() for k, v in model.state_dict().items()}, tokens, logits


def padded_vocab(size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron's _vocab_size_with_padding."""
    multiple = divisible_by * tp
    return int(math.ceil(size / multiple) * multiple)


def write_pai_bloom(hf: dict[str, torch.Tensor], out: Path, tp: int, pp: int, style: str) -> Path:
    """A PAI-Megatron-Patch Bloom save folder of `hf` (see the module docstring for `style`)."""
    state = {k.removeprefix("transformer."): v for k, v in hf.items()}
    vocab = padded_vocab(HF_VOCAB, tp)
    words = state["word_embeddings.weight"]
    words = torch.cat([words, words[-1:].expand(vocab - HF_VOCAB, -1)])
    word_parts = words.chunk(tp, dim=0)
    if style == "release":
        folder_name, tracker = "release", "release"
        args = types.SimpleNamespace(
            unk_token_id=0, pad_token_id=3, bos_token_id=1, eos_token_id=2, orig_vocab_size=HF_VOCAB,
            hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=1024,
            ffn_hidden_size=4 * HIDDEN, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            data_parallel_size=1, make_vocab_size_divisible_by=128, rank=0, tokenizer_type="BloomTokenizer",
            params_dtype=torch.float32, padded_vocab_size=vocab)
    else:
        folder_name, tracker = "iter_0000001", "1"
        args = argparse.Namespace(
            num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=4 * HIDDEN, num_attention_heads=HEADS,
            kv_channels=HIDDEN // HEADS, seq_length=32, max_position_embeddings=32, padded_vocab_size=vocab,
            make_vocab_size_divisible_by=128, extra_vocab_size=0, patch_tokenizer_type="BloomTokenizerFromHF",
            position_embedding_type="alibi", embed_layernorm=True, layernorm_epsilon=1e-5,
            apply_query_key_layer_scaling=True, apply_residual_connection_post_layernorm=False,
            bias_gelu_fusion=True, openai_gelu=False, onnx_safe=None, swiglu=False, glu_activation=None,
            use_flash_attn=False, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=None, params_dtype=torch.float32, fp16=False, bf16=False,
            init_method_std=0.006, hidden_dropout=0.1, attention_dropout=0.1, micro_batch_size=1,
            iteration=1, consumed_train_samples=8, consumed_valid_samples=0)
    root = out / folder_name
    per_stage = LAYERS // pp
    for stage in range(pp):
        for rank in range(tp):
            language_model: dict = {}
            if stage == 0:
                norm = {"weight": state["word_embeddings_layernorm.weight"], "bias": state["word_embeddings_layernorm.bias"]}
                if style == "release":
                    language_model["embedding"] = {"word_embeddings.weight": word_parts[rank].clone(),
                                                   **{f"word_embeddings.norm.{k}": v for k, v in norm.items()}}
                else:
                    language_model["embedding"] = {"word_embeddings": {
                        "weight": word_parts[rank].clone(), **{f"norm.{k}": v for k, v in norm.items()}}}
            encoder = language_model["encoder"] = {}
            for local in range(per_stage):
                prefix = f"h.{stage * per_stage + local}."
                for name, tensor in state.items():
                    if not name.startswith(prefix):
                        continue
                    module = name[len(prefix):]
                    if module in TP_SPLIT_ROWS:
                        tensor = tensor.chunk(tp, dim=0)[rank]
                    elif module in TP_SPLIT_COLUMNS:
                        tensor = tensor.chunk(tp, dim=1)[rank]
                    encoder[f"layers.{local}.{module}"] = tensor.clone()
            model: dict = {"language_model": language_model}
            if stage == pp - 1:
                encoder["final_layernorm.weight"] = state["ln_f.weight"]
                encoder["final_layernorm.bias"] = state["ln_f.bias"]
                if style == "release" or pp > 1:  # training: only a last stage without the embedding keeps a copy
                    model["word_embeddings_for_head"] = {"weight": word_parts[rank].clone()}
            rank_dir = root / (f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else ""))
            rank_dir.mkdir(parents=True)
            saved = {"model": model, "checkpoint_version": 3.0, "args": args}
            if style == "training":
                saved["iteration"] = 1
            torch.save(saved, rank_dir / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text(tracker)
    return out


def assert_hf_logits(ember_logits: torch.Tensor, hf_logits: torch.Tensor) -> None:
    """fp32 logits equal to 1e-5 of their largest magnitude (the megatron tests' tolerance); the
    padded vocabulary rows are extra columns, compared only for the tokenizer's."""
    assert ember_logits.shape[-1] >= hf_logits.shape[-1]
    ember_logits = ember_logits[..., : hf_logits.shape[-1]]
    scale = hf_logits.abs().max().item()
    assert scale > 0.3  # random norms and biases: a misplaced tensor moves the logits by about this
    torch.testing.assert_close(ember_logits, hf_logits, rtol=0, atol=1e-5 * scale)


def ember_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = load_model(folder).eval()
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("style,tp,pp", [("release", 1, 1), ("release", 2, 1), ("release", 2, 2),
                                         ("training", 2, 1), ("training", 1, 2)])
def test_pai_bloom_checkpoint_gives_hf_logits(bloom, tmp_path, style, tp, pp):
    hf, tokens, logits = bloom
    src = write_pai_bloom(hf, tmp_path / "pai", tp, pp, style)
    report = convert_megatron_to_ember(src, tmp_path / "ember")
    assert (report["family"], report["format"], report["naming"]) == ("bloom", "legacy", "legacy")
    assert report["iteration"] == ("release" if style == "release" else 1)
    args = read_manifest(tmp_path / "ember")["model_args"]
    assert (args["position_type"], args["embedding_norm"], args["activation"], args["tie_embeddings"]) == (
        "alibi", True, "gelu_tanh", True)
    assert args["vocab_size"] == padded_vocab(HF_VOCAB, tp)
    assert_hf_logits(ember_logits(tmp_path / "ember", tokens), logits)


def test_flash_attention_run_is_noted(bloom, tmp_path):
    """PAI's Bloom with --use-flash-attn ran without ALiBi; the conversion says so in its line."""
    from ember.checkpoint.megatron import describe_megatron_source

    hf, _, _ = bloom
    src = write_pai_bloom(hf, tmp_path / "pai", 1, 1, "training")
    rank_file = src / "iter_0000001/mp_rank_00/model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    state["args"].use_flash_attn = True
    torch.save(state, rank_file)
    line = describe_megatron_source(convert_megatron_to_ember(src, tmp_path / "ember"))
    assert "--use-flash-attn" in line and "ALiBi" in line and "\n" not in line


def test_bloom_args_mapping():
    """PAI's training args say ALiBi and the embedding norm; its converter's say only sizes and the
    tokenizer; --no-bias-gelu-fusion means torch's exact GELU in PAI's MLP."""
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=256)
    family, args = model_args_from_megatron(argparse.Namespace(**base, position_embedding_type="alibi", embed_layernorm=True))
    assert (family, args.position_type, args.embedding_norm, args.activation) == ("bloom", "alibi", True, "gelu_tanh")
    _, exact = model_args_from_megatron(argparse.Namespace(**base, position_embedding_type="alibi", embed_layernorm=True,
                                                           bias_gelu_fusion=False))
    assert exact.activation == "gelu"
    _, release = model_args_from_megatron(types.SimpleNamespace(**base, tokenizer_type="BloomTokenizer"))
    assert (release.position_type, release.embedding_norm, release.norm_type, release.mlp_bias) == (
        "alibi", True, "layernorm", True)


def test_unmappable_bloom_variants_are_refused_in_one_line(bloom, tmp_path):
    hf, _, _ = bloom
    src = write_pai_bloom(hf, tmp_path / "pai", 1, 1, "training")
    rank_file = src / "iter_0000001/mp_rank_00/model_optim_rng.pt"
    original = torch.load(rank_file, weights_only=False)

    def refused(change, message: str) -> None:
        state = torch.load(rank_file, weights_only=False)
        change(state)
        torch.save(state, rank_file)
        with pytest.raises(EmberError, match=message) as error:
            convert_megatron_to_ember(src, tmp_path / "ember")
        assert "\n" not in str(error.value)
        assert not (tmp_path / "ember").exists()
        torch.save(original, rank_file)

    refused(lambda s: setattr(s["args"], "apply_residual_connection_post_layernorm", True),
            "after the layernorm.*not supported")
    refused(lambda s: setattr(s["args"], "embed_layernorm", False),  # weights hold a norm the args do not
            "word_embeddings.norm.(weight|bias) is not part of the model")
    refused(lambda s: s["model"]["language_model"]["embedding"]["word_embeddings"].pop("norm.bias"),
            "word_embeddings.norm.bias is missing")
    refused(lambda s: s.update(checkpoint_version=1.0), "checkpoint_version 1.0")
    refused(lambda s: setattr(s["args"], "normalization", "RMSNorm"), "embedding layernorm .* RMSNorm")


@pytest.mark.parametrize("layout", [(2, 2), (1, 1)])
def test_round_trip_pai_bloom_ember_pai_bloom_ember_is_bit_exact(bloom, tmp_path, layout):
    """ember's export writes what PAI's Bloom training saves (the same nested names and values, and
    the args PAI's model reads), and reads back bit-exactly."""
    hf, tokens, logits = bloom
    tp, pp = layout
    convert_megatron_to_ember(write_pai_bloom(hf, tmp_path / "pai", 2, 1, "release"), tmp_path / "ember1")
    report = convert_ember_to_megatron(tmp_path / "ember1", tmp_path / "megatron", "legacy", tp, pp)
    assert (report["format"], report["tensor_parallel"], report["pipeline_parallel"], report["files"]) == (
        "legacy", tp, pp, tp * pp)
    back = convert_megatron_to_ember(tmp_path / "megatron", tmp_path / "ember2")
    assert (back["family"], back["naming"], back["tensor_parallel"], back["pipeline_parallel"]) == ("bloom", "legacy", tp, pp)
    args_a, state_a = load_ember_weights(tmp_path / "ember1")
    args_b, state_b = load_ember_weights(tmp_path / "ember2")
    assert args_a.to_dict() == args_b.to_dict() and state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert_hf_logits(ember_logits(tmp_path / "ember2", tokens), logits)

    # the same files PAI's training would save for this layout
    reference = write_pai_bloom(hf, tmp_path / "pai-training", tp, pp, "training") / "iter_0000001"
    for rank_dir in sorted(reference.iterdir()):
        theirs = torch.load(rank_dir / "model_optim_rng.pt", weights_only=False)
        ours = torch.load(tmp_path / "megatron/iter_0000000" / rank_dir.name / "model_optim_rng.pt", weights_only=False)
        assert ours["checkpoint_version"] == 3.0 and isinstance(ours["args"], argparse.Namespace)
        ours_flat, theirs_flat = _flat(ours["model"]), _flat(theirs["model"])
        assert ours_flat.keys() == theirs_flat.keys(), rank_dir.name
        for name, tensor in theirs_flat.items():
            assert torch.equal(ours_flat[name], tensor), f"{rank_dir.name}: {name}"
        for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
                      "padded_vocab_size", "position_embedding_type", "embed_layernorm", "layernorm_epsilon",
                      "apply_residual_connection_post_layernorm", "bias_gelu_fusion", "openai_gelu", "swiglu",
                      "tensor_model_parallel_size", "pipeline_model_parallel_size"):
            expected = 256 if field == "padded_vocab_size" else getattr(theirs["args"], field)
            assert getattr(ours["args"], field) == expected, field


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """A nested legacy state dict by path (nesting kept apart from dots inside keys)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def test_ember_convert_commands_and_bloom_export_refusals(bloom, tmp_path, capsys):
    """`ember convert` both ways; torch_dist (the --format default) is refused in one line."""
    from ember.cli import main

    hf, _, _ = bloom
    src = write_pai_bloom(hf, tmp_path / "pai", 1, 1, "release")
    assert main(["convert", "--from", "megatron", "--to", "ember", str(src), str(tmp_path / "ember")]) == 0
    assert "-> ember bloom" in capsys.readouterr().out
    assert main(["convert", "--from", "ember", "--to", "megatron", str(tmp_path / "ember"), str(tmp_path / "dist")]) == 2
    error = capsys.readouterr().err
    assert "no Megatron-Core model" in error and "--format legacy" in error and not (tmp_path / "dist").exists()
    assert main(["convert", "--from", "ember", "--to", "megatron", str(tmp_path / "ember"), str(tmp_path / "pai2"),
                 "--format", "legacy", "--target-tensor-parallel-size", "2"]) == 0
    assert sorted(p.name for p in (tmp_path / "pai2/iter_0000000").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    with pytest.raises(EmberError, match="does not divide the 4 attention heads"):
        convert_ember_to_megatron(tmp_path / "ember", tmp_path / "tp8", "legacy", tensor_parallel=8)
    assert not (tmp_path / "dist").exists() and not (tmp_path / "tp8").exists()


def test_train_load_pai_bloom_release_starts_from_its_weights(bloom, tmp_path):
    """The seed's `--load bloomz-1b7-to-megatron` (PAI's converter output, a release checkpoint)
    with PAI's Bloom flags: training starts from exactly its weights."""
    from dist_utils import train_config, write_token_dataset

    from ember.train import Trainer

    hf, tokens, logits = bloom
    src = write_pai_bloom(hf, tmp_path / "pai", 2, 1, "release")
    data = write_token_dataset(tmp_path / "tokens", documents=20, vocab=100)
    config = train_config(["--load", str(src), "--save", str(tmp_path / "run"), "--data-path", str(data),
                           "--seq-length", "12", "--max-position-embeddings", "12", "--position-embedding-type", "alibi",
                           "--embed-layernorm", "--num-layers", str(LAYERS), "--hidden-size", str(HIDDEN),
                           "--num-attention-heads", str(HEADS), "--micro-batch-size", "2", "--global-batch-size", "2",
                           "--train-iters", "1", "--split", "100,0,0", "--eval-iters", "0", "--no-tensorboard",
                           "--no-compile"])
    stream = io.StringIO()
    trainer = Trainer(config, stream=stream).setup()
    assert "imported into" in stream.getvalue() and "-> ember bloom" in stream.getvalue()
    with torch.no_grad():
        got = trainer.model.eval()(tokens)
    trainer.close()
    assert_hf_logits(got, logits)

"""Generation: greedy decoding identical to transformers' generate on converted tiny models,
the sampling filters, and `ember generate` streaming text through a real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ember.checkpoint.convert import convert_hf_to_ember  # noqa: E402
from ember.checkpoint.weights import load_model  # noqa: E402
from ember.cli import main  # noqa: E402
from ember.errors import EmberError  # noqa: E402
from ember.generation import TextCodec, generate, generate_batch, sample_next_token  # noqa: E402
from ember.models import Transformer, get_model_args  # noqa: E402

VOCAB = 128
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_LIKE)),
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=32)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LLAMA_LIKE)),  # q/k/v biases
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=12)),
    "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(**_LLAMA_LIKE, num_local_experts=4)),
    "bloom": lambda: transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    ),
}


def _hf_model(family: str, seed: int = 0):
    """Weights well away from init so greedy paths are not flat (and ties improbable)."""
    torch.manual_seed(seed)
    model = MODELS[family]()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3 if family == "bloom" else 0.15)
            else:
                param.add_(torch.randn_like(param) * 0.2)
    return model.eval()


@pytest.mark.parametrize("family", list(MODELS))
def test_greedy_equals_transformers_generate(family, tmp_path):
    hf_model = _hf_model(family)
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf_to_ember(tmp_path / "hf", tmp_path / "ember")
    model = load_model(tmp_path / "ember")
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    new_tokens = 24  # beyond mistral's sliding window of 12 with the prompt
    expected = hf_model.generate(
        prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, prompt.shape[1] :].tolist()
    got = list(generate(model, prompt[0], new_tokens))
    assert got == expected
    assert len(set(got)) > 1, "a constant continuation would not test much"


# rope, sliding window (left padding shifts it), ALiBi and learned positions
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "bloom", "gpt2"])
def test_left_padded_batch_equals_transformers_generate(family, tmp_path):
    """Prompts of different lengths decode together (one forward per step) and give, row by
    row, what transformers' generate gives the same left-padded batch with its attention mask."""
    hf_model = _hf_model(family)
    hf_model.save_pretrained(tmp_path / "hf")
    convert_hf_to_ember(tmp_path / "hf", tmp_path / "ember")
    model = load_model(tmp_path / "ember")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in (9, 4, 7)]
    width, new_tokens = 9, 16
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    expected = hf_model.generate(ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)[:, width:].tolist()
    got = generate_batch(model, prompts, new_tokens)
    assert got == expected
    assert len({tuple(row) for row in got}) == 3 and any(len(set(row)) > 1 for row in got), "too flat to test much"
    assert got[1] == list(generate(model, prompts[1], new_tokens))  # padding changes nothing for a row
    # a stop token ends each row after its first occurrence; the others run on
    stop = expected[0][3]
    assert generate_batch(model, prompts, new_tokens, eos_id=stop) == [
        row[: row.index(stop) + 1] if stop in row else row for row in expected
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_left_padded_batch_in_the_blocked_layout(family, tmp_path, monkeypatch):
    """The same, with the fused decode step's matrices in oneDNN's blocked layout (which only
    models past BLOCKED_LAYOUT_MIN_BYTES get by themselves)."""
    from ember.generation import fused_decode

    monkeypatch.setattr(fused_decode, "BLOCKED_LAYOUT_MIN_BYTES", 0)
    blocked = []
    original = fused_decode._Matrix.__call__
    monkeypatch.setattr(fused_decode._Matrix, "__call__", lambda self, *a, **k: blocked.append(self.blocked) or original(self, *a, **k))
    test_left_padded_batch_equals_transformers_generate(family, tmp_path)
    assert any(blocked) == torch.backends.mkldnn.is_available()  # batch 1 (`generate`) keeps the plain layout


def _converted(hf_model, folder):
    hf_model.save_pretrained(folder / "hf")
    convert_hf_to_ember(folder / "hf", folder / "ember")
    return load_model(folder / "ember")


def _hf_greedy(hf_model, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    return hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt) :].tolist()


def test_fused_decode_step_is_taken_and_follows_weight_changes(tmp_path, monkeypatch):
    """Llama-shaped models decode through the fused step (its weight copies kept between calls);
    loading other weights in place makes the next call copy them again, so it still matches
    transformers on the new weights."""
    from ember.generation import fused_decode

    steps = []
    original = fused_decode.FusedDecodeStep.__call__
    monkeypatch.setattr(fused_decode.FusedDecodeStep, "__call__", lambda self, t: steps.append(1) or original(self, t))
    first, second = _hf_model("llama", seed=0), _hf_model("llama", seed=3)
    model = _converted(first, tmp_path / "a")
    assert fused_decode.fused_decode_refusal(model) is None
    prompt, new_tokens = [3, 17, 90, 4, 55], 16
    assert list(generate(model, prompt, new_tokens)) == _hf_greedy(first, prompt, new_tokens)
    assert len(steps) == new_tokens - 1
    expected = _hf_greedy(second, prompt, new_tokens)
    assert list(generate(model, prompt, new_tokens)) != expected
    model.load_state_dict(_converted(second, tmp_path / "b").state_dict())  # copied in place
    assert list(generate(model, prompt, new_tokens)) == expected


def test_hooked_models_keep_their_own_forward(tmp_path):
    """A forward hook (what LoRA and tensor parallelism use) is honoured: decoding goes through
    the model's forward, which a full no-cache forward per token checks."""
    from ember.generation import fused_decode

    model = _converted(_hf_model("llama"), tmp_path)
    model.layers["1"].feed_forward.w2.register_forward_hook(lambda module, args, out: out * 0.5)
    assert "hooks" in fused_decode.fused_decode_refusal(model)
    ids = [3, 17, 90, 4, 55]
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert list(generate(model, ids[:5], 10)) == ids[5:]


def test_sampling_filters():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits) == 0
    assert all(sample_next_token(logits, 1.0, top_k=1, generator=generator) == 0 for _ in range(20))
    assert all(sample_next_token(logits, 1.0, top_p=1e-3, generator=generator) == 0 for _ in range(20))
    assert {sample_next_token(logits, 5.0, top_k=2, generator=generator) for _ in range(200)} == {0, 1}
    # softmax([2, 1.5, 1, 0, -1]) = [.47, .28, .17, .06, .02]: top_p 0.7 keeps 0 and 1 (0.47 < 0.7)
    assert {sample_next_token(logits, 1.0, top_p=0.7, generator=generator) for _ in range(300)} == {0, 1}
    assert {sample_next_token(logits, 1.0, top_p=0.9, generator=generator) for _ in range(300)} == {0, 1, 2}


def test_temperature_sampling_follows_softmax():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_next_token(logits, 2.0, generator=generator) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(frequencies, (logits / 2.0).softmax(-1), atol=0.03, rtol=0)


def test_seeded_sampling_is_reproducible_and_eos_stops():
    model = Transformer(get_model_args("tiny-llama"))
    model.init_weights(seed=0)
    prompt = [5, 6, 7]

    def run(seed: int, **kwargs) -> list[int]:
        return list(generate(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kwargs))

    first = run(1)
    assert first == run(1) and first != run(2)
    stop = first[4]
    stopped = run(1, eos_id=stop)
    assert stopped == first[: first.index(stop) + 1]
    assert model.training  # generate restores the mode it found


def test_prompt_longer_than_the_model_is_an_error():
    model = Transformer(get_model_args("tiny-gpt2", max_seq_len=16))
    with pytest.raises(EmberError, match="max_seq_len 16"):
        list(generate(model, list(range(10)), 10))


# ---------------------------------------------------------------------------------------------
def _train_tokenizer(folder, vocab_size: int = 300) -> tokenizers.Tokenizer:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    text = [
        "the quick brown fox jumps over the lazy dog",
        "a journey of a thousand miles begins with a single step",
        "to be or not to be that is the question",
    ] * 20
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(text, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return tokenizer


def test_cli_generate_streams_the_same_text_as_transformers(tmp_path, capsys):
    tokenizer = _train_tokenizer(tmp_path / "hf")
    vocab = tokenizer.get_vocab_size()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_LLAMA_LIKE, "vocab_size": vocab})
    hf_model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.15)
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "ember", str(tmp_path / "hf"), str(tmp_path / "ember")]) == 0
    assert (tmp_path / "ember" / "tokenizer" / "tokenizer.json").is_file()

    prompt = "the quick brown"
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    out = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, ids.shape[1] :].tolist()
    expected_text = tokenizer.decode(new, skip_special_tokens=True)

    capsys.readouterr()
    assert main(["generate", "--load", str(tmp_path / "ember"), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    assert captured.out == prompt + expected_text + "\n"
    assert "tokens/s" in captured.err

    # sampling flags are accepted and seeded runs repeat
    argv = ["generate", "--load", str(tmp_path / "ember"), "--prompt", prompt, "--max-new-tokens", "8"]
    sampled = argv + ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first
    assert main(sampled + ["--greedy"]) == 0
    assert capsys.readouterr().out.startswith(prompt)


def test_text_codec_through_auto_tokenizer(tmp_path):
    """Without tokenizer.json, a slow GPT-2 style vocab.json + merges.txt folder loads through
    transformers.AutoTokenizer (local files only)."""
    tokenizer = _train_tokenizer(tmp_path / "fast")
    (tmp_path / "slow").mkdir()
    tokenizer.model.save(str(tmp_path / "slow"))
    (tmp_path / "slow" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"})
    )
    slow, fast = TextCodec(tmp_path / "slow"), TextCodec(tmp_path / "fast")
    text = "to be or not to be"
    assert slow.encode(text) == fast.encode(text)
    assert slow.decode(slow.encode(text)) == text
    assert slow.eos_id == fast.eos_id == tokenizer.token_to_id("<|endoftext|>")


def test_cli_generate_errors(tmp_path, capsys):
    assert main(["generate", "--load", str(tmp_path), "--prompt", "x"]) == 2
    assert "not an ember weight folder" in capsys.readouterr().err

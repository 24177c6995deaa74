"""ember vs Hugging Face transformers, family by family.

Each case builds a tiny random model with transformers' own config and model classes, saves it
with save_pretrained, converts it with the CLI (`ember convert --from hf --to ember`), and
checks fp32 logits on several random batches, then the loss and every gradient of one training
step, all within the error two orders of fp32 summation give (tests/tolerances.py; a q/k layout
that pairs the wrong rotary dimensions fails it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from ember.checkpoint.weights import load_model  # noqa: E402
from ember.cli import main  # noqa: E402
from ember.models.hf import TensorMapper  # noqa: E402
from tolerances import assert_fp32_close, rms, backward_terms, forward_terms, fp32_bound, loss_terms  # noqa: E402

VOCAB = 160
_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128,
)

# name -> (config class, model class, config kwargs, family ember should detect)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE), "llama"),
    "llama-biases-mqa": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(_LLAMA_LIKE, num_key_value_heads=1, attention_bias=True, mlp_bias=True, tie_word_embeddings=True), "llama",
    ),
    "llama3-rope-scaling": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(
            _LLAMA_LIKE,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
            },
        ),
        "llama",
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE, tie_word_embeddings=True), "qwen2"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA_LIKE, head_dim=32), "qwen3"),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=16), "mistral"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), "mixtral"),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4), "bloom"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128), "gpt2"),
}
BATCHES = [(2, 17), (3, 40), (1, 64)]


def build_hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A tiny HF model with weights far from their init (norm scales and biases included), so
    every parameter's mapping matters to the logits."""
    config_cls, model_cls, kwargs, _ = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = "eager"  # explicit softmax attention: independent of SDPA
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.1)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    case = request.param
    root = tmp_path_factory.mktemp(case)
    hf_model = build_hf_model(case)
    hf_model.save_pretrained(root / "hf")
    assert main(["convert", "--from", "hf", "--to", "ember", str(root / "hf"), str(root / "ember")]) == 0
    return case, hf_model, load_model(root / "ember").eval(), root


def test_family_and_parameter_count(converted):
    case, hf_model, model, root = converted
    manifest = (root / "ember" / "ember_model.json").read_text()
    assert f'"family": "{CASES[case][3]}"' in manifest
    hf_count = sum(p.numel() for p in hf_model.parameters())  # tied weights are counted once
    assert model.args.num_params() == hf_count == sum(p.numel() for p in model.parameters())


def test_logits_match(converted):
    case, hf_model, model, _ = converted
    generator = torch.Generator().manual_seed(1)
    for batch, seq in BATCHES:
        tokens = torch.randint(0, VOCAB, (batch, seq), generator=generator)
        with torch.no_grad():
            expected = hf_model(tokens).logits
            got = model(tokens)
        assert got.shape == expected.shape
        assert expected.abs().max() > 0.5, "logits too small for the comparison to mean anything"
        assert_fp32_close(got, expected, terms=forward_terms(model.args, seq), msg=lambda m: f"{case} {seq}: {m}")


def test_loss_and_gradients_match(converted):
    case, hf_model, model, _ = converted
    tokens = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(2))
    hf_model.zero_grad()
    model.zero_grad()
    hf_loss = hf_model(tokens, labels=tokens).loss
    hf_loss.backward()
    logits = model(tokens)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    terms = loss_terms(model.args, seq_len=33, tokens=2 * 32)
    assert loss.item() == pytest.approx(hf_loss.item(), rel=fp32_bound(terms))
    grad_terms = backward_terms(terms, tokens=2 * 32)

    # ember gradients, renamed/re-laid-out by the same mapping as the weights
    mapper = TensorMapper(CASES[case][3], model.args)
    grads = {}
    for name, param in model.named_parameters():  # named_parameters lists a tied weight once
        for hf_name, grad in mapper.to_hf(name, param.grad):
            grads[hf_name] = grad
    hf_params = dict(hf_model.named_parameters())
    # a key bias's gradient is zero up to rounding (softmax ignores a shift of every score): its
    # error is on the scale of the model's gradients, not its own
    grad_scale = rms(*grads.values())
    compared = 0
    for hf_name, grad in grads.items():
        if hf_name not in hf_params:  # HF's in-memory MoE layout differs from its file layout
            continue
        expected = hf_params[hf_name].grad
        assert_fp32_close(grad, expected, terms=grad_terms, min_scale=grad_scale,
                          msg=lambda m: f"{case} {hf_name}: {m}")
        compared += 1
    if case == "mixtral":
        compared += _compare_mixtral_expert_grads(hf_model, grads, grad_terms, grad_scale)
    assert compared == len(hf_params)


def _compare_mixtral_expert_grads(hf_model, grads, terms: int, scale: float) -> int:
    """transformers 5 keeps Mixtral's router as mlp.gate and its experts fused in memory
    ([E, 2F, D] gate+up, [E, D, F] down); compare them with the per-expert gradients that
    ember's mapping produced in the checkpoint layout."""
    compared = 0
    for name, param in hf_model.named_parameters():
        if name.endswith(".mlp.gate.weight"):  # the router
            router = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            assert_fp32_close(grads[router], param.grad, terms=terms, min_scale=scale)
            compared += 1
            continue
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            continue
        prefix = name.rsplit(".mlp.", 1)[0] + ".block_sparse_moe.experts"
        experts = param.shape[0]
        if name.endswith("down_proj"):
            mine = torch.stack([grads[f"{prefix}.{e}.w2.weight"] for e in range(experts)])
        else:
            mine = torch.stack(
                [torch.cat([grads[f"{prefix}.{e}.w1.weight"], grads[f"{prefix}.{e}.w3.weight"]]) for e in range(experts)]
            )
        assert_fp32_close(mine, param.grad, terms=terms, min_scale=scale)
        compared += 1
    return compared


def test_rope_scaling_changes_the_model():
    """The Llama-3 case above only proves something if scaling changes the logits."""
    scaled = build_hf_model("llama3-rope-scaling")
    plain_config = scaled.config.to_dict()
    plain_config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**plain_config)).eval()
    plain.load_state_dict(scaled.state_dict())
    tokens = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (plain(tokens).logits - scaled(tokens).logits).abs().max() > 1e-3


def test_rotary_layout_bug_fails_the_logits_tolerance(tmp_path):
    """The logits tolerance catches the classic conversion bug: q/k rows left in Meta's interleaved
    rotary layout (dimensions 2i, 2i+1 paired) where ember and transformers pair i with i + d/2.
    Attention scores without RoPE would not see it (q and k permuted alike)."""
    hf_model = build_hf_model("llama")
    hf_model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "hf", "--to", "ember", str(tmp_path / "hf"), str(tmp_path / "ember")]) == 0
    model = load_model(tmp_path / "ember").eval()
    head_dim = model.args.head_dim
    interleaved = torch.arange(head_dim).view(2, head_dim // 2).T.reshape(-1)  # 0, d/2, 1, d/2+1, ...
    with torch.no_grad():
        for layer in model.layers.values():
            for linear in (layer.attention.wq, layer.attention.wk):
                rows = linear.weight.view(-1, head_dim, linear.weight.shape[1])
                rows.copy_(rows[:, interleaved].clone())
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_fp32_close(model(tokens), hf_model(tokens).logits, terms=forward_terms(model.args, 17))

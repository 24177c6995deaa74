"""Mixture of experts: the block against transformers' Mixtral block (that is how Grok-1's MoE,
which has no transformers class, is checked), the load-balancing loss against megatron-core's,
and capacity / sigmoid gating / shared experts against a per-token reference loop.

fp32 comparisons use tests/tolerances.py (the error two orders of summation give, from the
reduction lengths); a deliberately wrong expert weight fails that tolerance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ember.models import ModelArgs, Transformer, get_model_args
from ember.models.moe import MoE
from tolerances import assert_fp32_close, backward_terms, forward_terms


def _moe_terms(args: ModelArgs) -> int:
    """K (tests/tolerances.py) of an MoE block's output: router / expert input over dim, expert
    output over its ffn (a shared MLP is num_shared_experts of them side by side), the top-k sum."""
    return args.dim + args.moe_ffn_dim * max(1, args.num_shared_experts) + args.moe_top_k + 1


def _randomise(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition, not an optimisation."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ moe.router.weight.T
    scores = logits.softmax(-1) if moe.gating == "softmax" else logits.sigmoid()
    weights, experts = scores.topk(moe.top_k, dim=-1)
    if moe.renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    capacity = None
    if moe.capacity_factor is not None:
        capacity = math.ceil(moe.capacity_factor * tokens.shape[0] * moe.top_k / moe.num_experts)
    used = [0] * moe.num_experts
    out = torch.zeros_like(tokens)
    # Assignments are served in token order; an expert past capacity drops the rest.
    for t in range(tokens.shape[0]):
        for slot in range(moe.top_k):
            e = int(experts[t, slot])
            used[e] += 1
            if capacity is not None and used[e] > capacity:
                continue
            w1, w2, w3 = moe.experts.w1[e], moe.experts.w2[e], moe.experts.w3[e]
            hidden = F.silu(tokens[t] @ w1.T) * (tokens[t] @ w3.T)
            out[t] += weights[t, slot] * (hidden @ w2.T)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(tokens)
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe_gating": "sigmoid"},
        {"moe_renormalize": False, "moe_top_k": 1},
        {"moe_capacity_factor": 0.5},
        {"num_shared_experts": 2},
    ],
    ids=["softmax", "sigmoid", "top1-no-renorm", "capacity", "shared-experts"],
)
def test_moe_matches_per_token_reference(overrides):
    args = ModelArgs(**{"dim": 32, "n_heads": 4, "ffn_dim": 48, "num_experts": 4, "moe_top_k": 2, **overrides})
    moe = MoE(args)
    _randomise(moe, seed=0)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(1))
    assert_fp32_close(moe(x), _naive_moe(moe, x), terms=_moe_terms(args))


def test_capacity_really_drops_tokens():
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=2, moe_capacity_factor=0.25)
    moe = MoE(args)
    _randomise(moe, seed=0)
    x = torch.randn(1, 40, 32)
    dropless = MoE(args.replace(moe_capacity_factor=None))
    dropless.load_state_dict(moe.state_dict())
    assert (moe(x) - dropless(x)).abs().max() > 1e-3


def _grok1_block_and_mixtral_block(perturb=None):
    """ember's grok1 MoE block (random weights) and transformers' MixtralSparseMoeBlock given the
    same weights; `perturb(gate_up, down)` may alter what transformers gets."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    args = get_model_args("tiny-grok1")
    model = Transformer(args)
    model.init_weights(seed=0)
    ours = model.layers["0"].moe
    _randomise(ours, seed=2)
    config = transformers.MixtralConfig(
        hidden_size=args.dim, intermediate_size=args.moe_ffn_dim, num_local_experts=args.num_experts,
        num_experts_per_tok=args.moe_top_k, hidden_act="silu",
    )
    config._experts_implementation = "eager"
    theirs = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(torch.cat([ours.experts.w1, ours.experts.w3], dim=1))
        theirs.experts.down_proj.copy_(ours.experts.w2)
        if perturb is not None:
            perturb(theirs.experts.gate_up_proj, theirs.experts.down_proj)
    return args, ours, theirs


def test_grok1_moe_block_matches_transformers_mixtral_block():
    """Grok-1 (grok1-40b style: SwiGLU experts, softmax top-2) has no transformers class; its
    MoE block must equal transformers' MixtralSparseMoeBlock with the same weights, outputs and
    gradients."""
    args, ours, theirs = _grok1_block_and_mixtral_block()
    x = torch.randn(2, 9, args.dim, generator=torch.Generator().manual_seed(3), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = ours(x), theirs(x_ref)
    forward = _moe_terms(args)
    assert_fp32_close(out, ref, terms=forward)
    out.square().sum().backward()
    ref.square().sum().backward()
    backward = backward_terms(forward, tokens=x.shape[0] * x.shape[1])
    assert_fp32_close(x.grad, x_ref.grad, terms=backward)
    assert_fp32_close(ours.router.weight.grad, theirs.gate.weight.grad, terms=backward)
    assert_fp32_close(
        torch.cat([ours.experts.w1.grad, ours.experts.w3.grad], dim=1), theirs.experts.gate_up_proj.grad, terms=backward
    )
    assert_fp32_close(ours.experts.w2.grad, theirs.experts.down_proj.grad, terms=backward)


@pytest.mark.parametrize("bug", ["one-expert-down-proj-0.1%-off", "gate-up-rows-swapped-in-one-expert"])
def test_fp32_tolerance_still_fails_a_wrong_expert_weight(bug):
    """The tolerance the block comparison uses is far below what a small weight error does."""

    def perturb(gate_up, down):
        if bug.startswith("one-expert-down-proj"):
            down[1].mul_(1.001)
        else:  # two rows of w1 (gate) exchanged: a mapping that mixes up neighbouring rows
            gate_up[2, [0, 1]] = gate_up[2, [1, 0]]

    args, ours, theirs = _grok1_block_and_mixtral_block(perturb)
    x = torch.randn(2, 9, args.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), pytest.raises(AssertionError, match="Tensor-likes are not close"):
        assert_fp32_close(ours(x), theirs(x), terms=_moe_terms(args))


def test_grok1_block_structure_against_transformers_parts():
    """A whole grok1 model (sandwich norms, embedding and output multipliers) against the
    same computation assembled from transformers' Mixtral layers."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral import modeling_mixtral as mx

    args = get_model_args("tiny-grok1", n_layers=1)
    model = Transformer(args).eval()
    _randomise(model, seed=4)
    config = transformers.MixtralConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.moe_ffn_dim,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, num_local_experts=args.num_experts,
        num_experts_per_tok=args.moe_top_k, rms_norm_eps=args.norm_eps, max_position_embeddings=args.max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
    )
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    block = model.layers["0"]
    attn = mx.MixtralAttention(config, layer_idx=0)
    moe = mx.MixtralSparseMoeBlock(config)
    rotary = mx.MixtralRotaryEmbedding(config)
    norms = [mx.MixtralRMSNorm(args.dim, eps=args.norm_eps) for _ in range(5)]
    with torch.no_grad():
        for name, ember_linear in [("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")]:
            getattr(attn, name).weight.copy_(getattr(block.attention, ember_linear).weight)
        moe.gate.weight.copy_(block.moe.router.weight)
        moe.experts.gate_up_proj.copy_(torch.cat([block.moe.experts.w1, block.moe.experts.w3], dim=1))
        moe.experts.down_proj.copy_(block.moe.experts.w2)
        ember_norms = [block.attention_norm, block.post_attention_norm, block.ffn_norm, block.post_ffn_norm, model.norm]
        for theirs, ours in zip(norms, ember_norms):
            theirs.weight.copy_(ours.weight)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    with torch.no_grad():
        h = model.tok_embeddings(tokens) * args.embedding_multiplier
        position_embeddings = rotary(h, torch.arange(12)[None])
        causal = torch.full((12, 12), float("-inf")).triu(1)[None, None]
        a, _ = attn(norms[0](h), position_embeddings=position_embeddings, attention_mask=causal)
        h = h + norms[1](a)
        h = h + norms[3](moe(norms[2](h)))
        expected = (norms[4](h) @ model.output.weight.T) * args.output_multiplier
        assert_fp32_close(model(tokens), expected, terms=forward_terms(args, seq_len=12))


def test_aux_loss_matches_megatron_core():
    megatron = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=8, moe_top_k=2, moe_aux_loss_coef=0.01)
    moe = MoE(args)
    _randomise(moe, seed=5)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(6))
    moe(x)
    logits = x.reshape(-1, 32) @ moe.router.weight.T
    probs = logits.softmax(-1)
    routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, probs.topk(2, dim=-1).indices, True)
    expected = megatron.switch_load_balancing_loss_func(
        probs=probs, tokens_per_expert=routing_map.sum(0), total_num_tokens=64, topk=2, num_experts=8, moe_aux_loss_coeff=0.01
    )
    torch.testing.assert_close(moe.aux_loss, expected)


def test_aux_loss_relates_to_transformers_mixtral_loss():
    """transformers' load_balancing_loss_func is the same Switch loss without Megatron's
    division by top_k (and without the coefficient)."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=2, moe_aux_loss_coef=0.02)
    moe = MoE(args)
    _randomise(moe, seed=7)
    x = torch.randn(2, 10, 32)
    moe(x)
    logits = x.reshape(-1, 32) @ moe.router.weight.T
    hf_loss = load_balancing_loss_func((logits,), num_experts=4, top_k=2)
    torch.testing.assert_close(moe.aux_loss, hf_loss * 0.02 / 2)


def test_aux_loss_gradient_reaches_the_router():
    model = Transformer(get_model_args("tiny-mixtral"))
    model(torch.randint(0, 512, (2, 16)))
    model.aux_loss().backward()
    assert model.layers["0"].moe.router.weight.grad.abs().sum() > 0


def test_input_jitter_only_in_training():
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=2, moe_input_jitter=0.3)
    moe = MoE(args)
    _randomise(moe, seed=8)
    x = torch.randn(1, 30, 32)
    moe.eval()
    torch.testing.assert_close(moe(x), moe(x), rtol=0, atol=0)
    moe.train()
    torch.manual_seed(0)
    assert not torch.equal(moe(x), moe(x))

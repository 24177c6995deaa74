"""Mixture of experts: the block against transformers' Mixtral block (that is how Grok-1's MoE,
which has no transformers class, is checked), the load-balancing loss, router z-loss and token
dropping (both drop policies) against megatron-core's, capacity / sigmoid gating / shared experts
against a per-token reference loop, and the grouped-GEMM experts against the per-expert loop
(forward and backward, with no host read of the expert counts).

fp32 comparisons use tests/tolerances.py (the error two orders of summation give, from the
reduction lengths); a deliberately wrong expert weight fails that tolerance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ember.models import ModelArgs, Transformer, get_model_args
from ember.errors import EmberError
from ember.models.moe import MoE, grouped_mm_supported, prefer_grouped_mm
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
    # Over capacity an expert keeps its first assignments in token order ("position") or those
    # of highest router weight ("probs"), as Megatron's drop policies do.
    assignments = [[] for _ in range(moe.num_experts)]
    for t in range(tokens.shape[0]):
        for slot in range(moe.top_k):
            assignments[int(experts[t, slot])].append((t, slot))
    out = torch.zeros_like(tokens)
    for e, taken in enumerate(assignments):
        if capacity is not None and moe.drop_policy == "probs":
            taken = sorted(taken, key=lambda ts: -float(weights[ts]))
        for t, slot in taken[:capacity]:
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
        {"moe_capacity_factor": 0.5, "moe_drop_policy": "position"},
        {"num_shared_experts": 2},
    ],
    ids=["softmax", "sigmoid", "top1-no-renorm", "capacity-probs", "capacity-position", "shared-experts"],
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


@pytest.mark.parametrize("path", ["grouped", "looped"])
def test_grok1_moe_block_matches_transformers_mixtral_block(path):
    """Grok-1 (grok1-40b style: SwiGLU experts, softmax top-2) has no transformers class; its
    MoE block must equal transformers' MixtralSparseMoeBlock with the same weights, outputs and
    gradients, with the experts run by one grouped GEMM or by one matmul per expert."""
    args, ours, theirs = _grok1_block_and_mixtral_block()
    _use_path(ours, path)
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


# ------------------------------------------------ grouped GEMM, drop policies, router z-loss, flags

EXPERT_PATHS = ["grouped", "looped"]
needs_grouped_mm = pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm")
                                      and not hasattr(torch, "_grouped_mm"), reason="torch has no grouped_mm")


def _use_path(moe: MoE, path: str) -> None:
    if path == "grouped" and not grouped_mm_supported(torch.zeros(1), torch.zeros(1, 1, 1)):
        pytest.skip("this torch has no CPU grouped_mm")
    moe.experts.use_grouped_mm = path == "grouped"


def _forward_backward(moe: MoE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The block's output and every gradient, for a loss whose output gradient is an expanded
    tensor (`.sum()`, which grouped_mm's own backward rejects) plus a non-uniform one."""
    x = x.detach().clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    out = moe(x)
    (out.sum() + out.square().sum() + (moe.aux_loss if moe.aux_loss is not None else 0)).backward()
    grads = {name: p.grad for name, p in moe.named_parameters()}
    return {"out": out.detach(), "x": x.grad, **grads}


@needs_grouped_mm
@pytest.mark.parametrize(
    "overrides",
    [{}, {"moe_capacity_factor": 0.5}, {"moe_capacity_factor": 0.5, "moe_drop_policy": "position"},
     {"mlp_type": "plain", "activation": "gelu", "num_shared_experts": 1}, {"moe_top_k": 1, "moe_z_loss_coef": 0.1}],
    ids=["dropless", "capacity-probs", "capacity-position", "plain-mlp-shared", "top1-zloss"],
)
def test_grouped_gemm_matches_looped_experts_forward_and_backward(overrides):
    args = ModelArgs(**{"dim": 32, "n_heads": 4, "ffn_dim": 48, "num_experts": 4, "moe_top_k": 2,
                        "moe_aux_loss_coef": 0.01, **overrides})
    moe = MoE(args)
    _randomise(moe, seed=11)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(12))
    results = {}
    for path in EXPERT_PATHS:
        _use_path(moe, path)
        results[path] = _forward_backward(moe, x)
    forward = _moe_terms(args)
    backward = backward_terms(forward, tokens=33)
    assert_fp32_close(results["grouped"]["out"], results["looped"]["out"], terms=forward)
    for name in results["looped"]:
        if name != "out":
            assert_fp32_close(results["grouped"][name], results["looped"][name], terms=backward, msg=name)


@needs_grouped_mm
def test_grouped_gemm_with_an_expert_no_token_picked():
    """An expert without tokens (and one taking them all) still gets a zero gradient, not garbage."""
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=1)
    moe = MoE(args)
    _randomise(moe, seed=13)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2] = 5.0  # every positive-sum token goes to expert 2
    x = torch.randn(2, 8, 32).abs()
    results = {}
    for path in EXPERT_PATHS:
        _use_path(moe, path)
        results[path] = _forward_backward(moe, x)
    assert torch.equal(results["grouped"]["experts.w1"][0], torch.zeros_like(results["grouped"]["experts.w1"][0]))
    for name in results["looped"]:
        assert_fp32_close(results["grouped"][name], results["looped"][name], terms=backward_terms(_moe_terms(args), 16))


def test_expert_path_chosen_by_capability():
    """grouped_mm is known supported where torch runs the dtype on the device (CPU: fp32/bf16/
    fp16), not elsewhere (CPU fp64 here); by default CPU takes the loop (measured faster, and no
    device to stall). A forced grouped path on an unsupported dtype is not needed: the fp64
    block below takes the loop and gives the reference result."""
    from ember.models import moe as moe_module

    fp64 = torch.zeros(1, dtype=torch.float64), torch.zeros(1, 1, 1, dtype=torch.float64)
    assert not grouped_mm_supported(*fp64)
    assert not prefer_grouped_mm(torch.zeros(1), torch.zeros(1, 1, 1))
    if moe_module._grouped_mm is not None:
        assert grouped_mm_supported(torch.zeros(1), torch.zeros(1, 1, 1))
        assert grouped_mm_supported(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, 1, 1, dtype=torch.bfloat16))
        assert not grouped_mm_supported(torch.zeros(1), torch.zeros(1, 1, 1, dtype=torch.bfloat16))
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=2, moe_capacity_factor=0.5)
    moe = MoE(args).double()
    _randomise(moe, seed=14)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(moe(x), _naive_moe(moe, x))


@needs_grouped_mm
def test_grouped_gemm_bf16_close_to_looped():
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=2)
    moe = MoE(args)
    _randomise(moe, seed=15)
    moe = moe.to(torch.bfloat16)
    x = torch.randn(2, 9, 32).to(torch.bfloat16)
    _use_path(moe, "grouped")
    grouped = moe(x)
    _use_path(moe, "looped")
    torch.testing.assert_close(grouped, moe(x), rtol=2e-2, atol=2e-2)


@needs_grouped_mm
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_local_dispatch_never_reads_the_device_on_the_host(monkeypatch, capacity_factor):
    """The grouped path keeps counts on the device: no .tolist() / .item() / bool() per block
    (each would be a device sync on an accelerator), forward or backward."""
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=4, moe_top_k=2, moe_aux_loss_coef=0.01,
                     moe_z_loss_coef=0.01, moe_capacity_factor=capacity_factor)
    moe = MoE(args)
    _randomise(moe, seed=16)
    _use_path(moe, "grouped")
    x = torch.randn(2, 9, 32, requires_grad=True)

    def host_read(*_args, **_kwargs):
        raise AssertionError("host read of a tensor in the MoE block")

    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = moe(x)
    (out.square().sum() + moe.aux_loss).backward()
    monkeypatch.undo()
    _use_path(moe, "looped")  # the fallback does read counts: the check above is not vacuous
    for name in ("tolist",):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with pytest.raises(AssertionError, match="host read"):
        moe(x)


def _megatron_routing(moe: MoE, x: torch.Tensor):
    """Router weights [N, k], expert ids [N, k] and Megatron's dense [N, E] probabilities / map."""
    with torch.no_grad():
        logits = x.reshape(-1, x.shape[-1]) @ moe.router.weight.T
        weights, experts = logits.softmax(-1).topk(moe.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
    probs = torch.zeros_like(logits).scatter(1, experts, weights)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, experts, True)
    return logits, weights, experts, probs, routing_map


def _kept_map(moe: MoE, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, E] bool: the assignments `sort_assignments` keeps."""
    order, counts = moe.sort_assignments(experts, weights)
    kept = order[: int(counts.sum())]
    kept_map = torch.zeros(experts.shape[0], moe.num_experts, dtype=torch.bool)
    kept_map[kept // moe.top_k, experts.reshape(-1)[kept]] = True
    return kept_map


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 4.0])
def test_token_dropping_matches_megatron_core(policy, capacity_factor):
    megatron = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=8, moe_top_k=2,
                     moe_capacity_factor=capacity_factor, moe_drop_policy=policy)
    moe = MoE(args)
    _randomise(moe, seed=17)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(18))
    _, weights, experts, probs, routing_map = _megatron_routing(moe, x)
    _, expected = megatron.apply_router_token_dropping(probs, routing_map, router_topk=2,
                                                       capacity_factor=capacity_factor, drop_policy=policy)
    kept = _kept_map(moe, experts, weights)
    if capacity_factor < 1:
        assert kept.sum() < routing_map.sum(), "the case must drop assignments"
    if policy == "position":
        # Megatron picks "position" with topk over a 0/1 map: which tied token stays is up to
        # the topk kernel (CPU: not the earliest). Same count per expert; that ember keeps the
        # earliest is Megatron's "probs" policy over scores falling with token position.
        assert torch.equal(kept.sum(0), expected.sum(0))
        earlier_first = routing_map * torch.arange(routing_map.shape[0], 0, -1, dtype=torch.float32)[:, None]
        _, expected = megatron.apply_router_token_dropping(earlier_first, routing_map, router_topk=2,
                                                           capacity_factor=capacity_factor, drop_policy="probs")
    assert torch.equal(kept, expected)


def test_drop_policies_differ():
    """probs keeps the strongest assignments, position the earliest: on the same routing they
    keep different sets, and probs keeps more router weight."""
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=8, moe_top_k=2, moe_capacity_factor=0.5)
    moe = MoE(args)
    _randomise(moe, seed=17)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(18))
    _, weights, experts, probs, _ = _megatron_routing(moe, x)
    by_probs = _kept_map(moe, experts, weights)
    moe.drop_policy = "position"
    by_position = _kept_map(moe, experts, weights)
    assert not torch.equal(by_probs, by_position)
    assert probs[by_probs].sum() > probs[by_position].sum()


def test_router_z_loss_matches_megatron_core():
    megatron = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    args = ModelArgs(dim=32, n_heads=4, ffn_dim=48, num_experts=8, moe_top_k=2, moe_z_loss_coef=1e-3)
    moe = MoE(args)
    _randomise(moe, seed=19)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(20))
    moe(x)
    logits = x.reshape(-1, 32) @ moe.router.weight.T
    torch.testing.assert_close(moe.aux_loss, megatron.z_loss_func(logits, 1e-3))
    # With the load-balancing loss too, the block's aux_loss is their sum.
    both = MoE(args.replace(moe_aux_loss_coef=0.01))
    both.load_state_dict(moe.state_dict())
    both(x)
    routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(2, dim=-1).indices, True)
    balance = megatron.switch_load_balancing_loss_func(
        probs=logits.softmax(-1), tokens_per_expert=routing_map.sum(0), total_num_tokens=64, topk=2, num_experts=8,
        moe_aux_loss_coeff=0.01)
    torch.testing.assert_close(both.aux_loss, balance + megatron.z_loss_func(logits, 1e-3))
    both.aux_loss.backward()
    assert both.router.weight.grad.abs().sum() > 0


def test_megatron_routing_flags_reach_the_model(tmp_path):
    import argparse

    from ember.compat.megatron import add_config_arguments, apply_flags
    from ember.config import Config
    from ember.models.from_config import model_args_from_config

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = parser.parse_args(["--model", "tiny-mixtral", "--seq-length", "64",
                               "--moe-expert-capacity-factor", "1.25", "--moe-token-drop-policy", "position", "--moe-z-loss-coeff", "0.001"])
    config = apply_flags(Config(), flags)
    args = model_args_from_config(config, tokenizer_vocab=lambda: None)
    assert (args.moe_capacity_factor, args.moe_drop_policy, args.moe_z_loss_coef) == (1.25, "position", 0.001)
    moe = Transformer(args).layers["0"].moe
    assert (moe.capacity_factor, moe.drop_policy, moe.z_loss_coef) == (1.25, "position", 0.001)
    # Routing settings may differ from a checkpoint's (they are not architecture).
    resumed = Config()
    apply_flags(resumed, parser.parse_args(["--seq-length", "64", "--moe-expert-capacity-factor", "2",
                                            "--moe-token-drop-policy", "probs"]))
    assert model_args_from_config(resumed, checkpoint_args=args).moe_capacity_factor == 2.0
    wrong = apply_flags(Config(), parser.parse_args(["--model", "tiny-mixtral", "--seq-length", "64",
                                                     "--moe-token-drop-policy", "random"]))
    with pytest.raises(EmberError, match="moe_drop_policy 'random' not in"):
        model_args_from_config(wrong, tokenizer_vocab=lambda: None)

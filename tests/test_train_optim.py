"""The optimizer step against PyTorch's reference pieces: clipping as `clip_grad_norm_`, AdamW as the
unfused implementation, loss scaling as `torch._amp_update_scale_` (GradScaler's kernel); a step
with NaN/Inf gradients leaves parameters and optimizer state untouched."""

import copy

import pytest
import torch
from torch import nn

from ember.config import OptimConfig
from ember.train.gradients import clip_and_step
from ember.train.optim import build_optimizer, parameter_groups
from ember.train.precision import LossScaler

CPU = torch.device("cpu")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _backward(model, scale=1.0, seed=1):
    torch.manual_seed(seed)
    loss = model(torch.randn(5, 6)).pow(2).sum() * scale
    loss.backward()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [0.05, 0.0, 100.0])
def test_clip_and_step_matches_torch_reference(fused, max_norm):
    ours, reference = _model(), _model()
    config = OptimConfig(weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, fused=fused)
    optimizer = build_optimizer(ours, config, lr=1e-2, device=CPU)
    ref_optimizer = torch.optim.AdamW(parameter_groups(reference, 0.1), lr=1e-2, betas=(0.8, 0.95), eps=1e-6,
                                      foreach=False)
    for step in range(3):
        scale = 1024.0
        _backward(ours, scale=scale, seed=step)
        outcome = clip_and_step(optimizer, max_norm, torch.tensor(scale))
        _backward(reference, seed=step)
        if max_norm > 0:
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        else:
            ref_norm = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        assert outcome.grad_norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)
        assert outcome.found_inf.item() == 0.0
    for a, b in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_no_weight_decay_on_biases_and_norms():
    groups = parameter_groups(_model(), 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    model = _model()
    names = {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert len(decayed) == len(names) == 2
    assert groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_skip_the_step(fused, bad):
    model = _model()
    optimizer = build_optimizer(model, OptimConfig(fused=fused), lr=1e-2, device=CPU)
    _backward(model)
    clip_and_step(optimizer, 1.0, torch.tensor(1.0))  # a good step first: optimizer state exists
    params = copy.deepcopy([p.detach() for p in model.parameters()])
    state = copy.deepcopy(optimizer.state_dict()["state"])
    _backward(model)
    next(model.parameters()).grad[0, 0] = bad
    outcome = clip_and_step(optimizer, 1.0, torch.tensor(1.0))
    assert outcome.found_inf.item() == 1.0
    for before, after in zip(params, model.parameters()):
        assert torch.equal(before, after)
    for key, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(value, state[key][name]), (key, name)
    assert all(p.grad is None for p in model.parameters())
    _backward(model)
    assert clip_and_step(optimizer, 1.0, torch.tensor(1.0)).found_inf.item() == 0.0
    assert not torch.equal(params[0], next(model.parameters()))


def test_dynamic_loss_scale_without_hysteresis_follows_gradscaler_kernel():
    ours = LossScaler.for_precision("fp16", CPU, loss_scale=None, initial_scale=2.0**10, min_scale=1.0, window=3,
                                    hysteresis=1)
    scale, tracker = torch.tensor(2.0**10), torch.zeros((), dtype=torch.int32)
    pattern = [0, 0, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    for overflow in pattern:
        found = torch.tensor(float(overflow))
        ours.update(found)
        torch._amp_update_scale_(scale, tracker, found, 2.0, 0.5, 3)
        assert ours.scale.item() == scale.item()


def _megatron_scaler(initial: float, min_scale: float, window: int, hysteresis: int):
    """megatron-core's DynamicGradScaler with its state on the CPU (its constructor puts it on
    CUDA); `update` is Megatron's own code."""
    from megatron.core.optimizer.grad_scaler import DynamicGradScaler

    scaler = object.__new__(DynamicGradScaler)
    scaler._scale = torch.tensor([initial])
    scaler.min_scale = torch.tensor([min_scale])
    scaler.growth_factor, scaler.backoff_factor = torch.tensor([2.0]), torch.tensor([0.5])
    scaler.growth_interval, scaler.hysteresis = window, hysteresis
    scaler._growth_tracker, scaler._hysteresis_tracker = 0, hysteresis
    return scaler


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_dynamic_loss_scale_follows_megatron_with_hysteresis(hysteresis):
    pytest.importorskip("megatron.core")
    generator = torch.Generator().manual_seed(hysteresis)
    pattern = (torch.rand(400, generator=generator) < 0.15).tolist() + [True] * 12 + [False] * 20
    ours = LossScaler.for_precision("fp16", CPU, loss_scale=None, initial_scale=2.0**12, min_scale=2.0, window=7,
                                    hysteresis=hysteresis)
    megatron = _megatron_scaler(2.0**12, 2.0, 7, hysteresis)
    changes = 0
    for step, overflow in enumerate(pattern):
        before = ours.scale.item()
        ours.update(torch.tensor(float(overflow)))
        megatron.update(overflow)
        assert ours.scale.item() == megatron._scale.item(), step
        changes += ours.scale.item() != before
        if step == 200:  # a resumed run continues the same way
            state = ours.state_dict()
            ours = LossScaler.for_precision("fp16", CPU, loss_scale=None, initial_scale=1.0, min_scale=2.0, window=7,
                                            hysteresis=hysteresis)
            ours.load_state_dict(state)
    assert changes > 10  # the pattern exercised both directions


def test_loss_scale_never_below_minimum_and_static_and_other_precisions():
    scaler = LossScaler.for_precision("fp16", CPU, loss_scale=None, initial_scale=4.0, min_scale=1.0, window=100)
    for _ in range(5):
        scaler.update(torch.tensor(1.0))
    assert scaler.scale.item() == 1.0 and scaler.at_minimum().item()
    static = LossScaler.for_precision("fp16", CPU, loss_scale=128.0, initial_scale=4.0, min_scale=1.0, window=1)
    static.update(torch.tensor(1.0))
    static.update(torch.tensor(0.0))
    assert static.scale.item() == 128.0
    assert LossScaler.for_precision("bf16", CPU, loss_scale=None, initial_scale=4.0, min_scale=1.0,
                                    window=1).scale.item() == 1.0

"""The learning-rate schedule against Megatron-LM's own OptimizerParamScheduler (megatron-core)."""

import warnings

import pytest

from dist_utils import train_config
from ember.config import validate
from ember.train.schedule import LRSchedule, build_schedule

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    scheduler_module = pytest.importorskip("megatron.core.optimizer_param_scheduler")


class _Optimizer:
    """What the scheduler touches of a MegatronOptimizer: the parameter groups."""

    def __init__(self):
        self.param_groups = [{}]


def megatron_lrs(iters, gbs, *, max_lr, min_lr, warmup_iters, decay_iters, style, init_lr=0.0, wsd_iters=None,
                 wsd_style=None):
    """lr Megatron reports after each of `iters` iterations (its steps count samples)."""
    scheduler = scheduler_module.OptimizerParamScheduler(
        _Optimizer(), init_lr=init_lr, max_lr=max_lr, min_lr=min_lr, lr_warmup_steps=warmup_iters * gbs,
        lr_decay_steps=decay_iters * gbs, lr_decay_style=style, start_wd=0.1, end_wd=0.1, wd_incr_steps=1,
        wd_incr_style="constant", wsd_decay_steps=None if wsd_iters is None else wsd_iters * gbs,
        lr_wsd_decay_style=wsd_style)
    out = []
    for _ in range(iters):
        scheduler.step(gbs)
        out.append(scheduler.get_lr(scheduler.optimizer.param_groups[0]))
    return out


def _config(*flags):
    return validate(train_config(["--model", "tiny-llama", "--data-path", "x", "--seq-length", "16",
                                  "--global-batch-size", "4", *flags]), check_paths=False)


@pytest.mark.parametrize("style, warmup, decay, extra", [
    ("cosine", 10, None, {}),
    ("linear", 0, None, {}),
    ("linear", 5, 30, {}),            # decay ends before training does: min_lr afterwards
    ("constant", 7, None, {}),
    ("inverse-square-root", 8, None, {}),
    ("WSD", 4, None, {"wsd_iters": 12, "wsd_style": "cosine"}),
])
def test_iteration_schedule_matches_megatron(style, warmup, decay, extra):
    flags = ["--train-iters", "50", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", style,
             "--lr-warmup-iters", str(warmup), "--lr-warmup-init", "1e-6"]
    if decay:
        flags += ["--lr-decay-iters", str(decay)]
    if extra:
        flags += ["--lr-wsd-decay-iters", str(extra["wsd_iters"]), "--lr-wsd-decay-style", extra["wsd_style"]]
    config = _config(*flags)
    schedule = build_schedule(config, config.train.train_iters)
    ours = [schedule.lr_at(schedule.progress_of(i, i * 64)) for i in range(1, 51)]
    theirs = megatron_lrs(50, 4, max_lr=3e-4, min_lr=3e-5, warmup_iters=warmup, decay_iters=decay or 50,
                          style=style, init_lr=1e-6, **extra)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15)
    assert len(set(ours)) > 1 or style == "constant"


def test_warmup_fraction_is_of_the_decay_span():
    config = _config("--train-iters", "40", "--lr-warmup-fraction", "0.25", "--lr", "1e-3")
    schedule = build_schedule(config, 40)
    ours = [schedule.lr_at(i) for i in range(1, 41)]
    assert ours == pytest.approx(megatron_lrs(40, 4, max_lr=1e-3, min_lr=0.0, warmup_iters=10, decay_iters=40,
                                              style="cosine"), rel=1e-12)


def test_token_budgets_follow_the_pai_scripts():
    """PAI-Megatron-Patch: TRAIN_ITERS = TRAIN_TOKENS / GBS / SEQ_LEN, LR_WARMUP_ITERS likewise, then
    Megatron's iteration schedule; tokens here: 4 x 16 = 64 per iteration."""
    config = _config("--train-tokens", str(64 * 30), "--warmup-tokens", str(64 * 6), "--lr", "2e-4",
                     "--min-lr", "2e-5")
    assert config.train.train_iters == 30
    schedule = build_schedule(config, config.train.train_iters)
    assert schedule.unit == "tokens"
    ours = [schedule.lr_at(schedule.progress_of(i, i * 64)) for i in range(1, 31)]
    theirs = megatron_lrs(30, 4, max_lr=2e-4, min_lr=2e-5, warmup_iters=6, decay_iters=30, style="cosine")
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_first_iteration_already_learns():
    """Megatron's first iteration runs at the warmup's initial lr (0 by default); ember's runs at the
    first warmup step's value, so no iteration is wasted."""
    schedule = LRSchedule(max_lr=1.0, min_lr=0.0, warmup_steps=4, decay_steps=10)
    assert schedule.lr_at(1) == 0.25
    assert schedule.lr_at(4) == 1.0
    assert schedule.lr_at(10) == 0.0

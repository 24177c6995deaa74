"""Check a whole configuration before any process starts: one `EmberError` line for the first problem.

`validate(config, world_size)` returns a resolved copy (global batch and iterations filled in);
the parallel layout's own rules are `ember.config.layout`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os

from ember.config.data_spec import parse_data_path, parse_split
from ember.config.layout import Layout, schedule_spelling
from ember.config.schema import Config, TrainConfig
from ember.errors import EmberError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
PRECISIONS = ("fp32", "bf16", "fp16")


def _positive(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise EmberError(f"{name} must be a positive number, got {value}")


def validate(config: Config, world_size: int = 1, check_paths: bool = True) -> Config:
    """Check everything that can be checked before processes start.

    Raises `EmberError` with one line for the first problem found. Returns a resolved copy (the
    argument is left as given): `global_batch_size` and `train_iters` filled in, `eval_iters` 0
    when there is no validation data.
    """
    config = copy.deepcopy(config)
    _check_finite(config)
    t, d, o, p, c, lg = config.train, config.data, config.optim, config.parallel, config.checkpoint, config.logging
    _check_choice(t.precision, PRECISIONS, "train.precision")
    _check_choice(t.lr_decay_style, LR_DECAY_STYLES, "train.lr_decay_style (--lr-decay-style)")
    if o.optimizer.lower() not in ("adam", "adamw"):
        raise EmberError(f"optimizer '{o.optimizer}' is not supported; use adamw")
    _positive(d.seq_length, "data.seq_length (--seq-length)")
    # the layout's own rules (degrees, batch, schedule) are all in Layout; the model's come later,
    # in Layout.check_model, once the model is known
    layout = Layout.from_config(p, t, world_size)
    t.global_batch_size = layout.global_batch_size
    p.pipeline_schedule = schedule_spelling(p.pipeline_schedule)
    _validate_budget(config)
    _validate_schedule(t)
    if not 0.0 <= o.weight_decay:
        raise EmberError(f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise EmberError(f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    if o.clip_grad < 0:
        raise EmberError(f"optim.clip_grad must be >= 0 (0 disables clipping), got {o.clip_grad}")
    _validate_recompute(t)
    if p.overlap_param_gather and p.dp_mode == "replicate":  # Megatron refuses it the same way
        raise EmberError("--overlap-param-gather needs --use-distributed-optimizer (or --use-torch-fsdp2): only "
                         "sharded parameters are gathered; drop it or shard the optimizer")
    _positive(lg.log_interval, "logging.log_interval (--log-interval)")
    _positive(t.eval_interval, "train.eval_interval (--eval-interval)")
    if t.eval_iters < 0:
        raise EmberError(f"train.eval_iters must be >= 0, got {t.eval_iters}")
    _positive(t.max_consecutive_skips, "train.max_consecutive_skips")
    _positive(t.exit_interval, "train.exit_interval (--exit-interval)", allow_none=True)
    _positive(t.cpu_threads, "train.cpu_threads (--cpu-threads)", allow_none=True)
    _validate_checkpointing(config)
    if t.precision == "fp16":
        _positive(t.initial_loss_scale, "train.initial_loss_scale")
        _positive(t.hysteresis, "train.hysteresis (--hysteresis)")
        _positive(t.loss_scale, "train.loss_scale (--loss-scale)", allow_none=True)
    if config.model.name is None and not c.load and config.model.num_layers is None:
        raise EmberError("no model given: pass --model NAME (see `ember models`), architecture flags "
                         "(--num-layers --hidden-size ...), or --load a converted checkpoint")
    _validate_data(config, check_paths)
    return config


def _check_finite(config: Config) -> None:
    """Every number setting is finite: an inf or nan (from a flag, YAML or a MindFormers file)
    passes every range check below (nan compares False to everything) and trains NaN."""
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise EmberError(f"{section.name}.{f.name} = {value} is not a finite number; give a finite value")


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise EmberError(f"{name} = {value!r} is not one of {', '.join(choices)}")


def _validate_budget(config: Config) -> None:
    t, d = config.train, config.data
    tokens_per_iter = t.global_batch_size * d.seq_length
    if t.train_tokens is not None and t.train_iters == t.train_tokens // tokens_per_iter:
        t.train_iters = None  # derived by an earlier validation (a printed config read back)
    given = [name for name in ("train_iters", "train_tokens", "train_epochs") if getattr(t, name) is not None]
    if len(given) != 1:
        what = " and ".join(given) if given else "none"
        raise EmberError(f"give exactly one training length: --train-iters, --train-tokens or "
                         f"--train-epochs ({what} given)")
    if t.train_tokens is not None:
        _positive(t.train_tokens, "train.train_tokens (--train-tokens)")
        # PAI-Megatron-Patch: TRAIN_ITERS = TRAIN_TOKENS / GLOBAL_BATCH_SIZE / SEQ_LEN.
        t.train_iters = t.train_tokens // tokens_per_iter
        if t.train_iters == 0:
            raise EmberError(f"--train-tokens {t.train_tokens} is less than one iteration "
                             f"({tokens_per_iter} tokens = global batch x sequence length)")
    elif t.train_epochs is not None:
        _positive(t.train_epochs, "train.train_epochs (--train-epochs)")
    else:
        _positive(t.train_iters, "train.train_iters (--train-iters)")


def _validate_schedule(t: TrainConfig) -> None:
    if t.lr < 0 or t.min_lr < 0:
        raise EmberError(f"learning rates must be >= 0 (lr {t.lr}, min_lr {t.min_lr})")
    if t.min_lr > t.lr:
        raise EmberError(f"--min-lr {t.min_lr} is above --lr {t.lr}; lower --min-lr")
    warmups = [n for n, v in (("--lr-warmup-iters", t.lr_warmup_iters or None),
                              ("--lr-warmup-fraction", t.lr_warmup_fraction),
                              ("--lr-warmup-tokens", t.lr_warmup_tokens)) if v is not None]
    if len(warmups) > 1:
        raise EmberError(f"{' and '.join(warmups)} both given; choose one way to set the warmup")
    if t.lr_warmup_iters < 0:
        raise EmberError(f"--lr-warmup-iters must be >= 0, got {t.lr_warmup_iters}")
    if t.lr_warmup_fraction is not None and not 0.0 <= t.lr_warmup_fraction <= 1.0:
        raise EmberError(f"--lr-warmup-fraction must be in [0, 1], got {t.lr_warmup_fraction}")
    if t.lr_decay_style == "WSD":
        _check_choice(t.lr_wsd_decay_style, WSD_STYLES, "--lr-wsd-decay-style")
        _positive(t.lr_wsd_decay_iters, "--lr-wsd-decay-iters (with --lr-decay-style WSD)")
    if t.lr_decay_iters is not None and t.lr_decay_tokens is not None:
        raise EmberError("--lr-decay-iters and --lr-decay-tokens both given; choose one")
    if t.train_iters is not None and t.lr_decay_iters is not None and t.lr_decay_iters < t.lr_warmup_iters:
        raise EmberError(f"--lr-decay-iters {t.lr_decay_iters} is shorter than the warmup "
                         f"{t.lr_warmup_iters}; lengthen the decay or shorten the warmup")


def _validate_recompute(t: TrainConfig) -> None:
    if t.recompute_granularity is not None:
        _check_choice(t.recompute_granularity, ("full", "selective"), "--recompute-granularity")
    if t.recompute_method is not None:
        _check_choice(t.recompute_method, ("uniform", "block"), "--recompute-method")
        if t.recompute_granularity != "full":
            raise EmberError("--recompute-method needs --recompute-granularity full")
    if t.recompute_granularity == "full" and t.recompute_method == "block":
        _positive(t.recompute_num_layers, "--recompute-num-layers (with --recompute-method block)")


def _validate_checkpointing(config: Config) -> None:
    c, t = config.checkpoint, config.train
    if c.save_interval is not None:
        _positive(c.save_interval, "checkpoint.save_interval (--save-interval)")
        if not c.save:
            raise EmberError("--save-interval given without --save; add --save DIR")
    if c.keep_last is not None:
        _positive(c.keep_last, "checkpoint.keep_last (--keep-last)")
    for flag, folder in (("--save", c.save), ("--output-dir", config.logging.output_dir),
                         ("--tensorboard-dir", config.logging.tensorboard_dir),
                         ("--data-cache-path", config.data.data_cache_path)):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise EmberError(f"{flag} {folder} is a file, not a folder; give a folder path")
    if c.overwrite and not c.save:
        raise EmberError("--overwrite given without --save; it replaces what --save holds: add --save DIR")
    if t.finetune and not c.load:
        raise EmberError("--finetune needs --load (the converted or trained checkpoint to start from)")
    if t.finetune and not os.path.exists(c.load):
        raise EmberError(f"--finetune: --load {c.load} does not exist, so there is nothing to fine-tune; "
                         f"check the path (or convert the model first)")
    if c.load and not os.path.exists(c.load) and c.load != c.save:
        raise EmberError(f"--load {c.load} does not exist; check the path (or convert the model first)")


def _validate_data(config: Config, check_paths: bool) -> None:
    d, t = config.data, config.train
    if not (d.data_path or d.train_data_path):
        raise EmberError("no training data: pass --data-path PREFIX (as `ember preprocess` printed it) "
                         "or --train-data-path PREFIX")
    if d.data_path and (d.train_data_path or d.valid_data_path or d.test_data_path):
        raise EmberError("give --data-path or --train-data-path/--valid-data-path/--test-data-path, not both")
    if d.data_path:
        fractions = parse_split(d.split)
        if fractions[0] == 0:
            raise EmberError(f"--split {d.split}: the training split gets no data; give it a positive weight, "
                             f"e.g. 969,30,1")
        if t.eval_iters > 0 and fractions[1] == 0:
            t.eval_iters = 0  # no validation split: nothing to evaluate on, as in Megatron
    elif not d.valid_data_path:
        t.eval_iters = 0
    kinds = set()
    for name in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        flag = "--" + name.replace("_", "-")
        for _, prefix in parse_data_path(getattr(d, name)):
            if check_paths:
                kinds.add(_dataset_kind(prefix, flag))
    if t.train_epochs is not None and check_paths and kinds != {"finetune"}:
        raise EmberError("--train-epochs is for fine-tuning data (PREFIX_packed_input_ids_document); "
                         "use --train-iters or --train-tokens for pretraining data")


def _dataset_kind(prefix: str, flag: str) -> str:
    """"pretrain" (PREFIX.bin/.idx) or "finetune" (PREFIX_packed_*_document), or a one-line error."""
    if _dataset_exists(prefix):
        return "pretrain"
    if _dataset_exists(f"{prefix}_packed_input_ids_document"):
        return "finetune"
    if os.path.isfile(prefix) and prefix.endswith((".bin", ".idx")):
        raise EmberError(f"{flag} {prefix}: give the prefix without .bin/.idx")
    raise EmberError(f"{flag}: dataset {prefix} not found (no {prefix}.bin/.idx); run `ember preprocess` "
                     f"or fix the path")


def _dataset_exists(prefix: str) -> bool:
    """A Megatron indexed dataset is a PREFIX.bin / PREFIX.idx pair (`ember.data.indexed`)."""
    return os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")

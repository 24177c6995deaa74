"""EMBER_TINY=1: run any example script or config as a tiny model of the same family, on this CPU.

    EMBER_TINY=1 bash examples/qwen3/pretrain_qwen3_8b_4K_ptd.sh

The script runs unchanged — its variables, flags and parallel layout — with these swaps made
where its configuration is resolved (`ember.compat.config_from_args`):

- model: `tiny-<family>` of the named (or flag-described) model, with as many layers, heads and
  experts as the layout needs (PP stages, TP shards, EP groups);
- data: ember's built-in corpus (standard-library docstrings), tokenized once by a byte-level BPE
  tokenizer trained on it — pretraining prefixes for `--data-path` (a blend keeps its weights and
  gets as many distinct parts), instruction data for fine-tuning runs;
- processes: gloo on CPU; TP, PP, CP and EP as the script says, data parallelism shrunk to the
  least the layout allows (at least two processes in all, so something is always distributed);
- length: 10 iterations (`EMBER_TINY_ITERS`) of short sequences, fp32 or as given, at a learning rate
  of its own (`TINY_LR`, decaying to a tenth): the seeds' 1e-5 does not move a tiny model's loss,
  1e-2 lowers it by ~0.8 nats in 10 steps, so a tiny run shows learning.

Checkpoint folders are kept (so a tiny pretrain feeds a tiny fine-tune); a `--load` that does not
exist is dropped (the command says so), one that holds another tool's checkpoint is refused as
in a full run. The translation here reads nothing but the config, the names in `--load` and the
assets' paths; the assets themselves (`ember.compat.tiny_assets`) are built by the command first.
"""

from __future__ import annotations

import os
import sys

from ember.compat.tiny_assets import TinyAssets
from ember.config.layout import data_parallel_size, least_world_size
from ember.errors import EmberError

TINY_ENV = "EMBER_TINY"
ITERS_ENV = "EMBER_TINY_ITERS"

SEQ_LENGTH = 64
MICRO_BATCH = 2
# observability (issue 19): a tiny run's own schedule, long and steep enough for a visible fall
TINY_ITERS = 10
TINY_LR = 1e-2

# tiny-<family> registry entries; their size is what every layout below starts from.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "grok1", "bloom", "gpt2")


def enabled() -> bool:
    return os.environ.get(TINY_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def tiny_iterations() -> int:
    text = os.environ.get(ITERS_ENV, str(TINY_ITERS))
    try:
        value = int(text)
    except ValueError:
        raise EmberError(f"{ITERS_ENV}={text!r} is not an integer") from None
    if value < 1:
        raise EmberError(f"{ITERS_ENV} must be >= 1, got {value}")
    return value


# --------------------------------------------------------------------------- the layout


def world_size(config) -> int:
    """Processes a tiny run of this layout uses: TP x PP x CP x the least DP, at least two (so
    something is always distributed)."""
    return max(2, least_world_size(config.parallel))


def _family(config) -> str:
    from ember.models.registry import get_model_family

    m = config.model
    if m.name:
        return get_model_family(m.name)
    # Described by Megatron flags: the family whose features they name.
    if m.num_experts:  # Grok-1's multipliers and post-norm, else Mixtral
        return "grok1" if m.post_norm or m.embedding_multiplier_scale else "mixtral"
    if m.embed_layernorm:
        return "bloom"
    kind = (m.position_embedding_type or "").lower()
    if kind == "alibi":
        return "bloom"
    if kind.startswith("learned"):
        return "gpt2"
    if m.qk_layernorm:
        return "qwen3"
    if m.add_qkv_bias:
        return "qwen2"
    if m.swiglu or (m.normalization or "").lower() == "rmsnorm" or kind == "rope":
        return "llama"
    return "gpt2"


# ModelConfig fields a tiny run keeps from the script: training behaviour, not size.
KEPT_MODEL_SETTINGS = ("attention_dropout", "hidden_dropout", "moe_input_jitter_eps", "input_jitter",
                       "moe_router_load_balancing_type")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _tiny_model(config) -> None:
    """Swap in tiny-<family>, sized so the script's TP/PP/EP split it evenly."""
    import dataclasses

    from ember.config import ModelConfig
    from ember.models.registry import get_model_args

    family = _family(config)
    if family not in FAMILIES:
        raise EmberError(f"EMBER_TINY: no tiny model for the {family} family")
    name = f"tiny-{family}"
    base = get_model_args(name)
    p = config.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    fresh = ModelConfig(name=name)
    # every architecture flag of the script belongs to the full-size model: drop them all, but keep
    # how it trains (dropout, router jitter and balancing), which the tiny model does the same way
    for f in dataclasses.fields(ModelConfig):
        if f.name not in ("name", "make_vocab_size_divisible_by") + KEPT_MODEL_SETTINGS:
            setattr(config.model, f.name, getattr(fresh, f.name))
    config.model.name = name
    if base.n_layers % pp:
        config.model.num_layers = _round_up(base.n_layers, pp)
    kv_heads = base.n_kv_heads or base.n_heads
    if base.n_heads % tp or kv_heads % tp:
        heads = _round_up(base.n_heads, tp)
        config.model.num_attention_heads = heads
        config.model.num_query_groups = _round_up(kv_heads, tp) if base.n_kv_heads else heads
        if base.head_dim is None and base.dim % heads:
            raise EmberError(f"EMBER_TINY: {name} (width {base.dim}) cannot split into {heads} heads for "
                             f"tensor parallel {tp}")
    if base.num_experts and base.num_experts % ep:
        config.model.num_experts = _round_up(base.num_experts, ep)


def _tiny_data(config, assets: TinyAssets, finetune: bool) -> None:
    """Built-in data of the kind the run trains on: instruction data for a fine-tune, else text."""
    from ember.config.data_spec import parse_data_path

    d = config.data

    def swap(spec: list[str], finetune_data: bool) -> list[str]:
        entries = parse_data_path(spec)
        if finetune_data:
            return [assets.finetune]
        if len(entries) == 1:
            return [assets.pretrain]
        words = []
        for index, (weight, _) in enumerate(entries):
            words += ([] if weight is None else [repr(weight)]) + [assets.pretrain_part(index)]
        return words

    if d.data_path:
        d.data_path = swap(d.data_path, finetune)
    for name in ("train_data_path", "valid_data_path", "test_data_path"):
        if getattr(d, name):
            setattr(d, name, swap(getattr(d, name), finetune))
    d.seq_length = SEQ_LENGTH
    d.tokenizer_type = "PretrainedFromHF"
    d.tokenizer_name_or_path = str(assets.tokenizer)
    d.tokenizer_model = d.vocab_file = d.merge_file = None
    d.num_workers = 0


def _tiny_schedule(config, data_parallel: int) -> None:
    t, lg = config.train, config.logging
    iterations = tiny_iterations()
    pp = config.parallel.pipeline_model_parallel_size
    t.micro_batch_size = MICRO_BATCH
    # as many micro-batches per step as pipeline stages, so a pipeline schedule has work to overlap
    t.global_batch_size = MICRO_BATCH * data_parallel * pp
    t.train_iters, t.train_tokens, t.train_epochs = iterations, None, None
    t.lr_warmup_iters, t.lr_warmup_fraction, t.lr_warmup_tokens = 0, None, None
    t.lr_decay_iters = t.lr_decay_tokens = None
    t.lr, t.min_lr = TINY_LR, TINY_LR / 10
    if t.lr_decay_style == "WSD":
        t.lr_wsd_decay_iters = 1
    t.eval_interval = iterations
    t.eval_iters = min(t.eval_iters, 1)
    t.exit_interval = None
    t.compile = False
    lg.log_interval = 1
    lg.tensorboard = False


def apply_tiny(config, assets: TinyAssets, world: int | None = None) -> None:
    """The EMBER_TINY swaps, in place, on a configuration resolved from a script's arguments, for
    `world` processes (None: `world_size(config)`, the least the layout needs)."""
    p, c = config.parallel, config.checkpoint
    p.backend = "gloo"
    p.dp_replicate = 1
    world = world or world_size(config)
    data_parallel = data_parallel_size(world, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                       p.context_parallel_size)
    # a fine-tune (--finetune, or PAI's --train-epochs over --train-data-path) trains on
    # instruction data even when its --load is dropped below
    finetune = config.train.finetune or (config.train.train_epochs is not None and bool(config.data.train_data_path))
    if c.load:
        from ember.checkpoint import foreign

        if not os.path.exists(c.load):  # the script's full-size checkpoint, not made in tiny runs
            print(f"EMBER_TINY: --load {c.load} does not exist; starting from random weights", file=sys.stderr)
            c.load = None
            config.train.finetune = False
        elif foreign.foreign_checkpoint(c.load) is not None:  # a tiny model cannot load it either
            raise EmberError(foreign.describe(foreign.foreign_checkpoint(c.load), c.load))
    _tiny_data(config, assets, finetune)
    _tiny_model(config)
    _tiny_schedule(config, data_parallel)
    if c.save_interval is not None:
        c.save_interval = min(c.save_interval, config.train.train_iters)

"""One typed training config, filled from defaults < YAML file < Megatron-style flags < dotted overrides.

    ember train --config run.yaml --micro-batch-size 2 --lr 3e-4 train.train_iters=100

The YAML file has one mapping per section (`model`, `data`, `train`, `optim`, `parallel`,
`checkpoint`, `logging`); a key whose name is unique across sections may also be written at the top
level or without its section in an override (`lr=1e-4`). Unknown keys, bad values and inconsistent
settings raise `EmberError` with one line saying which setting, where it came from and how to fix it
— all before any process group starts.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ember.errors import EmberError


@dataclass
class ModelConfig:
    """Which model: a registry name, a converted checkpoint (`--load`), and/or architecture flags.

    Architecture fields left at None keep the value of the named (or loaded) model.
    """

    name: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    group_query_attention: bool | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    position_embedding_type: str | None = None
    normalization: str | None = None
    norm_epsilon: float | None = None
    swiglu: bool | None = None
    untie_embeddings_and_output_weights: bool | None = None
    disable_bias_linear: bool | None = None
    add_qkv_bias: bool | None = None
    qk_layernorm: bool | None = None
    max_position_embeddings: int | None = None
    rotary_base: float | None = None
    vocab_size: int | None = None
    # Megatron pads the vocabulary so the embedding splits evenly and runs fast; None keeps it as is.
    make_vocab_size_divisible_by: int | None = 128
    num_experts: int | None = None
    moe_router_topk: int | None = None
    moe_ffn_hidden_size: int | None = None
    moe_aux_loss_coeff: float | None = None
    init_method_std: float | None = None

    def architecture_overrides(self) -> dict[str, Any]:
        """The architecture fields the user set, by Megatron name."""
        skip = {"name", "make_vocab_size_divisible_by"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in skip and getattr(self, f.name) is not None}


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    train_data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    test_data_path: list[str] = field(default_factory=list)
    data_cache_path: str | None = None
    # Without shared storage every node builds (or checks) its own index cache.
    shared_storage: bool = True
    seq_length: int = 2048
    tokenizer_type: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    num_workers: int = 2


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    # None: one micro-batch per data-parallel rank (micro_batch_size x dp).
    global_batch_size: int | None = None
    train_iters: int | None = None
    # PAI-Megatron-Patch style budgets: iterations = tokens / (global batch x sequence length).
    train_tokens: int | None = None
    train_epochs: int | None = None
    lr: float = 1.0e-4
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_warmup_tokens: int | None = None
    lr_warmup_init: float = 0.0
    lr_decay_iters: int | None = None
    lr_decay_tokens: int | None = None
    # WSD (warmup-stable-decay): the final iterations that anneal, and how.
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str = "linear"
    eval_interval: int = 1000
    eval_iters: int = 100
    seed: int = 1234
    precision: str = "fp32"
    # fp16 only: a fixed scale when set, else dynamic scaling starting here.
    loss_scale: float | None = None
    initial_loss_scale: float = 2.0**32  # Megatron's defaults
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    # overflows (since the scale last grew) before the scale drops; MindFormers' scaler drops at once
    hysteresis: int = 2
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    # None: compile where it pays off (GPU), eager on CPU where compiling costs more than it saves.
    compile: bool | None = None
    # CPU only. None: torch's thread count, less the cores other work keeps busy at start.
    cpu_threads: int | None = None
    finetune: bool = False
    # Steps with a NaN/Inf loss or gradient are skipped; this many in a row stops the run.
    max_consecutive_skips: int = 10
    exit_interval: int | None = None


@dataclass
class OptimConfig:
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0
    # None: the fused kernel where the device has one.
    fused: bool | None = None


@dataclass
class ParallelConfig:
    """The device layout: data, tensor (+ sequence), pipeline, context and expert parallelism.

    The processes form a mesh pp x dp x cp x tp (tp innermost); expert parallelism borrows its
    ranks from the data- and context-parallel ones (ep divides dp x cp), as in Megatron.
    """

    # replicate: every rank holds the whole model and optimizer (DDP-like);
    # zero1: optimizer state and gradients sharded (Megatron's --use-distributed-optimizer);
    # fsdp: parameters sharded too (full sharding, ZeRO-3).
    dp_mode: str = "replicate"
    # With zero1/fsdp: replicas of the sharded group (HSDP). dp_shard = dp / dp_replicate.
    dp_replicate: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # None: 1f1b, or interleaved_1f1b with virtual stages; gpipe also available.
    pipeline_schedule: str | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    # Uneven pipeline splits: the first/last stage's layer counts (the rest split evenly).
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # None: nccl on CUDA, hccl on Ascend, gloo on CPU.
    backend: str | None = None


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    keep_last: int | None = None
    async_save: bool = False
    save_optim: bool = True
    load_optim: bool = True
    load_rng: bool = True
    # Save and stop cleanly when the job is sent SIGTERM (preemption, scancel).
    exit_on_sigterm: bool = True


@dataclass
class LoggingConfig:
    log_interval: int = 100
    # Where logs/ and tensorboard/ go: --save when this is unset.
    output_dir: str | None = None
    tensorboard: bool = True
    tensorboard_dir: str | None = None
    # Peak TFLOP/s of one device for MFU; None: looked up from the device name.
    peak_tflops: float | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        config = cls()
        apply_mapping(config, values, source)
        return config

    @property
    def output_dir(self) -> str | None:
        return self.logging.output_dir or self.checkpoint.save


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))

# --------------------------------------------------------------------------- values and paths


@functools.cache
def _section_fields() -> dict[str, dict[str, Any]]:
    """Section -> field -> type hint (resolved once: the dataclasses never change)."""
    hints = typing.get_type_hints(Config)
    return {name: typing.get_type_hints(hints[name]) for name in SECTIONS}


@functools.cache
def _unique_field_sections() -> dict[str, str]:
    """Field name -> its section, for names that appear in exactly one section."""
    seen: dict[str, list[str]] = {}
    for section, fields in _section_fields().items():
        for name in fields:
            seen.setdefault(name, []).append(section)
    return {name: sections[0] for name, sections in seen.items() if len(sections) == 1}


def _all_paths() -> list[str]:
    return [f"{s}.{n}" for s, fields in _section_fields().items() for n in fields]


def resolve_path(key: str, source: str) -> tuple[str, str]:
    """`train.lr`, `lr` or `train-iters` -> (section, field), or a one-line error with a suggestion."""
    normalized = key.strip().replace("-", "_")
    fields = _section_fields()
    if "." in normalized:
        section, _, name = normalized.partition(".")
        if section in fields and name in fields[section]:
            return section, name
    elif normalized in _unique_field_sections():
        return _unique_field_sections()[normalized], normalized
    candidates = _all_paths() + list(_unique_field_sections())
    close = difflib.get_close_matches(normalized, candidates, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; run `ember train --print-config` to list settings"
    raise EmberError(f"unknown setting '{key}' in {source}{hint}")


def _is_optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return hint


def coerce(value: Any, hint, where: str) -> Any:
    """Turn a YAML/CLI value into the field's type, or say in one line why it cannot be."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if _is_optional(hint):
            return None
        raise EmberError(f"{where} cannot be empty; give a value")
    base = _base_type(hint)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            text = str(value).strip().replace("_", "")
            # 1e6 token budgets are written with exponents.
            number = float(text) if any(c in text for c in "eE.") else int(text)
            if isinstance(number, float):
                if not number.is_integer():
                    raise ValueError
                number = int(number)
            return number
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if typing.get_origin(base) is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            # "0.5 a 0.5 b" (one shell word, as the seed scripts pass --data-path) is four items.
            return [word for item in items for word in str(item).split()]
    except (TypeError, ValueError):
        pass
    name = getattr(base, "__name__", str(base))
    raise EmberError(f"{where} = {value!r} is not a valid {name}")


def set_value(config: Config, key: str, value: Any, source: str) -> None:
    section, name = resolve_path(key, source)
    hint = _section_fields()[section][name]
    setattr(getattr(config, section), name, coerce(value, hint, f"{section}.{name} (from {source})"))


def apply_mapping(config: Config, values: dict[str, Any], source: str) -> None:
    """Apply a YAML-shaped mapping: sections of settings, or settings whose name is unique."""
    if not isinstance(values, dict):
        raise EmberError(f"{source} must be a mapping of sections (model:, data:, train:, ...)")
    for key, value in values.items():
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise EmberError(f"section '{key}' in {source} must be a mapping of settings")
            for name, item in value.items():
                set_value(config, f"{key}.{name}", item, source)
        else:
            set_value(config, str(key), value, source)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise EmberError(f"config file {path} not found; check --config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise EmberError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return values or {}


def apply_override(config: Config, text: str) -> None:
    """One `section.key=value` override; the value is read as YAML (lists, numbers, booleans)."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise EmberError(f"override '{text}' must look like section.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    set_value(config, key, value, f"override '{text}'")


def to_yaml(config: Config) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- Megatron-style flags


@dataclass(frozen=True)
class Flag:
    """A command-line flag that sets one config field; `const` makes it a switch."""

    names: tuple[str, ...]
    path: str
    help: str = ""
    const: Any = None
    nargs: str | None = None


def _flags() -> list[Flag]:
    m, d, t, o, p, c, lg = "model.", "data.", "train.", "optim.", "parallel.", "checkpoint.", "logging."
    return [
        # model
        Flag(("--model",), m + "name", "registry name, e.g. tiny-llama, llama2-7b (ember models list)"),
        Flag(("--num-layers",), m + "num_layers"),
        Flag(("--hidden-size",), m + "hidden_size"),
        Flag(("--ffn-hidden-size",), m + "ffn_hidden_size"),
        Flag(("--num-attention-heads",), m + "num_attention_heads"),
        Flag(("--group-query-attention",), m + "group_query_attention", const=True),
        Flag(("--num-query-groups",), m + "num_query_groups"),
        Flag(("--kv-channels",), m + "kv_channels"),
        Flag(("--position-embedding-type",), m + "position_embedding_type", "rope, learned_absolute, alibi"),
        Flag(("--normalization",), m + "normalization", "RMSNorm or LayerNorm"),
        Flag(("--norm-epsilon", "--layernorm-epsilon"), m + "norm_epsilon"),
        Flag(("--swiglu",), m + "swiglu", const=True),
        Flag(("--untie-embeddings-and-output-weights",), m + "untie_embeddings_and_output_weights", const=True),
        Flag(("--disable-bias-linear",), m + "disable_bias_linear", const=True),
        Flag(("--add-qkv-bias",), m + "add_qkv_bias", const=True),
        Flag(("--qk-layernorm",), m + "qk_layernorm", const=True),
        Flag(("--max-position-embeddings",), m + "max_position_embeddings"),
        Flag(("--rotary-base",), m + "rotary_base"),
        Flag(("--vocab-size",), m + "vocab_size"),
        Flag(("--make-vocab-size-divisible-by",), m + "make_vocab_size_divisible_by"),
        Flag(("--num-experts",), m + "num_experts"),
        Flag(("--moe-router-topk",), m + "moe_router_topk"),
        Flag(("--moe-ffn-hidden-size",), m + "moe_ffn_hidden_size"),
        Flag(("--moe-aux-loss-coeff",), m + "moe_aux_loss_coeff"),
        Flag(("--init-method-std",), m + "init_method_std"),
        # data
        Flag(("--data-path", "--train_dataset_dir", "--train-dataset-dir"), d + "data_path",
             "prefixes, optionally weighted: '0.5 PATH1 0.5 PATH2'", nargs="+"),
        Flag(("--split",), d + "split", "train,valid,test weights, e.g. 969,30,1"),
        Flag(("--train-data-path",), d + "train_data_path", nargs="+"),
        Flag(("--valid-data-path",), d + "valid_data_path", nargs="+"),
        Flag(("--test-data-path",), d + "test_data_path", nargs="+"),
        Flag(("--data-cache-path",), d + "data_cache_path"),
        Flag(("--no-shared-storage",), d + "shared_storage", "every node builds its own data cache", const=False),
        Flag(("--seq-length",), d + "seq_length"),
        Flag(("--tokenizer-type",), d + "tokenizer_type"),
        Flag(("--tokenizer-name-or-path",), d + "tokenizer_name_or_path"),
        Flag(("--tokenizer-model",), d + "tokenizer_model"),
        Flag(("--vocab-file",), d + "vocab_file"),
        Flag(("--merge-file",), d + "merge_file"),
        Flag(("--num-workers",), d + "num_workers"),
        # training
        Flag(("--micro-batch-size",), t + "micro_batch_size"),
        Flag(("--global-batch-size",), t + "global_batch_size"),
        Flag(("--train-iters",), t + "train_iters"),
        Flag(("--train-tokens",), t + "train_tokens"),
        Flag(("--train-epochs", "--epochs"), t + "train_epochs"),
        Flag(("--lr",), t + "lr"),
        Flag(("--min-lr",), t + "min_lr"),
        Flag(("--lr-decay-style",), t + "lr_decay_style", "constant, linear, cosine, inverse-square-root, WSD"),
        Flag(("--lr-warmup-iters",), t + "lr_warmup_iters"),
        Flag(("--lr-warmup-fraction",), t + "lr_warmup_fraction"),
        Flag(("--lr-warmup-tokens", "--warmup-tokens"), t + "lr_warmup_tokens"),
        Flag(("--lr-warmup-init",), t + "lr_warmup_init"),
        Flag(("--lr-decay-iters",), t + "lr_decay_iters"),
        Flag(("--lr-decay-tokens",), t + "lr_decay_tokens"),
        Flag(("--lr-wsd-decay-iters",), t + "lr_wsd_decay_iters"),
        Flag(("--lr-wsd-decay-style",), t + "lr_wsd_decay_style", "linear, cosine, exponential, minus_sqrt"),
        Flag(("--eval-interval",), t + "eval_interval"),
        Flag(("--eval-iters",), t + "eval_iters"),
        Flag(("--seed",), t + "seed"),
        Flag(("--bf16",), t + "precision", "bfloat16 autocast", const="bf16"),
        Flag(("--fp16",), t + "precision", "float16 autocast with loss scaling", const="fp16"),
        Flag(("--loss-scale",), t + "loss_scale"),
        Flag(("--initial-loss-scale",), t + "initial_loss_scale"),
        Flag(("--min-loss-scale",), t + "min_loss_scale"),
        Flag(("--loss-scale-window",), t + "loss_scale_window"),
        Flag(("--hysteresis",), t + "hysteresis", "fp16: overflows before the loss scale drops"),
        Flag(("--recompute-granularity",), t + "recompute_granularity", "full or selective"),
        Flag(("--recompute-method",), t + "recompute_method", "uniform or block (with full)"),
        Flag(("--recompute-num-layers",), t + "recompute_num_layers"),
        Flag(("--compile",), t + "compile", "torch.compile the transformer blocks", const=True),
        Flag(("--no-compile",), t + "compile", const=False),
        Flag(("--cpu-threads",), t + "cpu_threads", "torch threads when training on the CPU (default: the cores "
                                                    "not busy with other work at start)"),
        Flag(("--finetune",), t + "finetune", "load weights only: fresh optimizer, iteration 0", const=True),
        Flag(("--max-consecutive-skips",), t + "max_consecutive_skips"),
        Flag(("--exit-interval",), t + "exit_interval", "save and stop after an iteration divisible by this"),
        # optimizer
        Flag(("--optimizer",), o + "optimizer"),
        Flag(("--weight-decay",), o + "weight_decay"),
        Flag(("--adam-beta1",), o + "adam_beta1"),
        Flag(("--adam-beta2",), o + "adam_beta2"),
        Flag(("--adam-eps",), o + "adam_eps"),
        Flag(("--clip-grad",), o + "clip_grad"),
        # parallel
        Flag(("--use-distributed-optimizer",), p + "dp_mode", "shard optimizer state (ZeRO-1)", const="zero1"),
        Flag(("--use-torch-fsdp2", "--fsdp"), p + "dp_mode", "shard parameters too (ZeRO-3)", const="fsdp"),
        Flag(("--dp-replicate",), p + "dp_replicate"),
        Flag(("--tensor-model-parallel-size",), p + "tensor_model_parallel_size"),
        Flag(("--pipeline-model-parallel-size",), p + "pipeline_model_parallel_size"),
        Flag(("--context-parallel-size",), p + "context_parallel_size"),
        Flag(("--expert-model-parallel-size",), p + "expert_model_parallel_size"),
        Flag(("--sequence-parallel",), p + "sequence_parallel", const=True),
        Flag(("--pipeline-schedule",), p + "pipeline_schedule", "1f1b (default), interleaved_1f1b or gpipe"),
        Flag(("--num-layers-per-virtual-pipeline-stage",), p + "num_layers_per_virtual_pipeline_stage",
             "interleaved 1F1B: layers per virtual stage"),
        Flag(("--decoder-first-pipeline-num-layers",), p + "decoder_first_pipeline_num_layers"),
        Flag(("--decoder-last-pipeline-num-layers",), p + "decoder_last_pipeline_num_layers"),
        Flag(("--overlap-grad-reduce",), p + "overlap_grad_reduce", const=True),
        Flag(("--overlap-param-gather",), p + "overlap_param_gather", const=True),
        Flag(("--distributed-backend",), p + "backend"),
        # checkpoints
        Flag(("--save",), c + "save"),
        Flag(("--load", "--load_checkpoint"), c + "load"),
        Flag(("--save-interval",), c + "save_interval"),
        Flag(("--keep-last",), c + "keep_last", "keep only the newest N checkpoints"),
        Flag(("--async-save",), c + "async_save", const=True),
        Flag(("--no-save-optim",), c + "save_optim", const=False),
        Flag(("--no-load-optim",), c + "load_optim", const=False),
        Flag(("--no-load-rng",), c + "load_rng", const=False),
        # logging
        Flag(("--log-interval",), lg + "log_interval"),
        Flag(("--output-dir", "--output_dir"), lg + "output_dir"),
        Flag(("--tensorboard-dir",), lg + "tensorboard_dir"),
        Flag(("--no-tensorboard",), lg + "tensorboard", const=False),
        Flag(("--peak-tflops",), lg + "peak_tflops"),
    ]


FLAGS = _flags()
# MindFormers' launcher flags with no ember setting of their own.
_RUN_MODES = ("train", "finetune", "predict")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --config, every Megatron-style flag and the dotted overrides to a parser."""
    parser.add_argument("--config", help="YAML file with model:, data:, train:, ... sections")
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="settings applied last, e.g. train.lr=1e-4")
    parser.add_argument("--run_mode", "--run-mode", dest="run_mode", choices=_RUN_MODES,
                        default=argparse.SUPPRESS,
                        help="MindFormers style: finetune is --finetune; predict generates from the checkpoint")
    parser.add_argument("--use_parallel", "--use-parallel", dest="use_parallel", default=argparse.SUPPRESS,
                        help="accepted for MindFormers scripts; the launcher decides the processes")
    group = parser.add_argument_group("settings (Megatron / ModelLink names)")
    for flag in FLAGS:
        dest = "cfg:" + flag.path + ":" + flag.names[0]
        if flag.const is not None:
            group.add_argument(*flag.names, dest=dest, action="store_const", const=flag.const,
                               default=argparse.SUPPRESS, help=flag.help or None)
        else:
            group.add_argument(*flag.names, dest=dest, nargs=flag.nargs, default=argparse.SUPPRESS,
                               metavar=flag.path.split(".")[1].upper(), help=flag.help or None)


def config_from_args(args: argparse.Namespace) -> Config:
    """defaults < --config YAML < flags < overrides (in that order)."""
    from ember import mindformers, tiny

    config = Config()
    mindformers_values = None
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        if mindformers.is_mindformers_config(values):  # a MindFormers run config (model_config, ...)
            mindformers.mindformers_to_ember(config, values, f"config file {args.config}")
            mindformers_values = values
        else:
            apply_mapping(config, values, f"config file {args.config}")
    # argparse keeps the order of the namespace, not of the command line; flags never conflict
    # except --bf16/--fp16, which validation reports.
    chosen: dict[str, list[str]] = {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            _, path, name = dest.split(":", 2)
            chosen.setdefault(path, []).append(name)
            set_value(config, path, value, name)
    precision_flags = chosen.get("train.precision", [])
    if len(precision_flags) > 1:
        raise EmberError(f"{' and '.join(precision_flags)} both given; choose one precision")
    if getattr(args, "run_mode", None) == "finetune":
        config.train.finetune = True
    for text in getattr(args, "overrides", None) or []:
        apply_override(config, text)
    if mindformers_values is not None:
        mindformers.finish(config, mindformers_values, args)
    if tiny.enabled():  # EMBER_TINY=1: the same run as a tiny model on this CPU
        tiny.apply_tiny(config)
    return config


# --------------------------------------------------------------------------- validation

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")
PRECISIONS = ("fp32", "bf16", "fp16")
DP_MODES = ("replicate", "zero1", "fsdp")


def _positive(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise EmberError(f"{name} must be a positive number, got {value}")


def data_parallel_size(config: Config, world_size: int) -> int:
    return data_parallel_size_of(config.parallel, world_size)


def validate(config: Config, world_size: int = 1, check_paths: bool = True) -> Config:
    """Check everything that can be checked before processes start.

    Raises `EmberError` with one line for the first problem found. Returns a resolved copy (the
    argument is left as given): `global_batch_size` and `train_iters` filled in, `eval_iters` 0
    when there is no validation data.
    """
    config = copy.deepcopy(config)
    t, d, o, p, c, lg = config.train, config.data, config.optim, config.parallel, config.checkpoint, config.logging
    _check_choice(t.precision, PRECISIONS, "train.precision")
    _check_choice(t.lr_decay_style, LR_DECAY_STYLES, "train.lr_decay_style (--lr-decay-style)")
    _check_choice(p.dp_mode, DP_MODES, "parallel.dp_mode")
    if o.optimizer.lower() not in ("adam", "adamw"):
        raise EmberError(f"optimizer '{o.optimizer}' is not supported; use adamw")
    _validate_parallel(p, world_size)
    dp = data_parallel_size(config, world_size)
    _positive(t.micro_batch_size, "train.micro_batch_size (--micro-batch-size)")
    _positive(d.seq_length, "data.seq_length (--seq-length)")
    if t.global_batch_size is None:
        t.global_batch_size = t.micro_batch_size * dp
    _positive(t.global_batch_size, "train.global_batch_size (--global-batch-size)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise EmberError(
            f"global batch size {t.global_batch_size} is not divisible by micro batch size "
            f"{t.micro_batch_size} x data-parallel size {dp} = {t.micro_batch_size * dp}; "
            f"change --global-batch-size or --micro-batch-size")
    _validate_pipeline(p, t.global_batch_size // (t.micro_batch_size * dp))
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


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise EmberError(f"{name} = {value!r} is not one of {', '.join(choices)}")


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


def _validate_parallel(p: ParallelConfig, world_size: int) -> None:
    """Checks that need no model; the model's own (heads, layers, experts vs the degrees) are in
    `ember.parallel.mesh.ParallelDims.check_model`."""
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "context_parallel_size", "expert_model_parallel_size"):
        _positive(getattr(p, name), f"parallel.{name} (--{name.replace('_', '-')})")
    _positive(p.dp_replicate, "parallel.dp_replicate (--dp-replicate)")
    dp = data_parallel_size_of(p, world_size)
    if p.dp_mode != "replicate" and dp % p.dp_replicate:
        raise EmberError(f"--dp-replicate {p.dp_replicate} does not divide the data-parallel size {dp}")
    ep, dp_cp = p.expert_model_parallel_size, dp * p.context_parallel_size
    if dp_cp % ep:
        raise EmberError(f"--expert-model-parallel-size {ep} must divide data-parallel x context-parallel size "
                         f"{dp_cp} (experts are sharded over data-parallel ranks); change the sizes or the "
                         f"process count")
    if p.pipeline_schedule is not None:
        p.pipeline_schedule = p.pipeline_schedule.lower().replace("-", "_")
        _check_choice(p.pipeline_schedule, PIPELINE_SCHEDULES, "parallel.pipeline_schedule (--pipeline-schedule)")
    _positive(p.num_layers_per_virtual_pipeline_stage, "--num-layers-per-virtual-pipeline-stage", allow_none=True)
    pipeline_only = {"--num-layers-per-virtual-pipeline-stage": p.num_layers_per_virtual_pipeline_stage,
                     "--decoder-first-pipeline-num-layers": p.decoder_first_pipeline_num_layers,
                     "--decoder-last-pipeline-num-layers": p.decoder_last_pipeline_num_layers}
    for flag, value in pipeline_only.items():
        if value is not None and p.pipeline_model_parallel_size == 1:
            raise EmberError(f"{flag} needs pipeline parallelism; set --pipeline-model-parallel-size > 1 or drop it")
        if value is not None and value < 0:
            raise EmberError(f"{flag} must be >= 0, got {value}")


def data_parallel_size_of(p: ParallelConfig, world_size: int) -> int:
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise EmberError(
            f"{world_size} processes do not divide into tensor x pipeline x context parallel = "
            f"{model_parallel}; change the process count or the parallel sizes")
    return world_size // model_parallel


def pipeline_schedule_name(p: ParallelConfig) -> str:
    """The schedule a pipeline-parallel run uses: as given, else Megatron's choice (1F1B,
    interleaved when virtual stages are set)."""
    if p.pipeline_schedule is not None:
        return p.pipeline_schedule
    return "interleaved_1f1b" if p.num_layers_per_virtual_pipeline_stage else "1f1b"


def _validate_pipeline(p: ParallelConfig, micro_batches: int) -> None:
    pp = p.pipeline_model_parallel_size
    if pp == 1:
        return
    name = pipeline_schedule_name(p)
    if name == "interleaved_1f1b" and not p.num_layers_per_virtual_pipeline_stage:
        raise EmberError("--pipeline-schedule interleaved_1f1b needs --num-layers-per-virtual-pipeline-stage")
    if name != "interleaved_1f1b" and p.num_layers_per_virtual_pipeline_stage:
        raise EmberError(f"--num-layers-per-virtual-pipeline-stage runs the interleaved_1f1b schedule, not {name}")
    if name == "1f1b" and micro_batches < pp:
        raise EmberError(f"1F1B needs at least as many micro-batches per step ({micro_batches} = global batch / "
                         f"(micro batch x data-parallel size)) as pipeline stages ({pp}); raise "
                         f"--global-batch-size or lower --micro-batch-size")


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
    if t.finetune and not c.load:
        raise EmberError("--finetune needs --load (the converted or trained checkpoint to start from)")
    if c.load and not os.path.exists(c.load) and c.load != c.save:
        raise EmberError(f"--load {c.load} does not exist; check the path (or convert the model first)")


def _validate_data(config: Config, check_paths: bool) -> None:
    from ember.data.blending import parse_data_path, parse_split

    d, t = config.data, config.train
    if not (d.data_path or d.train_data_path):
        raise EmberError("no training data: pass --data-path PREFIX (as `ember preprocess` printed it) "
                         "or --train-data-path PREFIX")
    if d.data_path and (d.train_data_path or d.valid_data_path or d.test_data_path):
        raise EmberError("give --data-path or --train-data-path/--valid-data-path/--test-data-path, not both")
    if d.data_path:
        fractions = parse_split(d.split)
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
    from ember.data.indexed import dataset_exists

    if dataset_exists(prefix):
        return "pretrain"
    if dataset_exists(f"{prefix}_packed_input_ids_document"):
        return "finetune"
    if os.path.isfile(prefix) and prefix.endswith((".bin", ".idx")):
        raise EmberError(f"{flag} {prefix}: give the prefix without .bin/.idx")
    raise EmberError(f"{flag}: dataset {prefix} not found (no {prefix}.bin/.idx); run `ember preprocess` "
                     f"or fix the path")

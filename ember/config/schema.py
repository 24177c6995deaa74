"""The one training config: typed sections filled from defaults < YAML < flags < dotted overrides.

    ember train --config run.yaml --micro-batch-size 2 --lr 3e-4 train.train_iters=100

The YAML file has one mapping per section (`model`, `data`, `train`, `optim`, `parallel`,
`checkpoint`, `logging`); a key whose name is unique across sections may also be written at the top
level or without its section in an override (`lr=1e-4`). Unknown keys and bad values raise
`EmberError` with one line saying which setting, where it came from and how to fix it.

Nothing here reads anything but the values it is given (and `load_yaml`'s file): the other formats
(Megatron flags, MindFormers YAML, tiny mode) translate into this schema in `ember.compat`.
"""

from __future__ import annotations

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
    moe_expert_capacity_factor: float | None = None
    moe_token_drop_policy: str | None = None  # probs | position
    moe_z_loss_coeff: float | None = None
    init_method_std: float | None = None
    # --- Megatron drop-in flags (issue 16, H2) ---
    # Dropout probabilities. None: Megatron's 0.1 when the architecture comes from Megatron flags
    # alone (no --model: the upstream scripts' case), else 0 (the registry's published models).
    attention_dropout: float | None = None
    hidden_dropout: float | None = None
    # The vocabulary exactly (MindSpeed --padded-vocab-size; no further padding), or PAI's tokens
    # added to the tokenizer's before padding (--extra-vocab-size).
    padded_vocab_size: int | None = None
    extra_vocab_size: int | None = None
    embedding_multiplier_scale: float | None = None  # Grok-1: token embeddings times this
    output_multiplier_scale: float | None = None  # Grok-1: logits times this
    post_norm: bool | None = None  # ModelLink: a norm on each branch output (Grok-1's sandwich)
    embed_layernorm: bool | None = None  # PAI Bloom: LayerNorm after the token embedding
    # MoE router input jitter: Megatron's --moe-input-jitter-eps; ModelLink's --input-jitter is a
    # store_false switch (given: jitter off), kept as given here.
    moe_input_jitter_eps: float | None = None
    input_jitter: bool | None = None
    moe_router_load_balancing_type: str | None = None  # aux_loss | none
    # --- MindFormers drop-in (issue 16, H3) ---
    # Position interpolation (MindFormers extend_method PI, Megatron's
    # --rotary-seq-len-interpolation-factor): RoPE positions divided by this factor.
    rotary_seq_len_interpolation_factor: float | None = None
    # --- mixed dense/MoE layers (issue 16, H6) ---
    # Megatron's --moe-layer-freq: an int N (every N-th layer MoE) or a list pattern such as
    # "([0]*1+[1]*3)" (1 MoE, 0 dense per layer); MindSpeed's --first-k-dense-replace: K first layers dense.
    moe_layer_freq: str | None = None
    first_k_dense_replace: int | None = None


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
    # packed documents (H1, ember/data/documents.py): Megatron's flags, and how fine-tuning
    # examples fill samples: "packed" (each example isolated) or "padded" (one per sample);
    # unset: packed with --reset-position-ids/--reset-attention-mask (MindSpeed), else padded (PAI)
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    finetune_packing: str | None = None


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
    # Continue the run whose checkpoint --save holds (only if it is this run: same model and data).
    # False (--no-resume, MindFormers' resume_training: False): never continue it, and refuse to
    # write into a --save that holds one unless `overwrite`.
    resume: bool = True
    # Start a new run in a --save that holds another run's checkpoints: they are removed.
    overwrite: bool = False


@dataclass
class LoggingConfig:
    log_interval: int = 100
    # Where logs/ and tensorboard/ go: --save when this is unset.
    output_dir: str | None = None
    tensorboard: bool = True
    tensorboard_dir: str | None = None
    # Peak TFLOP/s of one device for MFU; None: looked up from the device name.
    peak_tflops: float | None = None
    # --- observability (issue 19): profiler, trackers, memory, console line ---
    # torch.profiler over the iterations after profile_step_start up to profile_step_end, on
    # profile_ranks (Megatron's flags, count and defaults); traces under <output dir>/profile/.
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[str] = field(default_factory=lambda: ["0"])  # rank numbers, as the flag gives them
    # Weights & Biases (optional dependency): on when a project is given; offline unless WANDB_MODE says.
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None
    # CUDA only: record the allocator's history and dump a snapshot (pickle) when a step runs out of memory.
    record_memory_history: bool = False
    memory_snapshot_path: str | None = None
    # "short" (readable in 100 columns) or "megatron" (the Megatron-LM line, for parsers).
    log_format: str = "short"


# --- LoRA fine-tuning (issue 17) ---
@dataclass
class LoRAConfig:
    """Low-rank adapters on frozen base weights (MindSpeed-LLM's --lora-* flags): on when
    target_modules names layers (linear_qkv linear_proj linear_fc1 linear_fc2, q_proj ... down_proj,
    or wq ... w3). `adapter` (--lora-load) starts from a PEFT adapter folder instead of new adapters."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    adapter: str | None = None
    # with --bf16: the frozen linear weights of the blocks kept in bf16 (autocast rounds them so anyway)
    base_bf16: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # LoRA fine-tuning (issue 17)

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


# Names users bring from elsewhere (Megatron's short forms, other tools) -> the setting they mean.
_ALIASES = {
    "tp": "parallel.tensor_model_parallel_size", "pp": "parallel.pipeline_model_parallel_size",
    "cp": "parallel.context_parallel_size", "ep": "parallel.expert_model_parallel_size",
    "iters": "train.train_iters", "steps": "train.train_iters", "max_steps": "train.train_iters",
    "learning_rate": "train.lr", "warmup": "train.lr_warmup_iters", "warmup_steps": "train.lr_warmup_iters",
    "batch_size": "train.micro_batch_size", "layernorm_epsilon": "model.norm_epsilon",
    "seq_len": "data.seq_length", "max_seq_len": "data.seq_length", "epochs": "train.train_epochs",
}


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
    close = suggest_settings(normalized)
    if close:
        hint = "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        hint = "; run `ember train --print-config` to list settings"
    raise EmberError(f"unknown setting '{key}' in {source}{hint}")


def suggest_settings(key: str, limit: int = 3) -> list[str]:
    """The settings an unknown `key` ("section.name" or "name") most likely meant, best first.

    In order: the same name in another section (`train.seq_length` -> `data.seq_length`); a known
    alias (`tp`, `iters`); settings whose name starts with, or holds as whole words, what was typed
    (`lr_decay` -> `lr_decay_style`, `lr_decay_iters` ...); then spelling (`lr_decay_stlye`)."""
    fields = _section_fields()
    section, _, name = key.rpartition(".")
    if section not in fields:
        section = ""
    everywhere = [(s, n) for s, names in fields.items() for n in names]
    scope = [(s, n) for s, n in everywhere if not section or s == section]
    found: list[tuple[str, str]] = [(s, n) for s, n in everywhere if n == name]
    if name in _ALIASES:
        found.append(tuple(_ALIASES[name].split(".")))
    words = [w for w in name.split("_") if w]
    if words:
        found += [(s, n) for s, n in scope if n.startswith(name) or all(w in n.split("_") for w in words)]
    for match in difflib.get_close_matches(name, [n for _, n in scope], n=limit, cutoff=0.6):
        found += [(s, n) for s, n in scope if n == match]
    # written as the user wrote it: with its section, or without where the name is unique
    spelled = [f"{s}.{n}" if section or n not in _unique_field_sections() else n for s, n in found]
    return list(dict.fromkeys(spelled))[:limit]


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

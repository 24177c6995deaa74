"""Megatron-LM / ModelLink command-line flags, translated into ember's config.

Every flag sets one config field (`Flag.path`); `add_config_arguments` puts them, `--config` and the
dotted overrides on a parser, and `apply_flags` writes what the user gave into a `Config`
(`take_overrides_from_path_lists` first gives back the overrides a `--data-path` list swallowed). Which
formats a command reads, and in which order, is `ember.compat.config_from_args`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ember.config import SECTIONS, Config, resolve_path, set_value
from ember.errors import EmberError

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
        Flag(("--model",), m + "name", "registry name, e.g. tiny-llama, llama2-7b (`ember models` lists them)"),
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
        Flag(("--moe-expert-capacity-factor",), m + "moe_expert_capacity_factor",
             "tokens per expert past capacity_factor * tokens * topk / experts are dropped; unset: dropless"),
        Flag(("--moe-token-drop-policy",), m + "moe_token_drop_policy",
             "over capacity, drop the lowest router probabilities (probs, default) or later tokens (position)"),
        Flag(("--moe-z-loss-coeff",), m + "moe_z_loss_coeff", "router z-loss coefficient"),
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
        Flag(("--no-resume",), c + "resume", "do not continue the run whose checkpoint --save holds "
                                            "(a --save that holds one then needs --overwrite)", const=False),
        Flag(("--overwrite",), c + "overwrite", "start a new run in a --save that holds another run's "
                                               "checkpoints: they are removed", const=True),
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


def take_overrides_from_path_lists(args: argparse.Namespace) -> list[str]:
    """The dotted overrides that a list flag swallowed, removed from it (in place) and returned.

    `--data-path P train.lr=1e-4` gives argparse's `nargs="+"` both words; a word holding '=' whose
    left side is a setting is an override, not a dataset (a path with '=' in it stays a path)."""
    taken: list[str] = []
    for dest, value in vars(args).items():
        if not dest.startswith("cfg:") or not isinstance(value, list):
            continue
        kept = []
        for word in value:
            if _is_override(str(word)):
                taken.append(str(word))
            else:
                kept.append(word)
        setattr(args, dest, kept)
    return taken


def _is_override(word: str) -> bool:
    key, sep, _ = word.partition("=")
    if not sep or not key.strip() or "/" in key:
        return False
    if key.partition(".")[0] in SECTIONS and "." in key:
        return True  # `train.lr_decay_stlye=...`: a misspelt override, reported as one
    try:
        resolve_path(key, word)
    except EmberError:
        return False
    return True


def apply_flags(config: Config, args: argparse.Namespace) -> Config:
    """Write the Megatron-style flags present in `args` into `config` (in place; returned)."""
    # argparse keeps the order of the namespace, not of the command line; flags never conflict
    # except --bf16/--fp16, reported here.
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
    return config

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
        Flag(("--rotary-seq-len-interpolation-factor",), m + "rotary_seq_len_interpolation_factor",
             "position interpolation: RoPE positions / factor (MindFormers extend_method PI)"),  # H3
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
        Flag(("--moe-layer-freq",), m + "moe_layer_freq",
             "which layers are MoE: N (every N-th, from layer 0) or a 0/1 list per layer, e.g. '([0]*1+[1]*3)'"),
        Flag(("--first-k-dense-replace",), m + "first_k_dense_replace", "the first K layers dense (MindSpeed)"),
        Flag(("--init-method-std",), m + "init_method_std"),
        # data
        Flag(("--data-path", "--train_dataset_dir", "--train-dataset-dir", "--train_dataset"), d + "data_path",
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
        # packed documents (H1): each document attends only to itself
        Flag(("--reset-position-ids",), d + "reset_position_ids", "positions restart after each EOD", const=True),
        Flag(("--reset-attention-mask",), d + "reset_attention_mask",
             "attention stays inside each EOD-ended document", const=True),
        Flag(("--eod-mask-loss",), d + "eod_mask_loss", "no loss on the prediction made at an EOD", const=True),
        Flag(("--finetune-packing",), d + "finetune_packing",
             "fine-tuning samples: packed (examples isolated) or padded (one per sample); default: packed "
             "with --reset-position-ids/--reset-attention-mask, else padded"),
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
        Flag(("--keep-last",), c + "keep_last", "keep only the newest N checkpoints (bare, as PAI passes it: "
                                                "keep all; see the notice)", nargs="?"),
        Flag(("--async-save",), c + "async_save", const=True),
        Flag(("--no-save-optim",), c + "save_optim", const=False),
        Flag(("--no-load-optim",), c + "load_optim", const=False),
        Flag(("--no-load-rng",), c + "load_rng", const=False),
        Flag(("--no-resume",), c + "resume", "do not continue the run whose checkpoint --save holds "
                                            "(a --save that holds one then needs --overwrite)", const=False),
        Flag(("--overwrite",), c + "overwrite", "start a new run in a --save that holds another run's "
                                               "checkpoints: they are removed", const=True),
        # LoRA fine-tuning (issue 17): MindSpeed-LLM's flags
        Flag(("--lora-r",), "lora.r", "adapter rank (default 16)"),
        Flag(("--lora-alpha",), "lora.alpha", "the update is scaled by alpha / r (default 32)"),
        Flag(("--lora-dropout",), "lora.dropout", "dropout on the adapters' input (default 0)"),
        Flag(("--lora-target-modules",), "lora.target_modules", "layers to adapt (turns LoRA on): linear_qkv "
             "linear_proj linear_fc1 linear_fc2, q_proj ... down_proj, or wq wk wv wo w1 w2 w3", nargs="+"),
        Flag(("--lora-load",), "lora.adapter", "start from this PEFT adapter folder"),
        Flag(("--lora-base-bf16",), "lora.base_bf16", "with --bf16: keep the frozen linear weights in bf16 "
             "(half their memory, same results)", const=True),
        # logging
        Flag(("--log-interval",), lg + "log_interval"),
        Flag(("--output-dir", "--output_dir"), lg + "output_dir"),
        Flag(("--tensorboard-dir",), lg + "tensorboard_dir"),
        Flag(("--no-tensorboard",), lg + "tensorboard", const=False),
        Flag(("--peak-tflops",), lg + "peak_tflops"),
        # observability (issue 19): profiler, trackers, memory, console line
        Flag(("--profile",), lg + "profile", "torch.profiler traces of --profile-step-start..end under "
                                             "<save>/profile/, and a summary table at the end", const=True),
        Flag(("--profile-step-start",), lg + "profile_step_start"),
        Flag(("--profile-step-end",), lg + "profile_step_end"),
        Flag(("--profile-ranks",), lg + "profile_ranks", "ranks to profile (default 0)", nargs="+"),
        Flag(("--wandb-project",), lg + "wandb_project", "log to Weights & Biases (offline unless WANDB_MODE)"),
        Flag(("--wandb-exp-name",), lg + "wandb_exp_name"),
        Flag(("--wandb-save-dir",), lg + "wandb_save_dir"),
        Flag(("--record-memory-history",), lg + "record_memory_history",
             "CUDA: dump a memory snapshot (torch.cuda.memory._dump_snapshot) on out-of-memory", const=True),
        Flag(("--memory-snapshot-on-oom",), lg + "record_memory_history", "same as --record-memory-history",
             const=True),
        Flag(("--memory-snapshot-path",), lg + "memory_snapshot_path"),
        Flag(("--log-format",), lg + "log_format", "short (default, 100 columns) or megatron"),
    ]


# --- Megatron drop-in (issue 16, H2): the upstream scripts' flags, each honoured or answered ---
def _dropin_flags() -> list[Flag]:
    m, d, t = "model.", "data.", "train."
    return [
        Flag(("--attention-dropout",), m + "attention_dropout",
             "dropout on attention probabilities (default: Megatron's 0.1 without --model, else 0)"),
        Flag(("--hidden-dropout",), m + "hidden_dropout",
             "dropout on the embeddings and on each branch output before its residual add (as --attention-dropout)"),
        Flag(("--padded-vocab-size",), m + "padded_vocab_size", "the vocabulary size exactly, not padded further"),
        Flag(("--extra-vocab-size",), m + "extra_vocab_size", "PAI: tokens added to the tokenizer's before padding"),
        Flag(("--embedding-multiplier-scale",), m + "embedding_multiplier_scale", "token embeddings times this"),
        Flag(("--output-multiplier-scale",), m + "output_multiplier_scale", "logits times this"),
        Flag(("--post-norm",), m + "post_norm", "a norm on each attention/MLP output before the residual add",
             const=True),
        Flag(("--embed-layernorm",), m + "embed_layernorm", "LayerNorm after the token embedding (Bloom)",
             const=True),
        Flag(("--use-rotary-position-embeddings",), m + "position_embedding_type", "= --position-embedding-type rope",
             const="rope"),
        Flag(("--moe-router-load-balancing-type",), m + "moe_router_load_balancing_type",
             "aux_loss (Switch/GShard loss, scaled by --moe-aux-loss-coeff) or none"),
        Flag(("--moe-input-jitter-eps",), m + "moe_input_jitter_eps", "router input times U(1-eps, 1+eps) in training"),
        Flag(("--input-jitter",), m + "input_jitter",
             "ModelLink's switch, a store_false: given, router input jitter is off", const=False),
        Flag(("--recompute-activations",), t + "recompute_granularity", "= --recompute-granularity selective",
             const="selective"),
        Flag(("--patch-tokenizer-type",), d + "tokenizer_type", "PAI's --tokenizer-type"),
        # PAI fine-tuning: its data flags name the splits' json files (tokenized once before training by
        # ember.data.raw_finetune) or, as ember's own flags, tokenized prefixes
        Flag(("--train-data",), d + "train_data_path", "PAI: = --train-data-path", nargs="+"),
        Flag(("--valid-data",), d + "valid_data_path", "PAI: = --valid-data-path", nargs="+"),
    ]


# Flags that choose something ember chooses by itself: accepted, and named in one notice line
# (`notice_line`) with what ember does instead. flag -> (values it takes, what ember does).
NOTICE_FLAGS: dict[str, tuple[int, str]] = {
    "--use-mcore-models": (0, "one model implementation"),
    "--transformer-impl": (1, "one model implementation"),
    "--spec": (2, "one model implementation, the architecture from the flags"),  # MODULE FUNCTION
    "--use-flash-attn": (0, "torch SDPA picks flash/memory-efficient attention"),
    "--no-masked-softmax-fusion": (0, "torch SDPA"),
    "--attention-softmax-in-fp32": (0, "torch SDPA's flash/memory-efficient kernels keep softmax in fp32"),
    "--use-fused-rmsnorm": (0, "torch.compile fuses norms on GPU"),
    "--use-fused-swiglu": (0, "torch.compile fuses SwiGLU on GPU"),
    "--use-fused-rotary-pos-emb": (0, "torch.compile fuses rotary on GPU"),
    "--no-rope-fusion": (0, "torch.compile decides"),
    "--no-bias-dropout-fusion": (0, "torch.compile decides"),
    "--no-bias-swiglu-fusion": (0, "torch.compile decides"),
    "--no-gradient-accumulation-fusion": (0, "gradients accumulate in the parameters' dtype"),
    "--gemm-gradient-accumulation-fusion": (0, "gradients accumulate in the parameters' dtype"),
    "--use-mc2": (0, "no Ascend MC2/CoC fused compute-communication"),
    "--use-ascend-coc": (0, "no Ascend MC2/CoC fused compute-communication"),
    "--reuse-fp32-param": (0, "fp32 parameters with bf16/fp16 autocast, no half copy to reuse"),
    "--moe-token-dispatcher-type": (1, "ember's all-to-all expert dispatch"),
    "--moe-permutation-async-comm": (0, "ember's all-to-all expert dispatch"),
    "--moe-grouped-gemm": (0, "one grouped GEMM per expert weight where the device has one"),
    "--moe-permute-fusion": (0, "ember's all-to-all expert dispatch"),
    "--context-parallel-algo": (1, "context parallelism all-gathers keys and values (Llama 3's), "
                                   "one algorithm for every --context-parallel-size"),
    "--DDP-impl": (1, "data parallelism is FSDP2 in every mode: replicated, --use-distributed-optimizer, fsdp"),
    "--ckpt-format": (1, "ember's sharded checkpoints; `ember convert --to megatron` writes Megatron's"),
    "--no-save-rng": (0, "the RNG state is always saved (KBs); --no-load-rng decides its use"),
    "--enable-hf2mg-convert": (0, "--load's format is recognised; a Hugging Face folder is refused "
                                  "with its `ember convert` command"),
    "--model-type-hf": (1, "the architecture from the flags and --load"),
    "--handler-name": (1, "a preprocessing flag (`ember preprocess`)"),
    "--workers": (1, "a preprocessing flag (`ember preprocess`)"),
    "--tensorboard-queue-size": (1, "TensorBoard is flushed at every log line"),
    "--log-timers-to-tensorboard": (0, "TensorBoard always has iteration time, validation perplexity and "
                                       "consumed samples"),
    "--log-batch-size-to-tensorboard": (0, "TensorBoard always has iteration time, validation perplexity and "
                                           "consumed samples"),
    "--log-validation-ppl-to-tensorboard": (0, "TensorBoard always has iteration time, validation perplexity and "
                                               "consumed samples"),
}
NOTICE_PREFIX = "ember: accepted, changing nothing (what ember does instead): "
# (--data-impl takes only mmap, ember's one format; see `apply_flags`.)
_DATA_IMPL = "--data-impl"


def add_dropin_arguments(group) -> None:
    """The notice flags, and --data-impl, on the settings group."""
    for name, (values, _) in NOTICE_FLAGS.items():
        if values == 0:
            group.add_argument(name, dest="notice:" + name, action="store_true", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(name, dest="notice:" + name, nargs=None if values == 1 else values,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    group.add_argument(_DATA_IMPL, dest="data_impl", default=argparse.SUPPRESS,
                       help="mmap (the only format; others are refused)")
    group.add_argument("--max-padding-length", dest="max_padding_length", type=int, default=argparse.SUPPRESS,
                       help="PAI fine-tuning: each example padded to this length, the samples' length "
                            "(overrides --seq-length)")


def notice_line(args: argparse.Namespace) -> str | None:
    """One line naming every notice flag given, with what ember does instead; None if none."""
    given = [dest.split(":", 1)[1] for dest in vars(args) if dest.startswith("notice:")]
    bare_keep_last = vars(args).get("cfg:checkpoint.keep_last:--keep-last", 0) is None
    if not given and not bare_keep_last:
        return None
    by_reason: dict[str, list[str]] = {}
    for name in given:
        by_reason.setdefault(NOTICE_FLAGS[name][1], []).append(name)
    if bare_keep_last:
        by_reason.setdefault("PAI's keep-the-last-incomplete-batch: ember never drops samples, a step "
                             "crossing an epoch's end continues into the next; all checkpoints kept", []
                             ).append("--keep-last")
    parts = [f"{' '.join(names)} ({reason})" for reason, names in by_reason.items()]
    return NOTICE_PREFIX + "; ".join(parts)


def _print_notice_once(args: argparse.Namespace) -> None:
    """The notice, once, from the process the user watches: `ember launch` (which resolves the
    configuration before starting ranks) or a single `ember train`; ranks (RANK set) stay quiet."""
    import os
    import sys

    line = notice_line(args)
    if line is None or getattr(args, "_notice_printed", False):
        return
    if os.environ.get("RANK") is None:
        print(line, file=sys.stderr, flush=True)
    args._notice_printed = True


def _apply_dropin(config: Config, args: argparse.Namespace) -> None:
    impl = getattr(args, "data_impl", None)
    if impl is not None and impl != "mmap":
        raise EmberError(f"--data-impl {impl}: ember reads only mmap indexed datasets (.bin/.idx); "
                         f"preprocess with `ember preprocess` (or Megatron's --dataset-impl mmap)")
    balancing = vars(args).get("cfg:model.moe_router_load_balancing_type:--moe-router-load-balancing-type")
    if isinstance(balancing, str) and balancing.lower() == "none":  # a value, not "unset", here
        config.model.moe_router_load_balancing_type = "none"
    if getattr(args, "max_padding_length", None) is not None:
        config.data.seq_length = args.max_padding_length
    _bloom_tokenizer_from_load(config)
    _megatron_dropout_defaults(config, args)
    _print_notice_once(args)


def _bloom_tokenizer_from_load(config: Config) -> None:
    """PAI's BloomTokenizerFromHF loads the tokenizer of --load (`from_pretrained(args.load)`), and only
    without one the hub's bloom-560m: here the tokenizer folder of the --load checkpoint (an ember weight
    folder's `tokenizer/`, or tokenizer files beside the weights), when no --tokenizer-name-or-path names one."""
    import os

    d, load = config.data, config.checkpoint.load
    if d.tokenizer_type != "BloomTokenizerFromHF" or d.tokenizer_name_or_path or not load:
        return
    for folder in (os.path.join(load, "tokenizer"), load):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            d.tokenizer_name_or_path = folder
            return


MEGATRON_DROPOUT = 0.1  # Megatron-LM's default --attention-dropout and --hidden-dropout


def _megatron_dropout_defaults(config: Config, args: argparse.Namespace) -> None:
    """A model described by Megatron flags alone (no --model: the way pretrain_gpt.py is run) trains
    with Megatron's dropout defaults, 0.1 each, unless the flags say otherwise. A registry model
    (--model, YAML) keeps 0, its published configuration's value."""
    described = any(dest.startswith("cfg:model.num_layers:") for dest in vars(args))
    if config.model.name is None and described:
        m = config.model
        if m.attention_dropout is None:
            m.attention_dropout = MEGATRON_DROPOUT
        if m.hidden_dropout is None:
            m.hidden_dropout = MEGATRON_DROPOUT


FLAGS = _flags() + _dropin_flags()
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
    add_dropin_arguments(group)  # Megatron drop-in (issue 16, H2)


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
    _apply_dropin(config, args)  # Megatron drop-in (issue 16, H2)
    return config

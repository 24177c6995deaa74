"""MindSpore Transformers (MindFormers) run configs, read as ember configs.

    ember launch --msrun "run_mindformer.py --config pretrain_llama2_7b.yaml \\
        --train_dataset_dir ./dataset/wiki_text_document --use_parallel True --run_mode train" 8
    ember train --config pretrain_llama2_7b.yaml --run_mode predict --predict_data "I love Beijing,"

A YAML file with `model.model_config`, `runner_config`, `parallel_config` ... is recognised as a
MindFormers config and translated field by field into ember's `Config` (the translation is
`mindformers_to_ember`; everything else in such a file — context, callbacks other than
checkpointing, profiling, processor types — configures MindSpore itself and has no ember meaning):

    model.model_config     LlamaConfig-style architecture: hidden_size, num_layers, num_heads,
                           n_kv_heads, vocab_size, intermediate_size or multiple_of +
                           ffn_dim_multiplier, rms_norm_eps, theta, seq_length, qkv_has_bias,
                           compute_dtype (-> bf16/fp16/fp32)
    runner_config          batch_size (micro-batch), epochs, sink_size (-> log interval),
                           gradient_accumulation_steps
    parallel_config        data_parallel, model_parallel (TP), pipeline_stage (PP),
                           context_parallel, expert_parallel, micro_batch_num, use_seq_parallel
    parallel               enable_parallel_optimizer (-> sharded data parallelism)
    recompute_config       recompute (full), select_recompute (selective)
    optimizer, lr_schedule AdamW betas/eps/weight_decay; Cosine/Linear/Constant WarmUpLR,
                           learning_rate, lr_end, warmup_ratio/warmup_steps, total_steps
    runner_wrapper         use_clip_grad, scale_sense (fp16 loss scaling)
    train_dataset          data_loader.dataset_dir or data_loader.config.data_path
    callbacks              CheckpointMonitor save_checkpoint_steps, keep_checkpoint_max
    output_dir, seed, load_checkpoint, resume_training, run_mode, use_parallel

`resume_training`: True continues the run in load_checkpoint (optimizer, step); False loads its
weights only and never continues the checkpoint under output_dir (ember's --no-resume: a rerun
then needs --overwrite or another output_dir); unset, the weights only, and a relaunch continues
its own run under output_dir as ember's runs do.

The global batch is MindFormers': batch_size x data_parallel x micro_batch_num (with pipeline
stages) or x gradient_accumulation_steps (without), x micro_batch_interleave_num. Checkpoints go
to `output_dir/checkpoint`, logs to `output_dir/`. `epochs` counts passes over the training data
(ember reads Megatron .bin/.idx datasets; a MindRecord path gets an error that says how to make
one). `--run_mode predict` (run by `ember.commands.predict`) generates text from the checkpoint
(`load_checkpoint`, else the one training wrote under `output_dir`) for `--predict_data`, with the
YAML's max_decode_length, do_sample, top_k, top_p and temperature.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ember.errors import EmberError

# Keys that only MindFormers files have at the top level (ember's own sections are model, data,
# train, optim, parallel, checkpoint, logging).
_MINDFORMERS_KEYS = ("runner_config", "parallel_config", "lr_schedule", "train_dataset", "runner_wrapper",
                     "recompute_config", "trainer", "context", "train_dataset_task")

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
           "fp32": "fp32"}
_SCHEDULES = {"CosineWithWarmUpLR": "cosine", "cosine": "cosine", "LinearWithWarmUpLR": "linear",
              "linear": "linear", "ConstantWarmUpLR": "constant", "constant": "constant",
              "CosineWithRestartsAndWarmUpLR": "cosine", "PolynomialWithWarmUpLR": "linear"}
_OPTIMIZERS = {"AdamW": 0.01, "FP32StateAdamWeightDecay": 0.0, "AdamWeightDecay": 0.0, "FusedAdamWeightDecay": 0.0}
# MindFormers model types whose architecture is the Llama one (RMSNorm, SwiGLU, RoPE, no biases
# unless qkv_has_bias), and the ember family each is.
_MODEL_TYPES = {"LlamaConfig": "llama", "Llama3Config": "llama", "Qwen2Config": "qwen2", "InternLM2Config": "llama"}


def is_mindformers_config(values: Any) -> bool:
    if not isinstance(values, dict):
        return False
    model = values.get("model")
    if isinstance(model, dict) and "model_config" in model:
        return True
    return any(key in values for key in _MINDFORMERS_KEYS)


def _section(values: dict, name: str, source: str) -> dict:
    section = values.get(name) or {}
    if not isinstance(section, dict):
        raise EmberError(f"{source}: '{name}' must be a mapping")
    return section


def _positive_int(value: Any, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise EmberError(f"{where} = {value!r} is not an integer") from None
    if number < 1:
        raise EmberError(f"{where} must be >= 1, got {number}")
    return number


def feed_forward_size(hidden_size: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """The SwiGLU block's hidden size as MindFormers' LlamaFeedForward computes it (its multiplier
    applies before the 2/3, with +0.01 so that Llama-3's 1.3 lands on Meta's 28672 for 70B)."""
    hidden = 4 * hidden_size
    if ffn_dim_multiplier:
        hidden = int((ffn_dim_multiplier + 0.01) * hidden)
    hidden = int(2 * hidden / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def registry_name(model_name: str | None) -> str | None:
    """MindFormers' `trainer.model_name` ('llama2_7b') as an ember registry name ('llama2-7b')."""
    if not model_name:
        return None
    from ember.models.registry import list_models

    candidate = str(model_name).strip().lower().replace("_", "-")
    return candidate if candidate in list_models() else None


# --------------------------------------------------------------------------- the translation


def _boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise EmberError(f"{where} = {value!r} is not True or False")


def _apply_model(config, values: dict, source: str) -> dict:
    """model.model_config -> ember's model/data/train settings; returns model_config."""
    model_config = _section(_section(values, "model", source), "model_config", source)
    kind = model_config.get("type", "LlamaConfig")
    if kind not in _MODEL_TYPES:
        raise EmberError(f"{source}: model.model_config.type {kind} is not supported; ember reads "
                         f"{', '.join(_MODEL_TYPES)} (or give ember's own model: section)")
    m = config.model
    m.name = registry_name(_section(values, "trainer", source).get("model_name"))
    m.normalization, m.swiglu, m.position_embedding_type = "RMSNorm", True, "rope"
    m.untie_embeddings_and_output_weights = not model_config.get("tie_word_embeddings", False)
    m.disable_bias_linear = True
    m.add_qkv_bias = bool(model_config.get("qkv_has_bias", _MODEL_TYPES[kind] == "qwen2")) or None
    simple = {"hidden_size": "hidden_size", "num_layers": "num_layers", "num_heads": "num_attention_heads",
              "rms_norm_eps": "norm_epsilon", "theta": "rotary_base", "vocab_size": "vocab_size"}
    for key, name in simple.items():
        if model_config.get(key) is not None:
            setattr(m, name, model_config[key])
    if model_config.get("n_kv_heads"):
        m.group_query_attention, m.num_query_groups = True, model_config["n_kv_heads"]
    if model_config.get("intermediate_size"):
        m.ffn_hidden_size = model_config["intermediate_size"]
    elif model_config.get("hidden_size"):
        m.ffn_hidden_size = feed_forward_size(int(model_config["hidden_size"]),
                                              int(model_config.get("multiple_of", 256)),
                                              model_config.get("ffn_dim_multiplier"))
    if model_config.get("vocab_size"):
        m.make_vocab_size_divisible_by = None  # MindFormers never pads the vocabulary
    if model_config.get("seq_length"):
        config.data.seq_length = int(model_config["seq_length"])
        m.max_position_embeddings = max(int(model_config["seq_length"]),
                                        int(model_config.get("max_position_embedding") or 0))
    dtype = str(model_config.get("compute_dtype", "float32"))
    if dtype not in _DTYPES:
        raise EmberError(f"{source}: compute_dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    config.train.precision = _DTYPES[dtype]
    return model_config


def _apply_parallel(config, values: dict, source: str) -> dict:
    parallel_config = _section(values, "parallel_config", source)
    p = config.parallel

    def degree(key: str) -> int:
        return _positive_int(parallel_config.get(key, 1), f"parallel_config.{key}")

    p.tensor_model_parallel_size = degree("model_parallel")
    p.pipeline_model_parallel_size = degree("pipeline_stage")
    p.context_parallel_size = degree("context_parallel")
    p.expert_model_parallel_size = degree("expert_parallel")
    # Megatron's rule: sequence parallelism is a tensor-parallel feature, off without TP.
    p.sequence_parallel = bool(parallel_config.get("use_seq_parallel", False)) and p.tensor_model_parallel_size > 1
    if _section(values, "parallel", source).get("enable_parallel_optimizer"):
        # MindSpore's optimizer parallelism shards weights, gradients and optimizer state over
        # the data-parallel ranks: FSDP (ZeRO-3) in ember's terms.
        p.dp_mode = "fsdp"
    return parallel_config


def _apply_batch(config, values: dict, parallel_config: dict, source: str) -> None:
    runner = _section(values, "runner_config", source)
    t = config.train
    t.micro_batch_size = _positive_int(runner.get("batch_size", 1), "runner_config.batch_size")
    if runner.get("epochs") is not None:
        t.train_epochs = _positive_int(runner["epochs"], "runner_config.epochs")
    if runner.get("sink_size"):
        config.logging.log_interval = _positive_int(runner["sink_size"], "runner_config.sink_size")
    t.global_batch_size = t.micro_batch_size * _batch_multiplier(values, parallel_config, config)


def _batch_multiplier(values: dict, parallel_config: dict, config) -> int:
    """global batch / micro batch, as MindFormers computes it (semi-auto parallel, full batch)."""
    runner = values.get("runner_config") or {}
    dp = _positive_int(parallel_config.get("data_parallel", 1), "parallel_config.data_parallel")
    if config.parallel.pipeline_model_parallel_size > 1:
        steps = _positive_int(parallel_config.get("micro_batch_num", 1), "parallel_config.micro_batch_num")
    else:
        steps = _positive_int(runner.get("gradient_accumulation_steps", 1), "runner_config.gradient_accumulation_steps")
    interleave = _positive_int(values.get("micro_batch_interleave_num", 1), "micro_batch_interleave_num")
    return dp * steps * interleave


def _apply_optimizer(config, values: dict, source: str) -> None:
    optimizer = _section(values, "optimizer", source)
    schedule = _section(values, "lr_schedule", source)
    o, t = config.optim, config.train
    kind = optimizer.get("type", "AdamW")
    if kind not in _OPTIMIZERS:
        raise EmberError(f"{source}: optimizer type {kind} is not supported; use one of {', '.join(_OPTIMIZERS)}")
    betas = optimizer.get("betas")
    if isinstance(betas, (list, tuple)) and len(betas) == 2:
        o.adam_beta1, o.adam_beta2 = float(betas[0]), float(betas[1])
    o.adam_beta1 = float(optimizer.get("beta1", o.adam_beta1))
    o.adam_beta2 = float(optimizer.get("beta2", o.adam_beta2))
    o.adam_eps = float(optimizer.get("eps", o.adam_eps))
    o.weight_decay = float(optimizer.get("weight_decay", _OPTIMIZERS[kind]))
    style = schedule.get("type", "CosineWithWarmUpLR")
    if style not in _SCHEDULES:
        raise EmberError(f"{source}: lr_schedule type {style} is not supported; use one of "
                         f"{', '.join(k for k in _SCHEDULES if k[0].isupper())}")
    t.lr_decay_style = _SCHEDULES[style]
    lr = schedule.get("learning_rate", optimizer.get("learning_rate"))
    if lr is not None:
        t.lr = float(lr)
    t.min_lr = float(schedule.get("lr_end", schedule.get("min_lr", 0.0)) or 0.0)
    if schedule.get("warmup_steps"):
        t.lr_warmup_iters = int(schedule["warmup_steps"])
    elif schedule.get("warmup_ratio"):
        t.lr_warmup_fraction = float(schedule["warmup_ratio"])
    total = schedule.get("total_steps")
    if total not in (None, -1, "-1") and int(total) > 0:
        t.lr_decay_iters = int(total)


def _apply_training(config, values: dict, source: str) -> None:
    t, c, lg = config.train, config.checkpoint, config.logging
    if values.get("seed") is not None:
        t.seed = int(values["seed"])
    recompute = _section(values, "recompute_config", source)
    if recompute.get("recompute") is True:
        t.recompute_granularity, t.recompute_method = "full", "uniform"
    elif recompute.get("select_recompute"):  # True, or a per-stage list of layer counts
        t.recompute_granularity = "selective"
    wrapper = _section(values, "runner_wrapper", source)
    if wrapper.get("use_clip_grad") is False:
        config.optim.clip_grad = 0.0
    elif wrapper.get("max_grad_norm") is not None:
        config.optim.clip_grad = float(wrapper["max_grad_norm"])
    scale = wrapper.get("scale_sense")
    if isinstance(scale, dict):
        t.initial_loss_scale = float(scale.get("loss_scale_value", t.initial_loss_scale))
        t.loss_scale_window = int(scale.get("scale_window", t.loss_scale_window))
        t.hysteresis = 1  # MindSpore's DynamicLossScaleUpdateCell lowers the scale at the first overflow
    elif isinstance(scale, (int, float)) and t.precision == "fp16":
        t.loss_scale = float(scale)
    output_dir = values.get("output_dir") or "./output"
    lg.output_dir = str(output_dir)
    c.save = str(Path(output_dir) / "checkpoint")
    for callback in values.get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("type") == "CheckpointMonitor":
            if callback.get("save_checkpoint_steps"):
                c.save_interval = _positive_int(callback["save_checkpoint_steps"],
                                                "CheckpointMonitor.save_checkpoint_steps")
            if callback.get("keep_checkpoint_max"):
                c.keep_last = _positive_int(callback["keep_checkpoint_max"], "CheckpointMonitor.keep_checkpoint_max")
    if values.get("load_checkpoint"):
        c.load = str(values["load_checkpoint"])
    if values.get("run_mode") == "finetune":
        t.finetune = True


def _apply_data(config, values: dict, source: str) -> None:
    d = config.data
    loader = _section(_section(values, "train_dataset", source), "data_loader", source)
    paths = loader.get("dataset_dir") or (loader.get("config") or {}).get("data_path")
    if paths:
        d.data_path = [str(p) for p in paths] if isinstance(paths, list) else str(paths).split()
    # MindFormers trains on the whole dataset; evaluation is a separate run_mode.
    d.split = "100,0,0"
    config.train.eval_iters = 0
    tokenizer = _section(values.get("processor") or {}, "tokenizer", source)
    vocab_file = tokenizer.get("vocab_file") or tokenizer.get("tokenizer_file")
    if vocab_file:
        path = Path(str(vocab_file))
        if path.suffix == ".model":
            d.tokenizer_type, d.tokenizer_model = "Llama2Tokenizer", str(path)
        else:
            d.tokenizer_type = "PretrainedFromHF"
            d.tokenizer_name_or_path = str(path if path.is_dir() or not path.suffix else path.parent)


def mindformers_to_ember(config, values: dict, source: str) -> None:
    """Fill ember's `config` from a MindFormers YAML mapping (before command-line flags)."""
    try:
        _apply_model(config, values, source)
        parallel_config = _apply_parallel(config, values, source)
        _apply_batch(config, values, parallel_config, source)
        _apply_optimizer(config, values, source)
        _apply_training(config, values, source)
        _apply_data(config, values, source)
    except (TypeError, ValueError) as err:  # float("1e-4x"), int(None): a value of the wrong kind
        raise EmberError(f"{source}: a setting has a value of the wrong kind ({err}); check its numbers") from None
    if values.get("use_parallel") is False:
        _single_device(config, values)


def _single_device(config, values: dict) -> None:
    """use_parallel False: one device, parallel_config ignored (as MindFormers does)."""
    p = config.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.context_parallel_size = p.expert_model_parallel_size = 1
    p.sequence_parallel, p.dp_mode = False, "replicate"
    runner = values.get("runner_config") or {}
    steps = int(runner.get("gradient_accumulation_steps", 1) or 1)
    config.train.global_batch_size = config.train.micro_batch_size * steps


def finish(config, values: dict, args: argparse.Namespace | None) -> None:
    """Settings that need the command line too: --use_parallel, --batch_size, and epochs turned
    into iterations (which needs the data path, often given only as --train_dataset_dir)."""
    resume = getattr(args, "resume_training", None)
    if resume is None:
        resume = values.get("resume_training")
    if resume is not None:
        resume = _boolean(resume, "resume_training")
    if config.checkpoint.load and not config.train.finetune:
        # MindFormers continues a run (optimizer, step) only with resume_training; otherwise the
        # checkpoint gives the weights and training starts at step 0: ember's --finetune
        config.train.finetune = not resume
    if resume is False:
        # and never continues what output_dir holds: ember's --no-resume (which refuses to write
        # over a checkpoint there unless --overwrite). Unset, a relaunch continues its own run.
        config.checkpoint.resume = False
    use_parallel = getattr(args, "use_parallel", None)
    if use_parallel is not None and str(use_parallel).strip().lower() in ("false", "0", "no"):
        _single_device(config, values)
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None:
        multiplier = config.train.global_batch_size // max(config.train.micro_batch_size, 1)
        config.train.micro_batch_size = _positive_int(batch_size, "--batch_size")
        config.train.global_batch_size = config.train.micro_batch_size * multiplier
    for prefix in config.data.data_path:
        if prefix.endswith(".mindrecord") or os.path.isdir(prefix) and any(
                name.endswith(".mindrecord") for name in os.listdir(prefix)):
            raise EmberError(f"--train_dataset_dir {prefix} is a MindRecord dataset; ember reads Megatron "
                             f".bin/.idx datasets: run `ember preprocess --input TEXT_FILES --output-prefix "
                             f"PREFIX ...` and pass PREFIX_text_document")
    if config.train.train_epochs is not None and config.train.train_iters is None:
        iterations = _epoch_iterations(config)
        if iterations is not None:
            config.train.train_iters, config.train.train_epochs = iterations, None


def _epoch_iterations(config) -> int | None:
    """Iterations in `train_epochs` passes over pretraining data (None when the data is not
    there yet: validation then reports the missing path)."""
    from ember.config.data_spec import parse_data_path
    from ember.data.indexed import IndexedDataset, dataset_exists

    prefixes = [prefix for _, prefix in parse_data_path(config.data.data_path)]
    if not prefixes or not all(dataset_exists(p) for p in prefixes):
        return None
    seq = config.data.seq_length
    # GPTDataset: one epoch of a dataset is (tokens - 1) // seq_length samples
    samples = sum(max(int(IndexedDataset(p).sequence_lengths.sum()) - 1, 0) // seq for p in prefixes)
    iterations = config.train.train_epochs * samples // config.train.global_batch_size
    if iterations == 0:
        raise EmberError(f"{config.train.train_epochs} epoch(s) of {samples} samples of {seq} tokens is less "
                         f"than one global batch of {config.train.global_batch_size}; lower batch_size")
    return iterations


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """run_mindformer.py's flags that ember's config flags do not already cover."""
    group = parser.add_argument_group("MindFormers (run_mindformer.py) flags")
    group.add_argument("--predict_data", "--predict-data", default=argparse.SUPPRESS,
                       help="--run_mode predict: the prompt, or a text file with one prompt per line")
    group.add_argument("--batch_size", default=argparse.SUPPRESS, help="runner_config.batch_size")
    group.add_argument("--resume_training", default=argparse.SUPPRESS,
                       help="True: continue the run in load_checkpoint (optimizer, step); else weights only")
    for flag in ("--register_path", "--device_id", "--device_target", "--mode", "--auto_trans_ckpt",
                 "--src_strategy_path_or_dir", "--remote_save_url", "--do_eval"):
        # MindSpore runtime settings: accepted so the seed's command lines run unchanged
        group.add_argument(flag, dest="ignored_" + flag.lstrip("-"), default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)

"""MindSpore Transformers (MindFormers) run configs, read as ember configs.

    ember launch --msrun "run_mindformer.py --config pretrain_llama2_7b.yaml \\
        --train_dataset_dir ./dataset/wiki_text_document --use_parallel True --run_mode train" 8
    ember train --config pretrain_llama2_7b.yaml --run_mode predict --predict_data "I love Beijing,"

A YAML file with `model.model_config`, `runner_config`, `parallel_config` ... is recognised as a
MindFormers config and translated field by field into ember's `Config` (`mindformers_to_ember`).
Every key is answered: translated, refused in one line (what ember cannot do the same way), or
configuring MindSpore's own runtime (graph mode, memory pools, data sinking, kernels, strategy
files), which ember decides itself and names in one notice line; unknown keys are named in another
(`review_keys`):

    model.model_config     LlamaConfig-style architecture: hidden_size, num_layers, num_heads,
                           n_kv_heads, vocab_size, intermediate_size or multiple_of +
                           ffn_dim_multiplier, rms_norm_eps, theta, seq_length, qkv_has_bias,
                           compute_dtype (-> bf16/fp16/fp32), extend_method NTK (RoPE base x
                           scaling_factor) / PI (positions / scaling_factor), offset (-> first and
                           last pipeline stage's layers)
    runner_config          batch_size (micro-batch), epochs, sink_size (-> log interval),
                           gradient_accumulation_steps
    parallel_config        data_parallel, model_parallel (TP), pipeline_stage (PP),
                           context_parallel, expert_parallel, micro_batch_num, use_seq_parallel
    parallel               enable_parallel_optimizer (-> sharded data parallelism)
    recompute_config       recompute (full; equal per-stage counts: the first N of each stage),
                           select_recompute (selective)
    optimizer, lr_schedule AdamW betas/eps/weight_decay; Cosine/Linear/Constant WarmUpLR,
                           learning_rate, lr_end, warmup_ratio/warmup_steps, total_steps
    runner_wrapper         use_clip_grad, scale_sense (fp16 loss scaling)
    train_dataset          data_loader.dataset_dir or data_loader.config.data_path
    callbacks              CheckpointMonitor save_checkpoint_steps, keep_checkpoint_max, async_save
    do_eval, eval_dataset  validation every eval_step_interval (100) steps over the whole set
    profile*               --profile over profile_start_step..profile_stop_step
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
    _apply_recompute(config, _section(values, "recompute_config", source))
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
            if callback.get("async_save") is not None:
                c.async_save = _boolean(callback["async_save"], "CheckpointMonitor.async_save")
    if values.get("load_checkpoint"):
        c.load = str(values["load_checkpoint"])
    if values.get("run_mode") == "finetune":
        t.finetune = True
    _apply_profile(config, values)


def _stage_counts(value: Any) -> list[int] | None:
    """A per-stage list of layer counts (MindFormers' [10, 8, 6, ...]; True = every layer), or
    None when `value` is not such a list."""
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, (int, bool)) for v in value):
        return None
    return [10**9 if v is True else int(v) for v in value]


def _apply_recompute(config, recompute: dict) -> None:
    """recompute: True (full) or per-stage counts; select_recompute: True, per-stage counts, or
    operator patterns. ember recomputes whole layers (full) or one op policy (selective) in every
    layer of a stage, so per-stage counts map onto Megatron's `--recompute-method block N` (the
    first N layers of every stage) when they are all equal, else onto every layer (the same
    training; more memory saved and more compute than asked), which the notice says."""
    t = config.train
    full, select = recompute.get("recompute"), recompute.get("select_recompute")
    full_counts = _stage_counts(full)
    select_counts = _stage_counts(select)
    if full is True or (full_counts and any(full_counts)):
        t.recompute_granularity, t.recompute_method = "full", "uniform"
        if full_counts and len(set(full_counts)) == 1 and full_counts[0] < 10**9:
            t.recompute_method, t.recompute_num_layers = "block", full_counts[0]
        elif full_counts:
            _NOTES.append(f"recompute_config.recompute {list(full)}: per-stage counts differ; ember recomputes "
                          f"every layer of every stage (same training, less memory, more compute)")
    elif select is True or (select_counts and any(select_counts)):
        t.recompute_granularity = "selective"
        if select_counts and any(n < 10**9 for n in select_counts):
            _NOTES.append(f"recompute_config.select_recompute {list(select)}: ember's selective recomputation "
                          f"covers every layer of every stage (same training, less memory, more compute)")
    elif select and not select_counts:  # operator patterns (a list of names or a dict)
        t.recompute_granularity = "selective"
        _NOTES.append("recompute_config.select_recompute operator patterns: ember's selective recomputation "
                      "recomputes norms, activations and rotary (not the matmuls) in every layer")


def _apply_profile(config, values: dict) -> None:
    """profile, profile_start_step..profile_stop_step (1-based, both profiled) -> ember's --profile
    with Megatron's window (the steps after profile_step_start up to profile_step_end)."""
    if not values.get("profile"):
        return
    lg = config.logging
    lg.profile = True
    start = 0 if values.get("init_start_profile") else int(values.get("profile_start_step", 1) or 1) - 1
    lg.profile_step_start = max(start, 0)
    lg.profile_step_end = int(values.get("profile_stop_step", lg.profile_step_start + 10))
    ranks = values.get("profile_rank_ids")
    if isinstance(ranks, (list, tuple)) and ranks:
        lg.profile_ranks = [str(r) for r in ranks]
    if values.get("profile_memory"):
        lg.record_memory_history = True  # CUDA allocator history; a CPU run says it records nothing


def _apply_rope(config, model_config: dict, source: str) -> None:
    """extend_method with scaling_factor, as MindFormers' FreqsMgr applies them: NTK multiplies the
    RoPE base by the factor (a static NTK-aware stretch: exactly rope_theta x factor, which a Hugging
    Face export then carries as its rope_theta), PI divides positions by it (linear scaling)."""
    method = str(model_config.get("extend_method", "None"))
    factor = model_config.get("scaling_factor", 1.0)
    if method == "None":
        return
    if method == "linear" and isinstance(factor, dict):  # MindFormers' other spelling of PI
        method, factor = "PI", factor.get("factor", 1.0)
    if method not in ("NTK", "PI"):
        raise EmberError(f"{source}: model_config.extend_method {method} is not supported; ember reads None, PI "
                         f"(or linear) and NTK")
    try:
        factor = float(factor)
    except (TypeError, ValueError):
        raise EmberError(f"{source}: model_config.scaling_factor {factor!r} must be a number for "
                         f"extend_method {method}") from None
    if factor <= 0:
        raise EmberError(f"{source}: model_config.scaling_factor must be positive, got {factor}")
    if method == "NTK":
        config.model.rotary_base = float(model_config.get("theta", 10000.0)) * factor
    elif factor != 1.0:
        config.model.rotary_seq_len_interpolation_factor = factor


def _apply_offset(config, model_config: dict, source: str) -> None:
    """model_config.offset: stage s holds num_layers // stages + offset[s] layers (MindFormers'
    LayerSetting). ember's pipeline takes the first and last stage's counts and splits the rest
    evenly (Megatron's uneven split), so offsets that differ between middle stages are refused."""
    offset = model_config.get("offset", 0)
    stages = config.parallel.pipeline_model_parallel_size
    layers = model_config.get("num_layers")
    if offset in (0, None) or layers is None:
        return
    if isinstance(offset, (list, tuple)) and offset and isinstance(offset[0], (list, tuple)):
        if len(offset) != 1:
            raise EmberError(f"{source}: model_config.offset {offset} is per interleaved stage; ember's "
                             f"interleaved pipeline splits layers evenly: use one list of {stages} offsets")
        offset = offset[0]
    offsets = [int(offset)] * stages if isinstance(offset, int) else [int(o) for o in offset]
    layers = int(layers)
    if len(offsets) != stages:
        raise EmberError(f"{source}: model_config.offset has {len(offsets)} entries for {stages} pipeline stages")
    if sum(offsets) != layers % stages:
        raise EmberError(f"{source}: model_config.offset {list(offsets)} must add up to num_layers % pipeline_stage "
                         f"= {layers % stages} (MindFormers' rule)")
    counts = [layers // stages + o for o in offsets]
    if len(set(counts)) == 1:
        return
    from ember.config.layout import split_layers

    first, last = counts[0], counts[-1]
    try:
        expressible = split_layers(layers, stages, first, last) == counts
    except EmberError:
        expressible = False
    if not expressible:
        raise EmberError(f"{source}: model_config.offset {list(offsets)} gives stages {counts} layers; ember's "
                         f"pipeline sets the first and last stage and splits the rest evenly: make the middle "
                         f"stages' offsets equal")
    p = config.parallel
    p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers = first, last


def _apply_data(config, values: dict, source: str) -> None:
    d = config.data
    loader = _section(_section(values, "train_dataset", source), "data_loader", source)
    paths = loader.get("dataset_dir") or (loader.get("config") or {}).get("data_path")
    if paths:
        d.data_path = [str(p) for p in paths] if isinstance(paths, list) else str(paths).split()
    # MindFormers trains on the whole dataset; evaluation is do_eval's eval_dataset (see `finish`).
    d.split = "100,0,0"
    config.train.eval_iters = 0
    # A MindFormers sample is one record of the dataset (Wikitext: seq_length + 1 tokens, see
    # `ember preprocess` on .tokens files): one per sample, never packed together.
    d.finetune_packing = "padded"
    repeat = (values.get("train_dataset") or {}).get("repeat", 1)
    if repeat not in (None, 1):
        raise EmberError(f"{source}: train_dataset.repeat {repeat}: ember passes over the data "
                         f"runner_config.epochs times; set epochs to epochs x repeat instead")
    if loader.get("shuffle") is False:
        _NOTES.append("train_dataset.data_loader.shuffle False: ember shuffles samples (Megatron's order, "
                      "from the seed)")
    eval_step = values.get("eval_step_interval")
    if eval_step:
        config.train.eval_interval = _positive_int(eval_step, "eval_step_interval")
    else:
        config.train.eval_interval = 100  # MindFormers' EvalCallBack default
    if (values.get("eval_epoch_interval") or -1) > 0:
        _NOTES.append("eval_epoch_interval: ember evaluates every eval_step_interval steps (default 100)")
    tokenizer = _section(values.get("processor") or {}, "tokenizer", source)
    vocab_file = tokenizer.get("vocab_file") or tokenizer.get("tokenizer_file")
    if vocab_file:
        path = Path(str(vocab_file))
        if path.suffix == ".model":
            d.tokenizer_type, d.tokenizer_model = "Llama2Tokenizer", str(path)
        else:
            d.tokenizer_type = "PretrainedFromHF"
            d.tokenizer_name_or_path = str(path if path.is_dir() or not path.suffix else path.parent)


def _refuse(values: dict, source: str) -> None:
    """Settings that change the training in a way ember cannot: one line each."""
    if values.get("layer_scale"):
        raise EmberError(f"{source}: layer_scale True (layer-wise learning-rate decay) is not in ember; "
                         f"set it False")
    if values.get("only_save_strategy"):
        raise EmberError(f"{source}: only_save_strategy True saves MindSpore strategy files and stops; ember "
                         f"has none (it reshards checkpoints itself): set it False")
    kind = (values.get("trainer") or {}).get("type", "CausalLanguageModelingTrainer")
    if kind not in ("CausalLanguageModelingTrainer", None):
        raise EmberError(f"{source}: trainer.type {kind}: ember trains causal language models "
                         f"(CausalLanguageModelingTrainer)")
    penalty = ((values.get("model") or {}).get("model_config") or {}).get("repetition_penalty", 1)
    if penalty not in (None, 1, 1.0):
        _NOTES.append(f"model_config.repetition_penalty {penalty}: ember's predict applies none")


def mindformers_to_ember(config, values: dict, source: str) -> None:
    """Fill ember's `config` from a MindFormers YAML mapping (before command-line flags)."""
    _NOTES.clear()
    try:
        _refuse(values, source)
        model_config = _apply_model(config, values, source)
        _apply_rope(config, model_config, source)
        parallel_config = _apply_parallel(config, values, source)
        _apply_offset(config, model_config, source)
        _apply_batch(config, values, parallel_config, source)
        _apply_optimizer(config, values, source)
        _apply_training(config, values, source)
        _apply_data(config, values, source)
    except (TypeError, ValueError) as err:  # float("1e-4x"), int(None): a value of the wrong kind
        raise EmberError(f"{source}: a setting has a value of the wrong kind ({err}); check its numbers") from None
    if values.get("use_parallel") is False:
        _single_device(config, values)
    runtime, unknown = review_keys(values)
    name = Path(source.rsplit(" ", 1)[-1]).name
    if runtime:
        _NOTES.append(f"{name}: MindSpore runtime settings, decided by ember itself (kernels, memory, data "
                      f"loading, strategy files): {_grouped(runtime)}")
    if unknown:
        _NOTES.append(f"{name}: keys ember does not know, not read: {', '.join(unknown)}")


def _single_device(config, values: dict | None) -> None:
    """use_parallel False: one device, parallel_config ignored (as MindFormers does)."""
    p = config.parallel
    p.tensor_model_parallel_size = p.pipeline_model_parallel_size = 1
    p.context_parallel_size = p.expert_model_parallel_size = 1
    p.sequence_parallel, p.dp_mode = False, "replicate"
    p.decoder_first_pipeline_num_layers = p.decoder_last_pipeline_num_layers = None
    if values is None:  # no MindFormers file: the batch flags decide the batch
        return
    runner = values.get("runner_config") or {}
    steps = int(runner.get("gradient_accumulation_steps", 1) or 1)
    config.train.global_batch_size = config.train.micro_batch_size * steps


# --------------------------------------------------------------------------- every key answered

# Every key of MindFormers' run configs is translated (READ), configures MindSpore itself
# (RUNTIME: graph mode, memory pools, data sinking, kernels, strategy files, OBS upload; ember
# decides these itself and names the ones set in one notice line), or is unknown (named in
# another). A key is classified by its longest listed prefix.
_READ = (
    "seed", "output_dir", "load_checkpoint", "resume_training", "run_mode", "use_parallel", "do_eval",
    "micro_batch_interleave_num", "layer_scale", "only_save_strategy", "eval_step_interval",
    "eval_epoch_interval", "trainer.type", "trainer.model_name",
    "runner_config.epochs", "runner_config.batch_size", "runner_config.sink_size",
    "runner_config.gradient_accumulation_steps",
    "optimizer", "lr_schedule",
    "train_dataset.data_loader.type", "train_dataset.data_loader.dataset_dir", "train_dataset.data_loader.shuffle",
    "train_dataset.data_loader.config.data_path", "train_dataset.input_columns", "train_dataset.drop_remainder",
    "train_dataset.repeat", "train_dataset.batch_size",
    "eval_dataset.data_loader.type", "eval_dataset.data_loader.dataset_dir", "eval_dataset.data_loader.shuffle",
    "eval_dataset.input_columns", "eval_dataset.drop_remainder", "eval_dataset.repeat", "eval_dataset.batch_size",
    "parallel.enable_parallel_optimizer", "parallel.full_batch",
    "parallel_config.data_parallel", "parallel_config.model_parallel", "parallel_config.pipeline_stage",
    "parallel_config.context_parallel", "parallel_config.expert_parallel", "parallel_config.micro_batch_num",
    "parallel_config.use_seq_parallel",
    "recompute_config.recompute", "recompute_config.select_recompute",
    "model.arch.type", "model.model_config.type", "model.model_config.seq_length",
    "model.model_config.hidden_size", "model.model_config.num_layers", "model.model_config.num_heads",
    "model.model_config.n_kv_heads", "model.model_config.vocab_size", "model.model_config.multiple_of",
    "model.model_config.ffn_dim_multiplier", "model.model_config.intermediate_size",
    "model.model_config.rms_norm_eps", "model.model_config.theta", "model.model_config.qkv_has_bias",
    "model.model_config.tie_word_embeddings", "model.model_config.max_position_embedding",
    "model.model_config.compute_dtype", "model.model_config.layernorm_compute_type",
    "model.model_config.scaling_factor", "model.model_config.extend_method", "model.model_config.offset",
    "model.model_config.ignore_token_id", "model.model_config.bos_token_id", "model.model_config.eos_token_id",
    "model.model_config.pad_token_id", "model.model_config.repetition_penalty",
    "model.model_config.max_decode_length", "model.model_config.top_k", "model.model_config.top_p",
    "model.model_config.do_sample", "model.model_config.temperature",
    "processor", "metric.type",
    "runner_wrapper.type", "runner_wrapper.scale_sense", "runner_wrapper.use_clip_grad",
    "runner_wrapper.max_grad_norm",
    "profile", "profile_start_step", "profile_stop_step", "init_start_profile", "profile_communication",
    "profile_memory", "profile_rank_ids",
    # settings of switches read above (auto_tune, layer_scale) that are off unless those are on
    "auto_tune", "filepath_prefix", "autotune_per_step", "layer_decay", "lr_scale_factor",
    # aliases of train_dataset / eval_dataset (YAML anchors), read there
    "train_dataset_task", "eval_dataset_task",
)
_RUNTIME = (
    "context", "src_strategy_path_or_dir", "auto_trans_ckpt", "remote_save_url", "eval_callbacks",
    "runner_config.sink_mode", "train_dataset.num_parallel_workers", "train_dataset.python_multiprocessing",
    "train_dataset.numa_enable", "train_dataset.prefetch_size", "eval_dataset.num_parallel_workers",
    "eval_dataset.python_multiprocessing", "eval_dataset.numa_enable", "eval_dataset.prefetch_size",
    "parallel.parallel_mode", "parallel.gradients_mean", "parallel.enable_alltoall", "parallel.search_mode",
    "parallel.strategy_ckpt_save_file", "parallel.strategy_ckpt_config", "parallel.parallel_optimizer_config",
    "parallel_config.vocab_emb_dp", "parallel_config.gradient_aggregation_group",
    "recompute_config.select_comm_recompute", "recompute_config.parallel_optimizer_comm_recompute",
    "recompute_config.mp_comm_recompute", "recompute_config.recompute_slice_activation",
    "model.model_config.batch_size", "model.model_config.softmax_compute_type",
    "model.model_config.rotary_dtype", "model.model_config.param_init_type", "model.model_config.use_past",
    "model.model_config.use_flash_attention", "model.model_config.fine_grain_interleave",
    "model.model_config.checkpoint_name_or_path", "model.model_config.is_dynamic",
    "model.model_config.qkv_concat", "model.model_config.use_rope_slice",
)
# What a runtime key holds when it asks for nothing (then it is not named).
_OFF = (None, False, 0, "", "None", [], {})
_CALLBACKS_READ = {"MFLossMonitor": (), "CheckpointMonitor": ("save_checkpoint_steps", "keep_checkpoint_max",
                                                                "async_save")}
_CALLBACKS_RUNTIME = {"ObsMonitor", "CheckpointMonitor", "SummaryMonitor", "ProfileMonitor"}


def _leaves(values: Any, prefix: str = ""):
    if isinstance(values, dict) and values:
        for key, value in values.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, values


def _classify(path: str) -> str | None:
    best, kind = -1, None
    for table, name in ((_READ, "read"), (_RUNTIME, "runtime")):
        for key in table:
            if (path == key or path.startswith(key + ".")) and len(key) > best:
                best, kind = len(key), name
    return kind


def review_keys(values: dict) -> tuple[list[str], list[str]]:
    """(runtime keys set to something, unknown keys) of a MindFormers mapping, each once."""
    runtime: list[str] = []
    unknown: list[str] = []

    def note(table: list[str], name: str) -> None:
        if name not in table:
            table.append(name)

    for path, value in _leaves({k: v for k, v in values.items() if k != "callbacks"}):
        kind = _classify(path)
        if kind == "runtime" and value not in _OFF:
            note(runtime, path.split(".")[0] if path.startswith("context.") else path)
        elif kind is None:
            note(unknown, path)
    for callback in values.get("callbacks") or []:
        kind = callback.get("type") if isinstance(callback, dict) else None
        read = _CALLBACKS_READ.get(kind, ())
        for key, value in (callback.items() if isinstance(callback, dict) else ()):
            if key == "type" or key in read:
                continue
            if kind in _CALLBACKS_RUNTIME:
                if value not in _OFF:
                    note(runtime, f"{kind}.{key}")
            else:
                note(unknown, f"{kind}.{key}")
        if kind in _CALLBACKS_RUNTIME and kind not in _CALLBACKS_READ:
            note(runtime, str(kind))
        elif kind not in _CALLBACKS_READ and kind not in _CALLBACKS_RUNTIME:
            note(unknown, f"callbacks {kind}")
    return runtime, unknown


def _grouped(paths: list[str]) -> str:
    """'a.b, a.c, d' -> 'a(b c) d': one line stays readable."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        groups.setdefault(head, []).append(rest)
    return " ".join(head + (f"({' '.join(r for r in rests if r)})" if any(rests) else "")
                    for head, rests in groups.items())


# Notes gathered while translating one file: printed once by `finish`.
_NOTES: list[str] = []


def _notice(line: str) -> None:
    """One line, from the process the user watches: a single process or the launcher (whose ranks
    carry EMBER_LAUNCHER_PID), else rank 0 of another launcher (torchrun). As `megatron`'s notice."""
    import sys

    rank = os.environ.get("RANK")
    if rank is None or (rank == "0" and "EMBER_LAUNCHER_PID" not in os.environ):
        print(f"ember: {line}", file=sys.stderr, flush=True)


def finish(config, values: dict | None, args: argparse.Namespace | None) -> None:
    """Settings that need the command line too (values None: no MindFormers file, only its flags):
    --use_parallel, --batch_size, --resume_training, --do_eval, epochs turned into iterations
    (which needs the data path, often given only as --train_dataset_dir); then the notices."""
    notes = list(_NOTES) if values is not None else []
    _NOTES.clear()
    _apply_resume(config, values, args)
    use_parallel = getattr(args, "use_parallel", None)
    if use_parallel is not None and not _boolean(use_parallel, "--use_parallel"):
        _single_device(config, values)
    _apply_batch_flags(config, values, args)
    if values is not None:
        _apply_eval(config, values, args)
        _check_mindrecord(config, notes)
        _tiny_offsets(config, notes)
        if config.train.train_epochs is not None and config.train.train_iters is None:
            iterations = _epoch_iterations(config)
            if iterations is not None:
                config.train.train_iters, config.train.train_epochs = iterations, None
    ignored = sorted(dest.split(":", 1)[1] for dest in vars(args or argparse.Namespace())
                     if dest.startswith("mfruntime:"))
    if ignored:
        notes.append(f"run_mindformer.py flags for MindSpore's runtime, not needed by ember: {' '.join(ignored)}")
    for line in notes:
        _notice(line)


def _apply_resume(config, values: dict | None, args) -> None:
    given = getattr(args, "resume_training", None)
    resume = given if given is not None else (values or {}).get("resume_training")
    if values is None and resume is None:
        return
    if isinstance(resume, str) and resume.strip().lower() not in ("true", "1", "yes", "false", "0", "no", ""):
        raise EmberError(f"--resume_training {resume}: a checkpoint file name is MindSpore's; ember resumes from "
                         f"the newest complete checkpoint in load_checkpoint (or output_dir/checkpoint): pass "
                         f"--resume_training True")
    if resume is not None:
        resume = _boolean(resume, "resume_training")
    if config.checkpoint.load and not config.train.finetune:
        # MindFormers continues a run (optimizer, step) only with resume_training; otherwise the
        # checkpoint gives the weights and training starts at step 0: ember's --finetune. (Without
        # a MindFormers file, True asks for what ember's --load does anyway: continue.)
        config.train.finetune = not resume
    if resume is False:
        # and never continues what output_dir holds: ember's --no-resume (which refuses to write
        # over a checkpoint there unless --overwrite). Unset, a relaunch continues its own run.
        config.checkpoint.resume = False


def _apply_batch_flags(config, values: dict | None, args) -> None:
    t = config.train
    steps = getattr(args, "gradient_accumulation_steps", None)
    if steps is not None:
        if values is None:
            raise EmberError("--gradient_accumulation_steps needs a MindFormers --config (with ember's flags use "
                             "--global-batch-size)")
        runner = values.setdefault("runner_config", {})
        runner["gradient_accumulation_steps"] = _positive_int(steps, "--gradient_accumulation_steps")
        t.global_batch_size = t.micro_batch_size * _batch_multiplier(values, values.get("parallel_config") or {},
                                                                     config)
        if getattr(args, "use_parallel", None) is not None and not _boolean(args.use_parallel, "--use_parallel"):
            _single_device(config, values)
    batch_size = getattr(args, "batch_size", None)
    if batch_size is not None:
        if t.global_batch_size is None:  # no file: ember's default global batch (micro x dp)
            t.micro_batch_size = _positive_int(batch_size, "--batch_size")
            return
        multiplier = t.global_batch_size // max(t.micro_batch_size, 1)
        t.micro_batch_size = _positive_int(batch_size, "--batch_size")
        t.global_batch_size = t.micro_batch_size * multiplier


def _apply_eval(config, values: dict, args) -> None:
    """do_eval (or --do_eval True): evaluate on eval_dataset (or --eval_dataset_dir) every
    eval_step_interval steps (MindFormers' default 100), over the whole evaluation set."""
    flag = getattr(args, "do_eval", None)
    do_eval = _boolean(flag, "--do_eval") if flag is not None else _boolean(values.get("do_eval", False), "do_eval")
    if not do_eval:
        return
    d, t = config.data, config.train
    loader = ((values.get("eval_dataset") or {}).get("data_loader") or {})
    paths = getattr(args, "eval_dataset_dir", None) or loader.get("dataset_dir")
    if not paths:
        raise EmberError("do_eval True needs eval_dataset.data_loader.dataset_dir (or --eval_dataset_dir PREFIX)")
    if d.data_path:
        d.train_data_path, d.data_path = list(d.data_path), []
    d.valid_data_path = [str(p) for p in paths] if isinstance(paths, list) else str(paths).split()
    samples = _dataset_samples(d.valid_data_path, d.seq_length)
    t.eval_iters = max(1, -(-samples // (t.global_batch_size or t.micro_batch_size))) if samples else 100


def _check_mindrecord(config, notes: list[str]) -> None:
    from ember.compat import tiny

    d = config.data
    for prefix in [*d.data_path, *d.train_data_path, *d.valid_data_path]:
        if prefix.endswith(".mindrecord") or os.path.isdir(prefix) and any(
                name.endswith(".mindrecord") for name in os.listdir(prefix)):
            if tiny.enabled():  # the tiny run trains on the built-in corpus instead
                notes.append(f"EMBER_TINY: {prefix} is MindRecord (a full run refuses it); using the built-in corpus")
                continue
            from ember.data.sources import MINDRECORD_HINT

            raise EmberError(f"dataset {prefix} is {MINDRECORD_HINT}; give its output prefix instead")


def _tiny_offsets(config, notes: list[str]) -> None:
    """model_config.offset splits the full-size model's layers; a tiny run has its own few."""
    from ember.compat import tiny

    p = config.parallel
    if tiny.enabled() and (p.decoder_first_pipeline_num_layers is not None
                           or p.decoder_last_pipeline_num_layers is not None):
        p.decoder_first_pipeline_num_layers = p.decoder_last_pipeline_num_layers = None
        notes.append("EMBER_TINY: model_config.offset splits the full-size model's layers; the tiny model's "
                     "are split evenly")


def _dataset_samples(prefixes: list[str], seq: int) -> int | None:
    """Samples in one pass over these datasets (GPTDataset's count for token streams, one per
    record for record datasets); None when one is not there yet."""
    from ember.config.data_spec import parse_data_path
    from ember.data.indexed import IndexedDataset, dataset_exists

    total = 0
    for _, prefix in parse_data_path(prefixes):
        if dataset_exists(prefix):  # GPTDataset: one epoch is (tokens - 1) // seq_length samples
            total += max(int(IndexedDataset(prefix).sequence_lengths.sum()) - 1, 0) // seq
        elif dataset_exists(prefix + "_packed_input_ids_document"):
            total += IndexedDataset(prefix + "_packed_input_ids_document").num_documents
        else:
            return None
    return total


def _epoch_iterations(config) -> int | None:
    """Iterations in `train_epochs` passes over pretraining data (None when the data is not
    there yet: validation then reports the missing path; and for record datasets, whose epochs
    the fine-tuning dataset counts itself)."""
    from ember.config.data_spec import parse_data_path
    from ember.data.indexed import dataset_exists

    d = config.data
    paths = d.data_path or d.train_data_path
    if not paths or not all(dataset_exists(p) for _, p in parse_data_path(paths)):
        return None
    seq = d.seq_length
    samples = _dataset_samples(paths, seq) or 0
    iterations = config.train.train_epochs * samples // config.train.global_batch_size
    if iterations == 0:
        raise EmberError(f"{config.train.train_epochs} epoch(s) of {samples} samples of {seq} tokens is less "
                         f"than one global batch of {config.train.global_batch_size}; lower batch_size")
    return iterations


# --------------------------------------------------------------------------- command line

# run_mindformer.py flags that set MindSpore's runtime (device ids, graph mode, strategy files,
# OBS upload, data sinking): accepted, named in one notice line.
RUNTIME_FLAGS = ("--register_path", "--device_id", "--device_target", "--mode", "--auto_trans_ckpt",
                 "--src_strategy_path_or_dir", "--remote_save_url", "--transform_process_num",
                 "--strategy_load_checkpoint", "--sink_mode")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """run_mindformer.py's flags that ember's config flags do not already cover. Prefix matching is
    off (`--train_dataset` is a declared alias of `--train_dataset_dir`, not an abbreviation)."""
    parser.allow_abbrev = False
    group = parser.add_argument_group("MindFormers (run_mindformer.py) flags")
    group.add_argument("--predict_data", "--predict-data", default=argparse.SUPPRESS,
                       help="--run_mode predict: the prompt, or a text file with one prompt per line")
    group.add_argument("--batch_size", default=argparse.SUPPRESS, help="runner_config.batch_size")
    group.add_argument("--gradient_accumulation_steps", default=argparse.SUPPRESS,
                       help="runner_config.gradient_accumulation_steps")
    group.add_argument("--resume_training", default=argparse.SUPPRESS,
                       help="True: continue the run in load_checkpoint (optimizer, step); else weights only")
    group.add_argument("--do_eval", default=argparse.SUPPRESS,
                       help="True: evaluate on eval_dataset every eval_step_interval steps")
    group.add_argument("--eval_dataset_dir", default=argparse.SUPPRESS, help="eval_dataset's dataset prefix")
    for flag in RUNTIME_FLAGS:
        group.add_argument(flag, dest="mfruntime:" + flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

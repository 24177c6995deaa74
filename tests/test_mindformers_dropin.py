"""MindFormers drop-in (issue 16): the seed's two run configs and msrun_launcher.sh command lines run
with only the launcher changed, and every key and flag they use is honoured or answered in one line.

The upstream files are MindFormers v1.5.0 (mindspore-lab/mindformers@06e1af77d14e, the seed's
r1.5.0): configs/llama2/pretrain_llama2_7b.yaml, research/llama3/llama3_70b/pretrain_llama3_70b.yaml
and scripts/msrun_launcher.sh. Only the keys the tests need are kept here (values as upstream).
References: transformers' RoPE scaling functions, MindFormers' own formulas (FreqsMgr, LayerSetting,
msrun_launcher.sh's argument forms) restated from that source, megatron-core-style dataset counts.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from dist_utils import train_config, write_token_dataset
from ember.errors import EmberError

# --- the upstream configs: the keys the translation reads, values as in v1.5.0 -------------------------

LLAMA2_7B = {  # configs/llama2/pretrain_llama2_7b.yaml
    "seed": 0, "output_dir": "./output", "load_checkpoint": "", "src_strategy_path_or_dir": "",
    "auto_trans_ckpt": False, "only_save_strategy": False, "resume_training": False, "run_mode": "train",
    "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "llama2_7b"},
    "runner_config": {"epochs": 2, "batch_size": 1, "sink_mode": True, "sink_size": 1,
                      "gradient_accumulation_steps": 8},
    "optimizer": {"type": "FP32StateAdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1.0e-8,
                  "learning_rate": 5.0e-5},
    "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 5.0e-5, "lr_end": 0, "warmup_ratio": 0.03,
                    "total_steps": -1},
    "train_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": "", "shuffle": True},
                      "input_columns": ["input_ids"], "num_parallel_workers": 8, "drop_remainder": True,
                      "batch_size": 6, "repeat": 1},
    "do_eval": False,
    "eval_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": "", "shuffle": False},
                     "input_columns": ["input_ids"], "drop_remainder": False, "repeat": 1},
    "use_parallel": True,
    "parallel": {"parallel_mode": 1, "gradients_mean": False, "full_batch": True, "enable_parallel_optimizer": True},
    "parallel_config": {"data_parallel": 8, "model_parallel": 1, "pipeline_stage": 1, "use_seq_parallel": False,
                        "micro_batch_num": 1, "vocab_emb_dp": True, "gradient_aggregation_group": 4},
    "micro_batch_interleave_num": 1,
    "recompute_config": {"recompute": False, "select_recompute": False, "mp_comm_recompute": True},
    "callbacks": [{"type": "MFLossMonitor"},
                  {"type": "CheckpointMonitor", "prefix": "llama2_7b", "save_checkpoint_steps": 100,
                   "integrated_save": False, "async_save": False},
                  {"type": "ObsMonitor"}],
    "context": {"mode": 0, "device_target": "Ascend", "max_device_memory": "58GB"},
    "model": {"model_config": {"type": "LlamaConfig", "batch_size": 1, "seq_length": 4096, "hidden_size": 4096,
                               "num_layers": 32, "num_heads": 32, "vocab_size": 32000, "multiple_of": 256,
                               "rms_norm_eps": 1.0e-5, "compute_dtype": "float16", "param_init_type": "float16",
                               "scaling_factor": 1.0, "extend_method": "None", "use_flash_attention": True,
                               "offset": 0, "repetition_penalty": 1, "max_decode_length": 512},
              "arch": {"type": "LlamaForCausalLM"}},
    "runner_wrapper": {"type": "MFTrainOneStepCell", "use_clip_grad": True,
                       "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 65536,
                                       "scale_factor": 2, "scale_window": 1000}},
    "profile": False, "profile_start_step": 1, "profile_stop_step": 10, "init_start_profile": False,
    "profile_communication": False, "profile_memory": True, "layer_scale": False,
}

LLAMA3_70B = {  # research/llama3/llama3_70b/pretrain_llama3_70b.yaml: where it differs
    **copy.deepcopy(LLAMA2_7B),
    "trainer": {"type": "CausalLanguageModelingTrainer", "model_name": "llama3_70b"},
    "runner_config": {"epochs": 2, "batch_size": 1, "sink_mode": True, "sink_size": 1},
    "optimizer": {"type": "AdamW", "betas": [0.9, 0.999], "eps": 1.0e-8},
    "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 1.0e-4, "lr_end": 0.0, "warmup_ratio": 0.03,
                    "total_steps": -1},
    "parallel_config": {"data_parallel": 1, "model_parallel": 8, "pipeline_stage": 8, "use_seq_parallel": True,
                        "micro_batch_num": 256, "vocab_emb_dp": False, "gradient_aggregation_group": 4},
    "recompute_config": {"recompute": False, "select_recompute": [10, 8, 6, 4, 2, 0, 0, 0],
                         "select_comm_recompute": [10, 8, 6, 4, 2, 0, 0, 0]},
    "model": {"model_config": {"type": "LlamaConfig", "seq_length": 8192, "hidden_size": 8192, "num_layers": 80,
                               "num_heads": 64, "n_kv_heads": 8, "ffn_dim_multiplier": 1.3, "multiple_of": 256,
                               "vocab_size": 128256, "rms_norm_eps": 1.0e-5, "compute_dtype": "bfloat16",
                               "scaling_factor": 1.0, "theta": 500000, "extend_method": "None",
                               "use_flash_attention": True, "offset": 0, "fine_grain_interleave": 2},
              "arch": {"type": "LlamaForCausalLM"}},
    "runner_wrapper": {"type": "MFTrainOneStepCell", "scale_sense": 1.0, "use_clip_grad": True},
    "profile_start_step": 4, "profile_stop_step": 8,
}

# Every key path of the two files (names only), each of which ember must answer.
UPSTREAM_KEYS = """seed output_dir load_checkpoint src_strategy_path_or_dir auto_trans_ckpt only_save_strategy
resume_training run_mode trainer.type trainer.model_name runner_config.epochs runner_config.batch_size
runner_config.sink_mode runner_config.sink_size runner_config.gradient_accumulation_steps optimizer.type
optimizer.beta1 optimizer.beta2 optimizer.betas optimizer.eps optimizer.learning_rate lr_schedule.type
lr_schedule.learning_rate lr_schedule.lr_end lr_schedule.warmup_ratio lr_schedule.total_steps
train_dataset.data_loader.type train_dataset.data_loader.dataset_dir train_dataset.data_loader.shuffle
train_dataset.input_columns train_dataset.num_parallel_workers train_dataset.python_multiprocessing
train_dataset.drop_remainder train_dataset.batch_size train_dataset.repeat train_dataset.numa_enable
train_dataset.prefetch_size train_dataset_task.type train_dataset_task.dataset_config.data_loader.type do_eval
eval_dataset.data_loader.type eval_dataset.data_loader.dataset_dir eval_dataset.data_loader.shuffle
eval_dataset.input_columns eval_dataset.num_parallel_workers eval_dataset.python_multiprocessing
eval_dataset.drop_remainder eval_dataset.repeat eval_dataset.numa_enable eval_dataset.prefetch_size
eval_dataset_task.type use_parallel parallel.parallel_mode parallel.gradients_mean parallel.enable_alltoall
parallel.full_batch parallel.search_mode parallel.enable_parallel_optimizer parallel.strategy_ckpt_save_file
parallel.parallel_optimizer_config.gradient_accumulation_shard
parallel.parallel_optimizer_config.parallel_optimizer_threshold parallel_config.data_parallel
parallel_config.model_parallel parallel_config.pipeline_stage parallel_config.use_seq_parallel
parallel_config.micro_batch_num parallel_config.vocab_emb_dp parallel_config.gradient_aggregation_group
micro_batch_interleave_num recompute_config.recompute recompute_config.select_recompute
recompute_config.select_comm_recompute recompute_config.parallel_optimizer_comm_recompute
recompute_config.mp_comm_recompute recompute_config.recompute_slice_activation context.mode
context.device_target context.max_call_depth context.max_device_memory context.mempool_block_size
context.save_graphs context.save_graphs_path context.device_id context.jit_config.jit_level
context.memory_optimize_level model.model_config.type model.model_config.batch_size model.model_config.seq_length
model.model_config.hidden_size model.model_config.num_layers model.model_config.num_heads
model.model_config.n_kv_heads model.model_config.ffn_dim_multiplier model.model_config.multiple_of
model.model_config.vocab_size model.model_config.rms_norm_eps model.model_config.bos_token_id
model.model_config.eos_token_id model.model_config.pad_token_id model.model_config.ignore_token_id
model.model_config.compute_dtype model.model_config.layernorm_compute_type model.model_config.softmax_compute_type
model.model_config.rotary_dtype model.model_config.param_init_type model.model_config.use_past
model.model_config.scaling_factor model.model_config.theta model.model_config.extend_method
model.model_config.use_flash_attention model.model_config.offset model.model_config.fine_grain_interleave
model.model_config.checkpoint_name_or_path model.model_config.repetition_penalty
model.model_config.max_decode_length model.model_config.top_k model.model_config.top_p
model.model_config.do_sample model.arch.type processor.return_tensors processor.tokenizer.unk_token
processor.tokenizer.bos_token processor.tokenizer.eos_token processor.tokenizer.pad_token processor.tokenizer.type
processor.type metric.type runner_wrapper.type runner_wrapper.scale_sense runner_wrapper.use_clip_grad
eval_callbacks auto_tune filepath_prefix autotune_per_step profile profile_start_step profile_stop_step
init_start_profile profile_communication profile_memory layer_scale layer_decay lr_scale_factor
remote_save_url""".split()


def _write(tmp_path: Path, values: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _config(tmp_path, values, *flags):
    return train_config(["--config", _write(tmp_path, values), "--train_dataset_dir", "d_text_document", *flags])


# --------------------------------------------------------------------------- every key answered


def test_every_upstream_key_is_read_or_answered():
    """No key of the two files is unknown: each is translated, or configures MindSpore's runtime
    (named in the notice when set) — nothing is silently ignored."""
    from ember.compat.mindformers import _classify

    unknown = [key for key in UPSTREAM_KEYS if _classify(key) is None]
    assert not unknown, unknown
    assert _classify("model.model_config.extend_method") == "read"
    assert _classify("context.jit_config.jit_level") == "runtime"


def test_upstream_configs_translate_with_notices(tmp_path, capsys):
    c = _config(tmp_path, LLAMA3_70B, "--use_parallel", "True", "--run_mode", "train")
    err = capsys.readouterr().err
    # select_recompute [10, 8, ...]: selective recomputation, and one line saying it covers every layer
    assert c.train.recompute_granularity == "selective" and "every layer of every stage" in err
    assert "MindSpore runtime settings" in err and "use_flash_attention" in err and "keys ember does not know" not in err
    p = c.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel) == (8, 8, True)
    assert c.train.global_batch_size == 1 * 1 * 256 and c.model.rotary_base == 500000
    c2 = _config(tmp_path, LLAMA2_7B)
    assert c2.train.global_batch_size == 1 * 8 * 8 and c2.parallel.dp_mode == "fsdp"
    assert not c2.checkpoint.async_save and not c2.logging.profile  # async_save False, profile False
    unknown = copy.deepcopy(LLAMA2_7B)
    unknown["model"]["model_config"]["made_up_key"] = 3
    _config(tmp_path, unknown)
    assert "keys ember does not know, not read: model.model_config.made_up_key" in capsys.readouterr().err


# --------------------------------------------------------------------------- RoPE: extend_method


def _mindformers_inv_freq(head_dim: int, theta: float, method: str, factor: float) -> torch.Tensor:
    """MindFormers' FreqsMgr (mindformers/modules/layers.py@v1.5.0): NTK multiplies theta by the
    factor; PI divides the positions (the same as dividing the frequencies)."""
    if method == "NTK":
        theta *= factor
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return freqs / factor if method == "PI" else freqs


@pytest.mark.parametrize("method", ["NTK", "PI"])
def test_extend_method_scales_rope_as_mindformers_and_transformers(tmp_path, method):
    from transformers import LlamaConfig
    from transformers import modeling_rope_utils as rope

    from ember.models.positions import rope_inv_freq
    from ember.train.model_setup import resolve_model_args

    values = copy.deepcopy(LLAMA2_7B)
    del values["trainer"]  # the architecture from model_config alone
    values["model"]["model_config"].update(extend_method=method, scaling_factor=4.0, theta=10000.0,
                                           hidden_size=256, num_heads=4, num_layers=2, seq_length=64)
    args = resolve_model_args(_config(tmp_path, values), None)
    ours = rope_inv_freq(args)
    torch.testing.assert_close(ours, _mindformers_inv_freq(args.head_dim, 10000.0, method, 4.0))
    d, positions = args.head_dim, args.max_seq_len
    if method == "PI":  # transformers' linear scaling
        hf = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=positions,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
        reference, _ = rope._compute_linear_scaling_rope_parameters(hf, "cpu")
    else:  # transformers' dynamic NTK at 2x its length: base x ((2f - (f - 1)) ** (d / (d - 2))) = base x 4
        factor = 4.0 ** ((d - 2) / d) - 1
        hf = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=positions,
                         rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0})
        reference, _ = rope._compute_dynamic_ntk_parameters(hf, "cpu", seq_len=2 * positions)
    torch.testing.assert_close(ours, reference.float())
    values["model"]["model_config"]["extend_method"] = "YARN"
    with pytest.raises(EmberError, match="extend_method YARN is not supported"):
        _config(tmp_path, values)


# --------------------------------------------------------------------------- offset, recompute


def _mindformers_stage_layers(num_layers: int, stages: int, offset) -> list[int]:
    """MindFormers' LayerSetting (mindformers/models/utils.py@v1.5.0): num_layers // pp + offset."""
    offsets = [offset] * stages if isinstance(offset, int) else offset
    return [num_layers // stages + o for o in offsets]


@pytest.mark.parametrize("layers, stages, offset, expressible", [
    (10, 4, [1, 0, 0, 1], True), (10, 4, [0, 1, 1, 0], True), (10, 4, [1, 0, 1, 0], False), (9, 2, [1, 0], True), (8, 4, 0, True),
])
def test_offset_maps_onto_the_uneven_pipeline_split(tmp_path, layers, stages, offset, expressible):
    from ember.config.layout import split_layers

    values = copy.deepcopy(LLAMA2_7B)
    values["model"]["model_config"].update(num_layers=layers, offset=offset)
    values["parallel_config"].update(pipeline_stage=stages, data_parallel=1)
    if not expressible:
        with pytest.raises(EmberError, match="make the middle stages' offsets equal"):
            _config(tmp_path, values)
        return
    p = _config(tmp_path, values).parallel
    counts = split_layers(layers, stages, p.decoder_first_pipeline_num_layers, p.decoder_last_pipeline_num_layers)
    assert counts == _mindformers_stage_layers(layers, stages, offset)
    values["model"]["model_config"]["offset"] = [1, 1, 1, 0] if stages > 2 else [2, 2]
    with pytest.raises(EmberError, match="must add up to num_layers % pipeline_stage"):
        _config(tmp_path, values)


def test_recompute_counts(tmp_path, capsys):
    values = copy.deepcopy(LLAMA2_7B)
    values["recompute_config"] = {"recompute": [2, 2], "select_recompute": False}
    values["parallel_config"].update(pipeline_stage=2)
    t = _config(tmp_path, values).train
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)
    values["recompute_config"] = {"recompute": [3, 1]}
    t = _config(tmp_path, values).train
    assert (t.recompute_granularity, t.recompute_method) == ("full", "uniform")
    assert "per-stage counts differ" in capsys.readouterr().err
    values["recompute_config"] = {"recompute": False, "select_recompute": [0, 0]}
    assert _config(tmp_path, values).train.recompute_granularity is None


# --------------------------------------------------------------------------- profile, checkpoints, eval


def test_profile_async_save_and_eval(tmp_path):
    values = copy.deepcopy(LLAMA2_7B)
    values.update(profile=True, profile_start_step=4, profile_stop_step=8, profile_memory=True)
    values["callbacks"][1]["async_save"] = True
    data = write_token_dataset(tmp_path / "train", documents=40)
    valid = write_token_dataset(tmp_path / "valid", documents=30, seed=1)
    values["model"]["model_config"]["seq_length"] = 32
    values["do_eval"] = True
    values["eval_step_interval"] = 5
    values["eval_dataset"]["data_loader"]["dataset_dir"] = valid
    c = train_config(["--config", _write(tmp_path, values), "--train_dataset_dir", data])
    lg = c.logging
    # MindFormers profiles steps 4..8 (1-based, both ends); Megatron's window: after step 3 up to 8
    assert (lg.profile, lg.profile_step_start, lg.profile_step_end, lg.record_memory_history) == (True, 3, 8, True)
    assert c.checkpoint.async_save
    d, t = c.data, c.train
    assert (d.data_path, d.train_data_path, d.valid_data_path) == ([], [data], [valid])
    from ember.data.indexed import IndexedDataset

    samples = (int(IndexedDataset(valid).sequence_lengths.sum()) - 1) // 32  # the whole evaluation set
    assert (t.eval_interval, t.eval_iters) == (5, math.ceil(samples / t.global_batch_size))
    off = train_config(["--config", _write(tmp_path, values), "--train_dataset_dir", data, "--do_eval", "False"])
    assert off.train.eval_iters == 0 and off.data.data_path == [data]


# --------------------------------------------------------------------------- run_mindformer.py flags


def test_run_mindformer_flags(tmp_path, capsys):
    path = _write(tmp_path, LLAMA2_7B)
    # --train_dataset: a declared alias (upstream it works by argparse's prefix matching)
    assert train_config(["--config", path, "--train_dataset", "x_text_document"]).data.data_path == ["x_text_document"]
    with pytest.raises(SystemExit):  # and prefix matching is off
        train_config(["--config", path, "--train_data", "x_text_document"])
    assert "unrecognized arguments: --train_data" in capsys.readouterr().err
    c = train_config(["--config", path, "--use_parallel", "False", "--batch_size", "3", "--device_id", "0",
                      "--mode", "0"])
    assert c.parallel.dp_mode == "replicate" and (c.train.micro_batch_size, c.train.global_batch_size) == (3, 24)
    assert "not needed by ember: --device_id --mode" in capsys.readouterr().err
    # without a MindFormers file: --resume_training decides between continuing and weights only
    ckpt = tmp_path / "weights"
    ckpt.mkdir()
    base = ["--model", "tiny-llama", "--data-path", "d_text_document", "--load", str(ckpt)]
    assert train_config([*base, "--resume_training", "False"]).train.finetune
    resumed = train_config([*base, "--resume_training", "True"])
    assert not resumed.train.finetune and resumed.checkpoint.resume
    assert train_config([*base, "--use_parallel", "False", "--tensor-model-parallel-size", "2"]).parallel \
        .tensor_model_parallel_size == 1
    with pytest.raises(EmberError, match="a checkpoint file name is MindSpore's"):
        train_config([*base, "--resume_training", "llama_rank_0-10_2.ckpt"])


def test_mindrecord_dataset_is_refused_with_the_command(tmp_path):
    with pytest.raises(EmberError, match="MindRecord.*ember preprocess --input wiki.train.tokens"):
        train_config(["--config", _write(tmp_path, LLAMA2_7B), "--train_dataset_dir", "/data/wiki4096.mindrecord"])


# --------------------------------------------------------------------------- msrun_launcher.sh forms

# scripts/msrun_launcher.sh@v1.5.0: $# = 1, 2, 6 or 9 (the command counts). What msrun gets:
# (worker_num, local_worker_num, master_addr, master_port, node_rank, log_dir, join, cluster_time_out);
# the single-node forms pass no master_addr / node_rank (msrun's 127.0.0.1, 0).
MSRUN_FORMS = [
    ([], (8, 8, "127.0.0.1", 8118, 0, "output/msrun_log", False, 7200)),
    (["4"], (4, 4, "127.0.0.1", 8118, 0, "output/msrun_log", False, 7200)),
    (["4", "9123", "logs/ms", "True", "300"], (4, 4, "127.0.0.1", 9123, 0, "logs/ms", True, 300)),
    (["64", "8", "10.0.0.1", "8118", "3", "output/msrun_log", "False", "300"],
     (64, 8, "10.0.0.1", 8118, 3, "output/msrun_log", False, 300)),
    (["8", "8", "10.0.0.1", "8118", "5", "out", "True", "60"], (8, 8, "127.0.0.1", 8118, 0, "out", True, 60)),
]


@pytest.mark.parametrize("positional, msrun", MSRUN_FORMS)
def test_msrun_launcher_argument_forms(positional, msrun, monkeypatch):
    from ember.commands.launch import add_arguments, plan_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.setenv("MF_LOG_SUFFIX", "")
    plan = plan_from_args(parser.parse_args(["--msrun", "run_mindformer.py --config c.yaml", *positional]))
    got = (plan.world_size, plan.nproc_per_node, plan.master_addr, plan.master_port, plan.node_rank, plan.log_dir,
           plan.join, plan.timeout)
    expected = list(msrun)
    if len(positional) < 2:  # the short forms' join=False returns at once; ember stays in the foreground
        expected[6] = True
    assert got == tuple(expected)
    assert plan.train_args == ["--config", "c.yaml"]
    monkeypatch.setenv("MF_LOG_SUFFIX", "run1")  # the script's log folder suffix
    plan = plan_from_args(parser.parse_args(["--msrun", "run_mindformer.py", *positional]))
    assert plan.log_dir == f"{msrun[5]}_run1"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from ember.compat.tiny_assets import prepare

    root = tmp_path_factory.mktemp("tiny-cache")
    prepare(root / "v1")
    return root


def test_llama3_70b_seed_command_resolves_tiny(tmp_path, monkeypatch, capsys, tiny_cache):
    """The seed's 8-node command line (9 arguments, JOIN False), checked as every rank resolves it,
    tiny: 64 CPU processes for TP 8 x PP 8 (printed, not started: --dry-run)."""
    from ember.commands.launch import add_arguments, run

    monkeypatch.setenv("EMBER_TINY", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))  # tiny sets it
    monkeypatch.setenv("EMBER_TINY_CACHE", str(tiny_cache))
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = _write(tmp_path, LLAMA3_70B, "pretrain_llama3_70b.yaml")
    command = (f"run_mindformer.py --register_path research/llama3 --config {config} --train_dataset dataset_dir "
               f"--use_parallel True --run_mode train")
    args = parser.parse_args(["--dry-run", "--msrun", command, "64", "8", "127.0.0.1", "8118", "0",
                              "output/msrun_log", "False", "300"])
    assert run(args) == 0
    out = capsys.readouterr()
    assert "--nproc-per-node=64" in out.out and "tp 8, pp 8" in out.err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EMBER_TEST_64_RANKS") != "1",
                    reason="64 CPU processes (TP 8 x PP 8): ~16 GB and ~6 min on 2 cores; EMBER_TEST_64_RANKS=1 runs it")
def test_llama3_70b_seed_command_runs_tiny_on_64_processes(tmp_path, tiny_cache):
    """The seed's 8-node command line as written (9 arguments, JOIN False: msrun starts in the
    background and returns), tiny: all 64 ranks of its TP 8 x PP 8 layout on this machine train 3
    iterations and save. Measured 2026-12-05 on a 2-core, 24 GB machine: 4-5.5 min, ~16 GB in use."""
    import json
    import re
    import subprocess
    import sys
    import time

    from dist_utils import free_port

    config = _write(tmp_path, LLAMA3_70B, "pretrain_llama3_70b.yaml")
    env = dict(os.environ, EMBER_TINY="1", EMBER_TINY_ITERS="3", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               EMBER_TINY_CACHE=str(tiny_cache), MASTER_PORT=str(free_port()),
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    command = (f"run_mindformer.py --register_path research/llama3 --config {config} --train_dataset dataset_dir "
               f"--use_parallel True --run_mode train")
    result = subprocess.run(["ember", "launch", "--msrun", command, "64", "8", "127.0.0.1", str(free_port()), "0",
                             "output/msrun_log", "False", "300"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64 CPU process(es) (tp 8, pp 8" in result.stderr
    pid = int(re.search(r"started in the background \(pid (\d+)\)", result.stderr).group(1))
    deadline = time.monotonic() + 900
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(2)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, 9)
        pytest.fail("the 64-rank run did not finish in 15 minutes")
    save = tmp_path / "output" / "checkpoint"
    state = json.loads((save / (save / "latest").read_text().strip() / "train_state.json").read_text())
    parallel = state["config"]["parallel"]
    assert state["state"]["iteration"] == 3
    assert (parallel["tensor_model_parallel_size"], parallel["pipeline_model_parallel_size"]) == (8, 8)


@pytest.mark.slow
def test_llama2_7b_seed_command_runs_tiny(tmp_path, tiny_cache):
    """The seed's single-node command line, as written (the .mindrecord dataset included), with only
    `bash scripts/msrun_launcher.sh` changed to `ember launch --msrun`: it trains, tiny."""
    import json
    import subprocess
    import sys

    from dist_utils import free_port

    config = _write(tmp_path, LLAMA2_7B, "pretrain_llama2_7b.yaml")
    env = dict(os.environ, EMBER_TINY="1", EMBER_TINY_ITERS="3", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    command = (f"run_mindformer.py --config {config} --train_dataset_dir /path/wiki4096.mindrecord "
               f"--use_parallel True --run_mode train")
    env["EMBER_TINY_CACHE"] = str(tiny_cache)
    result = subprocess.run(["ember", "launch", "--msrun", command, "8"], cwd=tmp_path, env=dict(
        env, MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    save = tmp_path / "output" / "checkpoint"
    state = json.loads((save / (save / "latest").read_text().strip() / "train_state.json").read_text())
    assert state["state"]["iteration"] == 3 and state["config"]["parallel"]["dp_mode"] == "fsdp"
    assert "is MindRecord (a full run refuses it)" in result.stderr
    assert (tmp_path / "output" / "msrun_log" / "worker_1.log").is_file()

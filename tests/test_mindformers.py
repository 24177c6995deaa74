"""MindFormers run configs read as ember configs: the example YAMLs resolve to the published
architectures (Hugging Face configs, in ember's registry), the batch / parallel / schedule settings
follow MindFormers' rules, `epochs` covers the data exactly as many times as Megatron's GPTDataset
counts it, and the run_mindformer.py flags are accepted."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import yaml

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import train_config, write_token_dataset
from ember.errors import EmberError
from ember.compat.mindformers import feed_forward_size, is_mindformers_config
from ember.models.registry import get_model_args

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _write(tmp_path: Path, values: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


@pytest.mark.parametrize("hidden, multiple_of, multiplier, model", [
    (4096, 256, None, "llama2-7b"), (5120, 256, None, "llama2-13b"),
    (4096, 1024, 1.3, "llama3-8b"), (8192, 4096, 1.3, "llama3-70b"), (8192, 256, 1.3, "llama3-70b"),
])
def test_feed_forward_size_matches_the_published_models(hidden, multiple_of, multiplier, model):
    assert feed_forward_size(hidden, multiple_of, multiplier) == get_model_args(model).ffn_dim


@pytest.mark.parametrize("name, model", [("llama2/pretrain_llama2_7b.yaml", "llama2-7b"),
                                         ("llama3/pretrain_llama3_70b.yaml", "llama3-70b")])
def test_example_yaml_describes_the_published_architecture(tmp_path, name, model):
    """From model_config alone (no registry name to lean on), the same ModelArgs as the HF config."""
    from ember.train.model_setup import resolve_model_args

    values = _example(name)
    assert is_mindformers_config(values)
    del values["trainer"]  # no model_name: the architecture comes from model_config only
    config = train_config(["--config", _write(tmp_path, values), "--train_dataset_dir", "data_text_document"])
    assert config.model.name is None
    resolved = resolve_model_args(config, None).to_dict()
    published = get_model_args(model).to_dict()
    different = {k: (resolved[k], published[k]) for k in published if resolved[k] != published[k]}
    assert not different, different
    assert config.data.data_path == ["data_text_document"] and config.data.seq_length == values["model"][
        "model_config"]["seq_length"]


def _settings(pipeline_stage: int) -> dict:
    return {
        "seed": 3, "output_dir": "./out", "run_mode": "train", "use_parallel": True,
        "runner_config": {"epochs": 1, "batch_size": 2, "sink_size": 5, "gradient_accumulation_steps": 3},
        "parallel": {"enable_parallel_optimizer": True},
        "parallel_config": {"data_parallel": 4, "model_parallel": 2, "pipeline_stage": pipeline_stage,
                            "use_seq_parallel": True, "micro_batch_num": 8, "vocab_emb_dp": False},
        "micro_batch_interleave_num": 1,
        "recompute_config": {"recompute": True},
        "optimizer": {"type": "AdamW", "betas": [0.8, 0.9], "eps": 1.0e-6, "weight_decay": 0.1},
        "lr_schedule": {"type": "LinearWithWarmUpLR", "learning_rate": 3.0e-4, "lr_end": 1.0e-5,
                        "warmup_steps": 10, "total_steps": 100},
        "runner_wrapper": {"use_clip_grad": True,
                           "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 4096,
                                           "scale_factor": 2, "scale_window": 500}},
        "callbacks": [{"type": "MFLossMonitor"},
                      {"type": "CheckpointMonitor", "save_checkpoint_steps": 50, "keep_checkpoint_max": 3}],
        "train_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": "d_text_document"}},
        "model": {"model_config": {"type": "LlamaConfig", "seq_length": 1024, "hidden_size": 512, "num_layers": 4,
                                   "num_heads": 8, "vocab_size": 1000, "compute_dtype": "bfloat16"}},
    }


@pytest.mark.parametrize("pipeline_stage", [1, 2])
def test_batch_parallel_schedule_and_outputs_follow_mindformers(tmp_path, pipeline_stage):
    values = _settings(pipeline_stage)
    c = train_config(["--config", _write(tmp_path, values)])
    run, par = values["runner_config"], values["parallel_config"]
    # global batch: batch_size x data_parallel x (micro_batch_num with pipeline stages, else
    # gradient_accumulation_steps) x micro_batch_interleave_num
    steps = par["micro_batch_num"] if pipeline_stage > 1 else run["gradient_accumulation_steps"]
    assert c.train.micro_batch_size == run["batch_size"]
    assert c.train.global_batch_size == run["batch_size"] * par["data_parallel"] * steps
    p = c.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size) == (2, pipeline_stage)
    assert p.sequence_parallel and p.dp_mode == "fsdp"
    assert (c.train.lr_decay_style, c.train.lr, c.train.min_lr) == ("linear", 3.0e-4, 1.0e-5)
    assert (c.train.lr_warmup_iters, c.train.lr_decay_iters) == (10, 100)
    assert (c.optim.adam_beta1, c.optim.adam_beta2, c.optim.adam_eps, c.optim.weight_decay) == (0.8, 0.9, 1e-6, 0.1)
    assert (c.train.recompute_granularity, c.train.precision, c.train.seed) == ("full", "bf16", 3)
    assert (c.checkpoint.save, c.checkpoint.save_interval, c.checkpoint.keep_last) == ("out/checkpoint", 50, 3)
    assert (c.logging.output_dir, c.logging.log_interval) == ("./out", 5)
    # MindSpore's dynamic loss scale: no hysteresis, the scale drops at the first overflow
    assert (c.train.initial_loss_scale, c.train.loss_scale_window, c.train.hysteresis) == (4096.0, 500, 1)


def test_command_line_flags_of_run_mindformer(tmp_path):
    """--use_parallel False: one device, parallel_config ignored; --batch_size and --load_checkpoint
    override the file; MindSpore-only flags (--register_path, --device_id) are accepted."""
    values = _settings(2)
    path = _write(tmp_path, values)
    ckpt = tmp_path / "weights"
    ckpt.mkdir()
    c = train_config(["--config", path, "--use_parallel", "False", "--batch_size", "3", "--register_path",
                      "research/llama3", "--device_id", "0", "--load_checkpoint", str(ckpt), "--run_mode", "finetune"])
    p = c.parallel
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.sequence_parallel) == (1, 1, False)
    assert c.train.micro_batch_size == 3
    assert c.train.global_batch_size == 3 * values["runner_config"]["gradient_accumulation_steps"]
    assert c.checkpoint.load == str(ckpt) and c.train.finetune
    # load_checkpoint continues the run (optimizer, step) only with --resume_training True
    weights_only = train_config(["--config", path, "--load_checkpoint", str(ckpt)])
    resumed = train_config(["--config", path, "--load_checkpoint", str(ckpt), "--resume_training", "True"])
    assert weights_only.train.finetune and not resumed.train.finetune


@pytest.mark.parametrize("change, message", [
    (lambda v: v["model"]["model_config"].update(type="GLMConfig"), "GLMConfig is not supported"),
    (lambda v: v["lr_schedule"].update(type="Nonsense"), "lr_schedule type Nonsense"),
    (lambda v: v["train_dataset"]["data_loader"].update(dataset_dir="/data/wiki4096.mindrecord"), "MindRecord"),
    (lambda v: v["runner_config"].update(batch_size=0), "runner_config.batch_size must be >= 1"),
])
def test_unusable_settings_say_what_to_do(tmp_path, change, message):
    values = copy.deepcopy(_settings(1))
    change(values)
    with pytest.raises(EmberError, match=message):
        train_config(["--config", _write(tmp_path, values)])


def test_ember_yaml_is_not_taken_for_mindformers():
    assert not is_mindformers_config({"model": {"name": "tiny-llama"}, "train": {"lr": 1e-3}})


# --------------------------------------------------------------------------- epochs


def _megatron_epoch_samples(prefix: str, seq_length: int) -> int:
    """Samples in one epoch of Megatron's own GPTDataset (megatron-core), train split 100%."""
    builder = pytest.importorskip("megatron.core.datasets.blended_megatron_dataset_builder")
    gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")

    class Tokenizer:
        vocab_size, eod, unique_identifiers = None, 0, {"class": "TestTokenizer"}

    config = gpt.GPTDatasetConfig(
        random_seed=1, sequence_length=seq_length, blend=([prefix], None), split="100,0,0", path_to_cache=None,
        tokenizer=Tokenizer(), reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _, _ = builder.BlendedMegatronDatasetBuilder(gpt.GPTDataset, [None, None, None], lambda: True,
                                                            config).build()
    return len(train)


def test_epochs_cover_the_data_as_megatron_counts_it(tmp_path):
    """runner_config.epochs on a tiny LlamaConfig: the run trains epochs x (one epoch's samples) /
    global batch iterations, one epoch counted by megatron-core's GPTDataset."""
    from ember.train import run_training

    data = write_token_dataset(tmp_path / "tokens", documents=40)
    seq_length, batch, epochs = 32, 4, 2
    values = {
        "output_dir": str(tmp_path / "out"), "use_parallel": False,
        "runner_config": {"epochs": epochs, "batch_size": batch, "sink_size": 1},
        "lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": 1.0e-3, "lr_end": 0.0, "warmup_ratio": 0.1},
        "train_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": ""}},
        "model": {"model_config": {"type": "LlamaConfig", "seq_length": seq_length, "hidden_size": 64,
                                   "num_layers": 2, "num_heads": 4, "n_kv_heads": 2, "intermediate_size": 176,
                                   "vocab_size": 512, "compute_dtype": "float32"}},
    }
    config = train_config(["--config", _write(tmp_path, values), "--train_dataset_dir", data, "--no-tensorboard"])
    expected = epochs * _megatron_epoch_samples(data, seq_length) // batch
    assert config.train.train_iters == expected and config.train.train_epochs is None
    result = run_training(config)
    assert (result.reason, result.iteration) == ("finished", expected)

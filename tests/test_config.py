"""One config from YAML, Megatron-style flags and dotted overrides; bad settings fail in one line
before any process starts."""

import subprocess
import sys

import pytest
import yaml

from dist_utils import train_config, write_token_dataset
from ember.cli import main as ember_main
from ember.config import Config, validate
from ember.errors import EmberError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", documents=20)


def _base(data, *more):
    return ["--model", "tiny-llama", "--data-path", data, "--seq-length", "32", "--train-iters", "10", *more]


def test_precedence_yaml_then_flags_then_overrides(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "tiny-qwen3"},
        "train": {"micro_batch_size": 4, "lr": 1.0e-3, "seed": 7},
        "optim": {"adam_beta2": 0.95},
        "log_interval": 5,  # a key unique across sections may stand at the top level
    }))
    config = train_config(["--config", str(path), "--data-path", data, "--micro-batch-size", "2", "--lr", "3e-4",
                           "--bf16", "--no-shared-storage", "--use-distributed-optimizer",
                           "train.lr=1e-4", "clip_grad=0.3", "data.split=98,2,0"])
    assert config.model.name == "tiny-qwen3"              # YAML
    assert config.train.seed == 7 and config.optim.adam_beta2 == 0.95
    assert config.logging.log_interval == 5
    assert config.train.micro_batch_size == 2             # flag over YAML
    assert config.train.lr == 1e-4                        # override over flag
    assert config.optim.clip_grad == 0.3
    assert config.train.precision == "bf16"
    assert config.data.shared_storage is False
    assert config.parallel.dp_mode == "zero1"
    assert config.data.split == "98,2,0"
    assert config.data.data_path == [data]


def test_seed_style_flags(data):
    config = train_config([
        "--data-path", f"0.3 {data} 0.7 {data}", "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size",
        "128", "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2",
        "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--max-position-embeddings", "128",
        "--rotary-base", "500000", "--vocab-size", "500", "--seq-length", "64", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--lr", "1e-4", "--min-lr", "1e-5", "--lr-decay-style", "cosine",
        "--lr-warmup-fraction", "0.01", "--train-iters", "100", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--fp16", "--split", "949,50,1",
        "--tokenizer-type", "PretrainedFromHF", "--save", "ckpt", "--save-interval", "50", "--eval-interval", "10",
        "--eval-iters", "2", "--log-interval", "1", "--seed", "42", "--recompute-granularity", "full",
        "--recompute-method", "block", "--recompute-num-layers", "1", "--overlap-grad-reduce",
        "--no-shared-storage", "--use-distributed-optimizer"])
    assert config.data.data_path == ["0.3", data, "0.7", data]
    assert config.model.num_query_groups == 2 and config.model.swiglu
    assert config.train.precision == "fp16" and config.train.recompute_num_layers == 1
    resolved = validate(config)
    from ember.train.model_setup import resolve_model_args

    args = resolve_model_args(resolved, None)
    assert (args.n_layers, args.dim, args.ffn_dim, args.n_heads, args.n_kv_heads) == (2, 64, 128, 4, 2)
    assert args.vocab_size == 512  # padded to a multiple of 128, as Megatron does
    assert (args.norm_type, args.mlp_type, args.position_type) == ("rmsnorm", "gated", "rope")
    assert not args.tie_embeddings and not args.qkv_bias and args.rope_theta == 500000.0


def test_mindformers_style_flags(data, tmp_path):
    config = train_config(["--model", "tiny-llama", "--train_dataset_dir", data, "--run_mode", "finetune",
                           "--use_parallel", "True", "--load_checkpoint", str(tmp_path), "--output_dir", "out"])
    assert config.data.data_path == [data] and config.train.finetune
    assert config.checkpoint.load == str(tmp_path) and config.logging.output_dir == "out"


def test_print_config_round_trips(tmp_path, data, capsys):
    argv = ["train", *_base(data, "--micro-batch-size", "2", "--lr", "2e-4", "--vocab-size", "512"), "--print-config"]
    assert ember_main(argv) == 0
    printed = capsys.readouterr().out
    assert "n_layers: 2" in printed  # the resolved architecture, as comments
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    again = train_config(["--config", str(path)])
    assert again.to_dict() == validate(train_config(_base(data, "--micro-batch-size", "2", "--lr", "2e-4",
                                                          "--vocab-size", "512"))).to_dict()


@pytest.mark.parametrize("flags, world, message", [
    (["--micro-batch-size", "3", "--global-batch-size", "8"], 1, "not divisible by micro batch size 3"),
    (["--micro-batch-size", "2", "--global-batch-size", "6"], 2, "data-parallel size 2"),
    (["--bf16", "--fp16"], 1, "choose one precision"),
    (["--lr-warmup-iters", "5", "--lr-warmup-fraction", "0.1"], 1, "choose one way to set the warmup"),
    (["--min-lr", "1", "--lr", "0.1"], 1, "is above --lr"),
    (["--train-tokens", "100"], 1, "exactly one training length"),
    (["--tensor-model-parallel-size", "4"], 2, "do not divide into tensor x pipeline x context"),
    (["--expert-model-parallel-size", "4"], 2, "must divide data-parallel x context-parallel size 2"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "1"], 2, "1F1B needs at least"),
    (["--num-layers-per-virtual-pipeline-stage", "1"], 1, "needs pipeline parallelism"),
    (["--finetune"], 1, "--finetune needs --load"),
    (["--recompute-method", "uniform"], 1, "needs --recompute-granularity full"),
    (["--save-interval", "10"], 1, "without --save"),
    (["--lr-decay-style", "cosine_with_restarts"], 1, "lr_decay_style"),
    (["train.micro_batch_size=0"], 1, "must be a positive number"),
    (["train.micro_batch_sise=2"], 1, "did you mean 'train.micro_batch_size'"),
    (["--load", "/nonexistent/ckpt"], 1, "does not exist"),
    (["--train-epochs", "2"], 1, "exactly one training length"),
])
def test_bad_settings_fail_in_one_line(data, flags, world, message):
    argv = _base(data)  # has --train-iters 10
    with pytest.raises(EmberError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        validate(train_config(argv + flags), world_size=world)
    assert "\n" not in str(info.value)


def test_missing_data_and_model(tmp_path):
    with pytest.raises(EmberError, match="not found"):
        validate(train_config(["--model", "tiny-llama", "--data-path", str(tmp_path / "nope"), "--train-iters", "1"]))
    with pytest.raises(EmberError, match="no training data"):
        validate(train_config(["--model", "tiny-llama", "--train-iters", "1"]))
    with pytest.raises(EmberError, match="no model given"):
        validate(train_config(["--data-path", str(tmp_path / "x"), "--train-iters", "1"]), check_paths=False)
    with pytest.raises(EmberError, match="unknown setting 'nonsense'"):
        Config.from_dict({"train": {"lr": 1e-3}, "nonsense": 1}, "run.yaml")
    with pytest.raises(EmberError, match="is not a valid int"):
        Config.from_dict({"train": {"train_iters": "ten"}}, "run.yaml")


def test_cli_prints_one_line_and_starts_no_process(data, capsys):
    """`ember train --nproc-per-node 4` with a global batch 4 cannot split micro-batches of 3: the
    error comes before torchrun is started, as one line without a traceback."""
    code = ember_main(["train", *_base(data, "--micro-batch-size", "3", "--global-batch-size", "12",
                                       "--nproc-per-node", "8")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("ember train: error: global batch size 12 is not divisible")


def test_torchrun_module_entry_reports_errors_the_same_way(data):
    proc = subprocess.run([sys.executable, "-m", "ember.commands.train", *_base(data, "--bf16", "--fp16")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ember train: error: --bf16 and --fp16 both given; choose one precision"


def test_validation_is_idempotent_for_derived_values(data):
    """A printed (resolved) config read back validates to the same thing, token budgets included."""
    config = train_config(["--model", "tiny-llama", "--data-path", data, "--seq-length", "32",
                           "--global-batch-size", "4", "--train-tokens", "4000", "--warmup-tokens", "640"])
    once = validate(config)
    assert once.train.train_iters == 4000 // (4 * 32)
    assert validate(once).to_dict() == once.to_dict()


def test_parsing_a_tiny_config_has_no_side_effects(tmp_path, monkeypatch, data):
    """EMBER_TINY: translating the arguments neither builds the assets nor touches the environment;
    the command's explicit step does (issue 13: parsing used to train a tokenizer and set
    CUDA_VISIBLE_DEVICES)."""
    import os

    from ember.compat import config_from_args, tiny
    from ember.compat.tiny_assets import TinyAssets

    cache = tmp_path / "cache"
    monkeypatch.setenv("EMBER_TINY", "1")
    monkeypatch.setenv("EMBER_TINY_CACHE", str(cache))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = train_config(_base(data, "--tensor-model-parallel-size", "2"))
    assert config.model.name == "tiny-llama" and config.data.data_path == [data]  # untouched
    assets = TinyAssets(tmp_path / "assets")  # paths only: nothing is built
    with_tiny = config_from_args(_parsed(_base(data, "--tensor-model-parallel-size", "2")), assets)
    assert with_tiny.data.data_path == [assets.pretrain] and with_tiny.parallel.backend == "gloo"
    assert with_tiny.data.tokenizer_name_or_path == str(assets.tokenizer)
    assert tiny.world_size(with_tiny) == 2
    assert not cache.exists() and not (tmp_path / "assets").exists()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def _parsed(argv):
    import argparse

    from ember.commands.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)

"""Settings that would train something wrong are refused in one line, before any process starts:
non-finite numbers, loose `--split` forms, overrides swallowed by `--data-path`, unknown keys
(with a suggestion that fits), a `--load` holding another tool's checkpoint (or nothing), a
`--save` holding another run, and out-of-range decoding settings for `ember generate`."""

from __future__ import annotations

import json

import pytest
import yaml

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import train_config, write_token_dataset
from ember.cli import main as ember_main
from ember.config import Config, apply_override, validate
from ember.config.data_spec import parse_data_path, parse_split
from ember.errors import EmberError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens", documents=20)


def _argv(data, *more, iters=2):
    return ["--model", "tiny-llama", "--vocab-size", "512", "--data-path", data, "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", str(iters), "--log-interval", "1",
            "--eval-iters", "0", "--no-tensorboard", *more]


def _refused(argv, match: str) -> str:
    with pytest.raises(EmberError, match=match) as info:
        validate(train_config(argv))
    assert "\n" not in str(info.value)
    return str(info.value)


# --------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--min-lr", "nan"),
                                         ("--adam-eps", "inf"), ("--clip-grad", "nan"), ("--weight-decay", "inf"),
                                         ("--init-method-std", "nan"), ("--rotary-base", "inf")])
def test_non_finite_settings_are_refused(data, flag, value):
    """`--lr inf` passed every range check (only < 0 was refused) and trained NaN; `--lr nan` got
    as far as torch's optimizer and a traceback."""
    _refused(_argv(data, flag, value), r"is not a finite number")


def test_non_finite_settings_from_yaml_and_overrides_are_refused(data, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": float("inf")}}))
    _refused(["--config", str(path), *_argv(data)], r"train\.lr = inf is not a finite number")
    _refused(_argv(data, "optim.adam_beta2=.nan"), r"optim\.adam_beta2 = nan")


@pytest.mark.parametrize("spec", ["nan P", "inf P", "0.5 P -inf Q", "1 P nan Q"])
def test_non_finite_blend_weights_are_refused(spec):
    with pytest.raises(EmberError, match="must be a positive finite number"):
        parse_data_path(spec)


def test_non_finite_blend_weight_on_the_command_line_is_one_line(data, capsys):
    code = ember_main(["train", *_argv(data, "--data-path", f"nan {data}")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "weight nan" in err


# --------------------------------------------------------------------------- --split


@pytest.mark.parametrize("split, fractions", [
    ("969,30,1", [0.969, 0.03, 0.001]), ("98/2/0", [0.98, 0.02, 0.0]), ("99,1", [0.99, 0.01, 0.0]),
    ("0.8, 0.1, 0.1", [0.8, 0.1, 0.1]), ("100", [1.0, 0.0, 0.0]), (" 1/1/2 ", [0.25, 0.25, 0.5]),
])
def test_split_accepts_megatron_forms(split, fractions):
    assert parse_split(split) == pytest.approx(fractions)


@pytest.mark.parametrize("split", ["-1,2,3", "1,2,3,4", "a,b", "1e2,1,1", "inf,1,1", "nan", "1,,2", "1;2;3",
                                   "1,2/3", "", "+1,2,3", "0,0,0"])
def test_split_refuses_everything_else(split):
    """`-1,2,3` used to become 1,2,3 (the regular expression skipped the sign)."""
    with pytest.raises(EmberError, match="--split") as info:
        parse_split(split)
    assert "\n" not in str(info.value)


def test_split_without_training_data_is_refused(data):
    """`0,100,0` passed validation and ended in a TypeError from the data loader."""
    _refused(_argv(data, "--split", "0,100,0"), r"training split gets no data")


# --------------------------------------------------------------------------- overrides and unknown keys


def test_override_after_data_path_is_an_override(data):
    """`--data-path P train.lr=1e-4`: nargs='+' took the override for a second dataset."""
    config = train_config(_argv(data, "--data-path", data, "train.lr=1e-4", "clip_grad=0.5"))
    assert config.data.data_path == [data]
    assert config.train.lr == 1e-4 and config.optim.clip_grad == 0.5
    blend = train_config(_argv(data, "--data-path", "0.3", data, "0.7", data, "train.seed=5"))
    assert blend.data.data_path == ["0.3", data, "0.7", data] and blend.train.seed == 5
    validate(blend)


def test_misspelt_override_after_data_path_gets_a_suggestion(data):
    with pytest.raises(EmberError, match=r"unknown setting 'train\.lr_decay_stlye'.*'train\.lr_decay_style'"):
        train_config(_argv(data, "--data-path", data, "train.lr_decay_stlye=linear"))


def test_path_with_an_equals_sign_stays_a_path(tmp_path):
    prefix = str(tmp_path / "run=1" / "tokens")
    config = train_config(["--data-path", prefix, "--train-iters", "1"])
    assert config.data.data_path == [prefix]


@pytest.mark.parametrize("key, suggestion", [
    ("train.lr_decay_stlye", "train.lr_decay_style"), ("lr-decay", "lr_decay_style"),
    ("micro_batch", "micro_batch_size"), ("train.iters", "train.train_iters"),
    ("train.seq_length", "data.seq_length"), ("train.save_interval", "checkpoint.save_interval"),
    ("parallel.tp", "parallel.tensor_model_parallel_size"), ("warmup", "lr_warmup_iters"),
    ("model.num_layer", "model.num_layers"),
])
def test_unknown_keys_get_a_relevant_suggestion(key, suggestion):
    with pytest.raises(EmberError, match="did you mean") as info:
        apply_override(Config(), f"{key}=1")
    suggested = str(info.value).split("did you mean ", 1)[1]
    assert suggested.startswith(f"'{suggestion}'"), str(info.value)


def test_unknown_yaml_key_gets_a_suggestion():
    with pytest.raises(EmberError, match=r"unknown setting 'train\.micro_batch' in run\.yaml; did you mean "
                                         r"'train\.micro_batch_size'"):
        Config.from_dict({"train": {"micro_batch": 2}}, "run.yaml")


# --------------------------------------------------------------------------- --load


def _run(argv):
    from ember.train import run_training

    return run_training(train_config(argv))


def _hf_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "model.safetensors").write_bytes(b"\0" * 16)
    return path


def _megatron_folder(path):
    (path / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    (path / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"\0" * 16)
    (path / "latest_checkpointed_iteration.txt").write_text("100")
    return path


def _megatron_dist_iteration(path):
    """One Megatron-Core torch_dist save (DCP files, but no ember train_state.json)."""
    path.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp", "common.pt", "metadata.json"):
        (path / name).write_bytes(b"\0" * 16)
    return path


def _mindspore_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 16)
    return path


@pytest.mark.parametrize("make, match", [
    (lambda p: _hf_folder(p / "hf"), r"Hugging Face model folder.*ember convert --from hf --to ember .*hf OUT"),
    (lambda p: _mindspore_file(p / "ms" / "llama_7b.ckpt"), r"MindSpore checkpoint \(\.ckpt\).*Hugging Face"),
    (lambda p: _mindspore_file(p / "ms" / "rank_0" / "llama_7b_rank_0-10_2.ckpt").parent.parent,
     r"MindSpore checkpoint"),
])
@pytest.mark.parametrize("finetune", [False, True])
def test_load_of_another_tools_checkpoint_says_what_to_run(data, tmp_path, make, match, finetune):
    """Each used to print "no checkpoint ... starting from scratch" and train a random model, rc 0."""
    load = make(tmp_path)
    argv = _argv(data, "--load", str(load), "--save", str(tmp_path / "out"), *(["--finetune"] if finetune else []))
    with pytest.raises(EmberError, match=match) as info:
        _run(argv)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "out").glob("iter_*"))  # nothing trained, nothing saved


@pytest.mark.parametrize("make, finetune, match", [
    # an iter_N is continued with its optimizer state as Megatron would (tests/test_megatron_optim.py
    # has the real ones, and the refusal of one without optimizer state), and with --finetune its
    # weights are imported: either way these files are read, found damaged, and say so
    (lambda p: _megatron_folder(p / "mega"), False, r"model_optim_rng.pt: cannot be read as a torch checkpoint"),
    (lambda p: _megatron_folder(p / "mega") / "iter_0000100", False,
     r"model_optim_rng.pt: cannot be read as a torch checkpoint"),
    (lambda p: _megatron_dist_iteration(p / "dist" / "iter_0000010"), False, r"\.metadata is not DCP checkpoint metadata"),
    (lambda p: _megatron_folder(p / "mega"), True, r"model_optim_rng.pt: cannot be read as a torch checkpoint"),
    (lambda p: _megatron_dist_iteration(p / "dist" / "iter_0000010"), True, r"\.metadata is not DCP checkpoint metadata"),
])
def test_load_of_a_megatron_checkpoint_is_imported_or_refused(data, tmp_path, make, finetune, match):
    """`--load MEGATRON_DIR` is converted on the fly (tests/test_megatron_checkpoint.py trains from
    real ones); what cannot be is refused in one line, and nothing trains from random weights."""
    load = make(tmp_path)
    argv = _argv(data, "--load", str(load), "--save", str(tmp_path / "out"), *(["--finetune"] if finetune else []))
    with pytest.raises(EmberError, match=match) as info:
        _run(argv)
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "out").glob("iter_*"))
    assert not list((tmp_path / "out").glob("megatron_import/iter_*"))  # no half-written import


def test_load_that_holds_nothing_is_refused(data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmberError, match="holds no ember checkpoint.*drop --load"):
        _run(_argv(data, "--load", str(empty), "--save", str(tmp_path / "out")))
    with pytest.raises(EmberError, match="--finetune.*nothing to fine-tune"):
        _run(_argv(data, "--load", str(empty), "--save", str(tmp_path / "out"), "--finetune"))


def test_finetune_of_a_first_run_save_folder_is_refused(data, tmp_path):
    """`--load DIR --save DIR` starts from scratch on a first run, but never under --finetune."""
    ckpt = str(tmp_path / "ckpt")
    _refused(_argv(data, "--load", ckpt, "--save", ckpt, "--finetune"), "nothing to fine-tune")
    assert _run(_argv(data, "--load", ckpt, "--save", ckpt)).iteration == 2  # the first run of the job


def test_mindformers_finetune_with_nothing_to_load_is_refused(data):
    _refused(_argv(data, "--run_mode", "finetune"), "--finetune needs --load")


def test_save_that_holds_a_megatron_checkpoint_is_refused(data, tmp_path):
    """ember's iter_* folders (and --keep-last) would replace or delete Megatron's own."""
    save = _megatron_folder(tmp_path / "mega")
    with pytest.raises(EmberError, match="--save .* holds a Megatron-LM/ModelLink checkpoint"):
        _run(_argv(data, "--save", str(save)))
    assert (save / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def test_tiny_mode_drops_a_missing_load_but_refuses_a_foreign_one(data, tmp_path, monkeypatch, capsys):
    from ember.compat import config_from_args
    from ember.compat.tiny_assets import TinyAssets

    from test_config import _parsed

    monkeypatch.setenv("EMBER_TINY", "1")
    assets = TinyAssets(tmp_path / "assets")  # paths only: nothing is built
    missing = config_from_args(_parsed(_argv(data, "--load", str(tmp_path / "nope"), "--finetune")), assets)
    assert missing.checkpoint.load is None and not missing.train.finetune
    assert "does not exist" in capsys.readouterr().err
    hf = _hf_folder(tmp_path / "hf")
    with pytest.raises(EmberError, match="Hugging Face model folder"):
        config_from_args(_parsed(_argv(data, "--load", str(hf))), assets)


def test_train_command_reports_a_foreign_load_before_starting_processes(data, tmp_path, capsys):
    hf = _hf_folder(tmp_path / "hf")
    code = ember_main(["train", *_argv(data, "--load", str(hf), "--global-batch-size", "4", "--nproc-per-node", "2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Hugging Face model folder" in err


# --------------------------------------------------------------------------- resuming only the same run


@pytest.fixture(scope="module")
def saved_run(data, tmp_path_factory):
    """A finished 2-iteration run of tiny-llama with 2 layers, its checkpoint in SAVE."""
    save = tmp_path_factory.mktemp("run") / "ckpt"
    assert _run(_argv(data, "--num-layers", "2", "--save", str(save))).iteration == 2
    return save


def _copy(saved_run, tmp_path):
    import shutil

    save = tmp_path / "ckpt"
    shutil.copytree(saved_run, save)
    return save


@pytest.mark.parametrize("change, difference", [
    (["--num-layers", "4"], "model.n_layers: saved 2, now 4"),
    (["--seq-length", "16"], "data.seq_length: saved 32, now 16"),
    (["--split", "90,10,0"], "data.split: saved 969,30,1, now 90,10,0"),
    (["--model", "tiny-qwen3"], "model.head_dim: saved 16, now 32"),
])
def test_save_of_a_different_run_is_not_resumed(data, saved_run, tmp_path, change, difference):
    """Another model or data in the same --save used to be resumed silently (or fail with a message
    about architecture flags that a script's user cannot act on)."""
    save = _copy(saved_run, tmp_path)
    argv = _argv(data, "--num-layers", "2", "--save", str(save), iters=4) + change
    with pytest.raises(EmberError, match="of a different run") as info:
        _run(argv)
    message = str(info.value)
    assert difference in message and "--overwrite" in message and "--finetune" in message and "\n" not in message
    assert json.loads((save / "iter_0000002" / "train_state.json").read_text())["state"]["iteration"] == 2


def test_different_data_is_not_resumed(data, saved_run, tmp_path):
    save = _copy(saved_run, tmp_path)
    other = write_token_dataset(tmp_path / "other", documents=20, seed=3)
    with pytest.raises(EmberError, match="data.data_path: saved .*tokens, now .*other"):
        _run(_argv(other, "--num-layers", "2", "--save", str(save), iters=4))


def test_same_run_resumes_with_run_time_settings_changed(data, saved_run, tmp_path):
    """The learning rate, the length and the logging may change between a run and its resumption;
    the model may be spelled another way (tiny-llama has 2 layers: `--num-layers 2` is no change)."""
    save = _copy(saved_run, tmp_path)
    result = _run(_argv(data, "--save", str(save), "--lr", "3e-4", "--log-interval", "2", iters=4))
    assert result.iteration == 4 and set(result.losses) == {3, 4}  # continued after iteration 2


def test_no_resume_refuses_to_write_over_a_checkpoint_and_overwrite_replaces_it(data, saved_run, tmp_path, capsys):
    save = _copy(saved_run, tmp_path)
    with pytest.raises(EmberError, match="resuming is off.*--overwrite"):
        _run(_argv(data, "--num-layers", "2", "--save", str(save), "--no-resume"))
    # --overwrite: a new run (here another model) from iteration 0; the old checkpoints are gone
    result = _run(_argv(data, "--num-layers", "4", "--save", str(save), "--no-resume", "--overwrite", iters=1))
    assert result.iteration == 1
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000001"]
    assert "--overwrite: removed latest, iter_0000002" in capsys.readouterr().out
    state = json.loads((save / "iter_0000001" / "train_state.json").read_text())
    assert state["config"]["model"]["num_layers"] == 4
    with pytest.raises(EmberError, match="--overwrite given without --save"):
        validate(train_config(_argv(data, "--overwrite")))


def test_mindformers_resume_training_false_is_honoured(data, saved_run, tmp_path):
    """MindFormers' `resume_training: False` was ignored: output_dir/checkpoint was resumed."""
    output = tmp_path / "output"
    _copy(saved_run, output).rename(output / "checkpoint")
    values = {
        "output_dir": str(output), "use_parallel": False, "resume_training": False,
        "runner_config": {"batch_size": 2, "sink_size": 1},
        "train_dataset": {"data_loader": {"type": "MindDataset", "dataset_dir": data}},
        "model": {"model_config": {"type": "LlamaConfig", "seq_length": 32, "hidden_size": 64, "num_layers": 2,
                                   "num_heads": 4, "vocab_size": 512}},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    config = train_config(["--config", str(path), "--train-iters", "2", "--no-tensorboard"])
    assert config.checkpoint.resume is False
    from ember.train import run_training

    with pytest.raises(EmberError, match="resuming is off"):
        run_training(config)
    flag = train_config(["--config", str(path), "--resume_training", "True", "--train-iters", "2"])
    assert flag.checkpoint.resume is True


# --------------------------------------------------------------------------- ember generate


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--top-k", "-5"], "--top-k must be >= 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_refuses_bad_decoding_settings(tmp_path, capsys, flags, message):
    """Checked before anything is read: the folder here does not even exist."""
    code = ember_main(["generate", "--load", str(tmp_path / "nowhere"), "--prompt", "hi", "--temperature", "0.5",
                       *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("ember generate: error: ") and message.replace("\\", "") in err.replace("\\", "")



# --------------------------------------------------------------------------- output folders and file values


@pytest.mark.parametrize("flag", ["--save", "--output-dir", "--tensorboard-dir", "--data-cache-path"])
def test_output_folder_that_is_a_file_is_refused(data, tmp_path, flag):
    path = tmp_path / "a-file"
    path.write_text("x")
    _refused(_argv(data, flag, str(path)), f"{flag} .* is a file, not a folder")


def test_mindformers_value_of_the_wrong_kind_is_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"lr_schedule": {"type": "CosineWithWarmUpLR", "learning_rate": "fast"},
                                    "model": {"model_config": {"type": "LlamaConfig", "num_layers": 2}}}))
    with pytest.raises(EmberError, match="run.yaml: a setting has a value of the wrong kind") as info:
        train_config(["--config", str(path)])
    assert "\n" not in str(info.value)

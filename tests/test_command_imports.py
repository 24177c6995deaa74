"""`ember convert` and `ember generate` never import the trainer: they read weights and training
checkpoints through `ember.checkpoint`, which sits below `ember.train`. Each case runs in a fresh
interpreter and lists the `ember.train*` modules loaded by the end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from ember.checkpoint.weights import save_ember_weights
from ember.models import Transformer, get_model_args

_REPORT = """
import json, sys
from ember.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps({"codes": codes, "train": sorted(m for m in sys.modules if m.startswith("ember.train"))}))
"""


def _run_in_fresh_process(*commands: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-c", _REPORT, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_commands_loads_no_trainer_module():
    code = textwrap.dedent("""
        import argparse, sys
        from ember.commands import convert, generate
        for module in (convert, generate):
            module.add_arguments(argparse.ArgumentParser())
        print(sorted(m for m in sys.modules if m.startswith("ember.train")))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tokenizer_dir):
    """A tiny Llama as an ember weight folder and as a training checkpoint (`--save` folder)."""
    root = tmp_path_factory.mktemp("command_imports")
    args = get_model_args("tiny-llama", vocab_size=2048)
    torch.manual_seed(0)
    model = Transformer(args)
    weights = save_ember_weights(model, args, root / "weights", "llama", tokenizer_dir=tokenizer_dir)

    import torch.distributed.checkpoint as dcp

    save = root / "save"
    iteration = save / "iter_0000001"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(iteration), no_dist=True)
    state = {"model_args": args.to_dict(), "config": {"data": {"tokenizer_name_or_path": str(tokenizer_dir)}}}
    (iteration / "train_state.json").write_text(json.dumps(state))
    (save / "latest").write_text(iteration.name)
    return {"weights": weights, "save": save, "root": root}


def test_convert_and_generate_load_no_trainer_module(model_folders):
    weights, save, root = model_folders["weights"], model_folders["save"], model_folders["root"]
    generate = ["--prompt", "Return the", "--max-new-tokens", "4", "--device", "cpu"]
    report = _run_in_fresh_process(
        ["convert", "--from", "ember", "--to", "hf", str(weights), str(root / "hf")],
        ["convert", "--from", "hf", "--to", "ember", str(root / "hf"), str(root / "back")],
        ["convert", "--from", "ember", "--to", "hf", str(save), str(root / "hf-from-save")],
        ["generate", "--load", str(root / "back"), *generate],
        ["generate", "--load", str(save), *generate],
    )
    assert report == {"codes": [0, 0, 0, 0, 0], "train": []}

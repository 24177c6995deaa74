"""Training checkpoints (DCP) read back as whole models: `ember generate --load SAVE_DIR` and
`ember convert --from ember --to hf SAVE_DIR OUT`, checked against transformers' own model."""

import io

import pytest
import torch

from dist_utils import single_thread  # noqa: F401 (autouse fixture: one torch thread)
from dist_utils import train_config, write_token_dataset
from ember.checkpoint.export import infer_family, load_model_from_training_checkpoint, read_training_checkpoint
from ember.cli import main as ember
from ember.errors import EmberError
from ember.train import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_dir):
    """Two tiny models (untied Llama, tied Qwen3) trained a few steps, saved as DCP checkpoints."""
    root = tmp_path_factory.mktemp("export")
    data = write_token_dataset(root / "tokens", seed=5)
    runs = {}
    for name in ("tiny-llama", "tiny-qwen3"):
        save = root / name
        run_training(train_config([
            "--model", name, "--vocab-size", "512", "--data-path", str(data), "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--lr", "5e-3",
            "--log-interval", "1", "--eval-iters", "0", "--save", str(save), "--save-interval", "3",
            "--tokenizer-name-or-path", str(tokenizer_dir), "--no-tensorboard"]), stream=io.StringIO())
        runs[name] = save
    return runs


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_hf_export_of_a_training_checkpoint_has_the_same_logits(trained, tmp_path, name):
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model_from_training_checkpoint(trained[name])
    assert tokenizer is not None and (tokenizer / "tokenizer.json").exists()
    assert ember(["convert", "--from", "ember", "--to", "hf", str(trained[name]), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    # the weights are the trained ones, not a fresh initialisation
    args, state, train_state = read_training_checkpoint(trained[name])
    assert train_state["iteration"] == 3
    fresh = type(model)(args)
    assert not torch.equal(fresh.tok_embeddings.weight, state["tok_embeddings.weight"])


def test_generate_loads_a_save_folder(trained, capsys):
    model, _ = load_model_from_training_checkpoint(trained["tiny-llama"])
    assert ember(["generate", "--load", str(trained["tiny-llama"]), "--prompt", "Return the",
                  "--max-new-tokens", "5", "--greedy"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Return the") and "5 tokens" in out.err


def test_family_is_inferred_from_the_architecture():
    from ember.models import get_model_args
    from ember.models.registry import get_model_family

    for name in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-mixtral", "tiny-grok1",
                 "tiny-bloom", "tiny-gpt2"):
        assert infer_family(get_model_args(name)) == get_model_family(name), name


def test_a_folder_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(EmberError, match="no training checkpoint"):
        read_training_checkpoint(tmp_path)

"""Training checkpoints (DCP) -> full weights, for `ember generate --load SAVE_DIR` and
`ember convert --from ember --to hf SAVE_DIR OUT`.

A DCP checkpoint stores every tensor under its full-model name whatever the layout it was saved
from, so one process can read the whole model back (optimizer state is left on disk). The
architecture and the tokenizer come from the checkpoint's train_state.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ember.errors import EmberError
from ember.models.args import ModelArgs
from ember.models.transformer import Transformer


def infer_family(args: ModelArgs, model_name: str | None = None) -> str:
    """The Hugging Face family whose layout these args describe (for the HF mapping table)."""
    if model_name:
        from ember.models.registry import get_model_family

        try:
            return get_model_family(model_name)
        except (KeyError, EmberError):
            pass
    if args.num_experts:
        if args.sandwich_norm:
            return "grok1"
        # Qwen3-MoE: q/k norms (and layers that may mix dense and MoE; a mixed model without
        # q/k norms has no Hugging Face family, and its export says so)
        return "qwen3_moe" if args.qk_norm else "mixtral"
    if args.position_type == "alibi":
        return "bloom"
    if args.position_type == "learned":
        return "gpt2"
    if args.qk_norm:
        return "qwen3"
    if args.qkv_bias:
        return "qwen2"
    if args.sliding_window:
        return "mistral"
    return "llama"


def is_training_checkpoint(path: str | Path) -> bool:
    from ember.checkpoint.training import LATEST, find_checkpoint

    try:
        ref = find_checkpoint(path)
    except EmberError:  # a damaged `latest`: loading the folder as a training checkpoint says what is wrong
        return (Path(path) / LATEST).exists()
    return ref is not None and ref.kind == "training"


def _notice(message: str) -> None:
    print(f"ember: {message}", file=sys.stderr, flush=True)


def _load_training_model(path: str | Path, device) -> tuple[Transformer, dict]:
    """The newest checkpoint under `path` as a Transformer on `device` (fp32, DCP reads the
    weights straight into it), and its train_state + "iteration". The files are checked against
    their checksums first (a damaged newest checkpoint gives way to the previous one, with a
    notice), and the DCP metadata is read without running code (`training.dcp_load`)."""
    from ember.checkpoint.training import find_checkpoint, load_training_state, usable_checkpoint

    ref = find_checkpoint(path)
    if ref is None or ref.kind != "training":
        raise EmberError(f"{path} holds no training checkpoint (expected `latest` or an iter_* folder)")
    ref = usable_checkpoint(ref, _notice)
    train_state = {**ref.train_state(), "iteration": ref.iteration}
    try:
        args = ModelArgs.from_dict(train_state["model_args"])
    except (KeyError, TypeError, ValueError) as err:
        raise EmberError(f"{ref.path}/train_state.json has no usable model_args ({err})") from None
    with torch.device("meta"):
        model = Transformer(args)
    lora = train_state.get("config", {}).get("lora", {})
    if lora.get("target_modules"):  # a LoRA run (issue 17): its adapters load too, and run in forward
        from ember.models.lora import add_adapters, make_spec

        add_adapters(model, make_spec(lora["r"], lora["alpha"], lora["dropout"], lora["target_modules"]))
    model.materialize(device)
    load_training_state(ref, model, None)
    return model, train_state


def read_training_checkpoint(path: str | Path) -> tuple[ModelArgs, dict[str, torch.Tensor], dict]:
    """(ModelArgs, full model state_dict, train_state + its "iteration") of the newest checkpoint
    under `path`."""
    model, train_state = _load_training_model(path, "cpu")
    return model.args, model.state_dict(), train_state


def _tokenizer_dir(train_state: dict) -> Path | None:
    data = train_state.get("config", {}).get("data", {})
    folder = data.get("tokenizer_name_or_path")
    return Path(folder) if folder and Path(folder).is_dir() else None


def export_training_checkpoint(path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the newest checkpoint under `path` as an ember weight folder (+ its tokenizer)."""
    from ember.checkpoint.weights import save_ember_weights

    args, state, train_state = read_training_checkpoint(path)
    model_name = train_state.get("config", {}).get("model", {}).get("name")
    family = infer_family(args, model_name)
    source = {"training_checkpoint": str(Path(path).resolve()), "iteration": train_state.get("iteration")}
    return save_ember_weights(state, args, out_dir, family, source=source,
                              tokenizer_dir=_tokenizer_dir(train_state), overwrite=overwrite)


def load_model_from_training_checkpoint(path: str | Path, device="cpu", dtype: torch.dtype | None = None):
    """A ready Transformer from a training checkpoint, and the tokenizer folder it was trained with."""
    model, train_state = _load_training_model(path, device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), _tokenizer_dir(train_state)

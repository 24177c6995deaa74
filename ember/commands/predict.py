"""MindFormers' `--run_mode predict`: `ember train --config run.yaml --run_mode predict --predict_data TEXT`
generates from the run's checkpoint, with the YAML's decoding settings (the train command's
predict mode, as run_mindformer.py has it)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from pathlib import Path

from ember.compat.mindformers import is_mindformers_config
from ember.config import load_yaml
from ember.errors import EmberError


def _prompts(predict_data: str) -> list[str]:
    path = Path(predict_data)
    if len(predict_data) < 4096 and path.is_file():
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return [line for line in lines if line]
    return [predict_data]


def predict(config, args: argparse.Namespace) -> int:
    """--run_mode predict: greedy (or sampled) continuation of --predict_data from the checkpoint."""
    from ember.commands.generate import run as generate

    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one process generates
    predict_data = getattr(args, "predict_data", None)
    if not predict_data:
        raise EmberError("--run_mode predict needs --predict_data TEXT (or a file of prompts)")
    load = config.checkpoint.load or config.checkpoint.save
    if not load or not os.path.exists(load):
        raise EmberError("--run_mode predict needs a checkpoint: set load_checkpoint (or --load_checkpoint), "
                         "or train first so output_dir/checkpoint holds one")
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    model_config = ((values.get("model") or {}).get("model_config") or {}) if is_mindformers_config(values) else {}
    limit = _setting(model_config, "max_decode_length", 512, int)
    sampled = bool(model_config.get("do_sample", False))
    temperature = _setting(model_config, "temperature", 1.0, float) if sampled else 0.0
    top_k = _setting(model_config, "top_k", 0, int) if sampled else 0
    top_p = _setting(model_config, "top_p", 1.0, float) if sampled else 1.0
    d = config.data
    # a SentencePiece tokenizer.model sits in its Hugging Face folder, which generation reads
    tokenizer = d.tokenizer_name_or_path or (str(Path(d.tokenizer_model).parent) if d.tokenizer_model else None)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with _whole_lines_under_launcher():
        for prompt in _prompts(str(predict_data)):
            generate(_generate_args(
                load=Path(load), tokenizer_name_or_path=Path(tokenizer) if tokenizer else None, prompt=prompt,
                max_new_tokens=_new_tokens(load, tokenizer, prompt, limit), greedy=not sampled,
                temperature=temperature, top_k=top_k, top_p=top_p,
                seed=config.train.seed, eos_id=None, device=device, dtype="keep"))
            sys.stdout.flush()
    return 0


class WholeLines(io.TextIOBase):
    """A text stream that passes on whole lines only: what a launcher that prefixes each line it
    reads with the rank (torchrun's `[rank0]:`, reading the rank's log file with readline) needs,
    since a piece flushed mid-line would come out as `[rank0]:Return the[rank0]: ...`."""

    def __init__(self, target):
        self.target = target
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        head, newline, self.pending = self.pending.rpartition("\n")
        if newline:
            self.target.write(head + newline)
            self.target.flush()
        else:
            self.pending = head + self.pending
        return len(text)

    def flush(self) -> None:  # a line is passed on when it ends, not when a piece is flushed
        pass

    def close_line(self) -> None:
        if self.pending:
            self.target.write(self.pending + "\n")
            self.target.flush()
            self.pending = ""


@contextlib.contextmanager
def _whole_lines_under_launcher():
    """Streamed text passes on whole lines when a launcher (torchrun, `ember launch`) reads it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        yield
        return
    lines = WholeLines(sys.stdout)
    try:
        with contextlib.redirect_stdout(lines):
            yield
    finally:
        lines.close_line()


def _generate_args(**values) -> argparse.Namespace:
    """`ember generate`'s arguments: its own defaults (whatever options it has), then `values`."""
    from ember.commands.generate import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--load", str(values["load"])])
    for key, value in values.items():
        setattr(args, key, value)
    return args


def _setting(model_config: dict, key: str, default, kind):
    """model_config's decoding setting `key` as `kind` (unset or null: `default`); ranges are
    checked with the command line's own (`ember.commands.generate.check_sampling`)."""
    value = model_config.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise EmberError(f"model.model_config.{key} = {value!r} is not a valid {kind.__name__}") from None


def _new_tokens(load: str, tokenizer: str | None, prompt: str, limit: int) -> int:
    """MindFormers' max_decode_length counts the prompt too; ember counts new tokens only, and
    never past the model's longest sequence."""
    from ember.checkpoint.training import find_checkpoint
    from ember.generation import TextCodec
    from ember.models.args import ModelArgs

    ref = find_checkpoint(load)
    if ref is not None and ref.kind == "training":
        state = ref.train_state()
        args = ModelArgs.from_dict(state["model_args"])
        folder = tokenizer or (state.get("config", {}).get("data", {}).get("tokenizer_name_or_path"))
    else:
        from ember.checkpoint.weights import read_manifest

        args = ModelArgs.from_dict(read_manifest(load)["model_args"])
        folder = tokenizer or str(Path(load) / "tokenizer")
    if not folder or not Path(folder).is_dir():
        return max(1, min(limit, args.max_seq_len) // 2)
    used = len(TextCodec(Path(folder)).encode(prompt))
    return max(1, min(limit, args.max_seq_len) - used)

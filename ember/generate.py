"""`ember generate`: text from an ember weight folder (the seeds' predict mode).

    ember generate --load DIR --prompt "Once upon a time" --max-new-tokens 64
    ember generate --load DIR --prompt "..." --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1

Greedy by default; sampling with temperature / top-k / top-p when --temperature > 0. Uses a KV
cache, streams text to the terminal as tokens arrive. `generate()` is the reusable part (the
trainer uses it for sample generations).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ember.errors import EmberError

_DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id from a [vocab] logits vector: argmax when temperature <= 0, else a sample
    from softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p (the token that crosses top_p is kept)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass ranked strictly above each token
        sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids after prompt_ids (one sequence), stopping
    after eos_id. Uses a KV cache: the prompt runs once, then one token per step.
    `list(generate(...))` for all ids at once. The model is in eval mode meanwhile."""
    args = model.args
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).reshape(1, -1)
    if ids.shape[1] == 0:
        raise EmberError("generate: the prompt is empty; give at least one token")
    total = ids.shape[1] + max_new_tokens
    if total > args.max_seq_len and args.position_type in ("rope", "learned"):
        raise EmberError(
            f"generate: prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's max_seq_len {args.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_kv_cache(1, total)
            logits = model(ids, kv_cache=cache)[0, -1]
        for step in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            yield token
            if token in stop or step + 1 == max_new_tokens:
                break
            with torch.inference_mode():
                logits = model(torch.tensor([[token]], device=device), kv_cache=cache)[0, -1]
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
class TextCodec:
    """encode/decode/eos over a local tokenizer folder: tokenizer.json through `tokenizers`,
    anything else through transformers.AutoTokenizer (local files only, no remote code)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config_path = self.folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if (self.folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            self._auto = None
            eos = config.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            self.eos_id = self._fast.token_to_id(eos) if eos else None
        else:
            from transformers import AutoTokenizer

            try:
                self._auto = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as err:  # noqa: BLE001 - transformers raises OSError/ValueError/...
                raise EmberError(f"cannot load a tokenizer from {self.folder}: {err}") from None
            self._fast = None
            self.eos_id = self._auto.eos_token_id

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text).ids
        return self._auto.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._auto.decode(ids, skip_special_tokens=True)


def stream_text(codec: TextCodec, tokens: Iterable[int], out=None) -> list[int]:
    """Print decoded text as tokens arrive. Re-decodes the whole continuation each time so
    multi-token characters come out whole (a trailing U+FFFD waits for the next token)."""
    out = out or sys.stdout
    ids: list[int] = []
    printed = ""
    for token in tokens:
        ids.append(token)
        text = codec.decode(ids)
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(printed) :])
        out.flush()
        printed = text
    text = codec.decode(ids)
    out.write(text[len(printed) :] + "\n")
    out.flush()
    return ids


# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", type=Path, required=True, help="ember weight folder (ember convert --to ember) or an ember train --save folder")
    parser.add_argument(
        "--tokenizer-name-or-path", type=Path, default=None, help="local tokenizer folder (default: LOAD/tokenizer)"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding, whatever the sampling flags say")
    parser.add_argument("--eos-id", type=int, default=None, help="stop token (default: the tokenizer's eos)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(_DTYPES), default="keep", help="cast weights (default: as stored)")


def run(args: argparse.Namespace) -> int:
    from ember.models.checkpoint_io import load_model, read_manifest
    from ember.train.export import is_training_checkpoint, load_model_from_training_checkpoint

    from_training = is_training_checkpoint(args.load)
    if not from_training:
        read_manifest(args.load)  # a clear error for a folder that is not ember weights, first
    if args.max_new_tokens < 1:
        raise EmberError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 < args.top_p <= 1:
        raise EmberError(f"--top-p must be in (0, 1], got {args.top_p}")
    if from_training:  # a `--save` folder of ember train: weights and tokenizer from its checkpoint
        model, trained_tokenizer = load_model_from_training_checkpoint(args.load, args.device, _DTYPES[args.dtype])
        tokenizer_dir = args.tokenizer_name_or_path or trained_tokenizer
    else:
        model = None
        tokenizer_dir = args.tokenizer_name_or_path or args.load / "tokenizer"
    if tokenizer_dir is None or not tokenizer_dir.is_dir():
        raise EmberError(f"no tokenizer folder at {tokenizer_dir}; pass --tokenizer-name-or-path DIR")
    codec = TextCodec(tokenizer_dir)
    if model is None:
        model = load_model(args.load, device=args.device, dtype=_DTYPES[args.dtype])
    prompt_ids = codec.encode(args.prompt)
    if not prompt_ids:
        raise EmberError("the prompt encodes to no tokens; give some text")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device="cpu" if args.device == "cpu" else args.device).manual_seed(args.seed)
    temperature = 0.0 if args.greedy else args.temperature
    eos_id = args.eos_id if args.eos_id is not None else codec.eos_id

    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    tokens = generate(model, prompt_ids, args.max_new_tokens, temperature, args.top_k, args.top_p, eos_id, generator)
    new_ids = stream_text(codec, tokens)
    elapsed = time.perf_counter() - started
    print(f"[{len(new_ids)} tokens in {elapsed:.2f}s, {len(new_ids) / elapsed:.1f} tokens/s]", file=sys.stderr)
    return 0

"""Text generation from a Transformer: the sampling filters, a KV-cached decoding loop, a
tokenizer wrapper and streaming of decoded text (what `ember generate` runs).

`generate()` is greedy by default and samples with temperature / top-k / top-p when
temperature > 0; the prompt runs once, then one token per step through the KV cache.
`stream_text()` prints decoded text as tokens arrive. The command's flags live in
`ember.commands.generate`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from ember.errors import EmberError


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

"""Text generation from a Transformer: the sampling filters, a KV-cached decoding loop, a
tokenizer wrapper and streaming of decoded text (what `ember generate` runs).

`generate()` is greedy by default and samples with temperature / top-k / top-p when
temperature > 0; the prompt runs once, then one token per step through the KV cache (for
Llama-shaped fp32 models on the CPU, through a fused decode step: `fused_decode_refusal`).
`generate_batch()` decodes a list of prompts of different lengths together: left-padded, one
forward per step, padding masked out.
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
from ember.generation.fused_decode import FusedDecodeStep, fused_decode_refusal  # noqa: F401 (public)
from ember.models.positions import AttentionMask, build_attention_mask
from ember.models.transformer import evaluating


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
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).tolist()
    stop = _stop_ids(eos_id)
    with evaluating(model):
        with torch.inference_mode():
            decoder = _Decoder(model, [prompt], max_new_tokens)
            logits = decoder.prefill()
        for step in range(max_new_tokens):
            token = sample_next_token(logits[0], temperature, top_k, top_p, generator)
            yield token
            if token in stop or step + 1 == max_new_tokens:
                break
            with torch.inference_mode():
                logits = decoder.step(torch.tensor([token], device=decoder.device))


def generate_batch(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new token ids for each of `prompts` (token-id lists of any lengths), up to
    max_new_tokens each and ending after eos_id. The prompts are left-padded into one batch and
    decoded together, one forward per step; padding is masked out of attention and positions
    count from each prompt's first token, so every row gets what `generate` gives it alone."""
    if len(prompts) == 0 or max_new_tokens <= 0:
        return [[] for _ in prompts]
    stop = _stop_ids(eos_id)
    with evaluating(model), torch.inference_mode():
        decoder = _Decoder(model, [list(map(int, p)) for p in prompts], max_new_tokens)
        out = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=decoder.device)
        stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=decoder.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=decoder.device)
        logits = decoder.prefill()
        for step in range(max_new_tokens):
            tokens = _next_tokens(logits, temperature, top_k, top_p, generator)
            out[:, step] = tokens
            if stop:
                finished |= torch.isin(tokens, stop_ids)
                # reading `finished` is a host sync: every 8 steps is enough to stop early
                if step % 8 == 7 and bool(finished.all()):
                    break
            if step + 1 < max_new_tokens:
                logits = decoder.step(tokens)
        rows = out[:, : step + 1].tolist()
    return [_cut_after_stop(row, stop) for row in rows]


def _stop_ids(eos_id: int | Iterable[int] | None) -> set[int]:
    return {eos_id} if isinstance(eos_id, int) else set(eos_id or ())


def _cut_after_stop(row: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + 1]
    return row


def _next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """[B] token ids from [B, vocab] logits; greedy stays on the device (no host sync)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    ids = [sample_next_token(row, temperature, top_k, top_p, generator) for row in logits]
    return torch.tensor(ids, dtype=torch.long, device=logits.device)


class _Decoder:
    """A batch of left-padded prompts decoding through one preallocated KV cache.

    Built once: the positions of every slot (counted from each row's first real token) and, when
    rows are padded, which cache slots hold real tokens. The prompt runs through the transformer's
    own forward with those positions, a mask that keeps rows off their padding, and the output
    layer on the last position only; so does each step, unless the model can take the fused
    decode step (`FusedDecodeStep`, the same computation with far less work per op). Call
    within torch.inference_mode()."""

    def __init__(self, model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int):
        args = model.args
        self.model = model
        self.device = next(model.parameters()).device
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            which = "the prompt" if len(prompts) == 1 else f"prompt {lengths.index(0)}"
            raise EmberError(f"generate: {which} is empty; give at least one token")
        width = max(lengths)
        total = width + max_new_tokens
        if total > args.max_seq_len and args.position_type in ("rope", "learned"):
            raise EmberError(
                f"generate: prompt ({width} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"the model's max_seq_len {args.max_seq_len}; shorten the prompt or ask for fewer tokens"
            )
        self.ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=self.device)
        self.cache = model.new_kv_cache(len(prompts), total)
        self.valid = None  # [B, total] bool, True where a cache slot holds a real token
        self.positions = torch.arange(total, device=self.device)
        if min(lengths) != width:
            pads = torch.tensor([width - n for n in lengths], device=self.device)
            self.valid = self.positions[None, :] >= pads[:, None]
            self.positions = (self.positions[None, :] - pads[:, None]).clamp(min=0)
        self.dtype = model.tok_embeddings.weight.dtype
        self.fused = FusedDecodeStep.build(model, self)

    def prefill(self) -> torch.Tensor:
        """Run the prompts; logits [B, vocab] for each row's next token."""
        return self._forward(self.ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B]; logits [B, vocab] for the token after them."""
        if self.fused is not None:
            return self.fused(tokens)
        return self._forward(tokens[:, None])

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        start, seq = self.cache.length, tokens.shape[1]
        return self.model(tokens, self.positions[..., start : start + seq], self.cache,
                          mask=self._mask(seq, start, self.dtype), head=_last_position_logits)

    def _mask(self, seq: int, start: int, dtype: torch.dtype) -> AttentionMask:
        model = self.model
        base = build_attention_mask(model.args, seq, start, self.device, dtype, model.alibi_slopes)
        if self.valid is None:
            return base
        allowed = self.valid[:, None, None, : start + seq]  # [B, 1, 1, S]: no row attends to padding
        if seq > 1:  # the prompt (start 0): causal, and a padding query sees itself so no row is empty
            causal = torch.ones(seq, seq, dtype=torch.bool, device=self.device).tril()
            allowed = (allowed & causal) | torch.eye(seq, dtype=torch.bool, device=self.device)
        if base.mask is None:
            return AttentionMask(allowed, is_causal=False)
        if base.mask.dtype == torch.bool:
            return AttentionMask(base.mask & allowed, is_causal=False)
        return AttentionMask(base.mask.masked_fill(~allowed, float("-inf")), is_causal=False)


def _last_position_logits(hidden: torch.Tensor, output: torch.nn.Module) -> torch.Tensor:
    """The output layer on each row's last position only: all that decoding reads."""
    return output(hidden[:, -1])


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
def attach_peft_adapter(model: torch.nn.Module, folder: str | Path, family: str | None = None) -> list[str]:
    """Run `model` with the LoRA adapter of a PEFT adapter folder (`ember generate --lora-load`):
    the adapters go on the layers the folder names, in the model's device and dtype. `family` picks
    the Hugging Face names (default: inferred from the architecture). Returns the adapted layers."""
    from ember.checkpoint.export import infer_family
    from ember.checkpoint.peft_adapter import adapter_layers, load_peft_adapter
    from ember.models.lora import add_adapters

    spec, adapters = load_peft_adapter(folder, family or infer_family(model.args), model.args)
    layers = adapter_layers(adapters)
    add_adapters(model, spec, layers)
    param = next(model.parameters())
    with torch.no_grad():
        for name, tensor in adapters.items():
            model.get_parameter(name).copy_(tensor.to(device=param.device, dtype=param.dtype))
    return layers

"""Records -> token ids, one handler per kind of data (ModelLink's `--handler-name`).

    GeneralPretrainHandler          plain text: each `--json-keys` column its own dataset
                                    `PREFIX_<key>_document` (Megatron's preprocess_data.py)
    AlpacaStyleInstructionHandler   instruction/input/output records
    SharegptStyleInstructionHandler conversations ([{"from": "human"|"gpt"|..., "value": ...}]
                                    or OpenAI-style "messages" with role/content)
    PaiFinetuneHandler              PAI-Megatron-Patch's fine-tuning json: {"text"} records as its
                                    Bloom dataset reads them (all trained), else Alpaca records

The instruction handlers write `PREFIX_packed_input_ids_document` and
`PREFIX_packed_labels_document` (ModelLink's names): the labels equal the ids where the model is
trained (the responses) and IGNORE_INDEX (-100) where it is not (system, prompt, user turns), so
they are stored as int32.

Token ids come out in `token_dtype`, the dtype of the datasets they are written to (uint16 for a
vocabulary below 65,500, as Megatron picks; `ember.data.indexed.optimal_dtype`), so that worker
processes send the main process half the bytes of int32 and the writer does not convert them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from ember.data.chat import ChatTemplateError, load_chat_template, record_messages, token_mask
from ember.data.records import DecodedChunk, Skip

IGNORE_INDEX = -100
HANDLERS = ("GeneralPretrainHandler", "AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler",
            "PaiFinetuneHandler")

# Prompt templates (`--prompt-type`): how an instruction and a conversation turn are laid out.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
CHATML_TURN = "<|im_start|>{role}\n{content}<|im_end|>\n"
PROMPT_TYPES = ("alpaca", "chatml", "plain", "chat_template")  # chat_template: the tokenizer's own (ember.data.chat)


@dataclass
class EncodedDocuments:
    """Documents of one dataset, back to back: what `IndexedDatasetWriter.add_documents` takes."""

    tokens: np.ndarray  # flat token ids, in the dataset's dtype
    sequence_lengths: np.ndarray  # one entry per sequence (sentence)
    sequences_per_document: np.ndarray  # how many sequences each document has

    @classmethod
    def from_lists(cls, documents: list[list[list[int]]], dtype=np.int32) -> "EncodedDocuments":
        """`documents[d][s]` = token ids of sentence s of document d."""
        sentences = [s for doc in documents for s in doc]
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        tokens = np.fromiter(itertools.chain.from_iterable(sentences), dtype=np.int32, count=int(lengths.sum()))
        tokens = tokens.astype(dtype, copy=False)  # as the writer casts
        counts = np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents))
        return cls(tokens, lengths, counts)


@dataclass
class HandledChunk:
    datasets: dict[str, EncodedDocuments]  # output key -> documents
    skips: list[Skip] = field(default_factory=list)
    num_documents: int = 0
    num_bytes: int = 0
    num_lines: int = 0  # records (lines, rows) the chunk held, set by the worker (ember.data.preprocess)

    @property
    def num_tokens(self) -> int:
        return int(next(iter(self.datasets.values())).tokens.size) if self.datasets else 0


class GeneralPretrainHandler:
    """Plain text, one dataset per `--json-keys` key; a list value is a list of sentences."""

    def __init__(self, tokenizer, encoder, json_keys=("text",), append_eod=False, splitter=None,
                 token_dtype=np.int32):
        self.tokenizer = tokenizer
        self.token_dtype = np.dtype(token_dtype)
        self.encoder = encoder  # fast exact encoder, or the tokenizer itself
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.splitter = splitter  # --split-sentences: a text becomes its sentences (ember.data.sentences)

    @property
    def output_keys(self) -> list[str]:
        return self.json_keys

    def label_dtype(self, key: str):
        return None  # token ids: Megatron's dtype for the vocabulary

    def handle(self, chunk: DecodedChunk) -> HandledChunk:
        skips = list(chunk.skips)
        kept: list[dict[str, list[str]]] = []
        for record, line in zip(chunk.records, chunk.lines):
            sentences_by_key, reason = {}, None
            for key in self.json_keys:
                value = record.get(key)
                if value is None:
                    reason = f"missing key {key!r} (keys: {', '.join(sorted(record))})"
                    break
                sentences = value if isinstance(value, list) else [value]
                if self.splitter is not None and isinstance(value, str):
                    sentences = self.splitter.split(value)
                if not all(isinstance(s, str) for s in sentences):
                    reason = f"key {key!r} is not text"
                    break
                if not any(sentences):
                    reason = f"empty text in {key!r}"
                    break
                sentences_by_key[key] = sentences
            if reason:
                skips.append(Skip(chunk.path, line, reason))
            else:
                kept.append(sentences_by_key)
        datasets = {key: self._encode_key(key, kept) for key in self.json_keys}
        return HandledChunk(datasets, skips, len(kept), chunk.num_bytes)

    def _encode_key(self, key: str, kept: list[dict[str, list[str]]]) -> EncodedDocuments:
        flat_sentences = [s for record in kept for s in record[key]]
        per_record = np.fromiter((len(record[key]) for record in kept), dtype=np.int64, count=len(kept))
        if hasattr(self.encoder, "encode_batch_flat"):  # fast path: ids straight into numpy
            tokens, lengths = self.encoder.encode_batch_flat(flat_sentences)
        else:
            encoded = self.encoder.encode_batch(flat_sentences)
            lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
            tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=int(lengths.sum()))
        return self._assemble(tokens.astype(self.token_dtype, copy=False), lengths, per_record)

    def _assemble(self, tokens: np.ndarray, lengths: np.ndarray, per_record: np.ndarray) -> EncodedDocuments:
        """Megatron's rules, vectorised: empty sentences are dropped, and with append_eod the EOD
        token joins the last (non-empty) sentence of every non-empty document."""
        record_of = np.repeat(np.arange(per_record.size), per_record)
        kept = lengths > 0
        counts = np.bincount(record_of[kept], minlength=per_record.size).astype(np.int64)
        lengths = lengths[kept]
        if self.append_eod and lengths.size:
            last_of_doc = np.cumsum(counts)[counts > 0] - 1  # index (among kept) of each doc's last sentence
            ends = np.cumsum(lengths)[last_of_doc]
            # the EOD id cast as the writer casts every id (np.insert would refuse one out of range)
            tokens = np.insert(tokens, ends, np.asarray(self.tokenizer.eod, dtype=np.int64).astype(tokens.dtype))
            lengths = lengths.copy()
            lengths[last_of_doc] += 1
        return EncodedDocuments(tokens, lengths, counts)


class _InstructionHandler:
    """Shared by the instruction handlers: segments of (text, trained?) -> ids + masked labels."""

    output_keys = ["packed_input_ids", "packed_labels"]

    def __init__(self, tokenizer, prompt_type: str, seq_length: int | None = None, token_dtype=np.int32):
        self.tokenizer = tokenizer
        self.token_dtype = np.dtype(token_dtype)
        self.prompt_type = prompt_type
        self.seq_length = seq_length
        probe = tokenizer.encode("a")
        self.bos = [tokenizer.bos] if tokenizer.bos is not None and probe and probe[0] == tokenizer.bos else []

    def label_dtype(self, key: str):
        return np.int32 if key == "packed_labels" else None

    def segments(self, record: dict) -> list[tuple[str, bool]] | str:
        """[(text, trained)] for one record, or a string saying why it is skipped."""
        raise NotImplementedError

    def handle(self, chunk: DecodedChunk) -> HandledChunk:
        skips = list(chunk.skips)
        ids_docs, label_docs = [], []
        for record, line in zip(chunk.records, chunk.lines):
            segments = self.segments(record)
            if isinstance(segments, str):
                skips.append(Skip(chunk.path, line, segments))
                continue
            texts = [text for text, _ in segments]
            encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            ids, labels = list(self.bos), [IGNORE_INDEX] * len(self.bos)
            for (text, trained), seg_ids in zip(segments, encoded):
                ids.extend(seg_ids)
                labels.extend(seg_ids if trained else [IGNORE_INDEX] * len(seg_ids))
            if self.tokenizer.eod is not None:
                ids.append(self.tokenizer.eod)
                labels.append(self.tokenizer.eod)
            if all(label == IGNORE_INDEX for label in labels):
                skips.append(Skip(chunk.path, line, "no response tokens to train on"))
                continue
            ids_docs.append([ids])
            label_docs.append([labels])
        datasets = {"packed_input_ids": EncodedDocuments.from_lists(ids_docs, self.token_dtype),
                    "packed_labels": EncodedDocuments.from_lists(label_docs)}
        return HandledChunk(datasets, skips, len(ids_docs), chunk.num_bytes)

    def format_turn(self, role: str, content: str) -> str:
        if self.prompt_type == "chatml":
            return CHATML_TURN.format(role=role, content=content)
        if self.prompt_type == "plain":
            return content if role == "assistant" else content + "\n"
        # alpaca layout for conversations: user turns as instructions
        if role == "user":
            return ALPACA_PROMPT.format(with_input="", instruction=content, input_block="")
        if role == "system":
            return content + "\n\n"
        return content + "\n\n"


class AlpacaStyleInstructionHandler(_InstructionHandler):
    """{"instruction", "input", "output"} (+ optional "system", "history": [[q, a], ...])."""

    def segments(self, record):
        instruction, output = record.get("instruction"), record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            return "missing 'instruction' or 'output' text"
        if not output:
            return "empty 'output'"
        extra = record.get("input") or ""
        segments: list[tuple[str, bool]] = []
        if record.get("system"):
            segments.append((self.format_turn("system", record["system"]), False))
        for turn in record.get("history") or []:
            if isinstance(turn, (list, tuple)) and len(turn) == 2:
                segments.append((self.format_turn("user", str(turn[0])), False))
                segments.append((self.format_turn("assistant", str(turn[1])), True))
        if self.prompt_type == "alpaca":
            prompt = ALPACA_PROMPT.format(
                with_input=", paired with an input that provides further context" if extra else "",
                instruction=instruction,
                input_block=f"### Input:\n{extra}\n\n" if extra else "")
            segments.append((prompt, False))
            segments.append((output, True))
        else:
            user = f"{instruction}\n{extra}" if extra else instruction
            segments.append((self.format_turn("user", user), False))
            segments.append((self.format_turn("assistant", output), True))
        return segments


PAI_END_OF_TEXT = "</s>"  # what PAI's Bloom dataset appends: Bloom's EOS token, written as text


class PaiFinetuneHandler(AlpacaStyleInstructionHandler):
    """The json files PAI-Megatron-Patch's `run_finetune_megatron_bloom.sh` passes as --train-data/
    --valid-data. PAI's Bloom dataset (megatron_patch/data/finetune_dataset.py `BloomDataset`, later
    data/bloom.py `BloomRawDataset`) reads one {"text": ...} per line and trains on all of it,
    `text + '</s>'` tokenized: here the text's ids then the tokenizer's EOS id (the same ids for
    Bloom's tokenizer, whose EOS is `</s>`; a text already ending in `</s>` gets no second one, as
    in PAI). A record without "text" but with instruction/output (which PAI's Bloom dataset cannot
    read) gets the Alpaca prompt, trained on the response only."""

    def segments(self, record):
        text = record.get("text")
        if not isinstance(text, str):
            if not isinstance(record.get("instruction"), str):
                return "missing 'text' (PAI's records) or 'instruction'/'output' (Alpaca records)"
            return super().segments(record)
        if text.endswith(PAI_END_OF_TEXT) and self._eos_is_end_of_text():
            text = text[: -len(PAI_END_OF_TEXT)]  # the EOS id comes back below, once
        if not text:
            return "empty 'text'"
        return [(text, True)]

    def _eos_is_end_of_text(self) -> bool:
        """Whether `</s>` is this tokenizer's EOS (Bloom's): then PAI's appended text is the EOS id.
        Otherwise PAI's `</s>` is plain text to it, and here too."""
        try:
            return self.tokenizer.eod is not None and self.tokenizer.token_to_id(PAI_END_OF_TEXT) == self.tokenizer.eod
        except NotImplementedError:
            return False


ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
              "system": "system", "bot": "assistant", "model": "assistant"}


class SharegptStyleInstructionHandler(_InstructionHandler):
    """{"conversations": [{"from", "value"}]} or {"messages": [{"role", "content"}]}; trains on replies."""

    def segments(self, record):
        turns = record.get("conversations") or record.get("messages")
        if not isinstance(turns, list) or not turns:
            return "missing 'conversations' (or 'messages') list"
        segments = []
        if record.get("system"):
            segments.append((self.format_turn("system", str(record["system"])), False))
        for turn in turns:
            if not isinstance(turn, dict):
                return "a conversation turn is not an object"
            role = ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None or not isinstance(content, str):
                return f"unknown turn {turn.get('from', turn.get('role'))!r} or missing text"
            segments.append((self.format_turn(role, content), role == "assistant"))
        return segments


# ---- chat templates (H5): --prompt-type chat_template ---------------------------------------------

class ChatTemplateHandler:
    """Either instruction format rendered by the tokenizer's own chat template (ember.data.chat): ids
    and labels as Hugging Face's apply_chat_template(..., return_assistant_tokens_mask=True) gives them.
    No BOS/EOD of ember's own: the template writes the special tokens it wants."""

    output_keys = ["packed_input_ids", "packed_labels"]

    def __init__(self, tokenizer, record_format: str, token_dtype=np.int32):
        from ember.errors import EmberError

        self.token_dtype = np.dtype(token_dtype)
        folder = getattr(tokenizer, "folder", None)
        if tokenizer.backend is None or folder is None:
            raise EmberError(f"--prompt-type chat_template needs a Hugging Face tokenizer folder with tokenizer.json "
                             f"(--tokenizer-name-or-path DIR); {tokenizer.name} has none")
        self.template = load_chat_template(folder)
        self.backend = tokenizer.backend
        self.record_format = record_format

    def label_dtype(self, key: str):
        return np.int32 if key == "packed_labels" else None

    def handle(self, chunk: DecodedChunk) -> HandledChunk:
        skips = list(chunk.skips)
        texts, spans, lines = [], [], []
        for record, line in zip(chunk.records, chunk.lines):
            try:
                messages, tools = record_messages(record, self.record_format)
                text, record_spans = self.template.assistant_spans(messages, tools)
            except ChatTemplateError as err:
                skips.append(Skip(chunk.path, line, str(err)))
                continue
            texts.append(text)
            spans.append(record_spans)
            lines.append(line)
        ids_docs, label_docs = [], []
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        for encoding, record_spans, line in zip(encodings, spans, lines):
            mask = token_mask(encoding.offsets, record_spans)
            if not mask.any():
                skips.append(Skip(chunk.path, line, "no assistant tokens to train on"))
                continue
            ids = np.asarray(encoding.ids, dtype=np.int64)
            ids_docs.append([ids.tolist()])
            label_docs.append([np.where(mask, ids, IGNORE_INDEX).tolist()])
        datasets = {"packed_input_ids": EncodedDocuments.from_lists(ids_docs, self.token_dtype),
                    "packed_labels": EncodedDocuments.from_lists(label_docs)}
        return HandledChunk(datasets, skips, len(ids_docs), chunk.num_bytes)


def build_handler(name: str, tokenizer, encoder, json_keys, append_eod: bool, prompt_type: str | None,
                  splitter=None, token_dtype=np.int32):
    """`token_dtype`: the dtype token ids come out in (the datasets'; labels stay int32)."""
    if prompt_type == "chat_template" and name in ("AlpacaStyleInstructionHandler", "SharegptStyleInstructionHandler"):
        return ChatTemplateHandler(tokenizer, "alpaca" if name == "AlpacaStyleInstructionHandler" else "sharegpt",
                                   token_dtype)
    if name == "GeneralPretrainHandler":
        return GeneralPretrainHandler(tokenizer, encoder, json_keys, append_eod, splitter, token_dtype)
    if name == "AlpacaStyleInstructionHandler":
        return AlpacaStyleInstructionHandler(tokenizer, prompt_type or "alpaca", token_dtype=token_dtype)
    if name == "SharegptStyleInstructionHandler":
        return SharegptStyleInstructionHandler(tokenizer, prompt_type or "chatml", token_dtype=token_dtype)
    if name == "PaiFinetuneHandler":
        return PaiFinetuneHandler(tokenizer, prompt_type or "alpaca", token_dtype=token_dtype)
    from ember.errors import EmberError

    raise EmberError(f"unknown --handler-name {name!r}; choose one of {', '.join(HANDLERS)}")

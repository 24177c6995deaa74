"""Tokenizers by Megatron/ModelLink type name, with the same ids and end-of-document token.

    PretrainedFromHF / HuggingFaceTokenizer   a Hugging Face folder (--tokenizer-name-or-path DIR)
    Llama2Tokenizer                           SentencePiece model, BOS prepended (--tokenizer-model FILE)
    SentencePieceTokenizer / GPTSentencePieceTokenizer
                                              SentencePiece model, no BOS (--tokenizer-model FILE)
    GPT2BPETokenizer                          GPT-2 vocab.json + merges.txt (--vocab-file, --merge-file)

Each yields the ids Megatron's `tools/preprocess_data.py` gets from the same tokenizer: HF folders
encode with their special-token template (Llama adds BOS, as `tokenizer(text).input_ids` does).
The Hugging Face path uses the Rust `tokenizers` library directly when the folder has a
`tokenizer.json`, so preprocessing never imports transformers or torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from ember.errors import EmberError

TOKENIZER_TYPES = (
    "PretrainedFromHF",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "GPT2BPETokenizer",
    # MindSpeed-LLM / Megatron / PAI names (issue 16, H2)
    "Qwen3Tokenizer",
    "BloomTokenizerFromHF",
    "NullTokenizer",
)
# Megatron types ember does not build, each with the reason and what to use instead.
REFUSED_TOKENIZER_TYPES = {
    "BertWordPieceLowerCase": "a BERT WordPiece vocabulary (encoder models); use PretrainedFromHF with the "
                              "model's folder",
    "BertWordPieceCase": "a BERT WordPiece vocabulary (encoder models); use PretrainedFromHF with the model's folder",
    "TikTokenizer": "tiktoken vocabularies are not read; use PretrainedFromHF with a folder holding tokenizer.json",
    "MagistralTokenizer": "mistral-common's tekken format is not read; use PretrainedFromHF with the HF folder",
    "MultimodalTokenizer": "ember trains text-only models",
}
# PAI-Megatron-Patch's BloomTokenizerFromHF loads this hub tokenizer when no folder is given.
BLOOM_HUB_TOKENIZER = "bigscience/bloom-560m"


class Tokenizer:
    """The small surface the rest of ember uses: ids in, ids out, and the special ids."""

    name: str = "tokenizer"
    vocab_size: int
    eod: int | None = None
    bos: int | None = None
    pad: int | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids as Megatron gets them; `add_special_tokens=False` leaves out BOS/templates."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def backend(self):
        """The Rust `tokenizers.Tokenizer` behind this one, if any (used by the fast encoder)."""
        return None


def _special_token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder, through `tokenizers` (fast) or transformers (fallback)."""

    def __init__(self, folder: str | Path, use_fast: bool = True):
        folder = Path(folder)
        if not folder.is_dir():
            raise EmberError(f"tokenizer folder {folder} does not exist; pass the Hugging Face model "
                             f"folder that holds tokenizer.json or tokenizer_config.json")
        self.name = f"PretrainedFromHF({folder})"
        self.folder = folder
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
            path = folder / name
            if path.exists():
                try:
                    config.update(json.loads(path.read_text(encoding="utf-8")))
                except json.JSONDecodeError as err:
                    raise EmberError(f"{path} is not valid JSON ({err}); fix or remove it") from err
        self._fast = None
        self._slow = None
        # use_fast False: transformers' AutoTokenizer(use_fast=False), as MindSpeed's --tokenizer-not-use-fast (H3)
        if use_fast and (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as RustTokenizer

            try:
                self._fast = RustTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as err:  # the Rust library raises plain Exceptions
                raise EmberError(f"cannot read {folder / 'tokenizer.json'}: {err}") from err
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        else:
            try:
                from transformers import AutoTokenizer

                self._slow = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=use_fast)
            except Exception as err:
                raise EmberError(f"cannot load a tokenizer from {folder}: {err}") from err
            self.vocab_size = len(self._slow)
        self.eod = self._special_id(config, "eos_token")
        self.bos = self._special_id(config, "bos_token")
        self.pad = self._special_id(config, "pad_token")

    def _special_id(self, config: dict, key: str) -> int | None:
        if self._slow is not None:
            return getattr(self._slow, f"{key}_id", None)
        content = _special_token_content(config.get(key))
        return None if content is None else self._fast.token_to_id(content)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_special_tokens).ids
        return self._slow(text, add_special_tokens=add_special_tokens)["input_ids"]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return self._slow(texts, add_special_tokens=add_special_tokens)["input_ids"]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._slow.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        if self._fast is not None:
            return self._fast.token_to_id(token)
        return self._slow.convert_tokens_to_ids(token)

    @property
    def backend(self):
        return self._fast


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `tokenizer.model`; `add_bos` for Llama-2 style (Megatron's Llama2Tokenizer)."""

    def __init__(self, model_file: str | Path, add_bos: bool, name: str):
        import sentencepiece

        model_file = Path(model_file)
        if not model_file.is_file():
            raise EmberError(f"tokenizer model {model_file} does not exist; pass the tokenizer.model file "
                             f"with --tokenizer-model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except Exception as err:
            raise EmberError(f"cannot read SentencePiece model {model_file}: {err}") from err
        self.name = f"{name}({model_file})"
        self.add_bos = add_bos
        self.vocab_size = self._sp.vocab_size()
        self.eod = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        self.bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos] + ids if add_special_tokens and self.add_bos and self.bos is not None else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        batch = self._sp.encode(texts)
        if add_special_tokens and self.add_bos and self.bos is not None:
            return [[self.bos] + ids for ids in batch]
        return batch

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        idx = self._sp.piece_to_id(token)
        return None if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx) else idx


class GPT2BPETokenizer(HFTokenizer):
    """GPT-2's vocab.json + merges.txt, byte-level BPE, end of document `<|endoftext|>`."""

    def __init__(self, vocab_file: str | Path, merge_file: str | Path):
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        for path, flag in ((vocab_file, "--vocab-file"), (merge_file, "--merge-file")):
            if path is None or not Path(path).is_file():
                raise EmberError(f"GPT2BPETokenizer needs {flag}: {path} is not a file")
        try:
            bpe = models.BPE.from_file(str(vocab_file), str(merge_file))
        except Exception as err:
            raise EmberError(f"cannot read GPT-2 vocab/merges {vocab_file}, {merge_file}: {err}") from err
        self._fast = RustTokenizer(bpe)
        self._fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._fast.decoder = decoders.ByteLevel()
        self._slow = None
        self.name = f"GPT2BPETokenizer({vocab_file})"
        self.folder = Path(vocab_file).parent
        self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        self.eod = self._fast.token_to_id("<|endoftext|>")
        self.bos = self.pad = None


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: no text, only ids below --vocab-size; the end of document is the
    id after them (vocab_size = --vocab-size + 1), for data preprocessed elsewhere."""

    def __init__(self, vocab_size: int | None):
        if vocab_size is None:
            raise EmberError("--tokenizer-type NullTokenizer needs --vocab-size (ids below it; the end of "
                             "document is that number)")
        self.name = f"NullTokenizer({vocab_size})"
        self.eod = int(vocab_size)
        self.vocab_size = int(vocab_size) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return None


def _hf_folder_of(tokenizer_type: str, name_or_path, model_file) -> Path:
    """The Hugging Face folder a MindSpeed type name means: --tokenizer-name-or-path, or the folder of
    the --tokenizer-model file (MindSpeed's docs point that at a file inside the model folder)."""
    if name_or_path is not None:
        return Path(name_or_path)
    if model_file is not None:
        path = Path(model_file)
        return path if path.is_dir() else path.parent
    raise EmberError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-name-or-path DIR (or --tokenizer-model "
                     f"FILE in the Hugging Face model folder)")


def _bloom_tokenizer(name_or_path) -> Tokenizer:
    """PAI's BloomTokenizerFromHF: the given folder, else bigscience/bloom-560m from the local
    Hugging Face cache (PAI downloads it; ember never downloads)."""
    if name_or_path is not None:
        return HFTokenizer(name_or_path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(BLOOM_HUB_TOKENIZER, "tokenizer.json")
    except ImportError:
        cached = None
    if isinstance(cached, str):
        return HFTokenizer(Path(cached).parent)
    raise EmberError(f"--patch-tokenizer-type BloomTokenizerFromHF without --tokenizer-name-or-path loads "
                     f"{BLOOM_HUB_TOKENIZER}, which is not in the Hugging Face cache; fetch it once "
                     f"(`huggingface-cli download {BLOOM_HUB_TOKENIZER}`) or pass --tokenizer-name-or-path DIR")


def build_tokenizer(tokenizer_type: str = "PretrainedFromHF", name_or_path=None, model_file=None,
                    vocab_file=None, merge_file=None, vocab_size: int | None = None, *,
                    use_fast: bool = True) -> Tokenizer:
    """Load a tokenizer by its Megatron/ModelLink type name; errors are one clear line.
    `vocab_size` is NullTokenizer's --vocab-size."""
    if tokenizer_type == "Qwen3Tokenizer":
        return HFTokenizer(_hf_folder_of(tokenizer_type, name_or_path, model_file), use_fast)
    if tokenizer_type == "BloomTokenizerFromHF":
        return _bloom_tokenizer(name_or_path)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type in REFUSED_TOKENIZER_TYPES:
        raise EmberError(f"--tokenizer-type {tokenizer_type}: {REFUSED_TOKENIZER_TYPES[tokenizer_type]}")
    if tokenizer_type in ("PretrainedFromHF", "HuggingFaceTokenizer"):
        if name_or_path is None:
            raise EmberError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-name-or-path DIR")
        return HFTokenizer(name_or_path, use_fast)
    if tokenizer_type in ("Llama2Tokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if model_file is None:
            raise EmberError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model FILE")
        return SentencePieceTokenizer(model_file, add_bos=tokenizer_type == "Llama2Tokenizer",
                                      name=tokenizer_type)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    raise EmberError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def add_tokenizer_arguments(parser) -> None:
    """The Megatron/ModelLink tokenizer flags, shared by every command that needs a tokenizer."""
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-name-or-path", help="Hugging Face tokenizer folder")
    group.add_argument("--tokenizer-model", help="SentencePiece tokenizer.model file")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json")
    group.add_argument("--merge-file", help="GPT-2 merges.txt")


def tokenizer_from_args(args) -> Tokenizer:
    return build_tokenizer(args.tokenizer_type, args.tokenizer_name_or_path, args.tokenizer_model,
                           args.vocab_file, args.merge_file)

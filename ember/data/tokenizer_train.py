"""A byte-level BPE tokenizer trained locally, saved as a Hugging Face folder (`ember tokenizer train`).

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) loads with
`transformers.AutoTokenizer.from_pretrained(DIR)` and with `--tokenizer-type PretrainedFromHF`,
so it stands in for a downloaded model's tokenizer everywhere a seed workflow needs one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ember.data.records import iter_texts
from ember.data.sources import resolve_input_files
from ember.errors import EmberError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 8192,
                        min_frequency: int = 2, model_max_length: int = 4096) -> Path:
    """Train GPT-2 style byte-level BPE on `texts` and write a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise EmberError(f"--vocab-size {vocab_size} is too small for byte-level BPE (256 bytes + merges); use >= 300")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer.save(str(tmp / "tokenizer.json"))
    specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, **specials}
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def train_tokenizer(*, input: str | os.PathLike, output: str | os.PathLike, vocab_size: int = 8192,
                    min_frequency: int = 2, json_key: str = "text", max_mb: float | None = None) -> Path:
    """Train on the `json_key` texts of a file or folder of records (at most about `max_mb` MB of
    text) and write the tokenizer folder `output`; returns its path."""
    files = resolve_input_files(input)
    if not Path(output).parent.resolve().is_dir():
        raise EmberError(f"the folder holding {output} does not exist; create it first")
    budget = None if max_mb is None else int(max_mb * 1e6)

    def texts():
        seen = 0
        for text in iter_texts(files, json_key):
            yield text
            seen += len(text)
            if budget is not None and seen >= budget:
                return

    return train_bpe_tokenizer(texts(), output, vocab_size, min_frequency)

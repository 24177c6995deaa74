"""PAI's `--train-data X.json --valid-data Y.json`: tokenized once before training (ember.data.raw_finetune).

- the tokens and labels are PAI's: a {"text"} record is `text + EOS`, every token trained, as
  PAI-Megatron-Patch's Bloom dataset builds it (checked against transformers' tokenizer called as
  PAI calls it); an Alpaca record gets the Alpaca prompt, trained on the response;
- training from the json is training from `ember preprocess --handler-name PaiFinetuneHandler`'s
  prefix: the same datasets, the same first-iteration loss;
- with a Bloom-like tokenizer (EOS `</s>`), the ids are PAI's literal `tokenizer(text + '</s>')`;
- the cache is reused by a second run, made once by processes starting at once, a damaged or
  partial one is not used, and a missing file is a one-line error;
- PAI's BloomTokenizerFromHF without a tokenizer folder is --load's tokenizer, as in PAI.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ember.data.finetune_dataset import IGNORE_INDEX, FinetuneSource
from ember.errors import EmberError

RECORDS = [
    {"text": "def add(a, b):\n    return a + b"},
    {"text": "Return the number of items in a container."},
    {"instruction": "Continue this passage.", "input": "The os module", "output": "provides a portable way."},
    {"nothing": "to train"},  # bad: counted and skipped
    {"text": "Split the string at the first occurrence of sep, and return a 3-tuple."},
    {"instruction": "Say what len does.", "output": "It returns the length of an object."},
]


def write_records(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def argv(tokenizer_dir, train: str, valid: str, save: Path, extra=()) -> list[str]:
    """PAI's data flags, on a tiny Bloom trained for one step from random weights."""
    return ["--model", "tiny-bloom", "--train-data", train, "--valid-data", valid,
            "--tokenizer-name-or-path", str(tokenizer_dir), "--seq-length", "48", "--micro-batch-size", "2",
            "--global-batch-size", "2", "--train-iters", "1", "--lr", "1e-3", "--log-interval", "1",
            "--eval-iters", "0", "--eval-interval", "1000", "--save", str(save), "--no-tensorboard",
            "--finetune-packing", "padded", "--seed", "1234", *extra]


def resolve(words: list[str]):
    from ember.commands.launch import training_config

    config, _ = training_config(words)
    return config


def source_arrays(prefix: str):
    source = FinetuneSource(prefix)
    return ([source.input_ids.get(i).tolist() for i in range(len(source))],
            [source.labels.get(i).tolist() for i in range(len(source))])


def test_json_trains_as_its_preprocessed_prefix_with_pais_tokens(tokenizer_dir, tmp_path, capfd):
    from transformers import AutoTokenizer

    from ember.commands.preprocess import add_arguments, run
    from ember.train import run_training

    data = write_records(tmp_path / "instruct_latest.json")
    config = resolve(argv(tokenizer_dir, str(data), str(data), tmp_path / "from_json"))
    prefix = config.data.train_data_path[0]
    assert config.data.valid_data_path == [prefix]  # the same file: one tokenization
    assert Path(prefix).parent.parent == tmp_path / "from_json" / "tokenized"
    err = capfd.readouterr().err
    notices = [line for line in err.splitlines() if "tokenized 5 records" in line]
    assert len(notices) == 1 and str(Path(prefix).parent) in notices[0]
    assert "skipped 1 bad record(s), the first: " in notices[0] and ":4: missing 'text'" in notices[0]

    # PAI's Bloom dataset: tokenizer(text + '</s>')['input_ids'] (Bloom's EOS, this tokenizer's <|endoftext|>),
    # every position trained
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids, labels = source_arrays(prefix)
    texts = [r["text"] for r in RECORDS if "text" in r]
    text_rows = [0, 1, 3]
    for row, text in zip(text_rows, texts):
        expected = hf(text + hf.eos_token)["input_ids"]
        assert ids[row] == expected and labels[row] == expected
    # an Alpaca record: the prompt untrained, the response and EOS trained
    assert labels[2][0] == IGNORE_INDEX and labels[2][-1] == hf.eos_token_id
    response = hf("provides a portable way.", add_special_tokens=False)["input_ids"]
    assert [t for t in labels[2] if t != IGNORE_INDEX] == response + [hf.eos_token_id]

    # `ember preprocess` of the same file, then training from the prefix
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "pre" / "instruct"
    out.parent.mkdir()
    assert run(parser.parse_args(["--input", str(data), "--output-prefix", str(out), "--handler-name",
                                  "PaiFinetuneHandler", "--tokenizer-name-or-path", str(tokenizer_dir)])) == 0
    assert source_arrays(str(out)) == (ids, labels)
    for suffix in ("_packed_input_ids_document", "_packed_labels_document"):
        for ext in (".bin", ".idx"):
            assert (Path(prefix + suffix + ext)).read_bytes() == Path(f"{out}{suffix}{ext}").read_bytes()

    from_json = run_training(config)
    from_prefix = run_training(resolve(argv(tokenizer_dir, str(out), str(out), tmp_path / "from_prefix")))
    assert from_json.losses[1] == from_prefix.losses[1]


def test_second_run_reuses_the_cache_and_a_changed_file_is_tokenized_again(tokenizer_dir, tmp_path, capfd):
    data = write_records(tmp_path / "train.jsonl")
    words = argv(tokenizer_dir, str(data), str(data), tmp_path / "run", ["--data-cache-path", str(tmp_path / "cache")])
    first = resolve(words).data.train_data_path[0]
    assert Path(first).parent.parent == tmp_path / "cache" / "tokenized"
    capfd.readouterr()
    stamp = Path(first + "_packed_input_ids_document.bin").stat().st_mtime_ns
    assert resolve(words).data.train_data_path[0] == first
    err = capfd.readouterr().err
    assert "(tokenized before)" in err and "tokenized 5 records" not in err
    assert Path(first + "_packed_input_ids_document.bin").stat().st_mtime_ns == stamp
    # ranks of a launched job (RANK set) reuse it quietly: the launcher said it
    os.environ["RANK"] = "0"
    try:
        assert resolve(words).data.train_data_path[0] == first
    finally:
        del os.environ["RANK"]
    assert capfd.readouterr().err.count("tokenized") == 0
    write_records(data, RECORDS[:3])
    changed = resolve(words).data.train_data_path[0]
    assert changed != first and len(FinetuneSource(changed)) == 3


def _resolve_into(words, queue):
    queue.put(resolve(words).data.train_data_path[0])


def test_several_processes_starting_at_once_tokenize_once(tokenizer_dir, tmp_path, capfd):
    """What ranks started by torchrun without ember's launcher do: each resolves the configuration."""
    import multiprocessing

    data = write_records(tmp_path / "train.json")
    words = argv(tokenizer_dir, str(data), str(data), tmp_path / "run")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_resolve_into, args=(words, queue)) for _ in range(3)]
    for process in processes:
        process.start()
    prefixes = {queue.get(timeout=60) for _ in processes}
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    err = capfd.readouterr().err
    assert len(prefixes) == 1 and err.count("tokenized 5 records") == 1
    assert err.count("(tokenized before)") == 2  # the two others (train and valid: one file, said once)
    assert source_arrays(prefixes.pop())[0]


@pytest.mark.parametrize("damage", ["no_record", "cut_short", "staging_left"])
def test_a_damaged_or_partial_cache_is_not_used(damage, tokenizer_dir, tmp_path, capfd):
    data = write_records(tmp_path / "train.json")
    words = argv(tokenizer_dir, str(data), str(data), tmp_path / "run")
    prefix = resolve(words).data.train_data_path[0]
    folder = Path(prefix).parent
    good = source_arrays(prefix)
    if damage == "no_record":  # a folder without its record, written last (copied half, or by hand)
        (folder / "complete.json").unlink()
    elif damage == "cut_short":
        path = Path(prefix + "_packed_labels_document.bin")
        path.write_bytes(path.read_bytes()[:-8])
    else:  # a killed run's staging folder beside a removed cache
        shutil.move(folder, folder.parent / f"{folder.name}.tmp-999999")
    capfd.readouterr()
    assert resolve(words).data.train_data_path[0] == prefix
    assert "tokenized 5 records" in capfd.readouterr().err
    assert source_arrays(prefix) == good
    assert not list(folder.parent.glob("*.tmp-*"))


def test_a_file_saved_with_a_byte_order_mark_loses_no_record(tokenizer_dir, tmp_path):
    """PAI opens its json with encoding='utf-8-sig'."""
    data = write_records(tmp_path / "train.json")
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    prefix = resolve(argv(tokenizer_dir, str(data), str(data), tmp_path / "run")).data.train_data_path[0]
    assert len(FinetuneSource(prefix)) == 5


def test_a_missing_file_is_a_one_line_error(tokenizer_dir, tmp_path):
    missing = str(tmp_path / "dev.json")
    with pytest.raises(EmberError) as error:
        resolve(argv(tokenizer_dir, str(write_records(tmp_path / "train.json")), missing, tmp_path / "run"))
    message = str(error.value)
    assert message.startswith(f"--valid-data-path {missing}: no such file") and "\n" not in message


def test_pais_bloom_tokenizer_is_the_one_of_its_load(tokenizer_dir, tmp_path):
    """PAI's script names no tokenizer folder: BloomTokenizerFromHF loads --load's (from_pretrained(args.load))."""
    load = tmp_path / "bloomz-1b7-ember"
    shutil.copytree(tokenizer_dir, load / "tokenizer")
    data = write_records(tmp_path / "train.json")
    words = [w for w in argv(tokenizer_dir, str(data), str(data), tmp_path / "run")]
    at = words.index("--tokenizer-name-or-path")
    words[at:at + 2] = ["--patch-tokenizer-type", "BloomTokenizerFromHF", "--load", str(load)]
    config = resolve(words)
    assert config.data.tokenizer_name_or_path == str(load / "tokenizer")
    assert len(FinetuneSource(config.data.train_data_path[0])) == 5


def test_a_bloom_like_tokenizer_gets_pais_literal_end_of_text(tokenizer_dir, tmp_path):
    """With `</s>` as the EOS token (Bloom's), PAI's `tokenizer(text + '</s>')` and its no-second-`</s>`
    rule give exactly the ids written here."""
    from transformers import AutoTokenizer

    from ember.data.handlers import build_handler
    from ember.data.records import DecodedChunk
    from ember.data.tokenizers import build_tokenizer

    bloom_like = tmp_path / "bloom_like"
    shutil.copytree(tokenizer_dir, bloom_like)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = bloom_like / name
        path.write_text(path.read_text().replace("<|endoftext|>", "</s>"))
    hf = AutoTokenizer.from_pretrained(str(bloom_like))
    assert hf.eos_token == "</s>"
    texts = ["Return a copy of the string.", "Return a copy of the string.</s>", "x </s> y"]
    handler = build_handler("PaiFinetuneHandler", build_tokenizer("PretrainedFromHF", str(bloom_like)), None,
                            ("text",), False, None)
    chunk = DecodedChunk("f.json", [{"text": t} for t in texts], [1, 2, 3], [], 0)
    handled = handler.handle(chunk)
    docs = handled.datasets["packed_input_ids"]
    written = np.split(docs.tokens, np.cumsum(docs.sequence_lengths)[:-1])
    for text, ids in zip(texts, written):
        pai = hf(text + "</s>" if not text.endswith("</s>") else text)["input_ids"]
        assert ids.tolist() == pai

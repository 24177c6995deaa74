"""Megatron / MindSpeed-LLM preprocess flags the upstream data scripts use, and MindFormers' Wikitext
path, each against an independent reference: NLTK's Punkt with megatron-core's own writer
(--split-sentences, --keep-newlines), Megatron's partition order (--partitions), transformers'
slow tokenizer (--tokenizer-not-use-fast), megatron-core's reader (--dataset-impl), and MindFormers'
llama_preprocess.py semantics (Wikitext .tokens -> samples of seq_length + 1 tokens)."""

from __future__ import annotations

import json
import re

import pytest

from ember.cli import main as ember
from ember.data.indexed import IndexedDataset
from ember.errors import EmberError

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

TEXTS = [
    "Dr. Brown went to Washington. He met Mr. Smith there.\nThe meeting lasted an hour. It ended well.",
    "A short one.",
    "First line.\n\nAfter a blank line! And a question? Yes.",
    "Numbers like 3.14 stay whole. The end.",
    "Fifth document here. With two sentences.",
]


def _write_jsonl(path, texts=TEXTS):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _same(prefix_a, prefix_b) -> bool:
    return all(open(f"{prefix_a}.{e}", "rb").read() == open(f"{prefix_b}.{e}", "rb").read() for e in ("bin", "idx"))


def _megatron_write(prefix, documents, tokenizer_dir):
    """megatron-core's IndexedDatasetBuilder with Megatron's dtype rule; documents = [[sentence ids...]]."""
    import torch
    from transformers import AutoTokenizer

    dtype = megatron_indexed.DType.optimal_dtype(len(AutoTokenizer.from_pretrained(str(tokenizer_dir))))
    builder = megatron_indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sentences in documents:
        ids = [i for s in sentences for i in s]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(s) for s in sentences])
    builder.finalize(f"{prefix}.idx")


# --------------------------------------------------------------------------- --split-sentences


@pytest.fixture()
def punkt_model(tmp_path, monkeypatch):
    """An English Punkt model trained here (NLTK's own trainer; no download), installed where
    NLTK looks for punkt_tab, as a user's NLTK_DATA holds the published one."""
    nltk_data = pytest.importorskip("nltk.data")
    from nltk.tokenize import punkt

    trainer = punkt.PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    trainer.train(" ".join(TEXTS * 20) + " Mr. Jones and Dr. Who. Mr. Smith is here. Dr. No.", finalize=True)
    folder = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    # the punkt_tab files, as nltk's save_punkt_params writes them (which only writes inside its sandbox)
    from nltk.tabdata import TabEncoder

    params, encode = trainer.get_params(), TabEncoder()
    (folder / "collocations.tab").write_text(encode.tups2tab(params.collocations))
    (folder / "sent_starters.txt").write_text(encode.set2txt(params.sent_starters))
    (folder / "abbrev_types.txt").write_text(encode.set2txt(params.abbrev_types))
    (folder / "ortho_context.tab").write_text(encode.ivdict2tab(params.ortho_context))
    monkeypatch.setattr(nltk_data, "path", [str(tmp_path / "nltk_data")])
    return punkt


class _MegatronKeepNewlines:
    """Megatron-LM tools/preprocess_data.py's CustomLanguageVars (NVIDIA/Megatron-LM@d98e8a64): Punkt's
    period context with `\\s*` so the whitespace after a sentence stays in it (the reference)."""

    _period_context_fmt = r"""
        \S*                          # some word material
        %(SentEndChars)s             # a potential sentence ending
        \s*                       #  <-- THIS is what I changed
        (?=(?P<after_tok>
            %(NonWord)s              # either other punctuation
            |
            (?P<next_tok>\S+)     #  <-- Normally you would have \s+ here
        ))"""


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_as_megatron(tmp_path, tokenizer_dir, punkt_model, keep_newlines):
    """Punkt sentences (Megatron's splitter, --keep-newlines its variant), each tokenized alone, EOD
    on the last: megatron-core's writer gives the same PREFIX_text_sentence bytes."""
    from transformers import AutoTokenizer

    data = _write_jsonl(tmp_path / "in.jsonl")
    flags = ["--keep-newlines"] if keep_newlines else []
    assert ember(["preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "ember"),
                  "--tokenizer-name-or-path", str(tokenizer_dir), "--split-sentences", "--append-eod", *flags]) == 0
    splitter = punkt_model.PunktTokenizer("english")
    if keep_newlines:
        lang_vars = type("CustomLanguageVars", (_MegatronKeepNewlines, punkt_model.PunktLanguageVars), {})()
        splitter = punkt_model.PunktSentenceTokenizer(train_text=splitter._params, lang_vars=lang_vars)
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    documents = []
    for text in TEXTS:
        sentences = [ids for ids in (hf(s).input_ids for s in splitter.tokenize(text)) if ids]
        sentences[-1] = sentences[-1] + [hf.eos_token_id]
        documents.append(sentences)
    assert sum(len(d) for d in documents) > len(TEXTS)  # it did split
    if keep_newlines:  # the variant keeps the newline after "there." inside that sentence
        assert any("\n" in s for s in splitter.tokenize(TEXTS[0]))
    _megatron_write(tmp_path / "ref_text_sentence", documents, tokenizer_dir)
    assert _same(tmp_path / "ember_text_sentence", tmp_path / "ref_text_sentence")


def test_split_sentences_without_the_model_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    nltk_data = pytest.importorskip("nltk.data")
    monkeypatch.setattr(nltk_data, "path", [str(tmp_path / "empty")])
    from ember.data.preprocess import preprocess

    with pytest.raises(EmberError, match=r"Punkt model for 'english' \(punkt_tab\) is not installed.*NLTK_DATA"):
        preprocess(input=_write_jsonl(tmp_path / "in.jsonl"), output_prefix=str(tmp_path / "x"),
                   tokenizer_name_or_path=str(tokenizer_dir), split_sentences=True)
    assert not list(tmp_path.glob("x_*"))


# --------------------------------------------------------------------------- --partitions


@pytest.mark.parametrize("sequential", [False, True])
def test_partitions_give_megatrons_order(tmp_path, tokenizer_dir, sequential):
    """Megatron deals input lines to the partitions in turn (line i to partition i % N) and merges
    partition 0, 1, ... in order; --keep-sequential-samples keeps contiguous parts (input order)."""
    texts = [f"Document number {i} of the partition test." for i in range(11)]
    data = _write_jsonl(tmp_path / "in.jsonl", texts)
    extra = ["--keep-sequential-samples"] if sequential else []
    assert ember(["preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "ember"), "--append-eod",
                  "--tokenizer-name-or-path", str(tokenizer_dir), "--partitions", "2", "--workers", "2", *extra]) == 0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = list(range(11)) if sequential else [i for k in range(2) for i in range(k, 11, 2)]
    _megatron_write(tmp_path / "ref_text_document", [[hf(texts[i]).input_ids + [hf.eos_token_id]] for i in lines],
                    tokenizer_dir)
    assert _same(tmp_path / "ember_text_document", tmp_path / "ref_text_document")
    with pytest.raises(EmberError, match="not a multiple of --partitions"):
        from ember.data.preprocess import preprocess

        preprocess(input=data, output_prefix=str(tmp_path / "odd"), tokenizer_name_or_path=str(tokenizer_dir),
                   partitions=2, workers=3)


# --------------------------------------------------------------------------- tokenizer, format


def test_tokenizer_not_use_fast_and_dataset_impl(tmp_path, tokenizer_dir, capsys):
    """--tokenizer-not-use-fast: transformers' AutoTokenizer(use_fast=False) ids (MindSpeed's call),
    not ember's fast encoder; --dataset-impl mmap writes what megatron-core's mmap reader reads, and
    lazy/cached (MindSpeed writes mmap whatever they say) get one notice line."""
    from transformers import AutoTokenizer

    from ember.data.preprocess import handler_for, PreprocessJob
    from ember.data.tokenizers import build_tokenizer

    data = _write_jsonl(tmp_path / "in.jsonl")
    assert ember(["preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "slow"),
                  "--tokenizer-name-or-path", str(tokenizer_dir), "--tokenizer-not-use-fast",
                  "--dataset-impl", "lazy"]) == 0
    err = capsys.readouterr().err
    assert "Hugging Face encoder" in err and "--dataset-impl lazy: writing mmap" in err
    slow = AutoTokenizer.from_pretrained(str(tokenizer_dir), use_fast=False)
    reader = megatron_indexed.IndexedDataset(str(tmp_path / "slow_text_document"), mmap=True)
    assert [reader[i].tolist() for i in range(len(TEXTS))] == [slow(t).input_ids for t in TEXTS]
    tokenizer = build_tokenizer("PretrainedFromHF", str(tokenizer_dir), use_fast=False)
    assert tokenizer.backend is None  # transformers' tokenizer, not the tokenizers library directly
    job = PreprocessJob(("PretrainedFromHF", str(tokenizer_dir), None, None, None), "GeneralPretrainHandler",
                        ("text",), False, None, True, use_fast_tokenizer=False)
    assert handler_for(job).encoder.__class__.__name__ == "HFTokenizer"


# --------------------------------------------------------------------------- MindFormers' Wikitext path

WIKITEXT = (" \n = Valkyria Chronicles III = \n \n"
            " Senjō no Valkyria 3 : Unrecorded Chronicles ( Japanese : 戦場のヴァルキュリア3 ) , commonly referred "
            "to as Valkyria Chronicles III outside Japan , is a tactical role @-@ playing video game . \n \n"
            " = = Gameplay = = \n \n"
            " The game 's battle system , the BliTZ system , is carried over directly from Valkyira Chronicles . "
            "It has 1 @,@ 000 units and 3 @.@ 5 km of \" open \" terrain , at 30 ° north . \n \n"
            " Troops are divided into five classes : Scouts , Shocktroopers , Engineers , Lancers and Armored "
            "Soldier . The N units ' weapons [ swords ] are { new } . \n \n") * 6


def _mindformers_clean(string: str) -> str:
    """The reference: MindFormers' clean_wikitext (mindformers/tools/dataset_preprocess/llama/
    llama_preprocess.py, mindspore-lab/mindformers@v1.5.0 = 06e1af77), its replacements in order."""
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    for a, b in [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")]:
        string = string.replace(a, b)
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    for a, b in [("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")]:
        string = string.replace(a, b)
    return string


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A small SentencePiece model (Llama's tokenizer kind: BOS 1, EOS 2), trained here."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("spm")
    (folder / "text.txt").write_text(_mindformers_clean(WIKITEXT))
    spm.SentencePieceTrainer.train(input=str(folder / "text.txt"), model_prefix=str(folder / "tokenizer"),
                                   vocab_size=200, model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    return folder / "tokenizer.model"


def test_wikitext_tokens_become_mindformers_samples(tmp_path, sentencepiece_model):
    """`ember preprocess --input wiki.train.tokens --seq-length N`: MindFormers' tokenize_wiki samples
    (paragraphs without headings, each BOS ... EOS, back to back, cut into N + 1 tokens, the rest
    dropped), one record each; ember's fine-tuning dataset then trains each sample whole."""
    import sentencepiece

    from ember.data.finetune_dataset import FinetuneDataset

    (tmp_path / "wiki.train.tokens").write_text(WIKITEXT, encoding="utf-8")
    seq = 32
    assert ember(["preprocess", "--input", str(tmp_path / "wiki.train.tokens"), "--output-prefix",
                  str(tmp_path / "wiki"), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                  str(sentencepiece_model), "--seq-length", str(seq)]) == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    content = []
    for para in _mindformers_clean(WIKITEXT).split("\n\n"):
        if para and not para.strip().startswith("="):
            content += [sp.bos_id()] + sp.encode(para) + [sp.eos_id()]
    expected = [content[i:i + seq + 1] for i in range(0, len(content), seq + 1) if len(content[i:i + seq + 1]) == seq + 1]
    ids = IndexedDataset(tmp_path / "wiki_packed_input_ids_document")
    labels = IndexedDataset(tmp_path / "wiki_packed_labels_document")
    assert [ids.document(i).tolist() for i in range(ids.num_documents)] == expected
    assert [labels.document(i).tolist() for i in range(labels.num_documents)] == expected  # every token trained
    dataset = FinetuneDataset(str(tmp_path / "wiki"), seq, seed=1, pack=False)
    assert sorted(dataset[i]["tokens"].tolist() for i in range(len(expected))) == sorted(expected)
    assert all(dataset[i]["loss_mask"].all() for i in range(len(expected)))


def test_mindrecord_input_is_refused_with_the_command(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "wiki4096.mindrecord").write_bytes(b"\0" * 16)
    assert ember(["preprocess", "--input", str(tmp_path / "wiki4096.mindrecord"), "--output-prefix",
                  str(tmp_path / "x"), "--tokenizer-name-or-path", str(tokenizer_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MindRecord" in err[0] and "ember preprocess --input wiki.train.tokens" in err[0]

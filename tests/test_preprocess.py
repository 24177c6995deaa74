"""`ember preprocess` against Megatron's own writer and the Hugging Face tokenizer, and its safety rules."""

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from ember.cli import main as ember
from ember.data.indexed import IndexedDataset

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def megatron_reference(jsonl, out_prefix, tokenizer_dir, keys=("text",), append_eod=False):
    """What Megatron-LM's tools/preprocess_data.py does, step by step, with Megatron's own builder:
    json.loads per line, HuggingFaceTokenizer = AutoTokenizer(text).input_ids, eod = eos_token_id,
    dtype = DType.optimal_dtype(len(tokenizer)), a list value = sentences, empty sentences dropped."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dtype = megatron_indexed.DType.optimal_dtype(len(tokenizer))
    builders = {k: megatron_indexed.IndexedDatasetBuilder(f"{out_prefix}_{k}_document.bin", dtype=dtype)
                for k in keys}
    with open(jsonl, encoding="utf-8") as f:
        for line in f:
            data = json.loads(line)
            for key in keys:
                text = data[key]
                sentences = text if isinstance(text, list) else [text]
                doc_ids, lens = [], []
                for sentence in sentences:
                    ids = tokenizer(sentence).input_ids
                    if len(ids) > 0:
                        doc_ids.extend(ids)
                        lens.append(len(ids))
                if len(doc_ids) > 0 and append_eod:
                    doc_ids.append(tokenizer.eos_token_id)
                    lens[-1] += 1
                builders[key].add_document(torch.tensor(doc_ids, dtype=torch.int64), lens)
    for key, builder in builders.items():
        builder.finalize(f"{out_prefix}_{key}_document.idx")


def same_files(prefix_a, prefix_b):
    return all(open(f"{prefix_a}.{e}", "rb").read() == open(f"{prefix_b}.{e}", "rb").read() for e in ("bin", "idx"))


def preprocess(*args):
    return ember(["preprocess", *map(str, args)])


@pytest.mark.parametrize("append_eod", [False, True])
def test_byte_identical_to_megatron(tmp_path, corpus_jsonl, tokenizer_dir, append_eod):
    megatron_reference(corpus_jsonl, tmp_path / "ref", tokenizer_dir, append_eod=append_eod)
    extra = ["--append-eod"] if append_eod else []
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "ours",
                      "--tokenizer-name-or-path", tokenizer_dir, *extra) == 0
    assert same_files(tmp_path / "ours_text_document", tmp_path / "ref_text_document")


def test_several_json_keys_and_sentence_lists(tmp_path, tokenizer_dir):
    src = tmp_path / "multi.jsonl"
    rows = [{"text": f"document {i} " * (i + 1), "input": ["first sentence.", "", f"second {i}."],
             "output": "out " * (i % 5 + 1)} for i in range(60)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = ("text", "input", "output")
    megatron_reference(src, tmp_path / "ref", tokenizer_dir, keys=keys, append_eod=True)
    assert preprocess("--input", src, "--output-prefix", tmp_path / "ours", "--tokenizer-name-or-path",
                      tokenizer_dir, "--json-keys", *keys, "--append-eod") == 0
    for key in keys:
        assert same_files(tmp_path / f"ours_{key}_document", tmp_path / f"ref_{key}_document"), key


@pytest.mark.parametrize("flags", [["--workers", "2"], ["--n-subs", "3"], ["--n-subs", "2", "--workers", "2"],
                                   ["--workers", "2", "--chunk-size", "7"]])
def test_parallelism_gives_the_same_bytes(tmp_path, corpus_jsonl, tokenizer_dir, flags):
    common = ["--input", corpus_jsonl, "--tokenizer-name-or-path", tokenizer_dir, "--append-eod"]
    assert preprocess(*common, "--output-prefix", tmp_path / "one") == 0
    assert preprocess(*common, "--output-prefix", tmp_path / "par", *flags) == 0
    assert same_files(tmp_path / "one_text_document", tmp_path / "par_text_document")
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_long_documents_are_chunked_by_bytes(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch):
    """A chunk closes at CHUNK_BYTES as well as at --chunk-size lines (issue 18: with long documents,
    1,024 lines were most of the input and one worker did nearly all of it); the chunks still hold
    every line once, in order, and 2 workers still write Megatron's bytes."""
    import ember.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    texts = _texts(corpus_jsonl)
    src = tmp_path / "long.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(texts[i : i + 8])}) + "\n"
                           for i in range(0, len(texts) - 8, 3)))
    chunks = list(sources.iter_chunks([src], 1024))
    lines = src.read_bytes().splitlines(keepends=True)
    assert len(chunks) >= 5 and [line for c in chunks for line in c.lines] == lines
    assert [c.first_line for c in chunks] == list(np.cumsum([1] + [len(c.lines) for c in chunks[:-1]]))
    assert all(sum(map(len, c.lines[:-1])) < 4096 <= sum(map(len, c.lines)) for c in chunks[:-1])

    megatron_reference(src, tmp_path / "ref", tokenizer_dir, append_eod=True)
    assert preprocess("--input", src, "--output-prefix", tmp_path / "ours", "--tokenizer-name-or-path",
                      tokenizer_dir, "--append-eod", "--workers", "2") == 0
    assert same_files(tmp_path / "ours_text_document", tmp_path / "ref_text_document")


def _awkward_jsonl(corpus_jsonl, chunk_bytes):
    """Lines of every length around `chunk_bytes` (several longer than it), CRLF endings, blank lines,
    three bad records on known lines, and a last line without a newline; (bytes, bad line numbers)."""
    texts = _texts(corpus_jsonl)
    lines, bad = [], {}
    for i in range(60):
        if i == 9:
            lines.append(b"\n")
            bad[len(lines)] = "blank line"
        elif i == 23:
            lines.append(b'{"text": broken\r\n')
            bad[len(lines)] = "malformed JSON"
        elif i == 41:
            lines.append(b'{"other": "no text key"}\n')
            bad[len(lines)] = "missing key 'text'"
        text = " ".join(texts[i % 70 : i % 70 + 1 + i % 9])[: chunk_bytes * (1 + i % 4) // 2]
        lines.append(json.dumps({"text": text}).encode() + (b"\r\n" if i % 5 == 2 else b"\n"))
    return b"".join(lines).rstrip(b"\n"), bad


def test_workers_read_their_own_line_ranges(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch):
    """With several workers the main process sends (file, offset, length) ranges of whole lines,
    never the lines (issue 18): the ranges close where line chunks close (the line holding the
    CHUNK_BYTES-th byte), cover the file once, and read back as the same lines."""
    import ember.data.sources as sources
    from ember.data.records import decode_chunk

    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)
    data, _ = _awkward_jsonl(corpus_jsonl, 2000)
    src = tmp_path / "awkward.jsonl"
    src.write_bytes(data)
    ranges = list(sources.iter_chunks([src], 1024, line_ranges=1))
    chunks = list(sources.iter_chunks([src], 1024))
    assert all(isinstance(r, sources.LineRange) for r in ranges) and len(ranges) >= 10
    sizes = [sum(map(len, c.lines)) for c in chunks]
    assert [(r.offset, r.length) for r in ranges] == list(zip([0, *np.cumsum(sizes)[:-1]], sizes))
    assert [r.first_line for r in ranges] == [1] + [None] * (len(ranges) - 1)
    read = [sources.read_line_range(r) for r in ranges]
    assert [c.lines for c in read] == [c.lines for c in chunks]
    assert [c.first_line for c in read] == [1] * len(read)  # numbered from 1; the main process shifts them
    assert read[-1].lines[-1].endswith(b"}")  # the last line has no newline
    assert any(c.lines[-1].endswith(b"\r\n") for c in read[:-1])
    # A BOM opens only the file's first line: a range that starts inside the file keeps it (malformed JSON).
    bom = tmp_path / "bom.jsonl"
    line = b'\xef\xbb\xbf{"text": "a"}\n'
    bom.write_bytes(line * 2)
    head = sources.LineRange(str(bom), ".jsonl", 0, len(line), 1)
    tail = sources.LineRange(str(bom), ".jsonl", len(line), len(line), None)
    assert len(decode_chunk(sources.read_line_range(head)).records) == 1
    assert [s.line for s in decode_chunk(sources.read_line_range(tail)).skips] == [1]
    # n-subs parts: ranges within each part, the part's first line known
    parts = sources.split_input([src], 3)
    in_parts = [list(sources.iter_chunks([src], 1024, part=part, line_ranges=1)) for part in parts]
    assert [r.first_line for rs in in_parts for r in rs if r.first_line is not None] == [
        part.files[str(src)][1] for part in parts]
    assert b"".join(line for rs in in_parts for r in rs for line in sources.read_line_range(r).lines) == data


def test_a_small_file_is_cut_for_every_worker(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch):
    """A file of a few ranges' size still gives each of many workers several ranges (else most of
    them would wait while one or two tokenize); the output is the single worker's, byte for byte."""
    import ember.data.sources as sources

    monkeypatch.setattr(sources, "MIN_RANGE_BYTES", 512)
    data, _ = _awkward_jsonl(corpus_jsonl, 600)
    src = tmp_path / "small.jsonl"
    src.write_bytes(data)
    assert len(data) < 4 * sources.CHUNK_BYTES  # a few ranges of CHUNK_BYTES at most
    ranges = list(sources.iter_chunks([src], 1024, line_ranges=4))
    assert len(ranges) >= 12 and sum(r.length for r in ranges) == len(data)
    assert sources.range_bytes(len(data), 4) == len(data) // 16
    assert sources.range_bytes(100 * sources.CHUNK_BYTES, 4) == sources.CHUNK_BYTES  # large: as before
    assert sources.range_bytes(1000, 4) == 512  # not below MIN_RANGE_BYTES
    common = ["--input", src, "--tokenizer-name-or-path", tokenizer_dir, "--append-eod"]
    assert preprocess(*common, "--output-prefix", tmp_path / "one") == 0
    assert preprocess(*common, "--output-prefix", tmp_path / "four", "--workers", "4") == 0
    assert same_files(tmp_path / "one_text_document", tmp_path / "four_text_document")


@pytest.mark.parametrize("flags", [["--workers", "2"], ["--n-subs", "2", "--workers", "4"]])
def test_line_ranges_give_the_same_bytes_and_line_numbers(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch,
                                                          capsys, flags):
    """Range boundaries in the middle of long lines, at CRLF, blank lines, bad records and a last line
    without a newline: 2 workers write the single worker's bytes and name the same lines."""
    import ember.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)
    data, bad = _awkward_jsonl(corpus_jsonl, 2000)
    src = tmp_path / "awkward.jsonl"
    src.write_bytes(data)
    common = ["--input", src, "--tokenizer-name-or-path", tokenizer_dir, "--append-eod"]
    assert preprocess(*common, "--output-prefix", tmp_path / "one") == 0
    one = capsys.readouterr().err
    assert preprocess(*common, "--output-prefix", tmp_path / "par", *flags) == 0
    par = capsys.readouterr().err
    assert same_files(tmp_path / "one_text_document", tmp_path / "par_text_document")
    skipped = [line for line in one.splitlines() if line.startswith("skipped")]
    assert skipped == [line for line in par.splitlines() if line.startswith("skipped")]
    assert [f"awkward.jsonl:{n}: {reason}" in "\n".join(skipped) for n, reason in bad.items()] == [True] * 3
    assert f"skipped {len(bad)} record(s)" in one
    # --strict names the first bad record's line, which lies in a later range than the first
    assert preprocess(*common, "--output-prefix", tmp_path / "strict", "--strict", *flags) == 2
    first = min(bad)
    assert f"awkward.jsonl:{first}: {bad[first]}" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p or p.startswith("strict")]


def test_line_ranges_of_several_files_and_txt(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch, capsys):
    """Line numbers start again in each file of a folder (.json lines and .jsonl), and .txt lines
    (invalid UTF-8 skipped) go by ranges too: 2 workers, the single worker's bytes and lines."""
    import ember.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 1500)
    data, bad = _awkward_jsonl(corpus_jsonl, 1500)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_bytes(data + b"\n")
    (folder / "b.jsonl").write_bytes(data)
    texts = [line.decode() for line in data.split(b"\n") if line.strip()][:40]
    txt = b"\n".join(t.encode() for t in texts[:31]) + b"\n\xff\xfe not utf-8\n" + "\n".join(texts[31:]).encode()
    (tmp_path / "c.txt").write_bytes(txt)
    for name, source, lines in (("dir", folder, [f"{f}:{n}:" for f in ("a.json", "b.jsonl") for n in sorted(bad)][:5]),
                                ("txt", tmp_path / "c.txt", ["c.txt:32: not valid UTF-8"])):
        common = ["--input", source, "--tokenizer-name-or-path", tokenizer_dir, "--append-eod"]
        assert preprocess(*common, "--output-prefix", tmp_path / f"{name}1") == 0
        one = capsys.readouterr().err
        assert preprocess(*common, "--output-prefix", tmp_path / f"{name}2", "--workers", "2") == 0
        two = capsys.readouterr().err
        assert same_files(tmp_path / f"{name}1_text_document", tmp_path / f"{name}2_text_document"), name
        skipped = [line for line in one.splitlines() if line.startswith("skipped")]
        assert skipped == [line for line in two.splitlines() if line.startswith("skipped")], name
        assert [any(where in line for line in skipped) for where in lines] == [True] * len(lines), (name, skipped)


def test_workers_return_tokens_in_the_datasets_dtype(tmp_path, tokenizer_dir):
    """A worker sends back uint16 ids when the vocabulary fits (half of int32's bytes), one array
    per dataset, with the number of lines its range held."""
    from ember.data.preprocess import PreprocessJob, _handle_chunk
    from ember.data.sources import LineRange

    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"text": "one two"}\n\n{"text": "three"}\n')
    job = PreprocessJob(("PretrainedFromHF", str(tokenizer_dir), None, None, None), "GeneralPretrainHandler",
                        ("text",), True, None, True, token_dtype="uint16")
    handled = _handle_chunk(job, LineRange(str(src), ".jsonl", 0, src.stat().st_size, 1))
    docs = handled.datasets["text"]
    assert docs.tokens.dtype == np.uint16 and handled.num_lines == 3 and handled.num_documents == 2
    assert docs.sequence_lengths.sum() == docs.tokens.size and [s.line for s in handled.skips] == [2]


def _truncates_the_file_first(piece):
    """A worker's read of a later range that finds the file cut short under it (another program
    rewrote it mid-run): the file is truncated inside this range, then read as usual."""
    import ember.data.sources as sources

    if piece.offset >= 20 * sources.CHUNK_BYTES and os.path.getsize(piece.path) > piece.offset + 10:
        os.truncate(piece.path, piece.offset + 10)
    return sources.read_line_range(piece)


def test_input_cut_short_mid_run_is_one_line_and_writes_nothing(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch,
                                                                  capsys):
    import shutil

    import ember.data.preprocess as pre
    import ember.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(pre, "read_line_range", _truncates_the_file_first)
    src = tmp_path / "input.jsonl"
    shutil.copy(corpus_jsonl, src)
    assert src.stat().st_size > 30 * 4096
    out = tmp_path / "out"
    out.mkdir()
    assert preprocess("--input", src, "--output-prefix", out / "t", "--tokenizer-name-or-path", tokenizer_dir,
                      "--workers", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "input.jsonl" in err[-1] and "the file ends at byte" in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
    assert os.listdir(out) == []


def _dies_on_a_later_range(piece):
    """A worker's read that kills its process at about the 40th range (earlier ones are written by then)."""
    import ember.data.sources as sources

    if piece.offset >= 40 * sources.CHUNK_BYTES:
        os.kill(os.getpid(), signal.SIGKILL)
    return sources.read_line_range(piece)


def test_worker_killed_mid_run_leaves_nothing(tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch, capsys):
    import ember.data.preprocess as pre
    import ember.data.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(pre, "read_line_range", _dies_on_a_later_range)
    out = tmp_path / "out"
    out.mkdir()
    assert preprocess("--input", corpus_jsonl, "--output-prefix", out / "k", "--tokenizer-name-or-path",
                      tokenizer_dir, "--workers", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "worker process died" in err[-1] and "Traceback" not in "\n".join(err)
    assert os.listdir(out) == []


def _texts(corpus_jsonl, limit=80):
    with open(corpus_jsonl) as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(limit))]


def test_every_input_format_gives_the_same_tokens(tmp_path, corpus_jsonl, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    import zstandard

    texts = _texts(corpus_jsonl)
    table = pa.table({"text": texts, "id": list(range(len(texts)))})
    jsonl = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(jsonl)
    inputs = {
        "parquet": tmp_path / "a.parquet", "csv": tmp_path / "a.csv", "arrow": tmp_path / "a.arrow",
        "json_array": tmp_path / "a.json", "gz": tmp_path / "a.jsonl.gz", "zst": tmp_path / "a.jsonl.zst",
    }
    pq.write_table(table, inputs["parquet"], row_group_size=17)
    pcsv.write_csv(table, inputs["csv"])
    with pa.ipc.new_stream(str(inputs["arrow"]), table.schema) as writer:  # as Hugging Face datasets saves
        writer.write_table(table, max_chunksize=13)
    inputs["json_array"].write_text(json.dumps([{"text": t} for t in texts]))
    inputs["gz"].write_bytes(gzip.compress(jsonl))
    inputs["zst"].write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 30), folder / "part-0.parquet")
    pq.write_table(table.slice(30), folder / "part-1.parquet")
    inputs["folder"] = folder
    assert preprocess("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "ref",
                      "--tokenizer-name-or-path", tokenizer_dir) == 0
    for name, path in inputs.items():
        assert preprocess("--input", path, "--output-prefix", tmp_path / name,
                          "--tokenizer-name-or-path", tokenizer_dir, "--n-subs", "2") == 0, name
        assert same_files(tmp_path / f"{name}_text_document", tmp_path / "ref_text_document"), name


def test_txt_lines_are_records(tmp_path, tokenizer_dir):
    from ember.data.tokenizers import build_tokenizer

    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nfourth\n")
    assert preprocess("--input", tmp_path / "a.txt", "--output-prefix", tmp_path / "t",
                      "--tokenizer-name-or-path", tokenizer_dir) == 0
    tok = build_tokenizer("PretrainedFromHF", tokenizer_dir)
    ds = IndexedDataset(tmp_path / "t_text_document")
    assert [tok.decode(ds[i]) for i in range(len(ds))] == ["first line", "second line", "fourth"]


def test_bad_records_are_skipped_counted_and_located(tmp_path, tokenizer_dir, capsys):
    lines = [b'{"text": "good one"}', b'{"text": broken', b'{"other": "no text key"}', b'{"text": ""}',
             b'{"text": "bad \xff\xfe utf8"}', b'[1, 2]', b'{"text": "good two"}']
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    assert preprocess("--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "b",
                      "--tokenizer-name-or-path", tokenizer_dir) == 0
    err = capsys.readouterr().err
    assert "skipped 5 record(s)" in err
    for line_no in (2, 3, 4, 5):
        assert f"bad.jsonl:{line_no}:" in err
    assert "missing key 'text'" in err
    assert IndexedDataset(tmp_path / "b_text_document").num_documents == 2
    # --strict: the first bad record is an error, and nothing is written.
    assert preprocess("--input", tmp_path / "bad.jsonl", "--output-prefix", tmp_path / "s",
                      "--tokenizer-name-or-path", tokenizer_dir, "--strict") == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["b_text_document.bin", "b_text_document.idx", "bad.jsonl"]


def test_clear_errors_before_any_work(tmp_path, tokenizer_dir, corpus_jsonl, capsys):
    cases = [
        (["--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "o",
          "--tokenizer-name-or-path", tokenizer_dir], "does not exist"),
        (["--input", corpus_jsonl, "--output-prefix", tmp_path / "missing" / "o",
          "--tokenizer-name-or-path", tokenizer_dir], "folder"),
        (["--input", corpus_jsonl, "--output-prefix", tmp_path / "o",
          "--tokenizer-name-or-path", tmp_path / "no-tokenizer"], "tokenizer folder"),
        (["--input", corpus_jsonl, "--output-prefix", tmp_path / "o", "--tokenizer-type", "Llama2Tokenizer"],
         "needs --tokenizer-model"),
        (["--input", corpus_jsonl, "--output-prefix", tmp_path / "o", "--tokenizer-name-or-path", tokenizer_dir,
          "--pack"], "--seq-length"),
    ]
    for args, message in cases:
        assert preprocess(*args) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "o",
                      "--tokenizer-name-or-path", tokenizer_dir) == 0
    before = (tmp_path / "o_text_document.bin").stat().st_mtime_ns
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "o",
                      "--tokenizer-name-or-path", tokenizer_dir) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "o_text_document.bin").stat().st_mtime_ns == before


def test_interrupted_run_leaves_no_complete_pair(tmp_path, corpus_jsonl, tokenizer_dir):
    big = tmp_path / "big.jsonl"
    data = corpus_jsonl.read_bytes()
    big.write_bytes(data * 20)
    # Small chunks and frequent progress lines: the kill lands early, far from the end of the input.
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "preprocess", "--input", str(big),
                             "--output-prefix", str(tmp_path / "k"), "--tokenizer-name-or-path", str(tokenizer_dir),
                             "--log-interval", "20", "--chunk-size", "16", "--no-fast-encoder"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # wait until it is mid-way, then kill it hard
            if "processed" in line:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not finished before the signal
    assert not (tmp_path / "k_text_document.idx").exists()


def test_instruction_handler_masks_the_prompt(tmp_path, tokenizer_dir):
    from ember.data.tokenizers import build_tokenizer

    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "No output here."}]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert preprocess("--input", tmp_path / "alpaca.jsonl", "--output-prefix", tmp_path / "sft",
                      "--tokenizer-name-or-path", tokenizer_dir,
                      "--handler-name", "AlpacaStyleInstructionHandler") == 0
    tok = build_tokenizer("PretrainedFromHF", tokenizer_dir)
    ids = IndexedDataset(tmp_path / "sft_packed_input_ids_document")
    labels = IndexedDataset(tmp_path / "sft_packed_labels_document")
    assert ids.num_documents == labels.num_documents == 2 and labels.dtype == np.int32
    for i, row in enumerate(rows[:2]):
        x, y = ids.document(i), labels.document(i)
        assert x.shape == y.shape
        trained = y != -100
        assert tok.decode(x[trained]) == row["output"] + tok.decode([tok.eod])
        np.testing.assert_array_equal(x[trained], y[trained])
        assert tok.decode(x[~trained]).startswith("Below is an instruction")
        assert row["instruction"] in tok.decode(x[~trained])


def test_sharegpt_handler_trains_only_on_replies(tmp_path, tokenizer_dir):
    from ember.data.tokenizers import build_tokenizer

    conv = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hello?"},
                              {"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Bye?"},
                              {"from": "gpt", "value": "Bye."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(conv) + "\n")
    assert preprocess("--input", tmp_path / "chat.jsonl", "--output-prefix", tmp_path / "c",
                      "--tokenizer-name-or-path", tokenizer_dir,
                      "--handler-name", "SharegptStyleInstructionHandler") == 0
    tok = build_tokenizer("PretrainedFromHF", tokenizer_dir)
    x = IndexedDataset(tmp_path / "c_packed_input_ids_document").document(0)
    y = IndexedDataset(tmp_path / "c_packed_labels_document").document(0)
    trained_text = tok.decode(x[y != -100])
    assert "Hi." in trained_text and "Bye." in trained_text
    assert "Hello?" not in trained_text and "Be brief." not in trained_text
    assert "Hello?" in tok.decode(x)


def test_pack_mode_cuts_the_eod_joined_stream(tmp_path, corpus_jsonl, tokenizer_dir):
    common = ["--input", corpus_jsonl, "--tokenizer-name-or-path", tokenizer_dir]
    assert preprocess(*common, "--output-prefix", tmp_path / "eod", "--append-eod") == 0
    assert preprocess(*common, "--output-prefix", tmp_path / "pack", "--pack", "--seq-length", "128",
                      "--n-subs", "2") == 0
    plain, packed = IndexedDataset(tmp_path / "eod_text_document"), IndexedDataset(tmp_path / "pack_text_document")
    assert (tmp_path / "eod_text_document.bin").read_bytes() == (tmp_path / "pack_text_document.bin").read_bytes()
    assert set(packed.sequence_lengths[:-1].tolist()) == {128} and 0 < packed.sequence_lengths[-1] <= 128
    assert packed.num_documents == len(packed) == -(-plain.num_tokens // 128)
    # --seed shuffles whole documents before packing: same tokens, documents in the seeded order.
    assert preprocess(*common, "--output-prefix", tmp_path / "shuf", "--pack", "--seq-length", "128",
                      "--seed", "7") == 0
    shuffled = IndexedDataset(tmp_path / "shuf_text_document")
    order = np.random.RandomState(7).permutation(plain.num_documents)
    expected = np.concatenate([plain.document(int(d)) for d in order])
    np.testing.assert_array_equal(np.concatenate([shuffled[i] for i in range(len(shuffled))]), expected)
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def test_sentencepiece_and_gpt2_bpe_tokenizers(tmp_path, corpus_jsonl, tokenizer_dir):
    import sentencepiece
    from transformers import GPT2Tokenizer

    from ember.data.tokenizers import build_tokenizer

    texts = _texts(corpus_jsonl, 40)
    (tmp_path / "small.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=500, model_type="bpe", minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    assert preprocess("--input", tmp_path / "small.jsonl", "--output-prefix", tmp_path / "llama",
                      "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tmp_path / "sp.model",
                      "--append-eod") == 0
    ds = IndexedDataset(tmp_path / "llama_text_document")
    for i, text in enumerate(texts):  # Megatron's Llama2Tokenizer: BOS + pieces (+ EOS as eod)
        assert ds.document(i).tolist() == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()]

    build_tokenizer("PretrainedFromHF", tokenizer_dir).backend.model.save(str(tmp_path))  # vocab.json, merges.txt
    assert preprocess("--input", tmp_path / "small.jsonl", "--output-prefix", tmp_path / "gpt2",
                      "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", tmp_path / "vocab.json",
                      "--merge-file", tmp_path / "merges.txt") == 0
    reference = GPT2Tokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    ds = IndexedDataset(tmp_path / "gpt2_text_document")
    for i, text in enumerate(texts):
        assert ds.document(i).tolist() == reference(text).input_ids


def test_inspect_shows_counts_and_decoded_text(tmp_path, corpus_jsonl, tokenizer_dir, capsys):
    assert preprocess("--input", corpus_jsonl, "--output-prefix", tmp_path / "d",
                      "--tokenizer-name-or-path", tokenizer_dir) == 0
    capsys.readouterr()
    assert ember(["data", "inspect", str(tmp_path / "d_text_document"), "--tokenizer-name-or-path",
                  str(tokenizer_dir), "--show", "1", "--chars", "40"]) == 0
    out = capsys.readouterr().out
    ds = IndexedDataset(tmp_path / "d_text_document")
    assert f"documents {ds.num_documents:,}" in out and f"tokens {ds.num_tokens:,}" in out
    assert _texts(corpus_jsonl, 1)[0][:40].split("\n")[0] in out


def test_trained_tokenizer_loads_in_transformers(tokenizer_dir, corpus_jsonl):
    from transformers import AutoTokenizer

    from ember.data.tokenizers import build_tokenizer

    ours = build_tokenizer("PretrainedFromHF", tokenizer_dir)
    theirs = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert ours.vocab_size == len(theirs) and ours.eod == theirs.eos_token_id
    for text in _texts(corpus_jsonl, 20):
        assert ours.encode(text) == theirs(text).input_ids

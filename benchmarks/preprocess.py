"""Preprocessing throughput: `ember preprocess` against Megatron-LM's `tools/preprocess_data.py`.

    python benchmarks/preprocess.py --megatron-dir /tmp/Megatron-LM            # tools, 1 and 2 workers
    python benchmarks/preprocess.py --encoders                                  # encoders alone, 1 thread
    python benchmarks/preprocess.py --stages                                    # where ember's time goes

The corpus is a >= 100 MB jsonl made deterministically from the Python source files on this machine
(the standard library, then this interpreter's site-packages); the tokenizer is a byte-level BPE
that ember trains on its first megabytes (or `--tokenizer DIR`). Both tools get the same input,
tokenizer and flags (`--json-keys text --append-eod`), run alternately, `--repeats` times per
worker count. Each run prints one line: wall time including start-up, tokens/s, MB/s, peak RSS
(the whole process tree, sampled; and the largest single process). A summary line per worker
count gives the ratio of the best runs and whether the two outputs are byte-identical. ember's
peak RSS is also measured on a quarter of the corpus, to show it does not grow with the input.

`--encoders` times the tokenizers alone on one thread over the standard-library source: Hugging
Face `tokenizers` (`encode`, `encode_batch`, `encode_batch_fast`), transformers' fast tokenizer
called per document (Megatron's path), and ember's FastBPE (`encode`, `encode_batch_flat`),
checking that all return the same ids.

Each round also times ember's exact encoder alone on the same corpus, in this process, on one
thread (the texts already in memory: no start-up, no JSON, no writing), and the summary gives
ember's end-to-end tokens/s as a fraction of (that encoder's tokens/s x workers): the share of the
cores that goes to tokenizing.

`--baseline DIR` runs a second ember source tree too, as tool `ember-base`, alternately with the
others (before/after a change: `git archive <commit> ember | tar -x -C DIR`); its outputs must be
byte-identical as well.

`--stages` takes ember's pipeline apart on one thread over the corpus: start-up (a fresh
interpreter importing ember's preprocessing, the tokenizer, FastBPE's build), reading line chunks,
JSON parsing, encoding, assembling documents (EOD, lengths), the pickling a worker pool adds per
chunk (both ways: the line ranges sent, the results in the datasets' dtype returned), and writing
.bin/.idx; CPU seconds (steady on a shared machine) and share of each.

Megatron-LM >= core_v0.16 imports triton kernels at start-up, so on a machine without triton use
the core_v0.15.2 tree (its preprocess_data.py differs from core_v0.16.1 only in the legacy
tokenizer path, not used here); it runs with the checkout on PYTHONPATH, torch from this venv.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

# Single-thread measurements and no oversubscription: set before any tokenizer library loads.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent


# ---- inputs ------------------------------------------------------------------------------------


def corpus_roots() -> list[Path]:
    """The standard library first, then this interpreter's site-packages (for size)."""
    return [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]


def build_corpus(workdir: Path, min_mb: float) -> Path:
    """`corpus-<N>mb.jsonl`: Python source files as {"text": ...}, >= min_mb MB of text; reused."""
    from ember.data.corpus import write_jsonl

    path = workdir / f"corpus-{min_mb:g}mb.jsonl"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        return path
    start = time.perf_counter()
    documents, size = write_jsonl(path, kind="source", max_bytes=int(min_mb * 1e6), roots=corpus_roots())
    if size < min_mb * 1e6:
        raise SystemExit(f"only {size / 1e6:.0f} MB of Python source on this machine; lower --min-mb")
    meta.write_text(json.dumps({"documents": documents, "text_bytes": size,
                                "roots": [str(r) for r in corpus_roots()]}))
    print(f"corpus: {documents:,} documents, {size / 1e6:.1f} MB of text, {path.stat().st_size / 1e6:.1f} MB "
          f"of jsonl ({time.perf_counter() - start:.0f}s) -> {path}", flush=True)
    return path


def quarter_of(corpus: Path) -> Path:
    """The first quarter (by bytes) of the corpus' lines, for the RSS-versus-input-size check."""
    path = corpus.with_name(corpus.stem + "-quarter.jsonl")
    if not path.exists():
        budget = corpus.stat().st_size // 4
        with open(corpus, "rb") as src, open(path, "wb") as dst:
            for line in src:
                dst.write(line)
                budget -= len(line)
                if budget <= 0:
                    break
    return path


def build_tokenizer(workdir: Path, corpus: Path, vocab_size: int, train_mb: float) -> Path:
    from ember.data.tokenizer_train import train_bpe_tokenizer

    folder = workdir / f"tokenizer-{vocab_size}"
    if (folder / "tokenizer.json").exists():
        return folder

    def texts():
        seen = 0
        with open(corpus, "rb") as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                seen += len(text)
                if seen >= train_mb * 1e6:
                    return

    start = time.perf_counter()
    train_bpe_tokenizer(texts(), folder, vocab_size=vocab_size)
    print(f"tokenizer: byte-level BPE, {vocab_size} tokens, trained on {train_mb:g} MB "
          f"({time.perf_counter() - start:.0f}s) -> {folder}", flush=True)
    return folder


# ---- running one tool --------------------------------------------------------------------------


def _tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/statm") as f:
                resident = int(f.read().split()[1])
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = resident * page
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def run_measured(command: list[str], env: dict, cwd: Path, log: Path) -> dict:
    """Wall time (start-up included), peak RSS of the process tree (sampled every 0.1 s) and of the
    largest single process (the kernel's own count)."""
    peak = 0
    start = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss_bytes(process.pid))
                done.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    if process.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}); log {log}:\n{tail}")
    # The child's rusage includes the workers it waited for: the CPU time of the whole tree.
    return {"wall": wall, "tree_rss": peak, "max_process_rss": usage.ru_maxrss * 1024,
            "cpu": usage.ru_utime + usage.ru_stime}


def ember_command(corpus: Path, prefix: Path, tokenizer: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "ember.cli", "preprocess", "--input", str(corpus), "--output-prefix", str(prefix),
            "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", str(tokenizer),
            "--json-keys", "text", "--append-eod", "--workers", str(workers), "--overwrite"]


def megatron_command(megatron_dir: Path, corpus: Path, prefix: Path, tokenizer: Path, workers: int) -> list[str]:
    return [sys.executable, str(megatron_dir / "tools" / "preprocess_data.py"), "--input", str(corpus),
            "--output-prefix", str(prefix), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(tokenizer), "--json-keys", "text", "--append-eod", "--workers", str(workers),
            "--log-interval", "100000"]


def report(tool: str, workers: int, run: int, corpus: Path, prefix: Path, measured: dict) -> dict:
    from ember.data.indexed import IndexedDataset

    tokens = IndexedDataset(f"{prefix}_text_document").num_tokens
    mb = corpus.stat().st_size / 1e6
    line = (f"preprocess tool={tool:8s} workers={workers} run={run} input={mb:.1f}MB tokens={tokens:,} "
            f"wall={measured['wall']:.1f}s cpu={measured['cpu']:.1f}s tokens/s={tokens / measured['wall']:,.0f} "
            f"MB/s={mb / measured['wall']:.2f} peak_rss_tree={measured['tree_rss'] / 2**20:.0f}MiB "
            f"max_process_rss={measured['max_process_rss'] / 2**20:.0f}MiB load1={os.getloadavg()[0]:.1f}")
    print(line, flush=True)
    return {**measured, "tokens": tokens}


def same_files(a: Path, b: Path) -> bool:
    return all(filecmp.cmp(f"{a}_text_document{ext}", f"{b}_text_document{ext}", shallow=False)
               for ext in (".bin", ".idx"))


def corpus_texts(corpus: Path) -> list[str]:
    import orjson

    with open(corpus, "rb") as f:
        return [orjson.loads(line)["text"] for line in f]


def time_encoder_alone(texts: list[str], tokenizer: Path) -> dict:
    """ember's exact encoder (FastBPE) alone over `texts`, one thread, wall time."""
    from tokenizers import Tokenizer

    from ember.data.fast_bpe import FastBPE

    fast = FastBPE.from_hf(Tokenizer.from_file(str(tokenizer / "tokenizer.json")))
    start, cpu = time.perf_counter(), time.process_time()
    _, lengths = fast.encode_batch_flat(texts)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    tokens = int(lengths.sum())
    print(f"encoder  tool=FastBPE  threads=1 tokens={tokens:,} wall={wall:.1f}s cpu={cpu:.1f}s "
          f"tokens/s={tokens / wall:,.0f} load1={os.getloadavg()[0]:.1f}", flush=True)
    return {"wall": wall, "tokens": tokens, "cpu": cpu}


def compare_tools(args, workdir: Path, corpus: Path, tokenizer: Path) -> None:
    out = workdir / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    megatron_dir = Path(args.megatron_dir).resolve() if args.megatron_dir else None
    if megatron_dir is None or not (megatron_dir / "tools" / "preprocess_data.py").exists():
        print(f"megatron: skipped (no Megatron-LM checkout at {args.megatron_dir!r}; pass --megatron-dir DIR "
              f"holding tools/preprocess_data.py)", flush=True)
        megatron_dir = None
    megatron_env = dict(os.environ, PYTHONPATH=str(megatron_dir)) if megatron_dir else None

    baseline = Path(args.baseline).resolve() if args.baseline else None
    if baseline is not None and not (baseline / "ember" / "cli.py").exists():
        raise SystemExit(f"--baseline {baseline}: no ember/cli.py there (an ember source tree)")
    results: dict[tuple[str, int], list[dict]] = {}
    texts = corpus_texts(corpus)
    encoder_runs: list[dict] = []
    for run in range(1, args.repeats + 1):
        encoder_runs.append(time_encoder_alone(texts, tokenizer))
        for workers in args.workers:
            tools = ["ember", *(["ember-base"] if baseline else []), *(["megatron"] if megatron_dir else [])]
            if run % 2 == 0:
                tools.reverse()  # alternate who goes first, so neither always gets the warmer cache
            for tool in tools:
                prefix = out / f"{tool}-w{workers}"
                if tool == "ember":
                    command, tool_env = ember_command(corpus, prefix, tokenizer, workers), env
                elif tool == "ember-base":
                    command = ember_command(corpus, prefix, tokenizer, workers)
                    tool_env = dict(os.environ, PYTHONPATH=str(baseline))
                else:
                    command, tool_env = megatron_command(megatron_dir, corpus, prefix, tokenizer, workers), megatron_env
                measured = run_measured(command, tool_env, workdir, out / f"{tool}-w{workers}-run{run}.log")
                results.setdefault((tool, workers), []).append(report(tool, workers, run, corpus, prefix, measured))

    best_encoder = min(encoder_runs, key=lambda r: r["wall"])
    encoder_rate = best_encoder["tokens"] / best_encoder["wall"]
    for workers in args.workers:
        best_ember = min(results[("ember", workers)], key=lambda r: r["wall"])
        ember_rate = best_ember["tokens"] / best_ember["wall"]
        # CPU time does not depend on what else the machine runs: the encoder's share of it is
        # the ratio a quiet machine would show, less what waiting for each other costs.
        encoder_cpu = min(r["cpu"] for r in encoder_runs)
        line = (f"summary workers={workers}: ember {ember_rate:,.0f} tokens/s = "
                f"{ember_rate / (encoder_rate * workers):.0%} of the encoder alone x {workers} "
                f"({encoder_rate:,.0f} tokens/s per thread); CPU: encoder {encoder_cpu:.1f}s of ember's "
                f"{best_ember['cpu']:.1f}s ({encoder_cpu / best_ember['cpu']:.0%})")
        if baseline:
            best_base = min(results[("ember-base", workers)], key=lambda r: r["wall"])
            line += (f"; baseline {best_base['tokens'] / best_base['wall']:,.0f} tokens/s -> "
                     f"{best_base['wall'] / best_ember['wall']:.2f}x, byte-identical: "
                     f"{'yes' if same_files(out / f'ember-w{workers}', out / f'ember-base-w{workers}') else 'NO'}")
        if megatron_dir:
            best_megatron = min(results[("megatron", workers)], key=lambda r: r["wall"])
            identical = same_files(out / f"ember-w{workers}", out / f"megatron-w{workers}")
            line += (f" vs megatron {best_megatron['tokens'] / best_megatron['wall']:,.0f} tokens/s (best of "
                     f"{args.repeats}, start-up included) -> {best_megatron['wall'] / best_ember['wall']:.2f}x; "
                     f"outputs byte-identical: {'yes' if identical else 'NO'}")
        print(line, flush=True)

    # Peak RSS against input size: the same run on a quarter of the corpus.
    quarter = quarter_of(corpus)
    prefix = out / "ember-quarter"
    small = run_measured(ember_command(quarter, prefix, tokenizer, 1), env, workdir, out / "ember-quarter.log")
    full = min(results[("ember", 1)] if ("ember", 1) in results else next(iter(results.values())),
               key=lambda r: r["wall"])
    print(f"summary rss: ember peak RSS (tree) {small['tree_rss'] / 2**20:.0f}MiB on "
          f"{quarter.stat().st_size / 1e6:.0f}MB vs {full['tree_rss'] / 2**20:.0f}MiB on "
          f"{corpus.stat().st_size / 1e6:.0f}MB", flush=True)


# ---- where ember's time goes -------------------------------------------------------------------


def startup_seconds(tokenizer: Path) -> tuple[float, float, float]:
    """A fresh interpreter: (start + import ember's preprocessing, build the tokenizer, build
    FastBPE), in CPU seconds."""
    code = ("import time\n"
            "from ember.data.preprocess import make_encoder\n"
            "from ember.data.tokenizers import build_tokenizer\n"
            "t1 = time.process_time()\n"
            f"tok = build_tokenizer('PretrainedFromHF', {str(tokenizer)!r})\n"
            "t2 = time.process_time()\n"
            "make_encoder(tok, True)\n"
            "print(t1, t2 - t1, time.process_time() - t2)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    imports, build_tok, build_fast = (float(x) for x in out.stdout.split())
    return imports, build_tok, build_fast


def profile_stages(args, workdir: Path, corpus: Path, tokenizer: Path) -> None:
    import pickle

    from ember.data.handlers import build_handler
    from ember.data.indexed import IndexedDatasetWriter, optimal_dtype
    from ember.data.preprocess import make_encoder
    from ember.data.records import decode_chunk
    from ember.data.sources import iter_chunks
    from ember.data.tokenizers import build_tokenizer

    seconds: dict[str, float] = {}
    seconds["start-up: interpreter + imports"], seconds["start-up: tokenizer"], seconds["start-up: FastBPE build"] = \
        startup_seconds(tokenizer)
    tok = build_tokenizer("PretrainedFromHF", str(tokenizer))
    encoder = make_encoder(tok, True)
    dtype = optimal_dtype(tok.vocab_size)
    handler = build_handler("GeneralPretrainHandler", tok, encoder, ("text",), True, None, token_dtype=dtype)

    def timed(name, function):  # CPU time: the machine's other work does not count
        start = time.process_time()
        result = function()
        seconds[name] = seconds.get(name, 0.0) + time.process_time() - start
        return result

    chunks = timed("read line chunks", lambda: list(iter_chunks([corpus], 1024, columns=["text"])))
    decoded = timed("parse JSON", lambda: [decode_chunk(c) for c in chunks])
    texts = [[r["text"] for r in d.records] for d in decoded]
    timed("encode (FastBPE alone)", lambda: [encoder.encode_batch_flat(t) for t in texts])
    handled = timed("handle = encode + assemble", lambda: [handler.handle(d) for d in decoded])
    seconds["assemble (handle - encode)"] = seconds.pop("handle = encode + assemble") - seconds[
        "encode (FastBPE alone)"]
    # what crosses the pipes with several workers: each chunk's line range (the workers read the
    # lines themselves) and its result, token ids in the dataset's dtype
    ranges = list(iter_chunks([corpus], 1024, columns=["text"], line_ranges=1))
    timed("IPC: pickle ranges + results", lambda: [pickle.loads(pickle.dumps(x, pickle.HIGHEST_PROTOCOL))
                                                   for x in (*ranges, *handled)])
    out = workdir / "out"
    out.mkdir(exist_ok=True)

    def write():
        writer = IndexedDatasetWriter(out / "stages_text_document", dtype)
        for h in handled:
            docs = h.datasets["text"]
            writer.add_documents(docs.tokens, docs.sequence_lengths, docs.sequences_per_document)
        writer.finalize()

    timed("write .bin/.idx", write)
    tokens = sum(h.num_tokens for h in handled)
    total = sum(seconds.values())
    print(f"stages: {corpus.name}, {len(chunks)} chunks, {tokens:,} tokens, one thread, CPU seconds, "
          f"load1 {os.getloadavg()[0]:.1f}", flush=True)
    for name, value in seconds.items():
        print(f"stage {name:34s} {value:6.2f}s {value / total:6.1%}", flush=True)
    print(f"stage {'total':34s} {total:6.2f}s -> {tokens / total:,.0f} tokens per CPU-second; the encoder alone "
          f"{tokens / seconds['encode (FastBPE alone)']:,.0f}", flush=True)


# ---- encoders alone ----------------------------------------------------------------------------


def time_best(function, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def compare_encoders(args, tokenizer: Path) -> None:
    import numpy as np
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from ember.data.corpus import iter_documents
    from ember.data.fast_bpe import FastBPE

    docs = list(iter_documents("source"))
    chars = sum(len(d) for d in docs)
    size = sum(len(d.encode()) for d in docs)
    hf = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    start = time.perf_counter()
    fast = FastBPE.from_hf(hf)
    build = time.perf_counter() - start
    if fast is None:
        raise SystemExit(f"FastBPE cannot reproduce {tokenizer}: {FastBPE.why_not(hf)}")
    auto = AutoTokenizer.from_pretrained(str(tokenizer))
    print(f"encoders: {len(docs):,} standard-library source files, {size / 1e6:.1f} MB, one thread, best of "
          f"{args.repeats}; tokenizer {tokenizer} (FastBPE built in {build:.2f}s)", flush=True)

    candidates = {
        "hf tokenizers encode": lambda: [hf.encode(d).ids for d in docs],
        "hf tokenizers encode_batch": lambda: [e.ids for e in hf.encode_batch(docs)],
        "hf tokenizers encode_batch_fast": lambda: [e.ids for e in hf.encode_batch_fast(docs)],
        "transformers tok(text).input_ids": lambda: [auto(d).input_ids for d in docs],
        "ember FastBPE encode": lambda: [fast.encode(d) for d in docs],
        "ember FastBPE encode_batch_flat": lambda: fast.encode_batch_flat(docs),
    }
    reference = None
    baseline = None
    for name, function in candidates.items():
        seconds, ids = time_best(function, args.repeats)
        if isinstance(ids, tuple):  # flat ids + lengths
            flat, lengths = ids
            ids = np.split(flat, np.cumsum(lengths)[:-1])
            ids = [a.tolist() for a in ids]
        reference = reference or ids
        tokens = sum(len(i) for i in ids)
        baseline = baseline or seconds
        print(f"encoder {name:34s} {seconds:6.2f}s {chars / seconds / 1e6:6.2f}M chars/s "
              f"{size / seconds / 1e6:6.2f} MB/s {tokens / seconds:11,.0f} tokens/s "
              f"x{baseline / seconds:.2f} vs hf encode; same ids: {'yes' if ids == reference else 'NO'}",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/ember-preprocess-bench", help="corpus, tokenizer and outputs")
    parser.add_argument("--megatron-dir", default=None, help="Megatron-LM checkout (tools/preprocess_data.py)")
    parser.add_argument("--min-mb", type=float, default=100, help="corpus size in MB of text")
    parser.add_argument("--tokenizer", default=None, help="reuse this Hugging Face tokenizer folder")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-mb", type=float, default=10, help="MB of the corpus the tokenizer trains on")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--encoders", action="store_true", help="time the encoders alone instead")
    parser.add_argument("--baseline", default=None, help="another ember source tree to run alongside (before/after)")
    parser.add_argument("--stages", action="store_true", help="where ember's time goes, stage by stage")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load1 {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}",
          flush=True)
    corpus = build_corpus(workdir, args.min_mb)
    tokenizer = Path(args.tokenizer) if args.tokenizer else build_tokenizer(workdir, corpus, args.vocab_size,
                                                                              args.train_mb)
    if args.encoders:
        compare_encoders(args, tokenizer)
    elif args.stages:
        profile_stages(args, workdir, corpus, tokenizer)
    else:
        compare_tools(args, workdir, corpus, tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())

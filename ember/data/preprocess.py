"""Text files -> Megatron `PREFIX_<key>_document.bin/.idx`, in parallel, streaming (`ember preprocess`).

The same options as Megatron-LM's / ModelLink's `tools/preprocess_data.py`, and the same bytes for
the same input and tokenizer. The main process reads raw chunks of records in order and hands
them to `--workers` processes, which parse, tokenize and return flat numpy arrays; results are
written in input order, so any worker count gives identical output. `--n-subs N` cuts the input
into N contiguous parts processed side by side and merged in order: again identical output.

With several workers, an uncompressed line file (.jsonl, .txt, .json lines) is not read by the
main process at all: it sends each worker only where its ~1 MiB of whole lines lie
(`ember.data.sources.LineRange`) and the worker reads them; line numbers (skipped records, --strict)
are completed in the main process, in input order, from the line counts the workers return.
Workers return token ids already in the datasets' dtype (uint16 for a vocabulary below 65,500),
one array per dataset: the pipe carries half of int32's bytes, and the writer converts nothing
(issue 18).

Everything is written under temporary names and renamed only when complete. A worker or part
process that dies (the OOM killer, SIGKILL) stops the run with a one-line error and its temporary
files removed; temporary files left by a run that was itself killed are removed by the next run
on the same output prefix (those of a run still going are left alone).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import re
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ember.data.handlers import build_handler
from ember.data.indexed import IndexedDataset, IndexedDatasetWriter, bin_path, idx_path, optimal_dtype
from ember.data.records import Skip, decode_chunk
from ember.data.sources import (InputPart, LineRange, file_format, iter_chunks, read_line_range, resolve_input_files,
                                split_input)
from ember.data.tokenizers import Tokenizer, build_tokenizer
from ember.errors import EmberError

MAX_SKIPS_SHOWN = 5


@dataclass(frozen=True)
class PreprocessJob:
    """Everything a worker process needs to rebuild the pipeline (picklable, small)."""

    tokenizer_spec: tuple  # (type, name_or_path, model_file, vocab_file, merge_file)
    handler_name: str
    json_keys: tuple
    append_eod: bool
    prompt_type: str | None
    fast_encoder: bool
    chunk_size: int = 1024
    split: tuple | None = None  # --split-sentences: (lang, keep_newlines) of ember.data.sentences.SentenceSplitter
    use_fast_tokenizer: bool = True  # False: --tokenizer-not-use-fast (transformers' slow tokenizer)
    token_dtype: str = "int32"  # the datasets' dtype for token ids (optimal_dtype): what handlers return


@dataclass
class Totals:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped: int = 0
    first_skips: list[Skip] = field(default_factory=list)

    def add_skips(self, skips: list[Skip], count: int | None = None) -> None:
        """Count `count` skips (default: all of `skips`) and keep the first few, in input order."""
        self.skipped += len(skips) if count is None else count
        room = MAX_SKIPS_SHOWN - len(self.first_skips)
        if room > 0:
            self.first_skips.extend(sorted(skips, key=lambda skip: skip.line)[:room])


# ---- worker side -------------------------------------------------------------------------------

# One handler per job and process. The parent builds it before forking its workers, so they
# inherit it instead of rebuilding the tokenizer and fast encoder (seconds for a large vocabulary).
_handlers: dict = {}


# Where FastBPE keeps the rank tables it builds (the larger part of its start-up; ember.data.fast_bpe).
FAST_BPE_CACHE_ENV = "EMBER_FAST_BPE_CACHE"


def fast_bpe_cache_dir() -> str | None:
    """$EMBER_FAST_BPE_CACHE, default ~/.cache/ember/fast_bpe; set to an empty string for none."""
    folder = os.environ.get(FAST_BPE_CACHE_ENV)
    if folder is None:
        folder = os.path.join(os.path.expanduser("~"), ".cache", "ember", "fast_bpe")
    return folder or None


def make_encoder(tokenizer, use_fast: bool):
    """The fast exact BPE encoder when it can reproduce this tokenizer, else the tokenizer itself."""
    if not use_fast or tokenizer.backend is None:
        return tokenizer
    from ember.data.fast_bpe import FastBPE

    fast = FastBPE.from_hf(tokenizer.backend, cache_dir=fast_bpe_cache_dir())
    return tokenizer if fast is None else fast


def handler_for(job: PreprocessJob, tokenizer: Tokenizer | None = None):
    """The job's handler, built once per process (`tokenizer`: the job's, when already built)."""
    if job not in _handlers:
        if tokenizer is None:
            tokenizer = build_tokenizer(*job.tokenizer_spec, use_fast=job.use_fast_tokenizer)
        encoder = make_encoder(tokenizer, job.fast_encoder and job.use_fast_tokenizer)
        splitter = None
        if job.split is not None:
            from ember.data.sentences import SentenceSplitter

            splitter = SentenceSplitter(*job.split)
        _handlers[job] = build_handler(job.handler_name, tokenizer, encoder, job.json_keys, job.append_eod,
                                       job.prompt_type, splitter, np.dtype(job.token_dtype))
    return _handlers[job]


def _handle_chunk(job: PreprocessJob, chunk):
    """A worker's task: a Chunk, or a LineRange that it reads itself. For a LineRange whose first
    line number the main process does not know, skipped records are numbered from 1 within the
    range (`_LineNumbers` shifts them); `num_lines` says how many lines the range held."""
    if isinstance(chunk, LineRange):
        chunk = read_line_range(chunk)
    handled = handler_for(job).handle(decode_chunk(chunk))
    handled.num_lines = len(chunk)
    return handled


# ---- main side ---------------------------------------------------------------------------------

class Progress:
    """Megatron-style progress lines every `interval` documents: rates and ETA."""

    def __init__(self, interval: int | None, total_bytes: int | None, label: str = ""):
        self.interval = None if interval is None else max(1, interval)  # None: no progress lines
        self.total_bytes = total_bytes
        self.label = label
        self.start = time.perf_counter()
        self.next_report = self.interval or 0

    def update(self, totals: Totals, force: bool = False) -> None:
        if self.interval is None or (not force and totals.documents < self.next_report):
            return
        self.next_report = (totals.documents // self.interval + 1) * self.interval
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        line = (f"{self.label}processed {totals.documents:,} documents, {totals.tokens:,} tokens | "
                f"{totals.documents / elapsed:,.0f} docs/s, {totals.tokens / elapsed:,.0f} tokens/s, "
                f"{totals.bytes / elapsed / 1e6:.1f} MB/s")
        if self.total_bytes:
            fraction = min(totals.bytes / self.total_bytes, 1.0)
            eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
            line += f" | {100 * fraction:.0f}% ETA {eta:.0f}s"
        print(line, file=sys.stderr, flush=True)


class _LineNumbers:
    """Completes the line numbers of LineRange results, taken in input order: a range with a known
    first line sets the count, one without continues it (its skips were numbered from 1)."""

    def __init__(self):
        self.next_line = 1

    def place(self, chunk, handled):
        if isinstance(chunk, LineRange):
            if chunk.first_line is not None:
                self.next_line = chunk.first_line
            else:
                for skip in handled.skips:
                    skip.line += self.next_line - 1
            self.next_line += handled.num_lines
        return handled


def _ordered_results(job: PreprocessJob, chunks, workers: int):
    """Handled chunks in input order; at most a few chunks in flight per worker (bounded memory)."""
    handler = handler_for(job)  # built here, inherited by the forked workers
    if workers <= 1:
        for chunk in chunks:
            yield handler.handle(decode_chunk(chunk))
        return
    # concurrent.futures, not multiprocessing.Pool: a Pool whose worker is killed replaces it and
    # waits forever for the lost task; this executor fails every pending task instead.
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    lines = _LineNumbers()
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_handle_chunk, job, chunk)))
            if len(pending) >= 3 * workers:
                done, future = pending.popleft()
                yield lines.place(done, future.result())
        while pending:
            done, future = pending.popleft()
            yield lines.place(done, future.result())
    except BrokenProcessPool:
        raise EmberError("a preprocess worker process died (killed, or out of memory?); nothing was written. "
                         "Run again with fewer --workers or a smaller --chunk-size") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _writers(prefixes: dict[str, str], dtypes: dict[str, type]) -> dict[str, IndexedDatasetWriter]:
    return {key: IndexedDatasetWriter(prefix, dtypes[key]) for key, prefix in prefixes.items()}


def check_not_empty(totals: Totals, files: list[Path]) -> None:
    """An empty dataset is not a success: refuse to write one."""
    if totals.documents:
        return
    where = str(files[0]) if len(files) == 1 else f"{len(files)} files under --input"
    if totals.skipped:
        raise EmberError(f"every record of {where} was skipped ({totals.skipped:,} in all; the first: "
                         f"{totals.first_skips[0]}); nothing written")
    raise EmberError(f"{where} holds no records; nothing written")


def process_part(job: PreprocessJob, files: list[Path], part: InputPart | None, prefixes: dict[str, str],
                 dtypes: dict[str, type], workers: int, strict: bool, progress: Progress,
                 allow_empty: bool = True) -> Totals:
    """Tokenize one input (or one part of it) into datasets at `prefixes`; atomic per dataset.
    Without `allow_empty`, an input that yields no document is an error (nothing written)."""
    columns = sorted(set(job.json_keys) | {"instruction", "input", "output", "system", "history",
                                              "conversations", "messages"})
    # several workers: they read uncompressed line files themselves (LineRanges)
    chunks = iter_chunks(files, job.chunk_size, columns=columns, part=part, line_ranges=workers if workers > 1 else 0)
    writers = _writers(prefixes, dtypes)
    totals = Totals()
    try:
        for handled in _ordered_results(job, chunks, workers):
            if strict and handled.skips:
                raise EmberError(f"{handled.skips[0]} (--strict stops at the first bad record; "
                                 f"drop --strict to skip and count them)")
            for key, docs in handled.datasets.items():
                writers[key].add_documents(docs.tokens, docs.sequence_lengths, docs.sequences_per_document)
            totals.documents += handled.num_documents
            totals.tokens += handled.num_tokens
            totals.bytes += handled.num_bytes
            totals.add_skips(handled.skips)
            progress.update(totals)
        if not allow_empty:
            check_not_empty(totals, files)
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return totals


def _run_sub(job, files, part, prefixes, dtypes, workers, strict, log_interval, label, queue) -> None:
    """Entry point of one --n-subs process: report totals (or the error) through `queue`."""
    try:
        size = sum(_piece_size(files, part))
        totals = process_part(job, files, part, prefixes, dtypes, workers, strict,
                              Progress(log_interval, size or None, label))
        queue.put(("ok", totals))
    except EmberError as err:
        queue.put(("error", str(err)))
    except BaseException as err:  # report, never hang the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def _piece_size(files, part: InputPart | None):
    for path in files:
        if part is None:
            yield path.stat().st_size
        elif str(path) in part.files:
            piece = part.files[str(path)]
            if piece is not None and isinstance(piece[0], tuple):
                yield piece[0][1] - piece[0][0]
            else:
                yield path.stat().st_size


def process_in_subs(job, files, n_subs, prefixes, dtypes, workers, strict, log_interval) -> Totals:
    """--n-subs: contiguous parts processed side by side, merged in order into the final datasets."""
    parts = split_input(files, n_subs)
    workers_per_part = max(1, workers // len(parts))
    tag = f".sub-tmp-{os.getpid()}-"
    part_prefixes = [{key: f"{prefix}{tag}{k}" for key, prefix in prefixes.items()}
                     for k in range(len(parts))]
    context = multiprocessing.get_context("fork")
    queues, processes = [], []
    try:
        for k, part in enumerate(parts):
            queue = context.Queue()
            process = context.Process(target=_run_sub, args=(
                job, files, part, part_prefixes[k], dtypes, workers_per_part, strict, log_interval,
                f"[part {k + 1}/{len(parts)}] ", queue))
            process.start()
            queues.append(queue)
            processes.append(process)
        results = [_result_of(k, queue, process, len(parts)) for k, (queue, process) in
                   enumerate(zip(queues, processes))]
        for process in processes:
            process.join()
        errors = [message for status, message in results if status == "error"]
        if errors:
            raise EmberError(errors[0])
        totals = Totals()
        for _, part_totals in results:
            totals.documents += part_totals.documents
            totals.tokens += part_totals.tokens
            totals.bytes += part_totals.bytes
            totals.add_skips(part_totals.first_skips, count=part_totals.skipped)
        check_not_empty(totals, files)
        writers = _writers(prefixes, dtypes)
        try:
            for key, writer in writers.items():
                for parts_of_key in part_prefixes:
                    writer.add_dataset(parts_of_key[key])
                writer.finalize()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        return totals
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join()
        for prefixes_of_part in part_prefixes:
            for prefix in prefixes_of_part.values():
                remove_dataset(prefix)
                # a part process killed mid-write leaves its writer's files, named after its pid
                for leftover in _temporary_files(prefix):
                    os.remove(leftover)


def _result_of(k: int, queue, process, parts: int):
    """The ("ok", totals) or ("error", message) of part process k; an error if it dies without one."""
    while True:
        try:
            return queue.get(timeout=0.5)
        except queue_module.Empty:
            if not process.is_alive():
                try:  # it may have reported just before exiting
                    return queue.get(timeout=0.5)
                except queue_module.Empty:
                    return ("error", f"preprocess part {k + 1}/{parts} died ({_exit_reason(process.exitcode)}) "
                                     f"without finishing; nothing was written. Run again with fewer --n-subs/"
                                     f"--workers if it ran out of memory")


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def remove_dataset(prefix: str) -> None:
    for path in (bin_path(prefix), idx_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


# The temporary names a run writes beside an output dataset D, each carrying the pid of the run
# (the first number): D.bin.tmp-PID / D.idx.tmp-PID (a writer), D.sub-tmp-PID-K... (--n-subs
# parts), D.unpacked-tmp-PID... (--pack).
_TEMPORARY_NAME = re.compile(r"\.(?:bin\.tmp-|idx\.tmp-|sub-tmp-|unpacked-tmp-)(\d+)")


def _temporary_files(prefix: str) -> list[str]:
    """Temporary files of any run beside dataset `prefix`."""
    folder, name = os.path.split(os.path.abspath(prefix))
    try:
        entries = os.listdir(folder)
    except OSError:
        return []
    return [os.path.join(folder, entry) for entry in sorted(entries)
            if entry.startswith(name + ".") and _TEMPORARY_NAME.match(entry[len(name):])]


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporary_files(prefixes: list[str]) -> list[str]:
    """Remove the temporary files that killed runs left beside these datasets (runs still alive
    keep theirs); returns what was removed."""
    removed = []
    for prefix in prefixes:
        for path in _temporary_files(prefix):
            owner = int(_TEMPORARY_NAME.match(path[len(os.path.abspath(prefix)):]).group(1))
            if owner != os.getpid() and not _process_alive(owner):
                os.remove(path)
                removed.append(path)
    return removed


def pack_dataset(source: str, target: str, length: int, seed: int | None) -> None:
    """Pack mode: the documents of `source` (each ending in EOD), optionally shuffled with `seed`,
    joined and cut into `length`-token samples at `target`."""
    dataset = IndexedDataset(source)
    writer = IndexedDatasetWriter(target, dataset.dtype)
    try:
        if seed is None:
            writer.add_dataset(source)
        else:
            order = np.random.RandomState(seed).permutation(dataset.num_documents)
            for start in range(0, order.size, 4096):
                docs = [dataset.document(int(d)) for d in order[start : start + 4096]]
                writer.add_documents(np.concatenate(docs), [d.size for d in docs])
        writer.pack(length)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise


# ---- the whole step ----------------------------------------------------------------------------

def output_prefixes(output_prefix: str, keys: list[str], level: str = "document") -> dict[str, str]:
    """PREFIX_<key>_document, or PREFIX_<key>_sentence with --split-sentences (Megatron's names)."""
    return {key: f"{output_prefix}_{key}_{level}" for key in keys}


@dataclass
class Prepared:
    """A checked request, before any work: what `on_start` is shown."""

    files: list[Path]
    tokenizer: Tokenizer
    fast_encoder: bool  # the fast exact BPE encoder (else the Hugging Face library) tokenizes
    prefixes: dict[str, str]  # output key -> dataset prefix


@dataclass
class PreprocessResult:
    totals: Totals
    prefixes: dict[str, str]  # output key -> dataset prefix written (PREFIX.bin/.idx)
    seconds: float


def preprocess(*, input: str | os.PathLike, output_prefix: str, tokenizer_type: str = "PretrainedFromHF",
               tokenizer_name_or_path: str | None = None, tokenizer_model: str | None = None,
               vocab_file: str | None = None, merge_file: str | None = None,
               handler_name: str = "GeneralPretrainHandler", json_keys: Sequence[str] = ("text",),
               append_eod: bool = False, prompt_type: str | None = None, workers: int = 1, n_subs: int = 1,
               pack: bool = False, seq_length: int | None = None, seed: int | None = None,
               strict: bool = False, overwrite: bool = False, fast_encoder: bool = True,
               chunk_size: int = 1024, log_interval: int | None = None,
               split_sentences: bool = False, keep_newlines: bool = False, lang: str = "english",
               partitions: int = 1, keep_sequential_samples: bool = False, use_fast_tokenizer: bool = True,
               on_start: Callable[[Prepared], None] | None = None) -> PreprocessResult:
    """Tokenize `input` into `output_prefix_<key>_document.bin/.idx` datasets, as `ember preprocess`.

    Megatron's options (issue 16, H3): `split_sentences` (NLTK Punkt, `keep_newlines`, `lang`) writes
    `_sentence` datasets of one sequence per sentence; `partitions` N processes N parts side by side
    and, as Megatron deals input lines to its partitions in turn, writes partition 0's documents
    (lines 0, N, 2N, ...) first, then partition 1's, ... (`keep_sequential_samples`: contiguous parts,
    the input order); `use_fast_tokenizer` False tokenizes with transformers' slow tokenizer.
    Wikitext `.tokens` files take MindFormers' path instead (`preprocess_wikitext`).

    Every check that can fail runs before work starts (then `on_start` sees the checked request).
    Progress lines go to stderr every `log_interval` documents; None prints nothing.
    """
    # `workers` is the whole parallelism: no extra Rust threads inside each worker.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    spec = (tokenizer_type, tokenizer_name_or_path, tokenizer_model, vocab_file, merge_file)
    if is_wikitext(input):
        return preprocess_wikitext(input=input, output_prefix=output_prefix, tokenizer_spec=spec,
                                   seq_length=seq_length, overwrite=overwrite, use_fast_tokenizer=use_fast_tokenizer)
    files = resolve_input_files(input)
    out_dir = Path(output_prefix).parent
    if not out_dir.is_dir():
        raise EmberError(f"--output-prefix {output_prefix}: folder {out_dir} does not exist; create it first")
    if workers < 1 or n_subs < 1 or partitions < 1:
        raise EmberError("--workers, --n-subs and --partitions must be at least 1")
    if partitions > 1:
        if n_subs > 1:
            raise EmberError("--partitions (Megatron) and --n-subs (ModelLink) both cut the input into parts; give one")
        if workers % partitions:
            raise EmberError(f"--workers {workers} is not a multiple of --partitions {partitions} (Megatron gives "
                             f"each partition workers / partitions processes)")
        n_subs = partitions
    if pack:
        if not seq_length or seq_length < 1:
            raise EmberError("--pack needs --seq-length N (the length of each packed sample)")
        if handler_name != "GeneralPretrainHandler":
            raise EmberError("--pack applies to pretraining data (GeneralPretrainHandler); "
                             "fine-tuning data is packed at training time")
    split = None
    if split_sentences:
        if handler_name != "GeneralPretrainHandler":
            raise EmberError("--split-sentences applies to pretraining text (GeneralPretrainHandler)")
        from ember.data.sentences import SentenceSplitter

        SentenceSplitter(lang, keep_newlines)  # the model is there, or a one-line error now
        split = (lang, keep_newlines)
    tokenizer = build_tokenizer(*spec, use_fast=use_fast_tokenizer)
    if (append_eod or pack) and tokenizer.eod is None:
        raise EmberError(f"{tokenizer.name} has no end-of-document token; --append-eod/--pack need one")
    token_dtype = optimal_dtype(tokenizer.vocab_size)
    job = PreprocessJob(spec, handler_name, tuple(json_keys), bool(append_eod or pack), prompt_type,
                        fast_encoder, chunk_size, split, use_fast_tokenizer, np.dtype(token_dtype).name)
    handler = build_handler(job.handler_name, tokenizer, tokenizer, job.json_keys, job.append_eod, job.prompt_type)
    prefixes = output_prefixes(output_prefix, handler.output_keys, "sentence" if split else "document")
    existing = [p for prefix in prefixes.values() for p in (bin_path(prefix), idx_path(prefix)) if os.path.exists(p)]
    if existing and not overwrite:
        raise EmberError(f"{existing[0]} already exists; pass --overwrite to replace it")
    removed = remove_stale_temporary_files(list(prefixes.values()))
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by an interrupted run "
              f"(e.g. {os.path.basename(removed[0])})", file=sys.stderr)
    dtypes = {key: handler.label_dtype(key) or token_dtype for key in handler.output_keys}
    encoder = getattr(handler_for(job, tokenizer), "encoder", None)
    if on_start is not None:
        on_start(Prepared(files, tokenizer, encoder is not None and encoder.__class__.__name__ == "FastBPE",
                          prefixes))

    start = time.perf_counter()
    # Pack mode writes plain EOD-terminated documents first, then packs them (after --n-subs merged
    # its parts, so packing never depends on where the parts were cut); Megatron's partition order
    # is made from the merged documents the same way.
    deal = partitions > 1 and not keep_sequential_samples
    staged = pack or deal
    written = {k: f"{p}.unpacked-tmp-{os.getpid()}" for k, p in prefixes.items()} if staged else prefixes
    try:
        if n_subs > 1:
            totals = process_in_subs(job, files, n_subs, written, dtypes, workers, strict, log_interval)
        else:
            compressed = any(file_format(p)[1] for p in files)
            total_bytes = None if compressed else sum(p.stat().st_size for p in files)
            totals = process_part(job, files, None, written, dtypes, workers, strict,
                                  Progress(log_interval, total_bytes), allow_empty=False)
        for key, prefix in prefixes.items():
            if deal and pack:
                dealt = f"{prefix}.unpacked-tmp-{os.getpid()}-dealt"
                deal_to_partitions(written[key], dealt, partitions)
                pack_dataset(dealt, prefix, seq_length, seed)
                remove_dataset(dealt)
            elif deal:
                deal_to_partitions(written[key], prefix, partitions)
            elif pack:
                pack_dataset(written[key], prefix, seq_length, seed)
    except OSError as err:  # reading errors are EmberErrors by now: this is the output side
        what = err.strerror or str(err)
        raise EmberError(f"cannot write the datasets at --output-prefix {output_prefix}: {what}"
                         f"{f' ({err.filename})' if err.filename else ''}; nothing was written") from None
    finally:
        if staged:
            for prefix in written.values():
                remove_dataset(prefix)
    return PreprocessResult(totals, prefixes, time.perf_counter() - start)


def partition_order(documents: int, partitions: int) -> np.ndarray:
    """Megatron's --partitions order: input documents dealt in turn to N partitions (document i to
    partition i % N), each partition's documents in input order, partition 0 first."""
    return np.concatenate([np.arange(k, documents, partitions) for k in range(partitions)])


def deal_to_partitions(source: str, target: str, partitions: int) -> None:
    """`source`'s documents (sentences kept) rewritten at `target` in `partition_order`."""
    dataset = IndexedDataset(source)
    writer = IndexedDatasetWriter(target, dataset.dtype)
    order = partition_order(dataset.num_documents, partitions)
    try:
        for start in range(0, order.size, 4096):
            docs = order[start : start + 4096]
            firsts, lasts = dataset.document_indices[docs], dataset.document_indices[docs + 1]
            sentences = np.concatenate([np.arange(a, b) for a, b in zip(firsts, lasts)]) if docs.size else []
            tokens = [dataset.get(int(i)) for i in sentences]
            writer.add_documents(np.concatenate(tokens) if tokens else np.empty(0, dataset.dtype),
                                 dataset.sequence_lengths[sentences] if len(tokens) else [], lasts - firsts)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise


# ---- MindFormers' Wikitext path ----------------------------------------------------------------

WIKITEXT_SUFFIX = ".tokens"


def is_wikitext(input: str | os.PathLike) -> bool:
    """Wikitext-2/-103's `wiki.train.tokens` (a file, or a folder holding only such files)."""
    path = Path(input)
    if path.is_file():
        return path.suffix == WIKITEXT_SUFFIX
    return path.is_dir() and any(path.glob(f"*{WIKITEXT_SUFFIX}")) and not any(
        p.is_file() and p.suffix != WIKITEXT_SUFFIX for p in path.iterdir())


def clean_wikitext(text: str) -> str:
    """Wikitext's tokenised spelling undone, rule for rule as MindFormers' llama_preprocess.py does it
    (its `clean_wikitext`): " @-@ " -> "-", " , " -> ", ", "( x )" -> "(x)", ..."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                     (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(old, new)
    for opening, closing in (("\\(", "\\)"), ("\\[", "\\]"), ("{", "}")):
        text = re.sub(opening + r"\s*([^" + closing + r"]*?)\s*" + closing,
                      opening.replace("\\", "") + r"\1" + closing.replace("\\", ""), text)
    text = re.sub(r'"\s*([^"]*?)\s*"', r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for old, new in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"), (" \n", "\n"),
                     ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(old, new)
    return text


def wikitext_tokens(text: str, tokenizer) -> np.ndarray:
    """MindFormers' tokenize_wiki: the cleaned text's paragraphs (split at blank lines), headings
    (`= Title =`) left out, each tokenized with BOS and EOS (LlamaTokenizer, add_bos/eos_token),
    back to back."""
    paragraphs = [para for para in clean_wikitext(text).split("\n\n") if para and not para.strip().startswith("=")]
    bos = [tokenizer.bos] if tokenizer.bos is not None else []
    eos = [tokenizer.eod] if tokenizer.eod is not None else []
    ids: list[int] = []
    for start in range(0, len(paragraphs), 1024):
        for encoded in tokenizer.encode_batch(paragraphs[start : start + 1024], add_special_tokens=False):
            ids += bos + list(encoded) + eos
    return np.asarray(ids, dtype=np.int64)


def preprocess_wikitext(*, input: str | os.PathLike, output_prefix: str, tokenizer_spec: tuple,
                        seq_length: int | None, overwrite: bool = False,
                        use_fast_tokenizer: bool = True) -> PreprocessResult:
    """Wikitext `.tokens` -> fixed samples of seq_length + 1 tokens, as MindFormers'
    `llama_preprocess.py --dataset_type wiki --seq_length N` writes them to MindRecord: the
    paragraphs' tokens back to back, cut into consecutive samples, the incomplete last one dropped.
    Written as one record per sample (`PREFIX_packed_input_ids_document`, with all-trained
    `PREFIX_packed_labels_document`), so that training takes each sample whole, as MindFormers does."""
    if not seq_length or seq_length < 1:
        raise EmberError("Wikitext .tokens input needs --seq-length N (samples of N + 1 tokens, as MindFormers' "
                         "llama_preprocess.py --seq_length N)")
    path = Path(input)
    files = [path] if path.is_file() else sorted(path.glob(f"*{WIKITEXT_SUFFIX}"))
    tokenizer = build_tokenizer(*tokenizer_spec, use_fast=use_fast_tokenizer)
    prefixes = output_prefixes(output_prefix, ["packed_input_ids", "packed_labels"])
    if not Path(output_prefix).parent.is_dir():
        raise EmberError(f"--output-prefix {output_prefix}: folder {Path(output_prefix).parent} does not exist; "
                         f"create it first")
    existing = [p for prefix in prefixes.values() for p in (bin_path(prefix), idx_path(prefix)) if os.path.exists(p)]
    if existing and not overwrite:
        raise EmberError(f"{existing[0]} already exists; pass --overwrite to replace it")
    start = time.perf_counter()
    ids = np.concatenate([wikitext_tokens(f.read_text(encoding="utf-8"), tokenizer) for f in files])
    length = seq_length + 1
    samples = ids.size // length
    if samples == 0:
        raise EmberError(f"{input} gives {ids.size} tokens, less than one sample of {length}; lower --seq-length")
    ids = ids[: samples * length]
    dtypes = {"packed_input_ids": optimal_dtype(tokenizer.vocab_size), "packed_labels": np.int32}
    writers = _writers(prefixes, dtypes)
    try:
        for key, writer in writers.items():
            writer.add_documents(ids, np.full(samples, length))
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    totals = Totals(documents=samples, tokens=int(ids.size), bytes=sum(f.stat().st_size for f in files))
    return PreprocessResult(totals, prefixes, time.perf_counter() - start)

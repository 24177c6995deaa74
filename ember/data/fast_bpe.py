"""An exact, faster encoder for byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2 style).

Tokenizing is the bottleneck of preprocessing. `FastBPE.from_hf(tok)` builds, from a Hugging Face
`tokenizers.Tokenizer`'s own vocabulary and merges, an encoder on tiktoken's BPE core (several
times faster than `tok.encode` on one thread) that returns exactly `tok.encode(text).ids`, or None
when it cannot guarantee that; `FastBPE.why_not(tok)` says why.

Why tiktoken's algorithm gives Hugging Face's ids here. HF merges, in a word, the adjacent *pair*
that comes first in the merges list; tiktoken merges the adjacent pair whose *concatenation* has
the lowest rank. With rank(t) = position of the merge that makes t, the two agree as long as an
adjacent pair (x, y) whose concatenation t is a ranked token is always t's own merge. We check the
property that guarantees it, with HF's BPE itself: every ranked token t is what HF's BPE makes of
t's bytes alone. (If x, y sit side by side over exactly t's bytes, no merge ever crossed that span,
so the merges inside it were the ones HF makes on t alone, which pass through [x, y] and then —
since they end at [t] — must merge exactly (x, y).) Tokens failing that property are never made by
HF's merges, so they are left out of tiktoken's ranks (with `ignore_merges`, where HF still looks a
whole pre-token up in the vocabulary, they are ranked after every merge, which is exact unless HF's
merges split one into exactly two tokens: then we refuse).

Everything around the BPE is reproduced from tokenizer.json and refused when unknown: added tokens
(found leftmost-longest, non-normalized ones first, as HF does), the NFC normalizer, the GPT-2 /
Llama-3 / Qwen2 split regexes (checked to match every character class alike in both regex engines
by the tests), `add_prefix_space`, and the post-processor's special tokens (checked on probes).
Text that HF and this encoder could read differently (lone surrogates; under NFC, code points this
Python's Unicode tables do not know) is handed to `tok` itself.

Checking the property runs HF's BPE over the whole vocabulary, the larger part of a build (about
0.4 s for 32k tokens, seconds for Llama-3's 128k), which every `ember preprocess` run paid before
its first token (issue 18). `from_hf(tok, cache_dir=...)` keeps the resulting rank table in
`cache_dir`, under a hash of the whole tokenizer.json and of the `tokenizers`/`tiktoken` versions
that made it; everything else (the reading of tokenizer.json, the probes against HF) runs on
every build, and a cache file that cannot be read is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import orjson

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Split regexes known to match every character (each is a letter, a number, whitespace or none of
# these, and each class has an alternative). tiktoken drops text between matches where HF keeps it
# as a piece, so an arbitrary regex is not safe.
COVERING_PATTERNS = (GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN)

# tiktoken only honours special tokens it is told to allow, and we never allow any; one placeholder
# makes its numpy path skip an empty special-token regex that would match at every position.
_PLACEHOLDER_SPECIAL = "\x00ember-fast-bpe-unused\x00"
# Part of the rank-table cache key: bumped whenever `_rank_table`'s result could change.
RANK_TABLE_VERSION = "1"
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Unsupported(Exception):
    """Raised while analysing a tokenizer: the reason FastBPE cannot reproduce it exactly."""


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@dataclass(frozen=True)
class _AddedTokens:
    """HF's added-token extraction: leftmost-longest matches, non-normalized tokens first."""

    raw: re.Pattern | None  # matched on the original text
    raw_ids: dict[str, int]
    normalized: re.Pattern | None  # matched on each normalized gap between raw matches
    normalized_ids: dict[str, int]


def _leftmost_longest(contents: Sequence[str]) -> re.Pattern | None:
    # At the leftmost position where any token matches, a longest-first alternation takes the
    # longest one: that is daachorse's LeftmostLongest, which HF uses.
    if not contents:
        return None
    return re.compile("|".join(re.escape(c) for c in sorted(contents, key=len, reverse=True)))


def _split(pattern: re.Pattern | None, ids: dict[str, int], text: str) -> Iterator[str | int]:
    """Non-empty text gaps (str) and added-token ids (int), in order."""
    if pattern is None:
        if text:
            yield text
        return
    start = 0
    for match in pattern.finditer(text):
        if match.start() > start:
            yield text[start:match.start()]
        yield ids[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:]


class FastBPE:
    """Encodes text exactly as a byte-level BPE `tokenizers.Tokenizer` does, faster."""

    def __init__(self, hf_tokenizer, core, rank_to_id: np.ndarray | None, prefix: list[int],
                 suffix: list[int], added: _AddedTokens, nfc: bool, add_prefix_space: bool):
        self._hf = hf_tokenizer
        self._core = core
        self._rank_to_id = rank_to_id  # None when ranks are the HF ids already
        self._prefix = prefix
        self._suffix = suffix
        self._added = added
        self._nfc = nfc
        self._add_prefix_space = add_prefix_space
        # Without a normalizer, prefix space or normalized added tokens, a text holding no added
        # token goes to tiktoken whole.
        self._simple = added.normalized is None and not nfc and not add_prefix_space
        self._prefix_array = np.asarray(prefix, dtype=np.uint32)
        self._suffix_array = np.asarray(suffix, dtype=np.uint32)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, tok, cache_dir: str | os.PathLike | None = None) -> FastBPE | None:
        """An exact fast encoder for `tok` (a `tokenizers.Tokenizer`), or None (see `why_not`).
        `cache_dir`: keep (and reuse) the vocabulary's rank table there (see the module docstring)."""
        try:
            return cls._build(tok, cache_dir)
        except _Unsupported:
            return None

    @classmethod
    def why_not(cls, tok) -> str | None:
        """Why `from_hf(tok)` returns None, or None when it does not."""
        try:
            cls._build(tok)
        except _Unsupported as reason:
            return str(reason)
        return None

    @classmethod
    def _build(cls, tok, cache_dir: str | os.PathLike | None = None) -> FastBPE:
        import tiktoken

        serialized = tok.to_str()
        spec = orjson.loads(serialized)
        if spec.get("truncation") or spec.get("padding"):
            raise _Unsupported("truncation or padding is enabled on the tokenizer")
        model = spec.get("model") or {}
        _check_model(model)
        nfc = _read_normalizer(spec.get("normalizer"))
        pattern, add_prefix_space = _read_pre_tokenizer(spec.get("pre_tokenizer"))
        added = _read_added_tokens(spec.get("added_tokens") or [], tok, nfc)
        prefix, suffix = _read_post_processor(spec.get("post_processor"))

        ranks, rank_to_id = _cached_rank_table(model, serialized, cache_dir)
        placeholder_rank = max(ranks.values()) + 1
        core = tiktoken.Encoding("ember-fast-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={_PLACEHOLDER_SPECIAL: placeholder_rank})
        fast = cls(tok, core, rank_to_id, prefix, suffix, added, nfc, add_prefix_space)
        for probe in ("", "a", " Hello world!\n"):  # the template's specials, checked by HF itself
            if fast.encode(probe) != tok.encode(probe).ids:
                raise _Unsupported(f"post-processor output differs from HF on {probe!r}")
        return fast

    # ---- encoding -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Exactly `tok.encode(text).ids` (special tokens added as the tokenizer's template says)."""
        if self._needs_reference(text):
            return self._hf.encode(text).ids
        try:
            body = self._encode_body(text)
        except BaseException as err:  # tiktoken's regex engine can panic (a BaseException)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            return self._hf.encode(text).ids
        return self._prefix + body + self._suffix if (self._prefix or self._suffix) else body

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """`encode` for each text; `num_threads` > 1 encodes on threads (tiktoken frees the GIL)."""
        if num_threads <= 1 or len(texts) < 2:
            return [self.encode(t) for t in texts]
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(self.encode, texts))

    def encode_batch_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids in one uint32 array, and each text's length (int64): no Python int lists."""
        chunks: list[np.ndarray] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self._encode_array(text)
            chunks.append(ids)
            lengths[i] = len(ids)
        ids = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint32)
        return ids, lengths

    def _is_plain(self, text: str) -> bool:
        return self._simple and (self._added.raw is None or self._added.raw.search(text) is None)

    def _encode_array(self, text: str) -> np.ndarray:
        if self._needs_reference(text) or not self._is_plain(text):
            return np.asarray(self.encode(text), dtype=np.uint32)
        try:
            ranks = self._core.encode_to_numpy(text, disallowed_special=())
        except BaseException as err:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            return np.asarray(self._hf.encode(text).ids, dtype=np.uint32)
        body = ranks if self._rank_to_id is None else self._rank_to_id[ranks]
        if self._prefix or self._suffix:
            return np.concatenate([self._prefix_array, body, self._suffix_array])
        return body

    def _needs_reference(self, text: str) -> bool:
        """Text that only HF itself can be trusted with (rare; `isascii` is O(1) on str)."""
        if text.isascii():
            return False
        if _SURROGATE.search(text):  # not UTF-8: HF refuses it, tiktoken would replace it
            return True
        # Under NFC, a code point newer than this Python's Unicode tables could normalise
        # differently in HF's Rust tables.
        return self._nfc and any(unicodedata.category(c) == "Cn" for c in set(text) if ord(c) > 127)

    def _bpe(self, piece: str) -> list[int]:
        """HF ids of one gap between added tokens (already normalized)."""
        ranks = self._core.encode_ordinary(piece)
        if self._rank_to_id is None:
            return ranks
        return self._rank_to_id[np.asarray(ranks, dtype=np.uint32)].tolist()

    def _encode_body(self, text: str) -> list[int]:
        """Ids of `text` without the template's special tokens."""
        if self._is_plain(text):
            return self._bpe(text)
        added = self._added
        out: list[int] = []
        for part in _split(added.raw, added.raw_ids, text):
            if isinstance(part, int):
                out.append(part)
                continue
            if self._nfc and not part.isascii():
                part = unicodedata.normalize("NFC", part)
            for piece in _split(added.normalized, added.normalized_ids, part):
                if isinstance(piece, int):
                    out.append(piece)
                    continue
                if self._add_prefix_space and not piece.startswith(" "):
                    piece = " " + piece
                out.extend(self._bpe(piece))
        return out


# ---- reading tokenizer.json ------------------------------------------------------------------


def _check_model(model: dict) -> None:
    if model.get("type") != "BPE":
        raise _Unsupported(f"the model is {model.get('type')}, not BPE")
    if model.get("dropout"):
        raise _Unsupported("BPE dropout is set (the output is random)")
    if model.get("byte_fallback"):
        raise _Unsupported("byte_fallback BPE (SentencePiece style) is not byte-level BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _Unsupported("the BPE uses a subword prefix or end-of-word suffix")
    alphabet = byte_level_alphabet().values()
    missing = [c for c in alphabet if c not in model.get("vocab", {})]
    if missing:
        raise _Unsupported(f"the vocabulary lacks {len(missing)} of the 256 byte-level symbols "
                           f"(e.g. {missing[0]!r}); not a byte-level BPE")


def _read_normalizer(normalizer: dict | None) -> bool:
    """True for NFC, False for none; anything else is refused."""
    if normalizer is None:
        return False
    kind = normalizer.get("type")
    if kind == "NFC":
        return True
    if kind == "Sequence":
        parts = [_read_normalizer(n) for n in normalizer.get("normalizers", [])]
        if len(parts) > 1:
            raise _Unsupported("a sequence of several normalizers")
        return bool(parts and parts[0])
    raise _Unsupported(f"normalizer {kind} is not reproduced (only NFC)")


def _read_pre_tokenizer(pre: dict | None) -> tuple[str, bool]:
    """(split regex, add_prefix_space) for ByteLevel, or Split(regex) followed by ByteLevel."""
    if pre is None:
        raise _Unsupported("no pre-tokenizer: not a byte-level BPE")
    if pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True):
            raise _Unsupported("ByteLevel without its regex and without a Split before it")
        return GPT2_PATTERN, bool(pre.get("add_prefix_space"))
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
            split, byte_level = steps
            pattern = (split.get("pattern") or {}).get("Regex")
            if pattern is None:
                raise _Unsupported("Split with a plain string pattern")
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise _Unsupported(f"Split behaviour {split.get('behavior')}/invert={split.get('invert')}")
            if pattern not in COVERING_PATTERNS:
                raise _Unsupported(f"Split regex {pattern!r} is not one of the known covering regexes")
            if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
                raise _Unsupported("ByteLevel after Split with its own regex or add_prefix_space")
            return pattern, False
    raise _Unsupported(f"pre-tokenizer {json.dumps(pre)[:120]} is not reproduced")


def _read_added_tokens(tokens: list[dict], tok, nfc: bool) -> _AddedTokens:
    if tokens and tok.encode_special_tokens:
        raise _Unsupported("encode_special_tokens is set")
    raw: dict[str, int] = {}
    normalized: dict[str, int] = {}
    for token in tokens:
        content = token["content"]
        if not content:
            continue
        if token.get("single_word") or token.get("lstrip") or token.get("rstrip"):
            raise _Unsupported(f"added token {content!r} uses single_word/lstrip/rstrip")
        if token.get("normalized"):
            normalized[unicodedata.normalize("NFC", content) if nfc else content] = token["id"]
        else:
            raw[content] = token["id"]
    return _AddedTokens(_leftmost_longest(list(raw)), raw, _leftmost_longest(list(normalized)), normalized)


def _read_post_processor(post: dict | None) -> tuple[list[int], list[int]]:
    """Ids the post-processor puts before and after a single sequence."""
    if post is None:
        return [], []
    kind = post.get("type")
    if kind == "ByteLevel":
        return [], []
    if kind == "Sequence":
        prefix: list[int] = []
        suffix: list[int] = []
        for step in post.get("processors", []):
            before, after = _read_post_processor(step)
            prefix, suffix = before + prefix, suffix + after
        return prefix, suffix
    if kind == "TemplateProcessing":
        prefix, suffix = [], []
        seen_sequence = False
        for item in post.get("single", []):
            if "Sequence" in item:
                if seen_sequence or item["Sequence"].get("id") != "A":
                    raise _Unsupported("template with other than one $A sequence")
                seen_sequence = True
            else:
                name = item["SpecialToken"]["id"]
                (suffix if seen_sequence else prefix).extend(post["special_tokens"][name]["ids"])
        if not seen_sequence:
            raise _Unsupported("template without the $A sequence")
        return prefix, suffix
    if kind in ("RobertaProcessing", "BertProcessing"):
        return [post["cls"][1]], [post["sep"][1]]
    raise _Unsupported(f"post-processor {kind} is not reproduced")


# ---- ranks -------------------------------------------------------------------------------------


def _read_merges(model: dict) -> list[tuple[str, str]]:
    merges = []
    for merge in model.get("merges", []):
        if isinstance(merge, str):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise _Unsupported(f"merge {merge!r} does not split into two tokens")
            merges.append((parts[0], parts[1]))
        else:
            merges.append((merge[0], merge[1]))
    return merges


def _hf_merges_of(vocab: dict[str, int], merges: list[tuple[str, str]], words: list[str]) -> list[list[int]]:
    """HF's own BPE (merges only, no whole-word lookup) on each word taken alone."""
    from tokenizers import Tokenizer, models

    bare = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    return [e.ids for e in bare.encode_batch_fast(words, add_special_tokens=False)]


def _last_merge(word: str, pair_rank: dict[tuple[str, str], int]) -> int:
    """Rank of the merge that completes `word` in HF's order (lowest rank first, then leftmost)."""
    symbols = list(word)
    last = -1
    while len(symbols) > 1:
        candidates = [(pair_rank[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in pair_rank]
        if not candidates:
            break
        last, i = min(candidates)
        symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
    if symbols != [word]:
        raise _Unsupported(f"internal check: merging {word!r} alone disagrees with HF's BPE")
    return last


def _vocab_bytes(vocab: dict[str, int]) -> dict[str, bytes]:
    """The bytes each vocabulary string stands for; strings outside the byte alphabet, which
    byte-level BPE can never produce, are left out."""
    to_latin1 = {ord(c): chr(b) for b, c in byte_level_alphabet().items()}
    # Characters below 256 that are not in the alphabet (e.g. a raw space) must fail too.
    to_latin1.update({i: "\uffff" for i in range(256) if i not in to_latin1})
    out = {}
    for token in vocab:
        try:
            out[token] = token.translate(to_latin1).encode("latin-1")
        except UnicodeEncodeError:
            continue
    return out


def _rank_table(model: dict) -> tuple[dict[bytes, int], np.ndarray | None]:
    """tiktoken's mergeable ranks for this vocabulary, and rank -> HF id (None: ranks are ids)."""
    vocab: dict[str, int] = model["vocab"]
    merges = _read_merges(model)
    if len(set(merges)) != len(merges):
        raise _Unsupported("the merges list holds the same pair twice")
    ignore_merges = bool(model.get("ignore_merges"))
    as_bytes = _vocab_bytes(vocab)
    singles = sorted(byte_level_alphabet().values(), key=as_bytes.__getitem__)

    merge_ranks: dict[str, list[int]] = {}
    for rank, (left, right) in enumerate(merges):
        merge_ranks.setdefault(left + right, []).append(rank)
    # Every multi-byte token HF could ever output from text: made by merges, or (ignore_merges)
    # looked up whole.
    candidates = [t for t in as_bytes if len(t) > 1 and (t in merge_ranks or ignore_merges)]
    merged_alone = dict(zip(candidates, _hf_merges_of(vocab, merges, candidates)))

    made: dict[str, int] = {}  # token -> rank of the merge that makes it, for tokens HF's merges make
    pair_rank = None
    for token, ids in merged_alone.items():
        if ids != [vocab[token]]:
            continue  # HF's merges never make this token (see the module docstring)
        ranks = merge_ranks[token]
        if len(ranks) == 1:
            made[token] = ranks[0]
        else:  # several merges make this token; HF only ever uses the one that ends its own bytes
            pair_rank = pair_rank or {pair: r for r, pair in enumerate(merges)}
            made[token] = _last_merge(token, pair_rank)
    whole_only = [t for t in candidates if t not in made] if ignore_merges else []
    for token in whole_only:
        if len(merged_alone[token]) == 2:
            raise _Unsupported(f"with ignore_merges, token {token!r} is split by the merges into exactly "
                               f"two tokens, which tiktoken would join")

    ordered = sorted(made, key=made.__getitem__)
    made_ids = [vocab[t] for t in ordered]
    # tiktoken only compares ranks of multi-byte tokens, so HF ids can serve as ranks when they
    # follow merge order and every whole-only token comes after all merged ones.
    if all(a < b for a, b in zip(made_ids, made_ids[1:])) and all(
            vocab[t] > made_ids[-1] for t in whole_only if made_ids):
        return {as_bytes[t]: vocab[t] for t in (*singles, *ordered, *whole_only)}, None
    order = (*singles, *ordered, *whole_only)
    ranks = {as_bytes[t]: rank for rank, t in enumerate(order)}
    return ranks, np.asarray([vocab[t] for t in order], dtype=np.uint32)


# ---- the rank table's cache ---------------------------------------------------------------------


def _rank_table_key(serialized: str) -> str:
    import tiktoken
    import tokenizers

    digest = hashlib.sha256(f"{RANK_TABLE_VERSION}|{tokenizers.__version__}|{tiktoken.__version__}|".encode())
    digest.update(serialized.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _cached_rank_table(model: dict, serialized: str,
                       cache_dir: str | os.PathLike | None) -> tuple[dict[bytes, int], np.ndarray | None]:
    """`_rank_table(model)`, read from `cache_dir` when a build of the same tokenizer left it there."""
    if cache_dir is None:
        return _rank_table(model)
    path = os.path.join(cache_dir, f"rank-table-{_rank_table_key(serialized)}.npz")
    try:
        return _load_rank_table(path)
    except Exception:  # absent, or unreadable (truncated, another format): rebuild it
        pass
    ranks, rank_to_id = _rank_table(model)
    try:
        _save_rank_table(path, ranks, rank_to_id)
    except OSError:  # a read-only or full cache folder only costs the next run this build again
        pass
    return ranks, rank_to_id


def _save_rank_table(path: str, ranks: dict[bytes, int], rank_to_id: np.ndarray | None) -> None:
    tokens = list(ranks)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".rank-table-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, blob=np.frombuffer(b"".join(tokens), dtype=np.uint8),
                     lengths=np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens)),
                     ranks=np.fromiter(ranks.values(), dtype=np.int64, count=len(ranks)),
                     rank_to_id=np.empty(0, np.uint32) if rank_to_id is None else rank_to_id,
                     has_rank_to_id=np.asarray(rank_to_id is not None))
        os.replace(tmp, path)  # readers see a whole file or none
    except BaseException:
        os.unlink(tmp)
        raise


def _load_rank_table(path: str) -> tuple[dict[bytes, int], np.ndarray | None]:
    with np.load(path, allow_pickle=False) as saved:
        blob = saved["blob"].tobytes()
        ends = np.cumsum(saved["lengths"]).tolist()
        values = saved["ranks"].tolist()
        rank_to_id = saved["rank_to_id"] if bool(saved["has_rank_to_id"]) else None
    if len(ends) != len(values) or (ends and ends[-1] != len(blob)):
        raise ValueError(f"{path}: inconsistent rank table")
    starts = [0, *ends[:-1]]
    return {blob[a:b]: rank for a, b, rank in zip(starts, ends, values)}, rank_to_id

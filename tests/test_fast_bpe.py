"""FastBPE against Hugging Face `tokenizers` itself: id-for-id on the built-in corpus, Unicode edge
cases, every code point, special tokens and random merge tables; refusals come with a reason."""

import json
import random
import unicodedata

import numpy as np
import pytest
import tiktoken
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from ember.data.corpus import iter_documents
from ember.data.fast_bpe import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, FastBPE, byte_level_alphabet
from ember.data.tokenizer_train import train_bpe_tokenizer

ALPHABET = byte_level_alphabet()
BYTE_OF = {c: b for b, c in ALPHABET.items()}

# ---- tokenizers under test, all built offline -----------------------------------------------


def make_tokenizer(vocab, merges, *, pre_tokenizer, normalizer=None, post_processor=None, added_tokens=(),
                   ignore_merges=False) -> Tokenizer:
    """A tokenizer.json written field by field, the way model repositories ship them."""
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": normalized, "special": special}
                         for c, i, special, normalized in added_tokens],
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    return Tokenizer.from_str(json.dumps(spec))


def split_then_byte_level(pattern):
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def bos_template(bos, bos_id):
    return {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}]}


def vocab_and_merges(tok: Tokenizer):
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def train_split_bpe(texts, pattern, vocab_size):
    """Byte-level BPE trained with a Split regex before ByteLevel (Llama-3 / Qwen2 layout)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return vocab_and_merges(tok)


def to_vocab_string(text: str) -> str:
    return "".join(ALPHABET[b] for b in text.encode())


@pytest.fixture(scope="module")
def training_texts():
    return list(iter_documents("source", max_bytes=1_200_000))


@pytest.fixture(scope="module")
def gpt2_style(training_texts, tmp_path_factory):
    """ember's own tokenizer trainer (GPT-2 layout: ByteLevel regex, <|endoftext|> in the vocab)."""
    folder = train_bpe_tokenizer(training_texts, tmp_path_factory.mktemp("gpt2") / "tok", vocab_size=4096)
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def gpt2_prefix_space(gpt2_style):
    spec = json.loads(gpt2_style.to_str())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def permuted_ids(gpt2_style):
    """The same tokenizer with merged tokens' ids shuffled: merge priority no longer follows ids."""
    spec = json.loads(gpt2_style.to_str())
    vocab = spec["model"]["vocab"]
    merged = sorted(t for t in vocab if len(t) > 1 and t not in ("<|endoftext|>", "<|pad|>"))
    ids = [vocab[t] for t in merged]
    random.Random(0).shuffle(ids)
    vocab.update(zip(merged, ids))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def llama3_style(training_texts):
    """Llama-3 layout: Split regex + ByteLevel, ignore_merges, BOS template, specials after the vocab,
    and whole words in the vocab that no merge makes (looked up whole, as HF does with ignore_merges)."""
    vocab, merges = train_split_bpe(training_texts, LLAMA3_PATTERN, 4096)
    probe = make_tokenizer(vocab, merges, pre_tokenizer=split_then_byte_level(LLAMA3_PATTERN))
    whole_words = []
    for word in WHOLE_WORDS:
        if to_vocab_string(word) not in vocab and len(probe.encode(word).ids) >= 3:
            whole_words.append(to_vocab_string(word))
    assert len(whole_words) >= 5
    for word in whole_words:
        vocab[word] = len(vocab)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    added = [(c, len(vocab) + i, True, False) for i, c in enumerate(specials)]
    return make_tokenizer(vocab, merges, pre_tokenizer=split_then_byte_level(LLAMA3_PATTERN),
                          post_processor=bos_template("<|begin_of_text|>", len(vocab)),
                          added_tokens=added, ignore_merges=True)


@pytest.fixture(scope="module")
def qwen2_style(training_texts):
    """Qwen2 layout: NFC normalizer, Qwen's Split regex + ByteLevel, ChatML specials, and one
    normalized (non-special) added token that only matches after NFC."""
    vocab, merges = train_split_bpe(training_texts, QWEN2_PATTERN, 4096)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    added = [(c, len(vocab) + i, True, False) for i, c in enumerate(specials)]
    added.append(("caf\u00e9!", len(vocab) + len(specials), False, True))
    return make_tokenizer(vocab, merges, normalizer={"type": "NFC"},
                          pre_tokenizer=split_then_byte_level(QWEN2_PATTERN),
                          post_processor={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                          "use_regex": False},
                          added_tokens=added)


TOKENIZERS = ["gpt2_style", "gpt2_prefix_space", "permuted_ids", "llama3_style", "qwen2_style"]


class FallbackWatch:
    """Stands in for the HF tokenizer FastBPE keeps for text it must not encode itself, and records
    that text: a test passing because FastBPE quietly asked HF would prove nothing."""

    def __init__(self, tok):
        self.tok = tok
        self.nfc = json.loads(tok.to_str())["normalizer"] is not None
        self.texts = []

    def encode(self, text):
        self.texts.append(text)
        return self.tok.encode(text)

    def unexpected(self):
        """Texts handed to HF without a lone surrogate or (under NFC) a code point unknown to Python."""
        def expected(text):
            return any(0xD800 <= ord(c) <= 0xDFFF for c in text) or (
                self.nfc and any(unicodedata.category(c) == "Cn" for c in text))
        return [t[:50] for t in self.texts if not expected(t)]


@pytest.fixture(params=TOKENIZERS)
def hf_and_fast(request):
    tok = request.getfixturevalue(request.param)
    fast = FastBPE.from_hf(tok)
    assert fast is not None, FastBPE.why_not(tok)
    watch = fast._hf = FallbackWatch(tok)
    yield tok, fast
    assert not watch.unexpected()


def special_tokens_of(tok):
    return [t.content for t in tok.get_added_tokens_decoder().values()]


def assert_same(tok, fast, texts):
    for text in texts:
        assert fast.encode(text) == tok.encode(text).ids, repr(text[:200])


# ---- texts ------------------------------------------------------------------------------------

# Llama-3 style vocabularies hold whole words that no merge makes; the fixture adds these.
WHOLE_WORDS = (" superclassification", " quintessential", " ephemerality", "Reconfigurability", "_initialisations",
               " 日本語", " zyzzyva", " NotImplementedErrorType")
UNICODE_SPACES = "\t\n\x0b\x0c\r \x85\xa0\u1680\u180e\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008" \
                 "\u2009\u200a\u200b\u2028\u2029\u202f\u205f\u3000\ufeff"
EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\n", "\t \t", " \n \n ", "a", " a", "a ", "a  b", "a   ", "   a", "\r\n", "x\r\ny\r\n\r\n",
    "Hello, world!", "hello world  ", "def f(x):\n    return x  # comment\n\n\n",
    "don't DON'T I'LL we'Re it'S they'VE I'M he'D 's's ''s '' '", "'ſ 'ſs 'K 'k",  # ſ folds to s
    "1 12 123 1234 12345 1234567890 3.14159 1e-10 0x1F 1_000", "١٢٣٤٥ ٦٧ ² ½ Ⅻ ⅷ 𝟘𝟙",
    "héllo wörld naïve café résumé Ærø", "e\u0301 a\u0308 o\u0302\u0323 \u212b \u2126 \uac00 \u1100\u1161",
    "ﬁ ﬂ ß ẞ İ ı ǅ ǈ", "日本語のテキストです。中文测试，标点。한국어 텍스트",
    "Ελληνικά русский текст עברית العربية हिन्दी ภาษาไทย ქართული", "emoji 😀👍🏽👨‍👩‍👧‍👦 🇯🇵🇫🇷 ❤️ ☃",
    "mixed日本語and English123with数字456", "tab\tseparated\tvalues\n", "trailing spaces   \n   \n",
    "x" + UNICODE_SPACES + "y", " ".join(UNICODE_SPACES), UNICODE_SPACES * 3, "a\u200db\u200cc\u2060d",
    "\x00\x01\x02\x1f\x7f", "\ufffd\uffff\U0010ffff\U000e0001", "<|not special|> <| |> <|endof",
    " " * 4000, "a" * 5000, "1" * 3000, "\n" * 1000, ". " * 2000, "ab" * 3000 + " " * 300 + "!",
    "=" * 10000, "\u3000" * 500,
    "".join(WHOLE_WORDS), " ".join(WHOLE_WORDS), "x".join(WHOLE_WORDS), "\n".join(WHOLE_WORDS) + "s",
]


def special_cases(specials):
    cases = []
    for s in specials:
        cases += [s, s + s, f"a{s}b", f" {s} ", f"\n{s}\n", f"{s}x", f"x{s}", s[:-1], s[1:], f"{s[:3]}{s}{s[3:]}",
                  f"text before{s}\n\nand after {s}", f"e\u0301{s}caf\u00e9!", f"cafe\u0301! {s} cafe\u0301!x"]
    cases.append("".join(specials))
    cases.append(" ".join(specials) + "  ")
    return cases


def random_texts(count, specials, seed):
    """Short strings from pieces that stress the regexes' class and lookahead boundaries."""
    pieces = ["a", "Z", "é", "e\u0301", "日", "本", "😀", "1", "23", "٣", "½", " ", "  ", "\t", "\n", "\r\n", "\r",
              "\u00a0", "\u3000", "'", "'s", "'LL", "'ſ", "-", ".", "!?", "_", "(", ")", "x", "ab", "the", " the",
              "def", "__", "\u200b", "\u0301", "ﬁ", "Å", "\u212b"] + list(specials)
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def every_code_point(chunk=4096):
    """All Unicode scalar values in order, alone and after a space, in documents of `chunk` characters."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    spaced = "".join(" " + c for c in chars)
    text = "".join(chars)
    return [text[i:i + chunk] for i in range(0, len(text), chunk)] + \
        [spaced[i:i + chunk] for i in range(0, len(spaced), chunk)]


# ---- id-for-id against HF ----------------------------------------------------------------------


def test_edge_cases_match_hf(hf_and_fast):
    tok, fast = hf_and_fast
    assert_same(tok, fast, EDGE_CASES + special_cases(special_tokens_of(tok)))


def test_random_strings_match_hf(hf_and_fast):
    tok, fast = hf_and_fast
    assert_same(tok, fast, random_texts(1500, special_tokens_of(tok), seed=1))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2_style", "llama3_style", "qwen2_style"])  # the three regexes
def test_every_code_point_matches_hf(name, request):
    tok = request.getfixturevalue(name)
    fast = FastBPE.from_hf(tok)
    docs = every_code_point()
    assert fast.encode_batch(docs) == [e.ids for e in tok.encode_batch(docs)]


def test_batch_and_flat_outputs_match_encode(hf_and_fast):
    tok, fast = hf_and_fast
    texts = EDGE_CASES + random_texts(200, special_tokens_of(tok), seed=2)
    expected = [e.ids for e in tok.encode_batch(texts)]
    assert fast.encode_batch(texts) == expected
    assert fast.encode_batch(texts, num_threads=2) == expected
    flat, lengths = fast.encode_batch_flat(texts)
    assert flat.dtype == np.uint32 and lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]


@pytest.fixture(scope="module")
def whole_corpus():
    return {kind: list(iter_documents(kind)) for kind in ("docstrings", "source")}


@pytest.mark.slow
@pytest.mark.parametrize("name, source_mb", [("gpt2_style", None), ("llama3_style", 4), ("qwen2_style", 4)])
def test_builtin_corpus_matches_hf(name, source_mb, whole_corpus, request):
    """The whole built-in corpus (docstrings and source, about 34 MB) with the tokenizer ember trains;
    all docstrings and the first `source_mb` MB of source with the other layouts."""
    tok = request.getfixturevalue(name)
    fast = FastBPE.from_hf(tok)
    for kind, docs in whole_corpus.items():
        if kind == "source" and source_mb is not None:
            cut = np.searchsorted(np.cumsum([len(d) for d in docs]), source_mb * 1e6)
            docs = docs[:cut + 1]
        expected = [e.ids for e in tok.encode_batch(docs)]
        assert fast.encode_batch(docs) == expected, kind
        flat, lengths = fast.encode_batch_flat(docs)
        assert lengths.tolist() == [len(e) for e in expected]
        assert np.array_equal(flat, np.concatenate([np.asarray(e, dtype=np.uint32) for e in expected]))


def test_lone_surrogates_fail_as_in_hf(gpt2_style):
    fast = FastBPE.from_hf(gpt2_style)
    with pytest.raises(Exception) as hf_error:
        gpt2_style.encode("a\ud800b")
    with pytest.raises(hf_error.type):
        fast.encode("a\ud800b")


def test_regex_engines_agree_on_character_classes():
    """tiktoken's regex engine (Rust regex) and HF's (Oniguruma) put every code point in the same
    classes the supported split regexes are built from."""
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(chars)
    byte_ranks = {bytes([b]): b for b in range(256)}
    for char_class in (r"\p{L}", r"\p{N}", r"\s", r"(?i:[stredvml])"):
        # tiktoken encodes only what its regex matches; HF's Split "removed" keeps what it does not.
        core = tiktoken.Encoding("probe", pat_str=char_class, mergeable_ranks=byte_ranks, special_tokens={})
        tiktoken_members = set(bytes(core.encode_ordinary(text)).decode())
        split = pre_tokenizers.Split(Regex(char_class), behavior="removed")
        hf_members = set(chars) - set("".join(piece for piece, _ in split.pre_tokenize_str(text)))
        assert tiktoken_members == hf_members, (char_class, sorted(tiktoken_members ^ hf_members)[:10])
        assert len(hf_members) > 5


# ---- the BPE rule itself, on merge tables built to break it ----------------------------------


def tiny_vocab_and_merges(merges):
    vocab = {c: i for i, c in enumerate(ALPHABET.values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, merges


def test_tokens_merges_never_make_are_left_out():
    """Merges (X,J) < (Q,X) < (QX,J): HF turns "QXJ" into [Q, XJ] and never makes QXJ; tiktoken with
    every token ranked would join them. FastBPE leaves QXJ out and matches HF."""
    vocab, merges = tiny_vocab_and_merges([("X", "J"), ("Q", "X"), ("QX", "J")])
    tok = make_tokenizer(vocab, merges, pre_tokenizer=split_then_byte_level(GPT2_PATTERN))
    naive = tiktoken.Encoding("naive", pat_str=GPT2_PATTERN, special_tokens={},
                              mergeable_ranks={bytes(BYTE_OF[c] for c in t): i for t, i in vocab.items()})
    texts = ["QXJ", "aQXJ", "QXJQXJ QXJ", "QQXJJ"]
    assert any(naive.encode_ordinary(t) != tok.encode(t).ids for t in texts)  # the trap is real
    assert_same(tok, FastBPE.from_hf(tok), texts)
    # With ignore_merges HF looks "QXJ" up whole, but inside "aQXJ" leaves [Q, XJ], which tiktoken
    # would join: no exact encoding exists on tiktoken's rule, so FastBPE refuses.
    tok = make_tokenizer(vocab, merges, pre_tokenizer=split_then_byte_level(GPT2_PATTERN), ignore_merges=True)
    assert FastBPE.from_hf(tok) is None
    assert "exactly two" in FastBPE.why_not(tok)


def test_token_made_by_two_merges_takes_the_rank_hf_uses():
    """QXJ is made by (QX,J) at rank 2 and by (Q,XJ) at rank 4; on its own bytes HF goes through
    [Q, XJ], so only rank 4 is ever used: in "QXJZ", (XJ,Z) at rank 3 must win over QXJ."""
    vocab, merges = tiny_vocab_and_merges([("X", "J"), ("Q", "X"), ("QX", "J"), ("XJ", "Z"), ("Q", "XJ")])
    tok = make_tokenizer(vocab, merges, pre_tokenizer=split_then_byte_level(GPT2_PATTERN))
    assert tok.encode("QXJZ").ids == [vocab["Q"], vocab["XJZ"]]
    assert_same(tok, FastBPE.from_hf(tok), ["QXJZ", "QXJ", "QXJ QXJZ", "QQXJZZ", "XJQXJZ"])


def test_random_merge_tables_match_hf():
    """Random merge lists over a small alphabet (tokens made twice, merges out of id order, tokens
    the merges never make, with and without ignore_merges): wherever FastBPE accepts, it is exact."""
    rng = random.Random(3)
    accepted = {False: 0, True: 0}
    for trial in range(60):
        tokens = list("abcd")
        merges = []
        for _ in range(rng.randint(3, 25)):
            pair = (rng.choice(tokens), rng.choice(tokens))
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
        vocab, merges = tiny_vocab_and_merges(merges)
        ignore_merges = trial % 2 == 1
        if ignore_merges:  # words no merge makes, looked up whole
            for _ in range(3):
                vocab.setdefault("".join(rng.choice("abcd") for _ in range(rng.randint(2, 6))), len(vocab))
        tok = make_tokenizer(vocab, merges, pre_tokenizer=split_then_byte_level(GPT2_PATTERN),
                             ignore_merges=ignore_merges)
        fast = FastBPE.from_hf(tok)
        if fast is None:
            assert ignore_merges, FastBPE.why_not(tok)  # without ignore_merges every table is supported
            continue
        accepted[ignore_merges] += 1
        words = ["".join(rng.choice("abcd") for _ in range(rng.randint(1, 24))) for _ in range(300)]
        assert_same(tok, fast, words + [" ".join(words[:50])])
    assert accepted[False] == 30 and accepted[True] >= 5, accepted


# ---- refusals ----------------------------------------------------------------------------------


def edited(tok, edit):
    spec = json.loads(tok.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("edit, reason", [
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer"),
    (lambda s: s["model"].update(dropout=0.1), "dropout"),
    (lambda s: s.update(truncation={"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                                    "stride": 0}), "truncation"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip"),
    (lambda s: s.update(pre_tokenizer=split_then_byte_level(r"\p{L}+")), "regex"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer"),
])
def test_unsupported_tokenizers_are_refused_with_a_reason(gpt2_style, edit, reason):
    tok = edited(gpt2_style, edit)
    assert FastBPE.from_hf(tok) is None
    assert reason in FastBPE.why_not(tok)


def test_non_byte_level_models_are_refused():
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert "WordPiece" in FastBPE.why_not(wordpiece)
    sentencepiece_bpe = Tokenizer(models.BPE({"<unk>": 0, "a": 1, "<0x41>": 2}, [], byte_fallback=True))
    assert "byte_fallback" in FastBPE.why_not(sentencepiece_bpe)
    assert FastBPE.why_not(Tokenizer(models.BPE({c: i for i, c in enumerate("abc")}, []))) is not None


def test_supported_tokenizers_have_no_reason(gpt2_style):
    assert FastBPE.why_not(gpt2_style) is None


def test_fixtures_exercise_what_they_claim(llama3_style, qwen2_style, permuted_ids):
    vocab = llama3_style.get_vocab()
    for word in WHOLE_WORDS:  # looked up whole, though the merges would split them in 3+
        if to_vocab_string(word) in vocab:
            assert FastBPE.from_hf(llama3_style).encode(word)[1:] == [vocab[to_vocab_string(word)]], word
    assert unicodedata.normalize("NFC", "cafe\u0301!") == "caf\u00e9!"
    normalized_token = qwen2_style.token_to_id("caf\u00e9!")
    assert normalized_token in FastBPE.from_hf(qwen2_style).encode("a cafe\u0301! b")
    assert FastBPE.from_hf(permuted_ids)._rank_to_id is not None  # the rank -> id lookup is used


def test_older_tokenizer_json_layouts(gpt2_style):
    """Merges written as "a b" strings (older tokenizer.json files) and a RoBERTa-style
    post-processor (<s> ... </s>)."""
    def old_layout(spec):
        spec["model"]["merges"] = [" ".join(m) for m in spec["model"]["merges"]]
        spec["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|endoftext|>", 0], "cls": ["<|pad|>", 1],
                                  "trim_offsets": True, "add_prefix_space": False}
    tok = edited(gpt2_style, old_layout)
    fast = FastBPE.from_hf(tok)
    assert tok.encode("a").ids[0] == 1 and tok.encode("a").ids[-1] == 0
    assert_same(tok, fast, EDGE_CASES[:40] + special_cases(special_tokens_of(tok)))


# ---- the rank table's cache (issue 18: FastBPE's build was most of preprocessing's start-up) ----


@pytest.mark.parametrize("name", ["gpt2_style", "permuted_ids", "llama3_style"])
def test_cached_rank_table_gives_the_same_ids(name, request, tmp_path, monkeypatch):
    """A build from the cache encodes as HF does, without running the check again; a damaged cache
    file is rebuilt; another tokenizer gets its own file."""
    import ember.data.fast_bpe as fast_bpe

    tok = request.getfixturevalue(name)
    texts = EDGE_CASES + random_texts(200, special_tokens_of(tok), seed=3)
    expected = [e.ids for e in tok.encode_batch(texts)]
    first = FastBPE.from_hf(tok, cache_dir=tmp_path)
    files = list(tmp_path.glob("rank-table-*.npz"))
    assert len(files) == 1 and first.encode_batch(texts) == expected

    with monkeypatch.context() as patch:  # from the cache, the vocabulary is not checked again
        patch.setattr(fast_bpe, "_rank_table", lambda model: pytest.fail("rank table rebuilt"))
        cached = FastBPE.from_hf(tok, cache_dir=tmp_path)
    assert cached.encode_batch(texts) == expected
    assert cached._core._mergeable_ranks == first._core._mergeable_ranks
    assert (cached._rank_to_id is None) == (first._rank_to_id is None)

    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated: rebuilt, then readable again
    assert FastBPE.from_hf(tok, cache_dir=tmp_path).encode_batch(texts) == expected
    with monkeypatch.context() as patch:
        patch.setattr(fast_bpe, "_rank_table", lambda model: pytest.fail("rank table rebuilt"))
        assert FastBPE.from_hf(tok, cache_dir=tmp_path).encode_batch(texts) == expected

    other = Tokenizer.from_str(tok.to_str())
    other.add_special_tokens(["<|ember-extra|>"])
    text = "x = 1<|ember-extra|> y"
    assert FastBPE.from_hf(other, cache_dir=tmp_path).encode(text) == other.encode(text).ids
    assert len(list(tmp_path.glob("rank-table-*.npz"))) == 2

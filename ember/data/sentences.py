"""Sentence splitting for `ember preprocess --split-sentences` (Megatron's `tools/preprocess_data.py`).

Megatron splits each document with NLTK's Punkt model for `--lang` (default english), in pieces of
at most 1,000,000 characters, and writes `PREFIX_<key>_sentence.bin/.idx` with one sequence per
sentence. `--keep-newlines` keeps the whitespace (newlines) that follows a sentence inside it,
instead of letting Punkt drop it. ember does the same with the same library and model.

The Punkt model is data (NLTK's `punkt_tab`), which Megatron downloads at run time; ember never
downloads anything, so without the model installed (NLTK_DATA or NLTK's default folders) the
splitter is refused in one line that says how to install it. There is no substitute: a different
splitter would cut different sentences, and a dataset that differs from Megatron's silently.
"""

from __future__ import annotations

from ember.errors import EmberError

MAX_PIECE = 1_000_000  # characters Megatron gives Punkt at a time


def _install_hint() -> str:
    return ("on a machine with network run `python -m nltk.downloader -d DIR punkt_tab` and set NLTK_DATA=DIR "
            "here (ember downloads nothing)")


def _keep_newlines_vars(punkt):
    """Punkt's language variables with the whitespace after a sentence end kept in the sentence:
    the period context matches `\\s*` (not `\\s+`) and the next token without the space before it."""

    class KeepNewlines(punkt.PunktLanguageVars):
        _period_context_fmt = r"""
            \S*                          # word material
            %(SentEndChars)s             # a possible sentence end
            \s*                          # the whitespace after it stays with this sentence
            (?=(?P<after_tok>
                %(NonWord)s              # punctuation
                |
                (?P<next_tok>\S+)        # or the next token, the whitespace already consumed
            ))"""

    return KeepNewlines()


class SentenceSplitter:
    """NLTK Punkt for `lang`, as Megatron builds it; `split(text)` -> the sentences, in order."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        try:
            from nltk.tokenize import punkt
        except ImportError:
            raise EmberError("--split-sentences needs NLTK (Megatron's sentence splitter): pip install nltk, and "
                             "its Punkt model: " + _install_hint()) from None
        try:
            model = punkt.PunktTokenizer(lang)
        except (LookupError, OSError):
            raise EmberError(f"--split-sentences: NLTK's Punkt model for {lang!r} (punkt_tab) is not installed; "
                             + _install_hint()) from None
        if keep_newlines:
            model = punkt.PunktSentenceTokenizer(train_text=model._params, lang_vars=_keep_newlines_vars(punkt))
        self.model = model
        self.lang, self.keep_newlines = lang, keep_newlines

    def split(self, text: str) -> list[str]:
        return [sentence for start in range(0, len(text), MAX_PIECE)
                for sentence in self.model.tokenize(text[start : start + MAX_PIECE])]

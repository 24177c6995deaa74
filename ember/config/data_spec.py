"""The data flags' own syntax: `--data-path` blends and `--split` weights (Megatron's rules).

Pure parsing, shared by config validation and the dataset builders (`ember.data.blending`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from ember.errors import EmberError

SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(spec: str | Sequence[str] | None) -> list[tuple[float | None, str]]:
    """`"0.3 P1 0.7 P2"` -> [(0.3, "P1"), (0.7, "P2")]; `"P1 P2"` -> [(None, "P1"), (None, "P2")].

    Accepts one string (as a shell script passes a quoted `$DATA_PATH`) or a list of words (as
    argparse's `nargs="*"` gives them). As in Megatron, the list is read as weight/path pairs
    when it has an even length and every other word is a number; otherwise as plain paths.
    """
    if spec is None:
        return []
    words = spec.split() if isinstance(spec, str) else [w for item in spec for w in str(item).split()]
    if not words:
        return []
    if len(words) % 2 == 0:
        weights = [_as_number(w) for w in words[0::2]]
        if all(w is not None for w in weights):
            entries = list(zip(weights, words[1::2]))
            for weight, path in entries:
                if weight <= 0:
                    raise EmberError(f"--data-path: weight {weight} for {path} must be positive")
            return entries  # type: ignore[return-value]
        if any(w is not None for w in weights):
            raise EmberError(f"--data-path {' '.join(words)!r}: mixes weights and paths; give either "
                             f"'W1 P1 W2 P2 ...' or 'P1 P2 ...'")
    for word in words:
        if _as_number(word) is not None:
            raise EmberError(f"--data-path {' '.join(words)!r}: {word!r} looks like a weight without "
                             f"a path; give 'W1 P1 W2 P2 ...'")
    return [(None, w) for w in words]


def _as_number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Divide by the sum in float64, as Megatron's `normalize` does (the exact floats matter)."""
    array = np.asarray(weights, dtype=np.float64)
    return (array / np.sum(array)).tolist()


def parse_split(split: str) -> list[float]:
    """`"969,30,1"` -> the normalised train/valid/test fractions; missing parts are 0."""
    parts = [float(p) for p in re.findall(r"[.0-9]+", split)]
    if not parts or len(parts) > len(SPLIT_NAMES) or sum(parts) <= 0:
        raise EmberError(f"--split {split!r}: expected up to three non-negative weights "
                         f"with a positive sum, e.g. 969,30,1")
    parts += [0.0] * (len(SPLIT_NAMES) - len(parts))
    return normalize_weights(parts)

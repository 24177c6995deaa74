"""The data flags' own syntax: `--data-path` blends and `--split` weights (Megatron's rules).

Pure parsing, shared by config validation and the dataset builders (`ember.data.blending`).
"""

from __future__ import annotations

import math
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
                if not math.isfinite(weight) or weight <= 0:
                    raise EmberError(f"--data-path: weight {weight} for {path} must be a positive finite number")
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


# One weight: a plain non-negative decimal ("969", "0.8", ".5"); no sign, exponent, inf or nan.
_SPLIT_WEIGHT = re.compile(r"\d+(\.\d*)?|\.\d+")


def parse_split(split: str) -> list[float]:
    """`"969,30,1"` -> the normalised train/valid/test fractions; missing parts are 0.

    Megatron's forms: up to three non-negative weights separated by ',' (or all by '/'),
    "969,30,1", "99,1", "0.8, 0.1, 0.1", "1/1/1". Anything else is refused rather than read
    loosely (Megatron's regular expression would turn "-1,2,3" into 1,2,3).
    """
    text = str(split).strip()
    separator = "/" if "/" in text and "," not in text else ","
    parts = [part.strip() for part in text.split(separator)]
    if not 1 <= len(parts) <= len(SPLIT_NAMES) or not all(_SPLIT_WEIGHT.fullmatch(part) for part in parts):
        raise EmberError(f"--split {split!r}: expected up to three non-negative numbers separated by ',' "
                         f"(or '/'), e.g. 969,30,1")
    weights = [float(part) for part in parts]
    if sum(weights) <= 0:
        raise EmberError(f"--split {split!r}: the weights add up to 0; give at least one positive weight, "
                         f"e.g. 969,30,1")
    weights += [0.0] * (len(SPLIT_NAMES) - len(weights))
    return normalize_weights(weights)

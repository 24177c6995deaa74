"""Which settings make a run this run: a checkpoint in `--save` is continued only when they match.

A relaunched job (preemption, a crash, `--exit-interval`) runs the same command and continues its
own checkpoint. A `--save` that holds the checkpoint of another run — another model, other data,
another sequence length or tokenizer, another YAML — must not be continued silently. What users
legitimately change when resuming (learning rate and schedule, iterations, batch size, logging,
layout, precision, intervals) is not compared: checkpoints reshard, and these are run-time choices.

`run_differences` compares the data settings; the model is compared as the architecture each
config resolves to (`--model X` and the same model spelled out in flags are one model), which
needs `ember.models` and so is the trainer's (`ember.train.trainer.checkpoint_to_start_from`).
"""

from __future__ import annotations

import os
from typing import Any

from ember.config.schema import Config

# The data settings that define a run.
RUN_DATA_FIELDS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "split", "seq_length",
                   "tokenizer_type", "tokenizer_name_or_path", "tokenizer_model", "vocab_file", "merge_file")
_PATH_FIELDS = ("data_path", "train_data_path", "valid_data_path", "test_data_path", "tokenizer_name_or_path",
                "tokenizer_model", "vocab_file", "merge_file")


def run_differences(saved: dict[str, Any], config: Config) -> list[str]:
    """`"data.field: saved X, now Y"` for each run-defining data setting in which `config` differs
    from the config a checkpoint saved (`train_state.json`'s "config"); settings the saved config
    does not have (an older ember) are not compared."""
    now = config.to_dict()
    differences = []
    for section, name in (("data", name) for name in RUN_DATA_FIELDS):
        if name not in (saved.get(section) or {}):
            continue
        old, new = saved[section][name], now[section][name]
        if old != new and not (name in _PATH_FIELDS and _same_paths(old, new)):
            differences.append(f"{section}.{name}: saved {_show(old)}, now {_show(new)}")
    return differences


def _same_paths(old: Any, new: Any) -> bool:
    """Paths that name the same files from this directory ("data/x" and "/abs/data/x")."""
    def normal(value):
        if isinstance(value, list):
            return [normal(v) for v in value]
        return os.path.realpath(value) if isinstance(value, str) else value
    return normal(old) == normal(new)


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    return str(value)

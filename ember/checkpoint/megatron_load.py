"""`ember train --load MEGATRON_DIR`: the Megatron checkpoint's weights, converted on the fly.

A Megatron-LM / ModelLink user's script passes `--load` a Megatron save folder. ember converts
that checkpoint (`ember.checkpoint.megatron.convert_megatron_to_ember`) into an ember weight folder
once, under the run's output folder (`megatron_import/<iteration>`), and starts from it; a later
run (or another rank) that finds the import of the same source and iteration reuses it. Several
processes asking at once convert once: the first takes a lock file, the others wait for it.

What Megatron itself would do with that `--load`, and what ember does:
- a `release` checkpoint (what Megatron's and MindSpeed's HF -> Megatron converters write): the
  weights at iteration 0, no optimizer state — ember the same.
- `iter_N` with `--finetune`: the weights at iteration 0, no optimizer or RNG state — ember the same.
- `iter_N` without `--finetune`: Megatron resumes iteration N with its optimizer state. ember
  imports weights only, so it refuses in one line rather than start over silently.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Callable

from ember.checkpoint.megatron import convert_megatron_to_ember, describe_megatron_source, locate_megatron_checkpoint
from ember.checkpoint.weights import is_weight_folder, read_manifest
from ember.errors import EmberError
from ember.file_lock import exclusive

IMPORT_FOLDER = "megatron_import"


def import_folder(load: str, output_dir: str | None) -> Path:
    """Where the import of the Megatron checkpoint in `load` lives: under the run's output folder,
    or (without one) under the system's temporary folder, named after the source path."""
    if output_dir:
        return Path(output_dir) / IMPORT_FOLDER
    key = hashlib.sha1(str(Path(load).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ember-{IMPORT_FOLDER}-{key}"


def megatron_weights_for_load(load: str, *, finetune: bool, output_dir: str | None,
                              notice: Callable[[str], None] = print) -> Path:
    """The ember weight folder to start from for `--load load` (a Megatron checkpoint)."""
    checkpoint = locate_megatron_checkpoint(load)
    if checkpoint.iteration != "release" and not finetune:
        raise EmberError(
            f"--load {load} is a Megatron checkpoint at iteration {checkpoint.iteration}: Megatron would resume "
            f"it with its optimizer state, which ember does not import; add --finetune to train from its "
            f"weights from iteration 0 (Megatron's --finetune), or keep resuming it with Megatron")
    name = checkpoint.folder.name
    target = import_folder(load, output_dir) / name
    with exclusive(target.parent / ".lock", "the Megatron import folder",
                   "give --save or --output-dir a writable folder"):
        if _imported_from(target, load, checkpoint.iteration):
            notice(f"--load {load}: using its weights as imported before into {target}")
            return target
        report = convert_megatron_to_ember(load, target, overwrite=target.exists())
        notice(f"--load {load}: imported into {target}: {describe_megatron_source(report)}")
    return target


def _imported_from(target: Path, load: str, iteration) -> bool:
    """Whether `target` is a complete import of `load` at `iteration`."""
    if not is_weight_folder(target):
        return False
    try:
        source = read_manifest(target).get("source") or {}
    except EmberError:
        return False  # damaged: convert again
    return source.get("kind") == "megatron" and source.get("path") == str(Path(load).resolve()) \
        and source.get("iteration") == iteration

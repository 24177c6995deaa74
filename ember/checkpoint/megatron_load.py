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
  imports the weights, Adam's moments and the iteration into an ember training checkpoint
  (`ember.checkpoint.megatron_optim`, under `megatron_import/iter_N-optim`) and resumes it, with a
  notice; with `--no-load-optim` (Megatron's flag) it resumes iteration N with a fresh optimizer
  and says the moments were dropped (`iter_N-no-optim`); a checkpoint without optimizer state, or
  with one ember cannot map (see `ember.checkpoint.megatron_optim` for the forms it reads), is refused in one line naming
  `--finetune` and `--no-load-optim` rather than started over silently.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ember.checkpoint.megatron import convert_megatron_to_ember, describe_megatron_source, locate_megatron_checkpoint
from ember.checkpoint.megatron_optim import (
    NoUsableOptimizerState,
    OptimizerFactory,
    convert_megatron_to_training_checkpoint,
    describe_training_import,
)
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
                              notice: Callable[[str], None] = print, load_optim: bool = True,
                              optimizer_factory: OptimizerFactory | None = None) -> Path:
    """What to start from for `--load load` (a Megatron checkpoint): an ember weight folder (a
    release checkpoint, or --finetune), else an ember save folder resuming iteration N (needs
    `optimizer_factory`, ember's optimizer for a model, see `convert_megatron_to_training_checkpoint`)."""
    checkpoint = locate_megatron_checkpoint(load)
    if checkpoint.iteration != "release" and not finetune:
        return _resume_import(load, checkpoint, output_dir, notice, load_optim, optimizer_factory)
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


def _resume_import(load: str, checkpoint, output_dir: str | None, notice: Callable[[str], None], load_optim: bool,
                   optimizer_factory: OptimizerFactory | None) -> Path:
    """The ember save folder that continues Megatron's iteration N (see the module docstring)."""
    n = checkpoint.iteration
    choices = (f"add --finetune to train from its weights from iteration 0 (Megatron's --finetune), or "
               f"--no-load-optim to continue from iteration {n} with a fresh optimizer")
    if optimizer_factory is None:
        raise EmberError(f"--load {load} is a Megatron checkpoint at iteration {n}; {choices}")
    target = import_folder(load, output_dir) / f"{checkpoint.folder.name}-{'optim' if load_optim else 'no-optim'}"
    dropped = "" if load_optim else "; --no-load-optim: its Adam moments are dropped, the optimizer starts fresh"
    with exclusive(target.parent / ".lock", "the Megatron import folder",
                   "give --save or --output-dir a writable folder"):
        if _resume_imported_from(target, load, n, load_optim):
            notice(f"--load {load}: continuing Megatron's iteration {n} from its import into {target}{dropped}")
            return target
        shutil.rmtree(target, ignore_errors=True)  # an import cut short
        try:
            # the import reads (and checks) the optimizer state before it writes anything
            report = convert_megatron_to_training_checkpoint(load, target, optimizer_factory, load_optim=load_optim)
        except NoUsableOptimizerState as err:
            raise EmberError(f"--load {load} is a Megatron checkpoint at iteration {n} without optimizer state ember "
                             f"can import ({err}); {choices}") from None
        notice(f"--load {load}: continuing Megatron's run at iteration {n}: imported into {target}: "
               f"{describe_training_import(report)}{dropped}")
    return target


def _resume_imported_from(target: Path, load: str, iteration, optimizer: bool) -> bool:
    """Whether `target` is a complete training-checkpoint import of `load` at `iteration`."""
    from ember.checkpoint.training import find_checkpoint

    try:
        ref = find_checkpoint(target) if target.is_dir() else None
        source = ref.train_state().get("source") or {} if ref is not None and ref.kind == "training" else {}
    except EmberError:
        return False  # damaged: import again
    return source.get("kind") == "megatron" and source.get("path") == str(Path(load).resolve()) \
        and source.get("iteration") == iteration and source.get("optimizer") == optimizer

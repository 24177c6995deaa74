"""Checkpoints ember cannot start from, recognised so that `--load` never silently starts from scratch.

A `--load` that holds no ember checkpoint (`ember.checkpoint.training.find_checkpoint` finds
nothing) is either a first run's save folder (`--load` equal to `--save`, nothing saved yet) or
a mistake. The usual mistakes are checkpoints of other tools, which `foreign_checkpoint` names:

    megatron    Megatron-LM / ModelLink: latest_checkpointed_iteration.txt, iter_*/mp_rank_*/
                (or a torch_dist iter_*/ with .metadata and common.pt)
    hf          a Hugging Face model folder: config.json + *.safetensors or pytorch_model*.bin
    mindspore   MindSpore / MindFormers: a .ckpt file, or a folder of them (rank_*/...ckpt)

`check_load` turns each case into a one-line `EmberError` with the command that makes the
checkpoint usable; `check_save` refuses a `--save` that holds a Megatron tree, whose `iter_*`
folders ember's saves and `--keep-last` would replace or delete. `remove_training_checkpoints`
is `--overwrite`'s removal of another run's ember checkpoints. Only names are read here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ember.errors import EmberError

MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_HF_TO_EMBER = "`ember convert --from hf --to ember HF_DIR OUT`, then pass --load OUT"


def foreign_checkpoint(path: str | os.PathLike) -> str | None:
    """"megatron", "hf" or "mindspore" when `path` holds that tool's checkpoint, else None."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".ckpt":
            return "mindspore"
        if path.name.startswith("model_optim_rng") or path.parent.name.startswith("mp_rank_"):
            return "megatron"
        if path.parent.joinpath("config.json").is_file() and any(path.match(p) for p in _HF_WEIGHTS):
            return "hf"
        return None
    if not path.is_dir():
        return None
    if (path / MEGATRON_TRACKER).is_file() or _is_megatron_iteration(path) or any(
            _is_megatron_iteration(child) for child in _subdirs(path) if child.name.startswith(("iter_", "release"))):
        return "megatron"
    if (path / "config.json").is_file() and any(any(path.glob(p)) for p in _HF_WEIGHTS):
        return "hf"
    if any(path.glob("*.ckpt")) or any(any(child.glob("*.ckpt")) for child in _subdirs(path)):
        return "mindspore"
    return None


def _subdirs(path: Path) -> list[Path]:
    try:
        return [child for child in path.iterdir() if child.is_dir()]
    except OSError:
        return []


def _is_megatron_iteration(path: Path) -> bool:
    """One Megatron save: per-rank folders (`mp_rank_TT[_PPP]/`, --ckpt-format torch) or a
    Megatron-Core distributed checkpoint (DCP's `.metadata` beside `common.pt`, torch_dist)."""
    if (path / ".metadata").is_file() and (path / "common.pt").is_file():
        return True
    return any(child.name.startswith("mp_rank_") for child in _subdirs(path))


def describe(kind: str, path: str | os.PathLike, flag: str = "--load") -> str:
    """What `path` is and what to run so ember can start from it (one line)."""
    if kind == "hf":
        return (f"{flag} {path} is a Hugging Face model folder, not an ember checkpoint; convert it first: "
                f"`ember convert --from hf --to ember {path} OUT`, then pass --load OUT")
    if kind == "megatron":
        return (f"{flag} {path} holds a Megatron-LM/ModelLink checkpoint ({MEGATRON_TRACKER}, iter_*/mp_rank_*), "
                f"not an ember one; convert it first: `ember convert --from megatron --to ember {path} OUT`, "
                f"then pass --load OUT")
    if kind == "mindspore":
        return (f"{flag} {path} is a MindSpore checkpoint (.ckpt), which ember cannot read; convert it to a "
                f"Hugging Face model with MindFormers' conversion script first, then {_HF_TO_EMBER}")
    raise ValueError(kind)


def check_load(load: str, found: bool, *, save: str | None, finetune: bool) -> None:
    """Raise a one-line `EmberError` unless training may go on from `--load` as it stands.

    `found`: whether `load` holds an ember checkpoint. Without one, only a first run whose
    `--load` is its own `--save` (nothing saved there yet) may start from random weights."""
    if found:
        return
    kind = foreign_checkpoint(load)
    if kind is not None:
        raise EmberError(describe(kind, load))
    own_save = save is not None and os.path.abspath(load) == os.path.abspath(save)
    if finetune:
        raise EmberError(f"--finetune: --load {load} holds no ember checkpoint (no `latest`, iter_*/ or "
                         f"ember_model.json), so there is nothing to fine-tune; check the path")
    if own_save:
        return  # Megatron's `--load DIR --save DIR`: the first run of a job that resumes itself
    if not os.path.exists(load):
        raise EmberError(f"--load {load} does not exist; check the path (or convert the model first)")
    raise EmberError(f"--load {load} holds no ember checkpoint (no `latest`, iter_*/ or ember_model.json); "
                     f"check the path, or drop --load to start from random weights")


def check_save(save: str) -> None:
    """Refuse a `--save` that holds a Megatron tree: ember's `iter_*` folders would replace its own."""
    if os.path.isdir(save) and foreign_checkpoint(save) == "megatron":
        raise EmberError(f"--save {save} holds a Megatron-LM/ModelLink checkpoint ({MEGATRON_TRACKER}, "
                         f"iter_*/mp_rank_*), whose folders ember's checkpoints would replace; give another --save")


def remove_training_checkpoints(save: str | os.PathLike) -> list[str]:
    """Remove the ember training checkpoints in `save` (`latest` first, then every `iter_*`);
    returns the names removed. Other files there are left alone."""
    from ember.checkpoint.training import LATEST, list_checkpoints

    save = Path(save)
    removed = []
    if (save / LATEST).is_file():
        (save / LATEST).unlink()  # first: a crash below leaves no pointer at a half-removed folder
        removed.append(LATEST)
    for _, folder in list_checkpoints(save):
        shutil.rmtree(folder)
        removed.append(folder.name)
    return removed

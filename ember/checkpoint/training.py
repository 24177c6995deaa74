"""Training checkpoints: DCP (sharded, reshardable), atomic, with a `latest` pointer.

Layout under `--save DIR`:

    DIR/latest                  text: the name of the newest complete checkpoint ("iter_0000100")
    DIR/iter_0000100/.metadata  DCP index, written last by DCP's coordinator
    DIR/iter_0000100/*.distcp   model and optimizer shards, one file per rank
    DIR/iter_0000100/train_state.json   iteration, counters, loader and loss-scaler state, config
    DIR/iter_0000100/rng/rank_00000.pt  each rank's RNG states (torch, numpy, python)

A checkpoint is written to `DIR/.iter_0000100.tmp` and renamed when every rank has finished, then
`latest` is replaced atomically; a crash at any point leaves the previous checkpoint intact. Nothing
is unpickled (`weights_only=True`; DCP stores tensors, the rest is JSON).

Checkpoints are layout-independent: every tensor is stored under the whole model's parameter name
(pipeline stages keep full names), model and optimizer state alike (the optimizer's flattened:
`state.<name>.exp_avg`, `param_groups.<name>.lr`), and DTensor shards (FSDP, tensor and expert
parallelism) are stored as pieces of the global tensor. So a checkpoint saved by one layout (say
TP2 x PP2) loads under any other (TP1 x PP4, DP4, one process): DCP reshards on load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ember.errors import EmberError
from ember.models.args import ModelArgs

LATEST = "latest"
TRAIN_STATE = "train_state.json"
WEIGHTS_MARKER = "ember_model.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """This process's random states, in types `torch.load(weights_only=True)` accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------- finding checkpoints


@dataclass(frozen=True)
class CheckpointRef:
    """What `--load` points at: a training checkpoint (`iter_*` with DCP shards) or converted
    weights (a folder with ember_model.json, from `ember convert`)."""

    path: Path
    kind: str  # "training" or "weights"

    @property
    def iteration(self) -> int:
        match = _ITER_RE.match(self.path.name)
        return int(match.group(1)) if match else 0

    def train_state(self) -> dict[str, Any]:
        with open(self.path / TRAIN_STATE, encoding="utf-8") as f:
            return json.load(f)

    def model_args(self) -> ModelArgs:
        """The architecture the checkpoint holds (from ember_model.json or train_state.json)."""
        if self.kind == "weights":
            from ember.checkpoint.weights import read_manifest

            return ModelArgs.from_dict(read_manifest(self.path)["model_args"])
        return ModelArgs.from_dict(self.train_state()["model_args"])


def find_checkpoint(load: str | os.PathLike) -> CheckpointRef | None:
    """Resolve `--load`: a save folder (follows `latest`), one `iter_*` folder, or converted weights.

    An `iter_*` folder is complete once it has its final name (it is written under a temporary
    one), so a save folder without `latest` falls back to its newest `iter_*`. Returns None when the
    folder holds no checkpoint yet (a first run with --load == --save).
    """
    path = Path(load)
    if (path / LATEST).is_file():
        name = (path / LATEST).read_text(encoding="utf-8").strip()
        target = path / name
        if not (target / ".metadata").is_file():
            raise EmberError(f"{path / LATEST} points at {name}, which is missing or incomplete; "
                             f"point `latest` at an existing iter_* folder")
        return CheckpointRef(target, "training")
    if (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file():
        return CheckpointRef(path, "training")
    if (path / WEIGHTS_MARKER).is_file():
        return CheckpointRef(path, "weights")
    complete = [p for _, p in list_checkpoints(path) if (p / ".metadata").is_file() and (p / TRAIN_STATE).is_file()]
    if complete:  # killed between renaming its first checkpoint and writing `latest`
        return CheckpointRef(complete[-1], "training")
    return None


def list_checkpoints(save_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if save_dir.is_dir():
        for entry in save_dir.iterdir():
            match = _ITER_RE.match(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


# --------------------------------------------------------------------------- state dicts


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # flattened optimizer state is keyed by parameter name, not by position in param_groups,
    # which differ between layouts
    return StateDictOptions(flatten_optimizer_state_dict=True)


def training_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} keyed by parameter names, sharded as the model is."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if optimizer is None:
        return {"model": model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    return {"model": model_sd, "optimizer": optim_sd}


def _rename_optimizer_keys(optim_state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    renamed = {}
    for key, value in optim_state.items():
        kind, _, rest = key.partition(".")
        if rest == old or rest.startswith(old + "."):
            key = f"{kind}.{new}{rest[len(old):]}"
        renamed[key] = value
    return renamed


def load_training_state(ref: CheckpointRef, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        tied_output_copy: bool = False) -> None:
    """Load model (and optimizer, when given) from a DCP checkpoint, resharding as needed.

    `tied_output_copy`: this rank's `output.weight` is a pipeline stage's copy of the tied
    embedding (held by another rank); its optimizer state is read from the embedding's, which
    every checkpoint of a tied model has (only pipeline runs also save the copy's)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = training_state_dict(model, optimizer)
    if tied_output_copy and "optimizer" in state:
        state["optimizer"] = _rename_optimizer_keys(state["optimizer"], "output.weight", "tok_embeddings.weight")
    try:
        dcp.load(state, checkpoint_id=str(ref.path), no_dist=not _distributed())
    except Exception as err:  # DCP raises CheckpointException with every rank's traceback
        first = str(err).strip().splitlines()
        raise EmberError(f"cannot load checkpoint {ref.path}: {first[-1] if first else err}; was it "
                         f"saved for a different model?") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
        return
    if tied_output_copy:
        state["optimizer"] = _rename_optimizer_keys(state["optimizer"], "tok_embeddings.weight", "output.weight")
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options())


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor], from_rank0: bool = False) -> None:
    """Copy full (unsharded) weights into a possibly sharded model: the names in `weights`, and
    the model's other parameters left as they are; names the model does not hold (another
    pipeline stage's) are skipped. The caller checks that every parameter got a value.

    With `from_rank0`, only rank 0 passes the weights (the others pass {}) and each rank receives
    its shards by broadcast, tensor by tensor.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=from_rank0)
    try:
        set_model_state_dict(model, weights, options=options)
    except RuntimeError as err:
        raise EmberError(f"the loaded weights do not fit the model: {str(err).splitlines()[0]}") from None


# --------------------------------------------------------------------------- saving


class Checkpointer:
    """Writes checkpoints under `save_dir`: every rank calls `save` together."""

    def __init__(self, save_dir: str | os.PathLike, keep_last: int | None = None, async_save: bool = False):
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending = None
        self._published = threading.Event()
        self._pending_error: BaseException | None = None
        self._lock = threading.Lock()
        self.last_saved_iteration: int | None = None
        # Async saves run collectives from a background thread: they need a group of their own, or
        # they would interleave with the training step's collectives on the default group.
        self._async_group = dist.new_group(backend="gloo") if async_save and _distributed() else None
        if _rank() == 0 and self.save_dir.is_dir():
            for pattern in (".iter_*.tmp", ".iter_*.old", f".{LATEST}.tmp*"):  # left by a run killed mid-save
                for stale in self.save_dir.glob(pattern):
                    if stale.is_dir():
                        shutil.rmtree(stale, ignore_errors=True)
                    else:
                        stale.unlink(missing_ok=True)

    def save(self, iteration: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
             train_state: dict[str, Any]) -> Path:
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = self.save_dir / iteration_dir_name(iteration)
        if self.last_saved_iteration == iteration:  # e.g. the last iteration was also an interval save
            return final
        tmp = self.save_dir / f".{final.name}.tmp"
        if _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a run that died mid-save
            (tmp / "rng").mkdir(parents=True)
            _write_text_atomic(tmp / TRAIN_STATE, json.dumps(train_state, indent=1, sort_keys=True))
        _barrier()
        torch.save(capture_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        state = training_state_dict(model, optimizer)
        if self.async_save:
            # DCP copies the state to CPU memory before returning, so training may go on.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group,
                                        no_dist=not _distributed())
            self._published.clear()
            if _rank() == 0:
                future.add_done_callback(lambda f: self._finish_async(f, tmp, final, iteration))
            self._pending = future
        else:
            with warnings.catch_warnings():  # DCP warns on every single-process save
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
            # DCP's coordinator (rank 0) writes .metadata after gathering every rank's results, so
            # when save returns on rank 0 all shards are on disk.
            if _rank() == 0:
                self._publish(tmp, final, iteration)
            _barrier()
        self.last_saved_iteration = iteration
        return final

    def _finish_async(self, future, tmp: Path, final: Path, iteration: int) -> None:
        try:
            future.result()
            self._publish(tmp, final, iteration)
        except BaseException as err:  # surfaced by wait() on the training thread
            with self._lock:
                self._pending_error = err
        finally:
            self._published.set()

    def _publish(self, tmp: Path, final: Path, iteration: int) -> None:
        if final.exists():
            # left by an earlier run killed after this rename but before `latest` moved on: replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_text_atomic(self.save_dir / LATEST, final.name + "\n")
        self._prune()

    def _prune(self) -> None:
        if not self.keep_last:
            return
        checkpoints = list_checkpoints(self.save_dir)
        for _, path in checkpoints[: max(0, len(checkpoints) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def wait(self) -> None:
        """Block until a pending async save is complete and published."""
        if self._pending is not None:
            self._pending.result()
            if _rank() == 0:
                # result() can return before the done-callback (the rename) has finished.
                self._published.wait()
            self._pending = None
            _barrier()
        with self._lock:
            error, self._pending_error = self._pending_error, None
        if error is not None:
            raise EmberError(f"saving a checkpoint under {self.save_dir} failed: {error}")


# --------------------------------------------------------------------------- signals


class StopSignal:
    """Remembers SIGTERM (preemption, scancel, torchrun shutting down) so the loop can save and exit.

    `requested()` is a collective when distributed: every rank must agree to stop at the same
    iteration, or the final save would deadlock.
    """

    def __init__(self, enabled: bool = True, group=None):
        self._received = False
        self._group = group
        self._previous = None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._received = True

    def requested(self) -> bool:
        if not _distributed():
            return self._received
        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

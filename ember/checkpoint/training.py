"""Training checkpoints: DCP (sharded, reshardable), atomic, with a `latest` pointer.

Layout under `--save DIR`:

    DIR/latest                  text: the name of the newest complete checkpoint ("iter_0000100")
    DIR/iter_0000100/.metadata  DCP index, written last by DCP's coordinator
    DIR/iter_0000100/*.distcp   model and optimizer shards, one file per rank
    DIR/iter_0000100/train_state.json   iteration, counters, loader and loss-scaler state, config
    DIR/iter_0000100/rng/rank_00000.pt  each rank's RNG states (torch, numpy, python)
    DIR/iter_0000100/checksums.json     size and CRC-32 of every other file, written before the rename

A checkpoint is written to `DIR/.iter_0000100.tmp` and renamed when every rank has finished, then
`latest` is replaced atomically; a crash at any point leaves the previous checkpoint intact.

Corruption does not spread: a checkpoint whose model weights hold NaN or Inf is never written (so it
never becomes `latest` nor prunes older ones under `--keep-last`), and every file is checked against
checksums.json before a load. A damaged checkpoint is named with its bad file; when it was picked as
the newest of a folder (`latest`), the previous good one is taken instead, with a notice.

Loading never runs code from the checkpoint: DCP's `.metadata` pickle is read by an unpickler that
admits only DCP's own metadata classes (`read_dcp_metadata`), and the non-tensor values in the shards
(optimizer hyper-parameters) and the RNG states are read with `torch.load(weights_only=True)`.

Checkpoints are layout-independent: every tensor is stored under the whole model's parameter name
(pipeline stages keep full names), model and optimizer state alike (the optimizer's flattened:
`state.<name>.exp_avg`, `param_groups.<name>.lr`), and DTensor shards (FSDP, tensor and expert
parallelism) are stored as pieces of the global tensor. So a checkpoint saved by one layout (say
TP2 x PP2) loads under any other (TP1 x PP4, DP4, one process): DCP reshards on load.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import threading
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
CHECKSUMS = "checksums.json"
WEIGHTS_MARKER = "ember_model.json"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CorruptCheckpointError(EmberError):
    """A checkpoint file is damaged (checksum, size, unreadable JSON or metadata, NaN weights)."""


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _raise_together(error: str | None, kind: type[EmberError] = EmberError) -> None:
    """Every rank raises the first rank's error, or none does: a rank that failed alone while the
    others went on to the next collective would leave them waiting forever."""
    if _distributed():
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise kind(error)


def _first_failure(err: BaseException) -> BaseException:
    """DCP's CheckpointException (a BaseException) holds each failed rank's exception with its
    traceback: the first of them."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = failures[min(failures)]
        return wrapped[0] if isinstance(wrapped, tuple) else wrapped
    return err


def failure_reason(err: BaseException) -> str:
    """One line for an OSError or a DCP failure."""
    err = _first_failure(err)
    if isinstance(err, EmberError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def _checkpoint_exception() -> type[BaseException]:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


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


def read_rng_state(path: Path) -> dict[str, Any]:
    """A saved RNG state, unpickled with weights_only=True (plain values and tensors only)."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CorruptCheckpointError(f"cannot read {path}: {failure_reason(err)}") from None


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
    # picked as the newest of a save folder (through `latest`), not named by the user: a damaged
    # one may be replaced by the previous good one (`usable_checkpoint`)
    automatic: bool = False

    @property
    def iteration(self) -> int:
        match = _ITER_RE.match(self.path.name)
        return int(match.group(1)) if match else 0

    def train_state(self) -> dict[str, Any]:
        path = self.path / TRAIN_STATE
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            reason = failure_reason(err) if isinstance(err, OSError) else f"not valid JSON, truncated? ({err})"
            raise CorruptCheckpointError(f"cannot read {path}: {reason}") from None
        if not isinstance(state, dict):
            raise CorruptCheckpointError(f"{path}: expected a JSON object, found {type(state).__name__}")
        return state

    def model_args(self) -> ModelArgs:
        """The architecture the checkpoint holds (from ember_model.json or train_state.json)."""
        if self.kind == "weights":
            from ember.checkpoint.weights import read_manifest

            return ModelArgs.from_dict(read_manifest(self.path)["model_args"])
        try:
            return ModelArgs.from_dict(self.train_state()["model_args"])
        except CorruptCheckpointError:
            # the newest checkpoint of a folder with a damaged train_state.json: the run's earlier
            # checkpoints have the same architecture, and loading (`usable_checkpoint`) falls back
            # to one of them with a notice
            previous = previous_checkpoint(self) if self.automatic else None
            if previous is None:
                raise
            return previous.model_args()


def find_checkpoint(load: str | os.PathLike) -> CheckpointRef | None:
    """Resolve `--load`: a save folder (follows `latest`), one `iter_*` folder, or converted weights.

    An `iter_*` folder is complete once it has its final name (it is written under a temporary
    one), so a save folder without `latest` falls back to its newest `iter_*`. Returns None when the
    folder holds no checkpoint yet (a first run with --load == --save).
    """
    path = Path(load)
    if (path / LATEST).is_file():
        try:
            name = (path / LATEST).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = failure_reason(err) if isinstance(err, OSError) else "not UTF-8 text"
            raise EmberError(f"cannot read {path / LATEST} ({reason}); write the name of an iter_* folder "
                             f"into it, or delete it to take the newest iter_* folder") from None
        if not name or Path(name).name != name or name in (".", ".."):
            raise EmberError(f"{path / LATEST} holds {name[:60]!r}, not the name of a checkpoint folder in "
                             f"{path}; write the name of an iter_* folder into it, or delete it")
        target = path / name
        if not (target / ".metadata").is_file():
            raise EmberError(f"{path / LATEST} points at {name}, which is missing or incomplete; "
                             f"point `latest` at an existing iter_* folder")
        return CheckpointRef(target, "training", automatic=True)
    if (path / ".metadata").is_file() and (path / TRAIN_STATE).is_file():
        return CheckpointRef(path, "training")
    if (path / WEIGHTS_MARKER).is_file():
        return CheckpointRef(path, "weights")
    complete = [p for _, p in list_checkpoints(path) if (p / ".metadata").is_file() and (p / TRAIN_STATE).is_file()]
    if complete:  # killed between renaming its first checkpoint and writing `latest`
        return CheckpointRef(complete[-1], "training", automatic=True)
    return None


def previous_checkpoint(ref: CheckpointRef) -> CheckpointRef | None:
    """The newest complete checkpoint saved before `ref` in the same folder."""
    older = [p for i, p in list_checkpoints(ref.path.parent)
             if i < ref.iteration and (p / ".metadata").is_file() and (p / TRAIN_STATE).is_file()]
    return CheckpointRef(older[-1], "training", automatic=ref.automatic) if older else None


def usable_checkpoint(ref: CheckpointRef, notice: Callable[[str], None]) -> CheckpointRef:
    """`ref` once its files are checked (checksums, train_state.json). A damaged checkpoint that was
    picked as the newest of a folder gives way to the previous good one, with a notice; one named
    by the user is an error that names the bad file and suggests the previous one. Distributed,
    every rank calls it (the files are checked in shares)."""
    candidate = ref
    while True:
        try:
            unchecked = verify_checkpoint(candidate)
            candidate.train_state()
        except CorruptCheckpointError as err:
            previous = previous_checkpoint(candidate)
            if not ref.automatic:
                hint = f"; load the previous checkpoint instead: --load {previous.path}" if previous else ""
                raise CorruptCheckpointError(f"{err}{hint}") from None
            if previous is None:
                raise CorruptCheckpointError(f"{err}; no earlier checkpoint in {ref.path.parent} to go back "
                                             f"to") from None
            notice(f"{err}; resuming from the previous checkpoint {previous.path.name} instead")
            candidate = previous
            continue
        if unchecked:
            notice(unchecked)
        return candidate


# --------------------------------------------------------------------------- checksums


def _file_crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)  # releases the GIL: files are summed in parallel threads
    return f"{crc:08x}"


def _hash_in_parallel(paths: list[Path]) -> list[str]:
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_file_crc32, paths))


def write_checksums(folder: Path) -> None:
    """checksums.json: size and CRC-32 of every file of a written checkpoint (CRC-32 catches
    damaged or overwritten bytes and runs at disk speed; it is no defence against a forger, who
    cannot run code through a load anyway)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.name != CHECKSUMS)
    sums = _hash_in_parallel([folder / name for name in names])
    files = {name: {"bytes": (folder / name).stat().st_size, "crc32": crc} for name, crc in zip(names, sums)}
    _write_text_atomic(folder / CHECKSUMS, json.dumps({"algorithm": "crc32", "files": files}, indent=1))


def verify_checkpoint(ref: CheckpointRef) -> str | None:
    """Check every file of a training checkpoint against its checksums.json; raise
    CorruptCheckpointError naming the first bad file. Returns a notice for a checkpoint saved
    before checksums existed. Distributed, every rank calls it and sums a share of the files."""
    listing = ref.path / CHECKSUMS
    if not listing.is_file():
        return f"{ref.path} has no {CHECKSUMS} (saved by an older ember): its files are not checked"
    error = None
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))["files"]
        expected = [(name, int(entry["bytes"]), str(entry["crc32"])) for name, entry in sorted(files.items())]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        expected, error = [], f"cannot read {listing} ({failure_reason(err)})"
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    to_sum = []
    for index, (name, size, crc) in enumerate(expected):
        path = ref.path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            error = error or f"{listing} lists {name!r}, which is outside the checkpoint"
        elif not path.is_file():
            error = error or f"checkpoint file {path} is missing"
        elif path.stat().st_size != size:
            error = error or (f"checkpoint file {path} is damaged: {path.stat().st_size} bytes, "
                              f"{size} when it was saved")
        elif index % world == rank:
            to_sum.append((path, crc))
    if error is None:
        try:
            sums = _hash_in_parallel([path for path, _ in to_sum])
        except OSError as err:
            sums, error = [], f"cannot read checkpoint file {err.filename}: {failure_reason(err)}"
        for (path, crc), found in zip(to_sum, sums):
            if found != crc:
                error = f"checkpoint file {path} is damaged: its checksum differs from the one saved"
                break
    _raise_together(error, CorruptCheckpointError)
    return None


# --------------------------------------------------------------------------- reading DCP files safely

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_METADATA_CLASSES = {
    *((_DCP_METADATA, name) for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                         "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                         "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # megatron-core's torch_dist checkpoints keep the save plans in their metadata too
    *(("torch.distributed.checkpoint.planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType",
                                                                   "TensorWriteData")),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # torch.strided & co. pickle as _get_layout("torch.strided")
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle._Unpickler):  # the Python one: its BUILD can be overridden
    """Admits DCP's metadata dataclasses, torch sizes, dtypes and layouts, paths: nothing callable
    beyond those, so a planted `.metadata` cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES or (
                module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")

    def _build(self) -> None:
        if isinstance(self.stack[-2], type):  # BUILD on a class would rewrite it for the process
            raise pickle.UnpicklingError("the metadata sets attributes of a class")
        pickle._Unpickler.load_build(self)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _build


def read_dcp_metadata(stream, where: str | os.PathLike) -> Any:
    """DCP's `.metadata` (a pickle) read without running code: only its own classes are admitted."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(stream).load()
    except Exception as err:  # noqa: BLE001 - a damaged pickle raises many types
        raise CorruptCheckpointError(f"{where} is not DCP checkpoint metadata ({failure_reason(err)}); "
                                     f"refusing to load it") from None
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
        raise CorruptCheckpointError(f"{where} is not DCP checkpoint metadata; refusing to load it")
    for info in metadata.storage_data.values():
        relative = getattr(info, "relative_path", "")
        if not isinstance(relative, str) or Path(relative).name != relative:
            raise CorruptCheckpointError(f"{where} names a data file outside the checkpoint ({relative!r}); "
                                         f"refusing to load it")
    return metadata


def _safe_reader(path: Path):
    """DCP's file reader, with `.metadata` read by `read_dcp_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata_path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(metadata_path, "rb") as stream:
                metadata = read_dcp_metadata(stream, metadata_path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(path)


def _safe_planner():
    """DCP's default load planner, reading non-tensor values with weights_only=True (DCP's own
    `load_bytes` unpickles them with weights_only=False)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            checked = io.BytesIO()
            torch.save(torch.load(value, weights_only=True), checked)  # only plain values come through
            checked.seek(0)
            super().load_bytes(read_item, checked)

    return SafeLoadPlanner()


def dcp_load(state: dict[str, Any], path: Path, no_dist: bool) -> None:
    """`torch.distributed.checkpoint.load` that never unpickles code (see `read_dcp_metadata`)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), storage_reader=_safe_reader(path), planner=_safe_planner(),
                 no_dist=no_dist)


def weights_finite(model: nn.Module) -> bool:
    """Whether every floating weight of the model is finite, on every rank: one fused max-abs over
    this rank's local shards, then one all-reduce of a flag."""
    tensors = []
    for value in model.state_dict().values():
        local = value.to_local() if hasattr(value, "to_local") else value
        if isinstance(local, torch.Tensor) and local.is_floating_point() and local.numel():
            tensors.append(local.detach())
    device = tensors[0].device if tensors else torch.device("cpu")
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:  # foreach kernels take one device and dtype at a time
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    largest = [norm.float().to(device) for group in groups.values()
               for norm in torch._foreach_norm(group, float("inf"))]
    bad = torch.zeros((), dtype=torch.float32, device=device)
    if largest:
        bad = (~torch.isfinite(torch.stack(largest))).any().float()
    if _distributed():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())


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
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = training_state_dict(model, optimizer)
    if tied_output_copy and "optimizer" in state:
        state["optimizer"] = _rename_optimizer_keys(state["optimizer"], "output.weight", "tok_embeddings.weight")
    try:
        dcp_load(state, ref.path, no_dist=not _distributed())
    except (Exception, _checkpoint_exception()) as err:  # CheckpointException holds every rank's traceback
        if isinstance(_first_failure(err), EmberError):  # the metadata refused
            raise _first_failure(err) from None
        raise EmberError(f"cannot load checkpoint {ref.path}: {failure_reason(err)}; was it saved for a "
                         f"different model?") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        if tied_output_copy:
            state["optimizer"] = _rename_optimizer_keys(state["optimizer"], "tok_embeddings.weight", "output.weight")
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=_options())
    if not weights_finite(model):  # a checkpoint saved before ember refused to write such weights
        raise CorruptCheckpointError(f"the weights in {ref.path} hold NaN or Inf; load an earlier checkpoint")


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
    """Writes checkpoints under `save_dir`: every rank calls `save` together.

    Any failure to write (a full disk, no permission, `--save` naming a file, a DCP error on any
    rank) stops every rank with the same one-line EmberError; the previous checkpoint stays `latest`.
    """

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
        error = None
        if _rank() == 0:  # a --save that cannot be written is found now, not after the first interval
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                self._remove_leftovers()
            except OSError as err:
                error = self._cannot_write(err)
        _raise_together(error)

    def _cannot_write(self, err: BaseException) -> str:
        if self.save_dir.exists() and not self.save_dir.is_dir():
            return f"--save {self.save_dir} is a file, not a folder; give a folder for the checkpoints"
        return f"cannot write checkpoints under {self.save_dir}: {failure_reason(err)}"

    def _remove_leftovers(self) -> None:
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
        if not weights_finite(model):
            # such a checkpoint would become `latest` and, with --keep-last, prune the good ones
            try:
                latest = find_checkpoint(self.save_dir)
            except EmberError:
                latest = None
            kept = f"{latest.path.name} is still the latest" if latest else "no earlier checkpoint exists"
            raise EmberError(f"the model's weights hold NaN or Inf at iteration {iteration}: checkpoint not "
                             f"saved ({kept}). Lower --lr, use --bf16 instead of --fp16, or check the data")
        tmp = self.save_dir / f".{final.name}.tmp"
        error = None
        if _rank() == 0:
            try:
                self.save_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by a run that died mid-save
                (tmp / "rng").mkdir(parents=True)
                _write_text_atomic(tmp / TRAIN_STATE, json.dumps(train_state, indent=1, sort_keys=True))
            except OSError as err:
                error = self._cannot_write(err)
        _raise_together(error)
        try:
            torch.save(capture_rng_state(), tmp / "rng" / f"rank_{_rank():05d}.pt")
        except OSError as err:
            error = self._cannot_write(err)
        _raise_together(error)  # before DCP's collectives, which a failed rank would never join
        state = training_state_dict(model, optimizer)
        try:
            if self.async_save:
                # DCP copies the state to CPU memory before returning, so training may go on.
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group,
                                            no_dist=not _distributed())
            else:
                with warnings.catch_warnings():  # DCP warns on every single-process save
                    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                    dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
        except (Exception, _checkpoint_exception()) as err:  # DCP shares one rank's failure with all
            raise EmberError(self._cannot_write(_first_failure(err))) from None
        if self.async_save:
            self._published.clear()
            if _rank() == 0:
                future.add_done_callback(lambda f: self._finish_async(f, tmp, final, iteration))
            self._pending = future
        else:
            # DCP's coordinator (rank 0) writes .metadata after gathering every rank's results, so
            # when save returns on rank 0 all shards are on disk.
            if _rank() == 0:
                try:
                    self._publish(tmp, final, iteration)
                except OSError as err:
                    error = self._cannot_write(err)
            _raise_together(error)
        self.last_saved_iteration = iteration
        return final

    def save_streamed(self, iteration: int, state: dict[str, Any], produce: Callable[[str], torch.Tensor],
                      order: list[str], train_state: dict[str, Any]) -> Path:
        """Write a checkpoint whose tensors are made one at a time as they are written, so no more
        than one of them need be in memory (an import of a foreign checkpoint, in one process).

        `state` is what `training_state_dict` gives for the model and optimizer, its tensors
        stand-ins of the right shapes and dtypes (a broadcast scalar costs no memory); `produce(fqn)`
        makes the real tensor of each stand-in named in `order` ("model.<name>", "optimizer.state.
        <name>.exp_avg"), called in that order; the other entries are written as they are. The files
        are those of `save`, without RNG states (a resumed run derives its streams from the seed and
        the iteration). `produce` guards what it makes (NaN weights): its EmberError stops the save."""
        import torch.distributed.checkpoint as dcp

        if _distributed():
            raise EmberError("a streamed checkpoint is written by one process, not inside a distributed run")
        final = self.save_dir / iteration_dir_name(iteration)
        tmp = self.save_dir / f".{final.name}.tmp"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            _write_text_atomic(tmp / TRAIN_STATE, json.dumps(train_state, indent=1, sort_keys=True))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(state, storage_writer=_in_order_writer(tmp, order), planner=_producing_planner(produce, order),
                         no_dist=True)
            self._publish(tmp, final, iteration)
        except (Exception, _checkpoint_exception()) as err:  # DCP wraps what the writer raised
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(_first_failure(err), EmberError):
                raise _first_failure(err) from None
            raise EmberError(self._cannot_write(_first_failure(err))) from None
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
        write_checksums(tmp)  # before the rename: a checkpoint under its final name is complete
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
        """Block until a pending async save is complete and published; a failure on any rank
        stops every rank."""
        if self._pending is None:
            return
        error = None
        try:
            self._pending.result()
        except (Exception, _checkpoint_exception()) as err:
            error = self._cannot_write(_first_failure(err))
        if _rank() == 0:
            # result() can return before the done-callback (the rename) has finished.
            self._published.wait()
        self._pending = None
        with self._lock:
            failed, self._pending_error = self._pending_error, None
        if failed is not None and error is None:
            error = self._cannot_write(_first_failure(failed))
        _raise_together(error)


def _producing_planner(produce: Callable[[str], torch.Tensor], order: list[str]):
    """DCP's save planner, taking the tensors named in `order` from `produce` when they are written."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    made = set(order)

    class ProducingPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type != WriteItemType.BYTE_IO and write_item.index.fqn in made:
                return produce(write_item.index.fqn)
            return super().resolve_data(write_item)

    return ProducingPlanner()


def _in_order_writer(folder: Path, order: list[str]):
    """DCP's file writer, one file, whose tensors are written in `order` (the rest after) and let go
    once written. DCP's own keeps every tensor of a file referenced until the file is closed (and,
    with several threads or a GPU, orders them by size), which would hold the whole checkpoint in
    memory; the bytes on disk are the same: each tensor torch.save'd at its offset."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    position = {fqn: number for number, fqn in enumerate(order)}

    class InOrderWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
            items = sorted(plan.items, key=lambda item: (item.type != WriteItemType.BYTE_IO,
                                                         position.get(item.index.fqn, len(position))))
            results = []
            with open(folder / name, "wb") as stream:
                for item in items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        data = data.detach().cpu()
                        if data.untyped_storage().nbytes() != data.nbytes:  # a view saves its whole storage
                            data = data.clone()
                        torch.save(data, stream)
                    del data
                    length = stream.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(name, offset, length)))
                stream.flush()
                os.fsync(stream.fileno())
            future: torch.futures.Future = torch.futures.Future()
            future.set_result(results)
            return future

    return InOrderWriter(folder, thread_count=1)


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

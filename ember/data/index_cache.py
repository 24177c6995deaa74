"""On-disk caches of dataset indices, and which rank builds them.

A cache entry is a few `.npy` arrays plus a `description.json`, all named
`<md5 of the description>-<label>-<name>`, like Megatron's `<hash>-GPTDataset-train-...`: the
description lists everything the arrays depend on (dataset, its sequence lengths, seed, sequence
length, sample count, split), so a changed parameter gives another name and never reuses stale
arrays. Arrays are written under temporary names and renamed; the description, which records each
array's size and checksum, is renamed last, so an entry without one is incomplete.

Reading an entry checks the description, each file's size and `.npy` header, and — on the rank
that builds or checks caches — every file's checksum plus the owner's own structural checks. A
damaged entry is rebuilt by that rank. Other ranks, which only load after the builder has finished,
trust what it checked and read the arrays memory-mapped.

Who builds (`build_on_one_rank_first`): with shared storage, global rank 0 builds every cache
while the other ranks wait on a barrier and then load them; with `shared_storage=False` the first
rank of every node (local rank 0) builds or checks its node's own copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from ember.errors import EmberError

T = TypeVar("T")
_CHUNK = 1 << 22


def description_hash(description: dict) -> str:
    """md5 of the canonical JSON of a description (a name, not a security measure)."""
    text = json.dumps(description, sort_keys=True, indent=1)
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def file_checksum(path: str | os.PathLike) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class IndexCache:
    """One cache directory. `may_build=False` (ranks that wait for the builder) never writes."""

    def __init__(self, directory: str | os.PathLike, *, may_build: bool = True):
        self.directory = Path(directory)
        self.may_build = may_build

    def paths(self, label: str, description: dict, names) -> tuple[Path, dict[str, Path]]:
        base = f"{description_hash(description)}-{label}"
        return (self.directory / f"{base}-description.json",
                {name: self.directory / f"{base}-{name}.npy" for name in names})

    def get_or_build(self, label: str, description: dict, build: Callable[[], dict[str, np.ndarray]],
                     validate: Callable[[dict[str, np.ndarray]], bool] | None = None) -> dict[str, np.ndarray]:
        """The arrays for `description`: loaded when a good entry exists, else built and saved."""
        description_path, _ = self.paths(label, description, [])
        arrays = self.load(label, description, verify=self.may_build)
        if arrays is not None and (validate is None or not self.may_build or validate(arrays)):
            return arrays
        if not self.may_build:
            raise EmberError(
                f"index cache {description_path} is missing or damaged after the building rank "
                f"finished; if the ranks do not share this storage, pass --no-shared-storage, or "
                f"point --data-cache-path at a folder every rank can read")
        arrays = build()
        self.save(label, description, arrays)
        return arrays

    def load(self, label: str, description: dict, *, verify: bool = True) -> dict[str, np.ndarray] | None:
        """The entry's arrays (memory-mapped), or None when absent, stale or damaged."""
        description_path, _ = self.paths(label, description, [])
        try:
            record = json.loads(description_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("description") != json.loads(json.dumps(description)):
            return None
        files = record.get("files")
        if not isinstance(files, dict):
            return None
        _, paths = self.paths(label, description, files)
        arrays = {}
        for name, path in paths.items():
            expected = files[name]
            try:
                if path.stat().st_size != expected["bytes"]:
                    return None
                if verify and file_checksum(path) != expected["checksum"]:
                    return None
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError, KeyError, TypeError):
                return None
            if list(array.shape) != expected["shape"] or str(array.dtype) != expected["dtype"]:
                return None
            arrays[name] = array
        return arrays

    def save(self, label: str, description: dict, arrays: dict[str, np.ndarray]) -> None:
        """Write the arrays, then the description that vouches for them, each atomically."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise EmberError(f"cannot create the index cache folder {self.directory} ({err.strerror}); "
                             f"pass --data-cache-path with a writable folder") from err
        description_path, paths = self.paths(label, description, arrays)
        files = {}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            _atomic_write(paths[name], lambda f, a=array: np.save(f, a, allow_pickle=False))
            files[name] = {"bytes": paths[name].stat().st_size, "checksum": file_checksum(paths[name]),
                           "shape": list(array.shape), "dtype": str(array.dtype)}
        record = {"description": description, "files": files}
        text = json.dumps(record, indent=1).encode("utf-8")
        _atomic_write(description_path, lambda f: f.write(text))


def _atomic_write(path: Path, write: Callable) -> None:
    # Unique per host and process: ranks of several nodes may write the same entry at once.
    temporary = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        if temporary.exists():
            temporary.unlink()
        raise EmberError(f"cannot write the index cache file {path} ({err.strerror}); pass "
                         f"--data-cache-path with a writable folder") from err


def builds_caches(rank: int, local_rank: int, shared_storage: bool) -> bool:
    """Global rank 0 on shared storage; the first rank of each node without it."""
    return rank == 0 if shared_storage else local_rank == 0


def build_on_one_rank_first(construct: Callable[[bool], T], *, rank: int = 0, local_rank: int = 0,
                            world_size: int = 1, shared_storage: bool = True,
                            barrier: Callable[[], None] | None = None) -> T:
    """Run `construct(may_build_caches)` on the building rank(s), wait, then on the others.

    Every rank calls `barrier` exactly once, also when the builder fails (the others then fail
    on the missing cache instead of waiting forever).
    """
    if world_size <= 1:
        return construct(True)
    barrier = barrier or _default_barrier()
    if builds_caches(rank, local_rank, shared_storage):
        try:
            return construct(True)
        finally:
            barrier()
    barrier()
    return construct(False)


def _default_barrier() -> Callable[[], None]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise EmberError("building datasets on several ranks needs torch.distributed initialised "
                         "or a barrier function")
    return dist.barrier

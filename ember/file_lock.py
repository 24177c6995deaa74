"""One process at a time: an exclusive lock file for work that several ranks may start together
(converting a Megatron checkpoint, tokenizing a raw json file), so that one does it and the
others wait, then find it done. Locks of processes on one machine (fcntl); low in the layer order
(just above `ember.errors`), so data and checkpoint code can both use it."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ember.errors import EmberError


@contextmanager
def exclusive(lock_path: Path, what: str, fix: str) -> Iterator[None]:
    """Hold `lock_path` (its folder created if need be) for the duration of the block. A folder
    that cannot be written is a one-line error: "cannot write `what` FOLDER (reason); `fix`"."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")
    except OSError as err:
        raise EmberError(f"cannot write {what} {lock_path.parent} ({err.strerror}); {fix}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""Processes a command starts stop with it: Linux's parent-death signal, asked for in the child.

`ember launch`'s ranks and the torchrun that `ember train --nproc-per-node` starts would otherwise
go on training (and writing checkpoints) as orphans when their parent is killed by SIGKILL or the
OOM killer, which runs no handler that could pass a signal on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask Linux to send this process SIGTERM when the thread that started it ends (SIGKILL, the OOM
    killer), as for any other stop; if `parent_pid` is given and that parent is already gone (it
    died before the request), stop now. Elsewhere, nothing: the parent's own handlers still stop
    its children on an ordinary signal."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)

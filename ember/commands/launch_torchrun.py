"""`ember train --nproc-per-node N`: torchrun as a child process of `ember train`, every rank
running `python -m ember.commands.train --config FILE` on the configuration resolved here.

Unlike `ember launch` (torchelastic inside the launcher, see `launch_node`), this starts the
`torchrun` program itself, so that `ember train` stays one process when it trains alone and a
torchrun started by hand runs exactly what it runs.

The configuration file outlives nothing: a run removes its own file when torchrun ends, and since
an `ember train` killed outright (SIGKILL, the OOM killer) cannot, every start first removes the
files of this host's `ember train` processes that no longer exist. The file's name carries the
host and the pid of its `ember train` for that (`ember-train-<host>-<pid>-*.yaml`).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from ember.commands.child_processes import die_with_parent
from ember.commands.launch_plan import TRAIN_MODULE
from ember.config import Config, to_yaml

CONFIG_PREFIX = "ember-train-"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_rank_configs(folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove the configuration files of this host's `ember train` processes that are gone (in
    `folder`, the temporary folder by default); the paths removed."""
    folder = Path(folder or tempfile.gettempdir())
    owner = re.compile(re.escape(f"{CONFIG_PREFIX}{_host()}-") + r"(\d+)-[^/]*\.yaml")
    removed = []
    for path in folder.glob(f"{CONFIG_PREFIX}*.yaml"):
        found = owner.fullmatch(path.name)
        if found and int(found.group(1)) > 0 and not _process_exists(int(found.group(1))):
            try:
                path.unlink()
                removed.append(path)
            except OSError:  # removed by another start, or not ours to remove
                pass
    return removed


def write_rank_config(config: Config, folder: str | os.PathLike | None = None) -> str:
    """The configuration as YAML in a new file named after this host and process; its path."""
    fd, path = tempfile.mkstemp(prefix=f"{CONFIG_PREFIX}{_host()}-{os.getpid()}-", suffix=".yaml", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(to_yaml(config))
    return path


def run_torchrun(config: Config, args) -> int:
    """Run torchrun with this configuration on `--nproc-per-node` processes; wait for it."""
    remove_stale_rank_configs()
    path = write_rank_config(config)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc_per_node or 1}",
               f"--nnodes={args.nnodes}", f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}",
               f"--master-port={args.master_port}", "-m", TRAIN_MODULE, "--config", path]
    # torchrun stops when this process dies, even by SIGKILL, and takes the ranks with it
    parent = os.getpid()
    process = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(parent))
    # torchrun passes SIGTERM on to the workers, which save a checkpoint and stop.
    previous_term = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal already signals torchrun
    try:
        code = process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)
        os.unlink(path)
    if code != 0:
        print(f"ember train: torchrun exited with status {code}", file=sys.stderr)
    return code

"""One node's part in an `ember launch` job, as a value: how many processes and nodes, which
rendezvous, where logs go, what every rank runs; and the command lines it becomes (torchrun's
flags, the `--dry-run` command, a background `ember launch`).

Every way of describing a launch (the seeds' variables, msrun's positionals, Slurm, Kubeflow)
ends in this one `LaunchPlan`, checked in one place (`check_plan`), so the code that runs,
prints or emits a launch never looks at where the numbers came from.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from ember.errors import EmberError

TRAIN_MODULE = "ember.commands.train"  # what every rank of a training run runs
RANK_SHIM_MODULE = "ember.commands.launch_rank"  # what torchelastic starts: it then runs the plan's module
# How long the nodes wait for each other without --timeout (torchelastic's static rendezvous
# default, stated here so that the launcher can say it and pass it explicitly).
JOIN_TIMEOUT = 600


@dataclass
class LaunchPlan:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    log_dir: str
    max_restarts: int
    join: bool
    timeout: int | None
    module: str
    train_args: list[str]
    # Elastic node counts (`--nnodes MIN:MAX`) need torchelastic's c10d rendezvous, hosted by node 0
    # at MASTER_ADDR:MASTER_PORT; the static one (the seeds' NODE_RANK) needs exactly `nnodes`.
    min_nnodes: int | None = None
    rdzv_backend: str = "static"
    rdzv_id: str = "ember"
    cluster: str | None = None  # "slurm"/"kubeflow" when the scheduler's variables filled the plan

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def join_timeout(self) -> int:
        """Seconds the nodes wait for each other at the rendezvous."""
        return self.timeout or JOIN_TIMEOUT

    @property
    def nnodes_spec(self) -> str:
        """`N`, or `MIN:MAX` for an elastic job (torchrun's --nnodes)."""
        if self.min_nnodes is not None and self.min_nnodes != self.nnodes:
            return f"{self.min_nnodes}:{self.nnodes}"
        return str(self.nnodes)

    def torchrun_flags(self) -> list[str]:
        common = [f"--nproc-per-node={self.nproc_per_node}", f"--max-restarts={self.max_restarts}"]
        if self.rdzv_backend == "c10d":
            # the agent on MASTER_ADDR hosts the rendezvous store (on one machine: the first to start)
            return [f"--nnodes={self.nnodes_spec}", f"--node-rank={self.node_rank}", *common,
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={self.master_addr}:{self.master_port}",
                    f"--rdzv-id={self.rdzv_id}", f"--rdzv-conf=join_timeout={self.join_timeout}"]
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", common[0],
                f"--master-addr={self.master_addr}", f"--master-port={self.master_port}",
                common[1], f"--rdzv-conf=timeout={self.join_timeout}"]

    def worker_args(self) -> list[str]:
        """What every rank runs: the rank shim (`launch_rank`: stderr joined to stdout), then MODULE."""
        return ["-m", RANK_SHIM_MODULE, self.module, *self.train_args]

    def torchrun_argv(self) -> list[str]:
        """The equivalent torchrun command (what `--dry-run` prints)."""
        return [sys.executable, "-m", "torch.distributed.run", *self.torchrun_flags(),
                f"--log-dir={self.log_dir}", "--redirects=3", "--tee=3", "-m", self.module, *self.train_args]

    def launcher_argv(self) -> list[str]:
        """An `ember launch` command line for this plan (to start it again in the background)."""
        argv = [sys.executable, "-m", "ember.cli", "launch", f"--nproc-per-node={self.nproc_per_node}",
                f"--nnodes={self.nnodes_spec}", f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}", f"--log-dir={self.log_dir}",
                f"--max-restarts={self.max_restarts}", f"--module={self.module}"]
        if self.timeout:
            argv.append(f"--timeout={self.timeout}")
        if self.rdzv_backend != "static":
            argv += [f"--rdzv-backend={self.rdzv_backend}", f"--rdzv-id={self.rdzv_id}"]
        return argv + ["--", *self.train_args]


def check_plan(plan: LaunchPlan) -> None:
    """Refuse, in one line, counts torchrun would only trip over later (or not at all)."""
    if plan.nproc_per_node < 1 or plan.nnodes < 1:
        raise EmberError(f"need at least one process and one node (got {plan.nproc_per_node} x {plan.nnodes})")
    if not 0 <= plan.node_rank < plan.nnodes:
        raise EmberError(f"NODE_RANK {plan.node_rank} is outside 0..{plan.nnodes - 1} (NNODES={plan.nnodes})")
    if plan.max_restarts < 0:
        raise EmberError(f"--max-restarts must be >= 0, got {plan.max_restarts}")
    if plan.timeout is not None and plan.timeout <= 0:
        raise EmberError(f"--timeout (the seconds to wait for every node) must be positive, got {plan.timeout}")
    if not 0 < plan.master_port < 65536:
        raise EmberError(f"MASTER_PORT {plan.master_port} is not a TCP port (1..65535); choose one with "
                         f"--master-port (or MASTER_PORT)")


def parse_nnodes(text: str | None, where: str = "--nnodes") -> tuple[int | None, int | None]:
    """`N` -> (N, N); `MIN:MAX` -> (MIN, MAX); None or "" -> (None, None)."""
    if text in (None, ""):
        return None, None
    found = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", str(text))
    if not found:
        raise EmberError(f"{where} {text!r} is not a node count: give N or MIN:MAX (e.g. 2 or 1:4)")
    low, high = int(found.group(1)), int(found.group(2) or found.group(1))
    if not 1 <= low <= high:
        raise EmberError(f"{where} {text!r}: need 1 <= MIN <= MAX")
    return low, high


def env_int(name: str, default: int) -> int:
    """An integer environment variable (the seeds' GPUS_PER_NODE, NODE_RANK, ...), `default` when unset."""
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise EmberError(f"environment variable {name}={value!r} is not an integer") from None


def default_nproc() -> int:
    """Devices on this node: CUDA GPUs, Ascend NPUs, else one CPU process."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
        npu = getattr(torch, "npu", None)
        if npu is not None and npu.is_available():
            return npu.device_count()
    except ImportError:
        pass
    return 1

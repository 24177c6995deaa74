"""What a cluster's scheduler tells `ember launch` about the job, when the seeds' variables
(NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE) do not.

- Slurm (`srun` with one task per node, see examples/slurm/): the agent's rank is SLURM_PROCID
  among SLURM_STEP_NUM_TASKS (with --ntasks-per-node=1 these are SLURM_NODEID and SLURM_NNODES;
  several tasks on one machine then act as several nodes, each with its own devices), the
  master is the first host of the step's node list (`node[01-03,07]` -> node01), and the port is
  derived from the job id so that two jobs sharing a node do not collide.
- Kubeflow's PyTorchJob (and torchrun's own convention): PET_NNODES, PET_NODE_RANK,
  PET_NPROC_PER_NODE; the operator sets MASTER_ADDR and MASTER_PORT itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ember.errors import EmberError

SLURM_PORT_BASE = 10000  # MASTER_PORT under Slurm: SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN
SLURM_PORT_SPAN = 50000


@dataclass(frozen=True)
class ClusterJob:
    """Defaults for a launch plan from the scheduler (None: it does not say)."""
    source: str  # "slurm" or "kubeflow"
    nnodes: int | None = None
    min_nnodes: int | None = None  # an elastic job's least node count
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    nproc_per_node: int | None = None


def expand_hostlist(text: str) -> list[str]:
    """Slurm's host list syntax, as `scontrol show hostnames` expands it:
    `node[01-03,07],gpu5` -> node01 node02 node03 node07 gpu5; several bracket groups in one name
    (`rack[1-2]-n[1-2]`) expand as a product; zero padding is kept from the range's start."""
    hosts: list[str] = []
    for item in _split_top_level(text.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            names = [name + literal for name in names]
            if ranges:
                names = [name + number for name in names for number in _expand_ranges(ranges, text)]
        hosts.extend(names)
    if not hosts or any(not host for host in hosts):
        raise EmberError(f"cannot read the Slurm host list {text!r}; expected names like node[01-03,07],gpu5")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise EmberError(f"cannot read the Slurm host list {text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise EmberError(f"cannot read the Slurm host list {text!r}: unbalanced brackets")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_ranges(ranges: str, text: str) -> list[str]:
    numbers = []
    for part in ranges.split(","):
        found = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not found or (found.group(2) and int(found.group(2)) < int(found.group(1))):
            raise EmberError(f"cannot read the Slurm host list {text!r}: bad range [{ranges}]")
        low, high = found.group(1), found.group(2) or found.group(1)
        numbers.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
    return numbers


def slurm_hosts(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list: `scontrol show hostnames` where Slurm is installed (the
    authority), else `expand_hostlist`."""
    if shutil.which("scontrol"):
        try:
            done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                  timeout=10, check=False)
            if done.returncode == 0 and done.stdout.split():
                return done.stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_hostlist(nodelist)


def _int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise EmberError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_step_tasks(environ: Mapping[str, str] = os.environ) -> int | None:
    """Tasks of the `srun` step this process belongs to (None outside a step)."""
    if not environ.get("SLURM_JOB_ID") or environ.get("SLURM_STEP_ID", "") == "":
        return None
    return _int(environ, "SLURM_STEP_NUM_TASKS") or _int(environ, "SLURM_NTASKS") or 1


def slurm_batch_nodes(environ: Mapping[str, str] = os.environ) -> int | None:
    """Nodes of the Slurm allocation when this is its batch script (not a task of `srun`)."""
    if not environ.get("SLURM_JOB_ID") or slurm_step_tasks(environ) is not None:
        return None
    return _int(environ, "SLURM_NNODES") or 1


def slurm_job(environ: Mapping[str, str] = os.environ) -> ClusterJob | None:
    """The rendezvous of a Slurm step, or None outside one (the batch script itself runs on the
    allocation's first node only, with no per-node rank to read)."""
    tasks = slurm_step_tasks(environ)
    if tasks is None:
        return None
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    master = slurm_hosts(nodelist)[0] if nodelist else None
    job = _int(environ, "SLURM_JOB_ID") or 0
    return ClusterJob("slurm", nnodes=tasks, node_rank=_int(environ, "SLURM_PROCID") or 0, master_addr=master,
                      master_port=SLURM_PORT_BASE + job % SLURM_PORT_SPAN)


def kubeflow_job(environ: Mapping[str, str] = os.environ) -> ClusterJob | None:
    """torchrun's PET_* variables, which Kubeflow's PyTorchJob sets on every pod (with an
    elasticPolicy, PET_NNODES is MIN:MAX and the rendezvous is PET_RDZV_ENDPOINT, worker 0)."""
    if not any(environ.get(name) for name in ("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE")):
        return None
    nnodes = environ.get("PET_NNODES", "")
    host, _, port = environ.get("PET_RDZV_ENDPOINT", "").rpartition(":")
    return ClusterJob("kubeflow", nnodes=_int({"PET_NNODES": nnodes.split(":")[-1]}, "PET_NNODES"),
                      node_rank=_int(environ, "PET_NODE_RANK"), nproc_per_node=_int(environ, "PET_NPROC_PER_NODE"),
                      master_addr=host or None, master_port=int(port) if port.isdigit() else None,
                      min_nnodes=_int({"PET_NNODES": nnodes.split(":")[0]}, "PET_NNODES"))


def cluster_job(environ: Mapping[str, str] = os.environ) -> ClusterJob | None:
    """The scheduler's view of this job: Slurm, else Kubeflow/torchrun's PET_* variables."""
    return slurm_job(environ) or kubeflow_job(environ)

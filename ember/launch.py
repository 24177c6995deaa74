"""`ember launch`: the seeds' launch conventions on top of torchrun (c10d).

Megatron / ModelLink / PAI scripts set, at the top:

    GPUS_PER_NODE=8 MASTER_ADDR=localhost MASTER_PORT=6000 NNODES=1 NODE_RANK=0
    WORLD_SIZE=$(($GPUS_PER_NODE * $NNODES))

`ember launch -- TRAIN_ARGS` reads those variables (flags override them), derives WORLD_SIZE and
runs `torchrun ... -m ember.train TRAIN_ARGS` on this node, with per-rank logs under `--log-dir`
(default `logs/`). Run the same command on every node with its own NODE_RANK. NCCL_*/HCCL_*
variables pass through to every rank untouched; the trainer picks the backend (NCCL on GPUs,
HCCL with torch_npu, gloo on CPU).

MindFormers' `msrun_launcher.sh` positional form is accepted too:

    ember launch --msrun "run_mindformer.py --config CFG --run_mode train" \\
        WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN TIMEOUT]
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError

PASS_THROUGH_PREFIXES = ("NCCL_", "HCCL_", "GLOO_", "TORCH_", "CUDA_", "ASCEND_")


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

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def torchrun_argv(self) -> list[str]:
        argv = [sys.executable, "-m", "torch.distributed.run",
                f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                f"--nproc-per-node={self.nproc_per_node}",
                f"--master-addr={self.master_addr}", f"--master-port={self.master_port}",
                f"--max-restarts={self.max_restarts}",
                f"--log-dir={self.log_dir}", "--redirects=3", "--tee=3"]
        if self.timeout:
            argv.append(f"--rdzv-conf=timeout={self.timeout}")
        return argv + ["-m", self.module, *self.train_args]


def _env_int(name: str, default: int) -> int:
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


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise EmberError(f"expected True or False, got {text!r}")


def plan_from_msrun(command: str, positional: list[str], module: str, max_restarts: int) -> LaunchPlan:
    """msrun_launcher.sh "CMD" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN TIMEOUT."""
    if not positional:
        raise EmberError('--msrun needs at least WORKER_NUM after the command, e.g. --msrun "run_mindformer.py ..." 8')
    try:
        worker_num = int(positional[0])
        local_worker = int(positional[1]) if len(positional) > 1 else worker_num
        master_addr = positional[2] if len(positional) > 2 else "127.0.0.1"
        master_port = int(positional[3]) if len(positional) > 3 else 8118
        node_rank = int(positional[4]) if len(positional) > 4 else 0
    except ValueError as err:
        raise EmberError(f"msrun arguments: {err}; expected WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT "
                         f"NODE_RANK LOG_DIR JOIN TIMEOUT") from None
    log_dir = positional[5] if len(positional) > 5 else "output/msrun_log"
    join = _bool(positional[6]) if len(positional) > 6 else True
    timeout = int(positional[7]) if len(positional) > 7 else None
    if worker_num % local_worker:
        raise EmberError(f"msrun: WORKER_NUM {worker_num} is not a multiple of LOCAL_WORKER {local_worker}")
    words = shlex.split(command)
    if words and words[0].endswith(".py"):  # run_mindformer.py: ember's trainer reads the same flags
        words = words[1:]
    return LaunchPlan(local_worker, worker_num // local_worker, node_rank, master_addr, master_port,
                      log_dir, max_restarts, join, timeout, module, words)


def add_arguments(parser) -> None:
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes on this node (default: $GPUS_PER_NODE, else the device count, else 1)")
    parser.add_argument("--nnodes", type=int, default=None, help="nodes (default: $NNODES or 1)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: $NODE_RANK or 0)")
    parser.add_argument("--master-addr", default=None, help="main node's address (default: $MASTER_ADDR or localhost)")
    parser.add_argument("--master-port", type=int, default=None, help="main node's port (default: $MASTER_PORT or 6000)")
    parser.add_argument("--log-dir", default="logs", help="per-rank stdout/stderr files go here")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart failed ranks this many times; training resumes from the last checkpoint")
    parser.add_argument("--timeout", type=int, default=None, help="seconds to wait for every node to join")
    parser.add_argument("--module", default="ember.train", help="python module each rank runs")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command instead of running it")
    parser.add_argument("--msrun", metavar="COMMAND", default=None,
                        help='MindFormers style: --msrun "run_mindformer.py ARGS" WORKER_NUM [LOCAL_WORKER ...]')
    parser.add_argument("args", nargs="*", help="arguments for every rank (after --), or the msrun positionals")


def plan_from_args(args) -> LaunchPlan:
    if args.msrun is not None:
        return plan_from_msrun(args.msrun, args.args, args.module, args.max_restarts)
    nproc = args.nproc_per_node or _env_int("GPUS_PER_NODE", 0) or default_nproc()
    plan = LaunchPlan(
        nproc_per_node=nproc,
        nnodes=args.nnodes or _env_int("NNODES", 1),
        node_rank=args.node_rank if args.node_rank is not None else _env_int("NODE_RANK", 0),
        master_addr=args.master_addr or os.environ.get("MASTER_ADDR") or "localhost",
        master_port=args.master_port or _env_int("MASTER_PORT", 6000),
        log_dir=args.log_dir, max_restarts=args.max_restarts, join=True, timeout=args.timeout,
        module=args.module, train_args=list(args.args))
    if not 0 <= plan.node_rank < plan.nnodes:
        raise EmberError(f"NODE_RANK {plan.node_rank} is outside 0..{plan.nnodes - 1} (NNODES={plan.nnodes})")
    if plan.nnodes > 1 and plan.master_addr in ("localhost", "127.0.0.1") and plan.node_rank == 0:
        print("ember launch: note: MASTER_ADDR is localhost with NNODES > 1; other nodes must reach this node "
              "by its address", file=sys.stderr)
    return plan


def run(args) -> int:
    plan = plan_from_args(args)
    argv = plan.torchrun_argv()
    passed = sorted(k for k in os.environ if k.startswith(PASS_THROUGH_PREFIXES))
    print(f"ember launch: node {plan.node_rank}/{plan.nnodes}, {plan.nproc_per_node} process(es) here, "
          f"world size {plan.world_size}, master {plan.master_addr}:{plan.master_port}, logs in {plan.log_dir}/"
          + (f", passing {', '.join(passed)}" if passed else ""), file=sys.stderr)
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, WORLD_SIZE=str(plan.world_size))
    if not plan.join:  # msrun JOIN=False: start in the background and return, like msrun does
        with open(Path(plan.log_dir) / f"launcher_node{plan.node_rank}.log", "ab") as log:
            process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        print(f"ember launch: started in the background (pid {process.pid}); follow {plan.log_dir}/", file=sys.stderr)
        return 0
    return subprocess.call(argv, env=env)

"""`ember launch`: the seeds' launch conventions on top of torchrun (PyTorch elastic).

Megatron / ModelLink / PAI scripts set, at the top:

    GPUS_PER_NODE=8 MASTER_ADDR=localhost MASTER_PORT=6000 NNODES=1 NODE_RANK=0
    WORLD_SIZE=$(($GPUS_PER_NODE * $NNODES))

`ember launch -- TRAIN_ARGS` reads those variables (flags override them), derives WORLD_SIZE, checks
the whole training configuration for this world size, and only then starts the ranks of this node
(as torchrun does, in this process: `--dry-run` prints the equivalent torchrun command). Run the
same command on every node with its own NODE_RANK. NCCL_*/HCCL_* variables pass through to every
rank untouched; the trainer picks the backend (NCCL on GPUs, HCCL with torch_npu, gloo on CPU).

Each rank's output (stdout and stderr together) goes to `LOG_DIR/worker_<rank>.log` and, prefixed
with its rank, to this console; a restarted rank writes `worker_<rank>.restart<n>.log`. With
`--max-restarts N` a failed rank makes every rank of the node restart (up to N times); the
trainer then resumes from the newest checkpoint under `--save` by itself.

MindFormers' `msrun_launcher.sh` positional form is accepted too:

    ember launch --msrun "run_mindformer.py --config CFG --run_mode train" \\
        WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN TIMEOUT]

On clusters, what the seeds' variables leave out comes from the scheduler (`cluster_env`): under
Slurm (`srun --ntasks-per-node=1 ember launch ...`, see examples/slurm/) the task's SLURM_PROCID
is the node rank, the step's tasks the node count, its first host the master; in a Kubeflow
PyTorchJob the operator's PET_* variables. `--emit k8s|pytorchjob` prints Kubernetes manifests for
the launch instead of running it. `--nnodes MIN:MAX` (or `--rdzv-backend c10d`) uses torchelastic's
c10d rendezvous, which a lost node can rejoin (docs/launching.md, "When a node is lost").

With EMBER_TINY=1 (see `ember.compat.tiny`) the node count, process count and master address come from
the layout instead: one machine, TP x PP x CP x the least data parallelism, CPU processes.

Before any rank starts, the launcher checks that MASTER_ADDR resolves and, on node 0, that
MASTER_PORT is free; with several nodes it says how long it waits for them (`--timeout`, default
600 s). Rendezvous failures, and a failed run, end in one line (a failed run's names the first
failed rank's own error). The ranks never outlive the launcher: SIGTERM, SIGINT and SIGHUP are
passed on to them (SIGTERM lets them save a checkpoint and stop), and if the launcher dies without
a word (SIGKILL, OOM killer) the kernel sends every rank SIGTERM (Linux parent-death signal).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ember.commands.child_processes import die_with_parent
from ember.commands.cluster_env import cluster_job, slurm_batch_nodes, slurm_step_tasks
from ember.errors import EmberError

PASS_THROUGH_PREFIXES = ("NCCL_", "HCCL_", "GLOO_", "TORCH_", "CUDA_", "ASCEND_")
TRAIN_MODULE = "ember.commands.train"  # what every rank of a training run runs
# How long the nodes wait for each other without --timeout (torchelastic's static rendezvous
# default, stated here so that the launcher can say it and pass it explicitly).
JOIN_TIMEOUT = 600
# Set by the launcher for its ranks: the pid a rank's parent must have (see `_die_with_launcher`).
LAUNCHER_PID_VARIABLE = "EMBER_LAUNCHER_PID"


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
        """What every rank runs: this module as a shim that joins stderr to stdout, then MODULE."""
        return ["-m", "ember.commands.launch", self.module, *self.train_args]

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
    """MindFormers' scripts/msrun_launcher.sh "CMD" [ARGS], every form it takes (H3, issue 16):

        (none)                       8 workers on this node
        WORKER_NUM                   WORKER_NUM workers on this node
        WORKER_NUM MASTER_PORT LOG_DIR JOIN TIMEOUT                               one node
        WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK LOG_DIR JOIN TIMEOUT   nodes

    Defaults are the script's (port 8118, output/msrun_log plus _$MF_LOG_SUFFIX, timeout 7200 s),
    except JOIN: its short forms start msrun with join=False (return at once); ember stays in the
    foreground there (say JOIN False in the longer forms to return at once). Other argument counts
    are read as the first ones of the 9-argument form. With WORKER_NUM equal to LOCAL_WORKER the
    job runs on this node alone, as the script does (MASTER_ADDR and NODE_RANK unused)."""
    count = len(positional)
    try:
        worker_num = int(positional[0]) if positional else 8
        if count == 5:  # the single-machine form: WORKER_NUM MASTER_PORT LOG_DIR JOIN TIMEOUT
            local_worker, master_addr, node_rank = worker_num, "127.0.0.1", 0
            master_port, log_dir, join, timeout = int(positional[1]), positional[2], _bool(positional[3]), \
                int(positional[4])
        else:
            local_worker = int(positional[1]) if count > 1 else worker_num
            master_addr = positional[2] if count > 2 else "127.0.0.1"
            master_port = int(positional[3]) if count > 3 else 8118
            node_rank = int(positional[4]) if count > 4 else 0
            log_dir = positional[5] if count > 5 else "output/msrun_log"
            join = _bool(positional[6]) if count > 6 else True
            timeout = int(positional[7]) if count > 7 else 7200
    except ValueError as err:
        raise EmberError(f"msrun arguments: {err}; expected WORKER_NUM [LOCAL_WORKER MASTER_ADDR MASTER_PORT "
                         f"NODE_RANK LOG_DIR JOIN TIMEOUT] or WORKER_NUM MASTER_PORT LOG_DIR JOIN TIMEOUT") from None
    if count > 8:
        raise EmberError(f"msrun: {count} arguments after the command; msrun_launcher.sh takes at most 8")
    suffix = os.environ.get("MF_LOG_SUFFIX", "")
    log_dir += f"_{suffix}" if suffix else ""
    if worker_num < 1 or local_worker < 1 or worker_num % local_worker:
        raise EmberError(f"msrun: WORKER_NUM {worker_num} is not a multiple of LOCAL_WORKER {local_worker}")
    if worker_num == local_worker:  # one node: msrun_launcher.sh passes no address or node rank
        master_addr, node_rank = "127.0.0.1", 0
    if count in (0, 1):
        print(f"ember launch: msrun_launcher.sh with {count + 1} argument(s) runs msrun with join=False (returns at "
              f"once); ember stays in the foreground (the 6- and 9-argument forms take JOIN)", file=sys.stderr)
    words = shlex.split(command)
    if words and words[0].endswith(".py"):  # run_mindformer.py: ember's trainer reads the same flags
        words = words[1:]
    plan = LaunchPlan(local_worker, worker_num // local_worker, node_rank, master_addr, master_port,
                      log_dir, max_restarts, join, timeout, module, words)
    _check_node_rank(plan)
    return plan


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes on this node (default: $GPUS_PER_NODE, else the device count, else 1)")
    parser.add_argument("--nnodes", default=None, metavar="N|MIN:MAX",
                        help="nodes (default: $NNODES, else Slurm's tasks or $PET_NNODES, else 1); MIN:MAX lets "
                             "the job go on with fewer nodes (elastic, c10d rendezvous)")
    parser.add_argument("--node-rank", "--node_rank", type=int, default=None,
                        help="this node's rank (default: $NODE_RANK, else $SLURM_PROCID or $PET_NODE_RANK, else 0)")
    parser.add_argument("--master-addr", "--master_addr", default=None,
                        help="main node's address (default: $MASTER_ADDR, else Slurm's first node, else localhost)")
    parser.add_argument("--master-port", "--master_port", type=int, default=None,
                        help="main node's port (default: $MASTER_PORT, else 10000 + Slurm job id %% 50000, else 6000)")
    parser.add_argument("--log-dir", default="logs", help="per-rank logs go here (worker_<rank>.log)")
    # torchrun's spelling, as upstream scripts' $DISTRIBUTED_ARGS pass it (issue 16 drop-in, H2):
    # `torchrun $DISTRIBUTED_ARGS pretrain_gpt.py ...` -> `ember launch $DISTRIBUTED_ARGS -- ...`.
    # It is the script's layout, which EMBER_TINY shrinks like $GPUS_PER_NODE.
    parser.add_argument("--nproc_per_node", dest="script_nproc_per_node", type=int, default=None,
                        help="torchrun's spelling of --nproc-per-node (EMBER_TINY sizes the run itself)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart failed ranks this many times; training resumes from the last checkpoint")
    parser.add_argument("--timeout", type=int, default=None, help="seconds to wait for every node to join")
    parser.add_argument("--module", default=TRAIN_MODULE, help="python module each rank runs")
    # clusters (elastic rendezvous, Kubernetes manifests)
    parser.add_argument("--rdzv-backend", choices=("static", "c10d"), default=None,
                        help="static: fixed NNODES and NODE_RANKs (default); c10d: node 0 hosts an elastic "
                             "rendezvous, ranks are assigned as nodes join (the default with --nnodes MIN:MAX)")
    parser.add_argument("--rdzv-id", default=None,
                        help="job id for the c10d rendezvous, the same on every node (default: $SLURM_JOB_ID or ember)")
    parser.add_argument("--emit", choices=("k8s", "pytorchjob"), default=None,
                        help="print Kubernetes manifests for this launch instead of running: k8s = a headless "
                             "Service and an Indexed Job; pytorchjob = a Kubeflow PyTorchJob")
    parser.add_argument("--image", default="ember:latest", help="--emit: the container image with ember installed")
    parser.add_argument("--job-name", default="ember-train", help="--emit: the Kubernetes name of the job")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the configuration and print the equivalent torchrun command instead of running")
    parser.add_argument("--msrun", metavar="COMMAND", default=None,
                        help='MindFormers style: --msrun "run_mindformer.py ARGS" WORKER_NUM [LOCAL_WORKER ...]')
    parser.add_argument("args", nargs="*", help="arguments for every rank (after --), or the msrun positionals")


def _check_node_rank(plan: LaunchPlan) -> None:
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


def plan_from_args(args) -> LaunchPlan:
    if args.msrun is not None:
        return plan_from_msrun(args.msrun, args.args, args.module, args.max_restarts)
    min_nnodes, nnodes = parse_nnodes(args.nnodes) if args.nnodes else parse_nnodes(os.environ.get("NNODES"), "NNODES")
    node_rank = args.node_rank if args.node_rank is not None else _env_int("NODE_RANK", -1)
    master_addr = args.master_addr or os.environ.get("MASTER_ADDR")
    # the seeds' variables first; what Slurm or Kubeflow say fills in the rest
    cluster = cluster_job() if nnodes is None or node_rank < 0 or not master_addr else None
    if cluster is None and nnodes is None and (slurm_batch_nodes() or 1) > 1:
        raise EmberError(f"ember launch runs in the batch script of a {slurm_batch_nodes()}-node Slurm job, on one "
                         f"node only; start it on every node with `srun --ntasks-per-node=1 ember launch ...` "
                         f"(see examples/slurm/), or set NNODES and NODE_RANK")
    if cluster and nnodes is not None and cluster.nnodes and node_rank < 0 and cluster.nnodes != nnodes:
        raise EmberError(f"NNODES={nnodes} but {cluster.source} started {cluster.nnodes} launcher task(s); run one "
                         f"`ember launch` per node (srun --ntasks-per-node=1) or set NNODES to match")
    from_cluster = cluster
    nproc = (args.nproc_per_node or getattr(args, "script_nproc_per_node", None) or _env_int("GPUS_PER_NODE", 0)
             or (from_cluster and from_cluster.nproc_per_node)
             or default_nproc())
    if nnodes is None:
        nnodes = (from_cluster and from_cluster.nnodes) or 1
        min_nnodes = (from_cluster and from_cluster.min_nnodes) or nnodes
    if node_rank < 0:
        node_rank = (from_cluster.node_rank if from_cluster and from_cluster.node_rank is not None else 0)
    rdzv_backend = args.rdzv_backend or ("c10d" if min_nnodes != nnodes else "static")
    if rdzv_backend == "static" and min_nnodes != nnodes:
        raise EmberError(f"--nnodes {min_nnodes}:{nnodes} (elastic) needs the c10d rendezvous; drop "
                         f"--rdzv-backend static")
    plan = LaunchPlan(
        nproc_per_node=nproc, nnodes=nnodes, node_rank=node_rank,
        master_addr=master_addr or (from_cluster and from_cluster.master_addr) or "localhost",
        master_port=(args.master_port or _env_int("MASTER_PORT", 0) or (from_cluster and from_cluster.master_port)
                     or 6000),
        log_dir=args.log_dir, max_restarts=args.max_restarts, join=True, timeout=args.timeout,
        module=args.module, train_args=list(args.args), min_nnodes=min_nnodes, rdzv_backend=rdzv_backend,
        rdzv_id=args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "ember",
        cluster=from_cluster.source if from_cluster else None)
    _check_node_rank(plan)
    emitting = getattr(args, "emit", None)  # the manifests set MASTER_ADDR themselves
    if plan.nnodes > 1 and plan.master_addr in ("localhost", "127.0.0.1") and plan.node_rank == 0 and not emitting:
        print("ember launch: note: MASTER_ADDR is localhost with NNODES > 1; other nodes must reach this node "
              "by its address", file=sys.stderr)
    return plan


# --------------------------------------------------------------------------- checking before spawning


def training_config(train_args: list[str], prepare_data: bool = True):
    """(Config, parsed arguments) of `ember train TRAIN_ARGS`, as every rank will resolve them
    (`prepare_data`: json training files tokenized into their cache, see `resolve_config`)."""
    from ember.commands.train import add_arguments as add_train_arguments
    from ember.commands.train import resolve_config

    parser = argparse.ArgumentParser(prog="ember launch -- (ember train arguments)")
    add_train_arguments(parser)
    args = parser.parse_intermixed_args(train_args)
    return resolve_config(args, prepare_data=prepare_data), args


def _tiny_plan(plan: LaunchPlan, world: int) -> LaunchPlan:
    """EMBER_TINY: the tiny layout's `world` CPU processes on this machine, or, in a Slurm step of
    several tasks (the Slurm examples run tiny), shared among the tasks as its nodes."""
    tasks = slurm_step_tasks()
    if not tasks or tasks == 1 or plan.nnodes == 1:
        return replace(plan, nproc_per_node=world, nnodes=1, min_nnodes=None, node_rank=0, master_addr="127.0.0.1")
    if plan.nnodes != tasks or world % tasks:
        raise EmberError(f"EMBER_TINY under Slurm: the tiny layout's {world} processes cannot be shared by "
                         f"{tasks} tasks as {plan.nnodes} node(s); run {world} // k tasks for a k dividing {world}")
    return replace(plan, nproc_per_node=world // tasks)


def check_training(plan: LaunchPlan, explicit_nproc: int | None = None) -> LaunchPlan:
    """Resolve and validate the training configuration for this world size (errors surface here,
    once, instead of on every rank). Under EMBER_TINY the plan is sized to the tiny layout on this
    machine, unless `explicit_nproc` (an --nproc-per-node flag) says otherwise."""
    from ember.compat import tiny
    from ember.config import validate

    config, args = training_config(plan.train_args)
    if getattr(args, "run_mode", None) == "predict":  # generation runs in one process
        return replace(plan, nproc_per_node=1, nnodes=1, node_rank=0)
    if tiny.enabled() and not explicit_nproc:
        plan = _tiny_plan(plan, tiny.world_size(config))
        p = config.parallel
        print(f"ember launch: EMBER_TINY: {config.model.name}, {plan.nproc_per_node} CPU process(es) "
              f"(tp {p.tensor_model_parallel_size}, pp {p.pipeline_model_parallel_size}, "
              f"ep {p.expert_model_parallel_size}, cp {p.context_parallel_size})", file=sys.stderr)
    for nnodes in range(plan.min_nnodes or plan.nnodes, plan.nnodes):  # an elastic job's smaller sizes
        try:
            validate(config, plan.nproc_per_node * nnodes)
        except EmberError as err:
            raise EmberError(f"--nnodes {plan.nnodes_spec}: with {nnodes} node(s): {err}") from None
    resolved = validate(config, plan.world_size)
    from ember.commands.preflight import check_before_starting

    check_before_starting(resolved, plan.world_size)
    return plan


# --------------------------------------------------------------------------- running


def _worker_logs(log_dir: str):
    """torchelastic LogsSpecs writing LOG_DIR/worker_<global rank>[.restart<n>].log."""
    from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs, Std

    class WorkerLogs(LogsSpecs):
        def __init__(self) -> None:
            super().__init__(log_dir, redirects=Std.OUT, tee=Std.OUT)

        @property
        def root_log_dir(self) -> str:
            return str(self._root_log_dir)

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            os.makedirs(log_dir, exist_ok=True)
            stdouts, stderrs, errors = {}, {}, {}
            for local_rank, env in envs.items():
                rank = env.get("RANK", str(local_rank))
                attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
                name = f"worker_{rank}.log" if attempt == 0 else f"worker_{rank}.restart{attempt}.log"
                stdouts[local_rank] = os.path.join(log_dir, name)
                stderrs[local_rank] = ""  # the worker shim sends stderr into stdout
                errors[local_rank] = os.path.join(log_dir, f".worker_{rank}.error.json")
                env["TORCHELASTIC_ERROR_FILE"] = errors[local_rank]
            return LogsDest(stdouts, stderrs, dict(stdouts), {}, errors)

    return WorkerLogs()


def check_master(plan: LaunchPlan) -> None:
    """Refuse, in one line, a MASTER_ADDR that does not resolve (torchelastic would retry it until
    the join timeout) and, on node 0, a MASTER_PORT something else already listens on."""
    try:
        socket.getaddrinfo(plan.master_addr, plan.master_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        reason = err.strerror if isinstance(err, socket.gaierror) else str(err)
        raise EmberError(f"MASTER_ADDR {plan.master_addr!r} does not resolve ({reason}); set --master-addr "
                         f"(or MASTER_ADDR) to node 0's host name or IP address") from None
    if plan.node_rank != 0:
        return
    # node 0 serves the rendezvous on every interface, as torchelastic's TCPStore does
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does
        try:
            probe.bind(("", plan.master_port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                raise EmberError(_port_in_use(plan, err.strerror)) from None
            raise


def wait_for_master(plan: LaunchPlan) -> None:
    """On nodes other than 0: wait (up to the join timeout) until node 0 accepts connections on
    MASTER_PORT. torchelastic's own client would retry too, but logs a C++ stack trace for each try."""
    import time

    deadline = time.monotonic() + plan.join_timeout
    while True:
        try:
            with socket.create_connection((plan.master_addr, plan.master_port), timeout=2):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise EmberError(_unreachable(plan)) from None
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))


def _unreachable(plan: LaunchPlan) -> str:
    return (f"could not reach node 0 at {plan.master_addr}:{plan.master_port} within {plan.join_timeout} s; start "
            f"node 0 (NODE_RANK 0) with the same MASTER_PORT, check MASTER_ADDR and the firewall, or give it "
            f"longer with --timeout")


def _port_in_use(plan: LaunchPlan, reason: str) -> str:
    return (f"MASTER_PORT {plan.master_port} cannot be used on this node ({reason}; another job?); choose a "
            f"free port with --master-port (or MASTER_PORT), the same on every node")


def _rendezvous_error(plan: LaunchPlan, err: Exception) -> EmberError:
    """One line for a failed rendezvous (torchelastic raises DistNetworkError/DistStoreError)."""
    text = str(err).strip()
    where = f"{plan.master_addr}:{plan.master_port}"
    if "EADDRINUSE" in text or "address already in use" in text:
        return EmberError(_port_in_use(plan, "address already in use"))
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    if joined:
        return EmberError(f"only {joined.group(1)} of {joined.group(2)} nodes joined at {where} within "
                          f"{plan.join_timeout} s; start `ember launch` with NODE_RANK 1..{plan.nnodes - 1} on the "
                          f"other nodes (same MASTER_ADDR and MASTER_PORT), or give them longer with --timeout")
    if "timed out" in text.lower() or "connect" in text.lower():
        return EmberError(_unreachable(plan))
    last = text.splitlines()[-1] if text else type(err).__name__
    return EmberError(f"rendezvous at {where} failed: {last}")


def _rank_error(log_dir: str, rank: int) -> str | None:
    """The one-line reason in a failed rank's newest log: its `ember ...: error:` line, else the
    last line of its traceback."""
    logs = sorted(Path(log_dir).glob(f"worker_{rank}*.log"), key=lambda path: path.stat().st_mtime)
    if not logs:
        return None
    with open(logs[-1], "rb") as log:  # the end is enough, and a long run's log is long
        log.seek(max(log.seek(0, os.SEEK_END) - 64 * 1024, 0))
        tail = log.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for line in reversed(lines):
        found = re.search(r"ember [\w-]+: error: (.*)", line)
        if found:
            return found.group(1)
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1]
    return None


def _failure_summary(plan: LaunchPlan, failures: dict) -> str:
    """`rank R (exit C) failed: REASON; see LOG` for the rank whose failure stopped the run.

    When one rank fails, torchelastic stops the others with SIGTERM and lists them as failed too;
    the rank to blame is one that ended by itself (or by another signal: the OOM killer's SIGKILL),
    and among those, one that said why. Other such ranks are named after it."""
    def reason(rank: int, exitcode: int) -> str | None:
        said = _rank_error(plan.log_dir, rank)
        if said is None and exitcode < 0:
            try:
                return f"killed by {signal.Signals(-exitcode).name}"
            except ValueError:
                return None
        return said

    stopped = -int(signal.SIGTERM)
    own = {rank: failure for rank, failure in failures.items() if failure.exitcode != stopped} or failures
    reasons = {rank: reason(rank, failure.exitcode) for rank, failure in own.items()}
    first = min(own, key=lambda rank: (reasons[rank] is None, rank))
    others = sorted(rank for rank in own if rank != first)
    also = ""
    if others:
        named = ", ".join(str(rank) for rank in others[:4])
        named += f" and {len(others) - 4} more" if len(others) > 4 else ""
        also = f" (rank{'s' if len(others) > 1 else ''} {named} failed too)"
    said = f": {reasons[first]}" if reasons[first] else ""
    return f"rank {first} (exit {own[first].exitcode}) failed{said}{also}; see {plan.log_dir}/worker_{first}*.log"


def launch(plan: LaunchPlan) -> int:
    """Run this node's ranks with torchelastic in this process; 0 when every rank succeeded."""
    import torch.distributed as dist
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    if plan.nproc_per_node > 1:  # torchrun's default, without its banner
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    torchrun_args = parse_args([*plan.torchrun_flags(), "--no-python", sys.executable, *plan.worker_args()])
    config, command, command_args = config_from_args(torchrun_args)
    config.logs_specs = _worker_logs(plan.log_dir)
    config.log_line_prefix_template = os.environ.get("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[rank${rank}]:")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # rank logs in the order things happened
    # torchelastic passes SIGTERM/SIGINT/SIGHUP/SIGQUIT on to the ranks; for a launcher that dies
    # without running any handler, each rank asks the kernel for a signal (`_die_with_launcher`)
    os.environ[LAUNCHER_PID_VARIABLE] = str(os.getpid())
    if plan.rdzv_backend == "c10d":
        # each rendezvous round then gets a fresh store from its rank 0 (torch's shared store keeps
        # the first round's address, which a node joining a later round never learns)
        os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if plan.nnodes > 1:
        print(f"ember launch: waiting up to {plan.join_timeout} s for {plan.nnodes_spec} nodes at "
              f"{plan.master_addr}:{plan.master_port} (--timeout)", file=sys.stderr, flush=True)
    try:
        if plan.node_rank > 0:
            wait_for_master(plan)
        elastic_launch(config=config, entrypoint=command)(*command_args)
    except ChildFailedError as err:
        print(f"ember launch: {_failure_summary(plan, err.failures)}", file=sys.stderr)
        return 1
    except SignalException as err:  # SIGTERM/SIGINT/SIGHUP to the launcher: the ranks were stopped
        print(f"ember launch: stopped by signal {err.sigval.name}", file=sys.stderr)
        return 128 + int(err.sigval)
    except (dist.DistNetworkError, dist.DistStoreError) as err:  # the rendezvous
        raise _rendezvous_error(plan, err) from None
    finally:
        os.environ.pop(LAUNCHER_PID_VARIABLE, None)
    return 0


def emit_manifests(plan: LaunchPlan, args) -> int:
    """`--emit k8s|pytorchjob`: the training configuration checked for the job's world size(s), then
    the manifests on stdout (data paths are the cluster's, so they are not looked for here)."""
    from ember.commands.k8s_manifests import indexed_job, pytorch_job, to_yaml
    from ember.config import validate

    if plan.module == TRAIN_MODULE:
        config, _ = training_config(plan.train_args, prepare_data=False)  # the cluster's files, not here
        for nnodes in range(plan.min_nnodes or plan.nnodes, plan.nnodes + 1):
            validate(config, plan.nproc_per_node * nnodes, check_paths=False)
    build = indexed_job if args.emit == "k8s" else pytorch_job
    print(to_yaml(build(plan, image=args.image, name=args.job_name)), end="")
    return 0


def run(args) -> int:
    plan = plan_from_args(args)
    if getattr(args, "emit", None):
        return emit_manifests(plan, args)
    if plan.module == TRAIN_MODULE:
        plan = check_training(plan, None if args.msrun is not None else args.nproc_per_node)
    passed = sorted(k for k in os.environ if k.startswith(PASS_THROUGH_PREFIXES))
    where = f" ({plan.cluster})" if plan.cluster else ""
    print(f"ember launch: node {plan.node_rank}/{plan.nnodes_spec}{where}, {plan.nproc_per_node} process(es) here, "
          f"world size {plan.world_size}, master {plan.master_addr}:{plan.master_port}, logs in {plan.log_dir}/"
          + (f", passing {', '.join(passed)}" if passed else ""), file=sys.stderr)
    if args.dry_run:
        print(shlex.join(plan.torchrun_argv()))
        return 0
    check_master(plan)
    Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
    if not plan.join:  # msrun JOIN=False: start in the background and return, like msrun does
        with open(Path(plan.log_dir) / f"launcher_node{plan.node_rank}.log", "ab") as log:
            process = subprocess.Popen(plan.launcher_argv(), stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        print(f"ember launch: started in the background (pid {process.pid}); follow {plan.log_dir}/", file=sys.stderr)
        return 0
    return launch(plan)


# --------------------------------------------------------------------------- one rank


def _separate_restart_keys() -> None:
    """Give a restarted rank its own key space in the launcher's store.

    torchelastic's static rendezvous keeps one store for the node's whole life, and a rank's
    process group publishes its address there under fixed keys; after a restart a fast rank could
    read the address a dead predecessor left and fail to connect. Prefixing every key of the
    rank's process groups with the attempt number makes each attempt start from an empty store.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    import importlib

    import torch.distributed as dist

    # the module, not the function of the same name that torch.distributed exports
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create_store = getattr(rendezvous, "_create_c10d_store", None)
    if create_store is None:  # a torch without this hook: restarts keep torch's own behaviour
        return

    def create_attempt_store(*args, **kwargs):
        return dist.PrefixStore(f"/ember/attempt_{attempt}", create_store(*args, **kwargs))

    rendezvous._create_c10d_store = create_attempt_store


def _die_with_launcher() -> None:
    """A rank dies with its launcher (`die_with_parent`): the trainer then saves a checkpoint and
    stops, as on any SIGTERM.

    torchelastic starts each rank directly from the launcher's main thread (the thread whose end
    the kernel watches), in a session of its own: nothing else would take the rank down."""
    launcher = os.environ.pop(LAUNCHER_PID_VARIABLE, None)  # for this process, not what it starts
    if launcher:
        die_with_parent(int(launcher))


def _worker(argv: list[str]) -> int:
    """`python -m ember.commands.launch MODULE ARGS`: run MODULE as __main__ with stderr joined to stdout,
    so a rank's log file holds warnings and tracebacks where they happened."""
    import runpy

    if not argv:
        print("usage: python -m ember.commands.launch MODULE [ARGS...]", file=sys.stderr)
        return 2
    _die_with_launcher()
    _separate_restart_keys()
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(sys.stdout.fileno(), sys.stderr.fileno())
    sys.argv = [argv[0], *argv[1:]]
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))

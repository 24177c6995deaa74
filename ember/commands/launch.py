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

With EMBER_TINY=1 (see `ember.compat.tiny`) the node count, process count and master address come from
the layout instead: one machine, TP x PP x CP x the least data parallelism, CPU processes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from ember.errors import EmberError

PASS_THROUGH_PREFIXES = ("NCCL_", "HCCL_", "GLOO_", "TORCH_", "CUDA_", "ASCEND_")
TRAIN_MODULE = "ember.commands.train"  # what every rank of a training run runs


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

    def torchrun_flags(self) -> list[str]:
        flags = [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}",
                 f"--nproc-per-node={self.nproc_per_node}",
                 f"--master-addr={self.master_addr}", f"--master-port={self.master_port}",
                 f"--max-restarts={self.max_restarts}"]
        if self.timeout:
            flags.append(f"--rdzv-conf=timeout={self.timeout}")
        return flags

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
                f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}", f"--log-dir={self.log_dir}",
                f"--max-restarts={self.max_restarts}", f"--module={self.module}"]
        if self.timeout:
            argv.append(f"--timeout={self.timeout}")
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
    if worker_num < 1 or local_worker < 1 or worker_num % local_worker:
        raise EmberError(f"msrun: WORKER_NUM {worker_num} is not a multiple of LOCAL_WORKER {local_worker}")
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
    parser.add_argument("--nnodes", type=int, default=None, help="nodes (default: $NNODES or 1)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: $NODE_RANK or 0)")
    parser.add_argument("--master-addr", default=None, help="main node's address (default: $MASTER_ADDR or localhost)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="main node's port (default: $MASTER_PORT or 6000)")
    parser.add_argument("--log-dir", default="logs", help="per-rank logs go here (worker_<rank>.log)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="restart failed ranks this many times; training resumes from the last checkpoint")
    parser.add_argument("--timeout", type=int, default=None, help="seconds to wait for every node to join")
    parser.add_argument("--module", default=TRAIN_MODULE, help="python module each rank runs")
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
    _check_node_rank(plan)
    if plan.nnodes > 1 and plan.master_addr in ("localhost", "127.0.0.1") and plan.node_rank == 0:
        print("ember launch: note: MASTER_ADDR is localhost with NNODES > 1; other nodes must reach this node "
              "by its address", file=sys.stderr)
    return plan


# --------------------------------------------------------------------------- checking before spawning


def training_config(train_args: list[str]):
    """(Config, parsed arguments) of `ember train TRAIN_ARGS`, as every rank will resolve them."""
    from ember.commands.train import add_arguments as add_train_arguments
    from ember.commands.train import resolve_config

    parser = argparse.ArgumentParser(prog="ember launch -- (ember train arguments)")
    add_train_arguments(parser)
    args = parser.parse_intermixed_args(train_args)
    return resolve_config(args), args


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
        plan = replace(plan, nproc_per_node=tiny.world_size(config), nnodes=1, node_rank=0,
                       master_addr="127.0.0.1")
        p = config.parallel
        print(f"ember launch: EMBER_TINY: {config.model.name}, {plan.nproc_per_node} CPU process(es) "
              f"(tp {p.tensor_model_parallel_size}, pp {p.pipeline_model_parallel_size}, "
              f"ep {p.expert_model_parallel_size}, cp {p.context_parallel_size})", file=sys.stderr)
    validate(config, plan.world_size)
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


def launch(plan: LaunchPlan) -> int:
    """Run this node's ranks with torchelastic in this process; 0 when every rank succeeded."""
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
    try:
        elastic_launch(config=config, entrypoint=command)(*command_args)
    except ChildFailedError as err:
        failures = sorted(err.failures.items())  # global rank -> ProcessFailure
        ranks = ", ".join(f"rank {rank} (exit {failure.exitcode})" for rank, failure in failures[:4])
        more = f" and {len(failures) - 4} more" if len(failures) > 4 else ""
        print(f"ember launch: {ranks}{more} failed; see {plan.log_dir}/worker_<rank>*.log", file=sys.stderr)
        return 1
    except SignalException as err:  # SIGTERM/SIGINT to the launcher: the ranks were stopped
        print(f"ember launch: stopped by signal {err.sigval.name}", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


def run(args) -> int:
    plan = plan_from_args(args)
    if plan.module == TRAIN_MODULE:
        plan = check_training(plan, None if args.msrun is not None else args.nproc_per_node)
    passed = sorted(k for k in os.environ if k.startswith(PASS_THROUGH_PREFIXES))
    print(f"ember launch: node {plan.node_rank}/{plan.nnodes}, {plan.nproc_per_node} process(es) here, "
          f"world size {plan.world_size}, master {plan.master_addr}:{plan.master_port}, logs in {plan.log_dir}/"
          + (f", passing {', '.join(passed)}" if passed else ""), file=sys.stderr)
    if args.dry_run:
        print(shlex.join(plan.torchrun_argv()))
        return 0
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


def _worker(argv: list[str]) -> int:
    """`python -m ember.commands.launch MODULE ARGS`: run MODULE as __main__ with stderr joined to stdout,
    so a rank's log file holds warnings and tracebacks where they happened."""
    import runpy

    if not argv:
        print("usage: python -m ember.commands.launch MODULE [ARGS...]", file=sys.stderr)
        return 2
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

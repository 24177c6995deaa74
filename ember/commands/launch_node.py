"""Running this node's ranks of an `ember launch` plan: torchelastic's agent in this process (what
torchrun does, without a second launcher process), or, for msrun's JOIN False, a copy of this
launcher in the background.

What is ember's own here: each rank's log file (`LOG_DIR/worker_<rank>[.restart<n>].log`), ranks
that die with the launcher, a fresh rendezvous store per elastic round, and a failed run, a
signal or a rendezvous fault each ended in one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ember.commands.launch_failures import failure_summary
from ember.commands.launch_plan import LaunchPlan
from ember.commands.launch_rank import LAUNCHER_PID_VARIABLE
from ember.commands.launch_rendezvous import rendezvous_error, wait_for_master


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
    # without running any handler, each rank asks the kernel for a signal (`die_with_launcher`)
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
        print(f"ember launch: {failure_summary(plan, err.failures)}", file=sys.stderr)
        return 1
    except SignalException as err:  # SIGTERM/SIGINT/SIGHUP to the launcher: the ranks were stopped
        print(f"ember launch: stopped by signal {err.sigval.name}", file=sys.stderr)
        return 128 + int(err.sigval)
    except (dist.DistNetworkError, dist.DistStoreError) as err:  # the rendezvous
        raise rendezvous_error(plan, err) from None
    finally:
        os.environ.pop(LAUNCHER_PID_VARIABLE, None)
    return 0


def start_in_background(plan: LaunchPlan) -> int:
    """msrun's JOIN False: this launch again as its own session in the background, its output in
    LOG_DIR/launcher_node<rank>.log; return at once, as msrun does."""
    with open(Path(plan.log_dir) / f"launcher_node{plan.node_rank}.log", "ab") as log:
        process = subprocess.Popen(plan.launcher_argv(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    print(f"ember launch: started in the background (pid {process.pid}); follow {plan.log_dir}/", file=sys.stderr)
    return 0

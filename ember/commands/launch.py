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

# The parts of a launch, each in a module of its own (ember/commands/):
#   launch_plan        the LaunchPlan value, its checks, the torchrun command lines it becomes
#   launch_msrun       MindFormers' msrun_launcher.sh positional forms -> LaunchPlan
#   cluster_env        what Slurm / Kubeflow say about the job when the seeds' variables do not
#   k8s_manifests      the manifests of --emit k8s|pytorchjob
#   launch_check       the training configuration checked (and EMBER_TINY sized) before spawning
#   launch_rendezvous  MASTER_ADDR/MASTER_PORT checks; rendezvous faults in one line
#   launch_node        this node's ranks under torchelastic (or in the background, msrun JOIN False)
#   launch_failures    a failed run's last line: the rank to blame and its own error
#   launch_rank        the shim every rank runs first (its log, parent death, restart key spaces)
#   launch_torchrun    `ember train --nproc-per-node`: torchrun as a child process

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ember.commands.cluster_env import cluster_job, slurm_batch_nodes
from ember.commands.launch_check import check_training, training_config
from ember.commands.launch_msrun import plan_from_msrun
from ember.commands.launch_node import launch, start_in_background
from ember.commands.launch_plan import TRAIN_MODULE, LaunchPlan, check_plan, default_nproc, env_int, parse_nnodes
from ember.commands.launch_rendezvous import check_master
from ember.errors import EmberError

PASS_THROUGH_PREFIXES = ("NCCL_", "HCCL_", "GLOO_", "TORCH_", "CUDA_", "ASCEND_")


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


def plan_from_args(args) -> LaunchPlan:
    """This node's plan: flags first, then the seeds' variables (NNODES, NODE_RANK, ...), then what
    the scheduler says (`cluster_env`), then defaults; so one script line runs anywhere."""
    if args.msrun is not None:
        return plan_from_msrun(args.msrun, args.args, args.module, args.max_restarts)
    min_nnodes, nnodes = parse_nnodes(args.nnodes) if args.nnodes else parse_nnodes(os.environ.get("NNODES"), "NNODES")
    node_rank = args.node_rank if args.node_rank is not None else env_int("NODE_RANK", -1)
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
    nproc = (args.nproc_per_node or getattr(args, "script_nproc_per_node", None) or env_int("GPUS_PER_NODE", 0)
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
        master_port=(args.master_port or env_int("MASTER_PORT", 0) or (from_cluster and from_cluster.master_port)
                     or 6000),
        log_dir=args.log_dir, max_restarts=args.max_restarts, join=True, timeout=args.timeout,
        module=args.module, train_args=list(args.args), min_nnodes=min_nnodes, rdzv_backend=rdzv_backend,
        rdzv_id=args.rdzv_id or os.environ.get("SLURM_JOB_ID") or "ember",
        cluster=from_cluster.source if from_cluster else None)
    check_plan(plan)
    emitting = getattr(args, "emit", None)  # the manifests set MASTER_ADDR themselves
    if plan.nnodes > 1 and plan.master_addr in ("localhost", "127.0.0.1") and plan.node_rank == 0 and not emitting:
        print("ember launch: note: MASTER_ADDR is localhost with NNODES > 1; other nodes must reach this node "
              "by its address", file=sys.stderr)
    return plan


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
    """Plan, check the training configuration once, say what will run; then run this node's ranks
    (or print the torchrun command, or the manifests, instead)."""
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
        return start_in_background(plan)
    return launch(plan)

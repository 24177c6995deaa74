"""The training configuration of an `ember launch`, resolved and checked in the launcher before
any rank starts: an error then surfaces once, in one line, instead of on every rank of every node
after the rendezvous. EMBER_TINY sizes the plan to the tiny layout here too, since only the
resolved configuration knows how many processes that layout takes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ember.commands.cluster_env import slurm_step_tasks
from ember.commands.launch_plan import LaunchPlan
from ember.errors import EmberError


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

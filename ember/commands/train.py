"""`ember train`: pretrain or fine-tune with Megatron-style flags, a YAML config, or both.

    ember train --model tiny-llama --data-path data/corpus_text_document --seq-length 256 \\
        --micro-batch-size 4 --global-batch-size 16 --train-iters 100 --lr 3e-4 --save out/ckpt
    ember train --config run.yaml train.lr=1e-4 --print-config
    ember train --nproc-per-node 4 ...                 # starts torchrun for you
    torchrun --nproc-per-node 4 -m ember train ...     # or launch it yourself

The whole configuration is checked before any process starts; one process trains in this process.
"""

from __future__ import annotations

import argparse
import os
import sys

from ember.compat import config_from_args, tiny
from ember.compat.megatron import add_config_arguments
from ember.config import Config, to_yaml, validate
from ember.errors import EmberError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (as YAML for --config) and exit")
    launch = parser.add_argument_group("launching several processes (torchrun)")
    launch.add_argument("--nproc-per-node", type=int, default=None, help="processes (devices) on this machine")
    launch.add_argument("--nnodes", type=int, default=1, help="machines taking part")
    launch.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    launch.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    launch.add_argument("--master-port", type=int, default=29500)
    add_config_arguments(parser)
    from ember.compat.mindformers import add_arguments as add_mindformers_arguments

    add_mindformers_arguments(parser)


def _launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def resolve_config(args: argparse.Namespace, world_size: int | None = None, prepare_data: bool = True) -> Config:
    """The run's configuration from its arguments, as every rank resolves it. Under EMBER_TINY the
    built-in assets are made first (once per machine) and the run is kept off any GPU. With
    `prepare_data`, json files given as split data (PAI's --train-data/--valid-data) are tokenized
    once into a cache and named by their prefixes (`ember.data.raw_finetune`); the launcher does it
    before any rank starts."""
    assets = None
    if tiny.enabled():
        from ember.compat.tiny_assets import prepare

        # CPU processes: keep CUDA out of sight before anything asks torch for a device
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        assets = prepare()
        if world_size is None and os.environ.get("WORLD_SIZE"):
            world_size = int(os.environ["WORLD_SIZE"])
    config = config_from_args(args, assets, world_size)
    if prepare_data and not tiny.enabled():  # tiny runs swap in their own data
        from ember.data.raw_finetune import tokenize_raw_json_data

        tokenize_raw_json_data(config)
    return config


def _print_config(resolved: Config) -> None:
    print(to_yaml(resolved), end="")
    try:
        from ember.checkpoint.training import find_checkpoint
        from ember.train.model_setup import resolve_model_args

        ref = find_checkpoint(resolved.checkpoint.load) if resolved.checkpoint.load else None
        args = resolve_model_args(resolved, ref)
    except EmberError as err:
        print(f"# model: not resolved ({err})")
        return
    import yaml

    print("# resolved architecture (ModelArgs):")
    for line in yaml.safe_dump(args.to_dict(), sort_keys=False).splitlines():
        print(f"#   {line}")
    print(f"#   parameters: {args.num_params():,}")


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if getattr(args, "run_mode", None) == "predict":  # MindFormers: generate from the checkpoint
        from ember.commands.predict import predict

        return predict(config, args)
    nproc = args.nproc_per_node or 1
    spawn = not _launched_by_torchrun() and (nproc > 1 or args.nnodes > 1)
    world_size = nproc * args.nnodes if spawn else int(os.environ.get("WORLD_SIZE", "1"))
    resolved = validate(config, world_size)
    if args.print_config:
        _print_config(resolved)
        return 0
    if spawn:
        from ember.commands.preflight import check_before_starting

        # what --load/--save hold and the model against the layout are checked here once, not by
        # every rank after torchrun starts
        check_before_starting(resolved, world_size)
        from ember.commands.launch_torchrun import run_torchrun

        return run_torchrun(config, args)
    from ember.train.trainer import run_training

    result = run_training(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"ember train: {result.reason} at iteration {result.iteration}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ember.commands.train` (what torchrun starts on every rank)."""
    parser = argparse.ArgumentParser(prog="ember train")
    add_arguments(parser)
    # intermixed: dotted overrides may stand between flags, as in `... train.lr=1e-4 --bf16`
    args = parser.parse_intermixed_args(argv)
    try:
        return run(args)
    except EmberError as err:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}ember train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

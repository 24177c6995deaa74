"""The formats users bring, translated into ember's one config (`ember.config.Config`).

- `megatron`: Megatron-LM / ModelLink / PAI command-line flags;
- `mindformers`: MindSpore Transformers run YAMLs (and run_mindformer.py's flags);
- `tiny`: EMBER_TINY=1, the same run as a tiny model on this CPU.

Each is a translation with no side effects: it reads the values it is given and writes the config.
What must happen on disk first (tiny mode's built-in assets) is a separate, explicit step that the
command runs (`ember.compat.tiny_assets.prepare`). `config_from_args` is the order every command
that takes training arguments uses.
"""

from __future__ import annotations

import argparse

from ember.config import Config, apply_mapping, apply_override, load_yaml


def config_from_args(args: argparse.Namespace, tiny_assets=None, world_size: int | None = None) -> Config:
    """defaults < --config YAML (ember's or MindFormers') < Megatron-style flags < dotted overrides,
    then MindFormers' command-line settings and, given `tiny_assets` (EMBER_TINY), the tiny swaps
    for `world_size` processes (None: the least the layout needs)."""
    from ember.compat import megatron, mindformers, tiny

    config = Config()
    mindformers_values = None
    if getattr(args, "config", None):
        values = load_yaml(args.config)
        if mindformers.is_mindformers_config(values):  # a MindFormers run config (model_config, ...)
            mindformers.mindformers_to_ember(config, values, f"config file {args.config}")
            mindformers_values = values
        else:
            apply_mapping(config, values, f"config file {args.config}")
    # `--data-path P train.lr=1e-4`: the list flag swallowed the override; it is one all the same
    swallowed = megatron.take_overrides_from_path_lists(args)
    megatron.apply_flags(config, args)
    for text in swallowed + list(getattr(args, "overrides", None) or []):
        apply_override(config, text)
    # MindFormers' command-line settings, with or without its YAML (--resume_training, --batch_size, ...)
    mindformers.finish(config, mindformers_values, args)
    if tiny_assets is not None:
        tiny.apply_tiny(config, tiny_assets, world_size)
    return config

"""Checks a multi-process launch runs before it starts any process (`ember launch`, `ember train
--nproc-per-node`): what every rank would otherwise find only after it started, each printing the
same error and torchrun adding its traceback.

`validate` checks the configuration without the model; `check_before_starting` adds what needs the
checkpoint and the model, as `Trainer.setup` checks them before its process group: what --save and
--load hold (`ember.train.trainer.checkpoint_to_start_from`), then the architecture the trainer
will build (`ember.train.model_setup.resolve_model_args`) against the parallel layout
(`Layout.check_model`: heads and vocabulary by tp, layers by pp, experts by ep, the sequence by cp).
"""

from __future__ import annotations

from ember.config import Config
from ember.config.layout import Layout


def check_before_starting(config: Config, world_size: int) -> None:
    """Raise the trainer's one-line EmberError for a checkpoint it cannot start from, or a model
    the layout on `world_size` processes cannot split. `config`: as `validate` returned it."""
    from ember.train.model_setup import resolve_model_args
    from ember.train.trainer import checkpoint_to_start_from

    layout = Layout.from_config(config.parallel, config.train, world_size)
    ref, _ = checkpoint_to_start_from(config, notice=lambda text: None)  # the ranks print the notices
    args = resolve_model_args(config, ref)
    layout.check_model(args, config.data.seq_length)

"""Experiment trackers besides TensorBoard: Weights & Biases, with Megatron's flags.

    ember train ... --wandb-project my-project [--wandb-exp-name run-1] [--wandb-save-dir DIR]

The tracker gets every record `metrics.jsonl` gets, under the same names, at step = iteration
(rank 0 only). wandb is an optional dependency (`pip install wandb`); it runs offline unless
WANDB_MODE says otherwise (training machines often have no network): `wandb sync DIR/wandb/offline-run-*`
uploads a run later. The files go under --wandb-save-dir, by default <output dir>/wandb.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ember.config import Config
from ember.errors import EmberError


class WandbTracker:
    def __init__(self, project: str, name: str | None, save_dir: str | os.PathLike, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise EmberError("--wandb-project needs the wandb package: pip install wandb "
                             "(or drop --wandb-project)") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, dir=str(save_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        """A metrics.jsonl record (values already JSON: numbers or None)."""
        values = {k: v for k, v in record.items()
                  if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.log(values, step=int(record["iteration"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def build_trackers(config: Config) -> list:
    """The trackers the config asks for (none by default). Call on rank 0 only."""
    lg = config.logging
    trackers = []
    if lg.wandb_project:
        save_dir = lg.wandb_save_dir or (Path(config.output_dir) / "wandb" if config.output_dir else Path("wandb"))
        trackers.append(WandbTracker(lg.wandb_project, lg.wandb_exp_name, save_dir, config.to_dict()))
    return trackers

"""ember's training engine: `ember train` (and `torchrun -m ember.train`).

`run_training(config)` trains in this process (on every rank under torchrun); the pieces —
schedule, optimizer step, precision, checkpoints, metrics — are modules of their own.
"""

from ember.train.trainer import Trainer, TrainResult, run_training

__all__ = ["TrainResult", "Trainer", "run_training"]

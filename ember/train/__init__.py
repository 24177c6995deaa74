"""ember's training engine: `run_training(config)` trains in this process (on every rank under torchrun).

The pieces — model setup, schedule, optimizer step, gradients, precision, metrics — are modules of
their own; `ember train` (`ember.commands.train`) is the command in front of them. Imported lazily,
so importing one piece (say `ember.train.cpu_threads`) does not load the trainer.
"""

_TRAINER_NAMES = ("Trainer", "TrainResult", "run_training")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        from ember.train import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = list(_TRAINER_NAMES)

"""ember's one configuration: the typed schema, the data flags' syntax, the parallel layout, validation,
and which settings make a run the same run (`run_identity`, for resuming).

The bottom of ember's layer order (only `ember.errors` is below it): pure values and checks, no
files read but the ones named, nothing started. Every input format (ember's YAML, Megatron flags,
MindFormers YAML, tiny mode) is translated into this schema by `ember.compat`.
"""

from ember.config.schema import (
    SECTIONS,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    apply_mapping,
    apply_override,
    coerce,
    load_yaml,
    resolve_path,
    set_value,
    to_yaml,
)
from ember.config.layout import Layout
from ember.config.validate import validate

__all__ = [
    "SECTIONS", "CheckpointConfig", "Config", "DataConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "Layout", "ParallelConfig", "TrainConfig", "apply_mapping", "apply_override", "coerce", "load_yaml",
    "resolve_path", "set_value", "to_yaml", "validate",
]

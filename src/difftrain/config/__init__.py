"""Run configuration: the typed schema, loading (presets, YAML, dotted overrides) and cross-field checks.

Layers, lowest first: ``schema`` (dataclasses, ConfigError) <- ``checks`` (cross-field checks) <-
``loading`` (presets, YAML, overrides, type checks, load/dump). Callers import from here.
"""

from difftrain.config.checks import check_config
from difftrain.config.loading import (
    NON_FINITE,
    config_from_dict,
    dump_config,
    list_presets,
    load_config,
    parse_overrides,
    presets_dir,
    resolve_config_source,
    save_config,
    section_from_dict,
    validate,
)
from difftrain.config.schema import (
    BetaSchedule,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    LoraConfig,
    MixedPrecision,
    ModelConfig,
    PredictionType,
    RunConfig,
    SampleConfig,
    SchedulerName,
    TextEncoderConfig,
    TrainConfig,
    VaeConfig,
)

__all__ = [
    "NON_FINITE",
    "BetaSchedule",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "LoraConfig",
    "MixedPrecision",
    "ModelConfig",
    "PredictionType",
    "RunConfig",
    "SampleConfig",
    "SchedulerName",
    "TextEncoderConfig",
    "TrainConfig",
    "VaeConfig",
    "check_config",
    "config_from_dict",
    "dump_config",
    "list_presets",
    "load_config",
    "parse_overrides",
    "presets_dir",
    "resolve_config_source",
    "save_config",
    "section_from_dict",
    "validate",
]

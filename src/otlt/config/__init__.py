"""Run configuration: frozen dataclasses, YAML files with inheritance, ``key=value`` overrides.

A config file is YAML with the sections below. ``base: other.yaml`` (relative to the file)
inherits another file and overrides it key by key, so a short CPU twin states only what it
changes. Unknown keys anywhere are errors that list the valid keys.

Modules: :mod:`~otlt.config.schema` (the dataclasses) <- :mod:`~otlt.config.files` (YAML,
presets, overrides), :mod:`~otlt.config.epochs` (epoch-valued knobs against ``optim.epochs``:
negative kept and plan epochs, refusals of epochs past the run) <- :mod:`~otlt.config.validate`
<- :mod:`~otlt.config.build`
(``build_config``, ``load_config``); :mod:`~otlt.config.compare` (what differs between two
configs of one run). Everything is importable from ``otlt.config``.
"""

from __future__ import annotations

from otlt.config.build import build_config, build_overridden, load_config
from otlt.config.compare import (
    SAFE_ON_RESUME,
    config_changes,
    flat_config,
    refuse_unsafe_changes,
)
from otlt.config.epochs import check_epoch_knobs, mixer_params, resolve_epochs
from otlt.config.files import (
    apply_overrides,
    config_source,
    dump_config,
    list_presets,
    load_raw,
    parse_override,
    preset_path,
    presets_dir,
)
from otlt.config.schema import (
    AMP_MODES,
    BN_STATS,
    DATASET_DEFAULTS,
    PROFILES,
    REWEIGHT_CHOICES,
    SCHEDULES,
    SELECT_METRICS,
    DataConfig,
    EvalConfig,
    LossConfig,
    MixConfig,
    ModelConfig,
    OptimConfig,
    ReweightConfig,
    RunConfig,
    TrainConfig,
    config_keys_markdown,
    to_dict,
)
from otlt.config.validate import is_device_name, validate

__all__ = ["AMP_MODES", "BN_STATS", "DATASET_DEFAULTS", "PROFILES", "REWEIGHT_CHOICES",
           "SAFE_ON_RESUME", "SCHEDULES", "SELECT_METRICS",
           "DataConfig", "config_changes", "flat_config", "refuse_unsafe_changes",
           "EvalConfig", "LossConfig", "MixConfig", "ModelConfig", "OptimConfig",
           "ReweightConfig", "RunConfig", "TrainConfig", "apply_overrides", "build_config",
           "check_epoch_knobs", "config_keys_markdown", "config_source", "dump_config",
           "list_presets", "load_config", "load_raw", "mixer_params", "parse_override",
           "preset_path", "presets_dir", "resolve_epochs", "to_dict", "validate",
           "build_overridden", "is_device_name"]

"""From raw YAML dicts to a validated :class:`~otlt.config.schema.RunConfig`: type coercion
with key-naming errors, unknown keys refused with the valid ones listed."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from otlt.config.files import apply_overrides, load_raw
from otlt.config.schema import RunConfig
from otlt.config.validate import validate
from otlt.errors import OtltError, is_integer, require


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Check and convert one YAML value to the dataclass field's annotated type."""
    optional = "None" in annotation
    if value is None:
        require(optional, f"config key {where} must not be empty")
        return None
    base = annotation.replace(" | None", "")
    try:
        if base == "bool":
            require(isinstance(value, bool), f"config key {where} must be true or false, "
                                             f"got {value!r}")
            return value
        if base == "int":
            require(not isinstance(value, bool) and float(value) == int(float(value)),
                    f"config key {where} must be an integer, got {value!r}")
            return int(float(value))
        if base == "float":
            require(not isinstance(value, bool), f"config key {where} must be a number, "
                                                 f"got {value!r}")
            out = float(value)
            require(math.isfinite(out), f"config key {where} must be finite, got {value!r}")
            return out
        if base == "str":
            if isinstance(value, bool):  # YAML 1.1 reads a bare off/on as a boolean
                return "on" if value else "off"
            require(isinstance(value, str), f"config key {where} must be a string, got {value!r}")
            return value
        if base.startswith("tuple"):
            require(isinstance(value, (list, tuple)), f"config key {where} must be a list, "
                                                      f"got {value!r}")
            item = "int" if "int" in base else "float"
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        if base == "dict":
            require(isinstance(value, dict), f"config key {where} must be a mapping, "
                                             f"got {value!r}")
            return dict(value)
    except OtltError:
        raise
    except (TypeError, ValueError):
        kind = {"int": "an integer", "float": "a number"}.get(base, base)
        raise OtltError(f"config key {where} must be {kind}, got {value!r}") from None
    return value


def _build(cls: type, raw: dict, where: str) -> Any:
    require(isinstance(raw, dict), f"config section {where or 'root'} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise OtltError(f"unknown config key {prefix}{unknown[0]} (valid keys in "
                        f"{where or 'the top level'}: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        f = fields[name]
        key = f"{where}.{name}" if where else name
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[name] = _build(sub, value or {}, key)
        else:
            kwargs[name] = _coerce(value, str(f.type), key)
    return cls(**kwargs)


def build_config(raw: dict, written_for: int | None = None) -> RunConfig:
    """Turn a raw dict into a validated :class:`RunConfig` (``written_for``: see
    :func:`otlt.config.check_epoch_knobs`)."""
    if not raw.get("stage2", True):  # the empty placeholder of runs written before `reweight`
        raw = {key: value for key, value in raw.items() if key != "stage2"}
    return validate(_build(RunConfig, raw, ""), written_for)


def build_overridden(raw: dict, overrides: list[str] | None = None) -> RunConfig:
    """:func:`build_config` of a loaded config with ``--set`` overrides applied. An
    epoch-valued knob past a shortened run is refused with a fix scaled from the config's
    own ``optim.epochs`` (30 for a ``_short`` preset), not the overridden one."""
    optim = raw.get("optim")
    written = optim.get("epochs") if isinstance(optim, dict) else None
    return build_config(apply_overrides(raw, overrides or []),
                        written if is_integer(written) and written > 0 else None)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides
    (:func:`build_overridden`)."""
    return build_overridden(load_raw(path) if path is not None else {}, overrides)

"""Config files: YAML with ``base:`` inheritance, the packaged presets, ``key=value`` overrides,
and writing the resolved config into a run directory."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from otlt.atomic import write_text_atomic
from otlt.config.schema import RunConfig, to_dict
from otlt.errors import OtltError, require


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise OtltError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise OtltError(f"config {path} is not valid YAML{where}: {problem}") from None
    require(data is not None and data != {}, f"config {path} is empty (a config needs at "
                                             "least a name; 'otlt presets' lists complete "
                                             "ones)")
    require(isinstance(data, dict), f"config {path} must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "params":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def presets_dir() -> Path:
    """The folder of the packaged presets (``configs/`` of the checkout, shipped in the wheel
    as ``otlt/presets``)."""
    from importlib.resources import files

    return Path(str(files("otlt") / "presets"))


def list_presets() -> list[str]:
    """Names of the packaged presets (``otlt train --preset NAME``), sorted."""
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name`` (a one-line error lists close names)."""
    path = presets_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(name, list_presets(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else " (otlt presets lists them)"
        raise OtltError(f"unknown preset {name!r}{hint}")
    return path


PRESET_PREFIX = "preset:"


def config_source(config: str | Path | None, preset: str | None,
                  resume_hint: bool = False) -> Path:
    """The YAML file a command reads: ``--config FILE`` or ``--preset NAME`` (exactly one;
    ``resume_hint``: the command also takes ``--resume RUN_DIR``, and says so)."""
    require(config is None or preset is None, "--config and --preset exclude each other (a "
            "preset is a packaged config file); give one of them")
    require(config is not None or preset is not None,
            "give --config FILE or --preset NAME" + (" (or --resume RUN_DIR)" if resume_hint
                                                     else "") + "; 'otlt presets' lists them")
    return Path(config) if config is not None else preset_path(preset)


def base_path(config: Path, base: str) -> Path:
    """Where ``base:`` in ``config`` points: ``preset:NAME`` is a packaged preset; anything
    else a file relative to ``config``, or, when no such file exists and ``base`` names a
    packaged preset (``cifar10_lt_r100_erm`` or ``cifar10_lt_r100_erm.yaml``), that preset,
    so a config written outside the checkout can start from a preset."""
    if base.startswith(PRESET_PREFIX):
        return preset_path(base[len(PRESET_PREFIX):].strip())
    relative = config.parent / base
    if not relative.exists() and "/" not in base and "\\" not in base \
            and base.removesuffix(".yaml") in list_presets():
        return preset_path(base)
    return relative


def load_raw(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and resolve its ``base:`` chain (one file relative to the config,
    or a packaged preset: :func:`base_path`; acyclic) into one dict."""
    path = Path(path)
    require(path.is_file(), f"config file {path} does not exist (expected a YAML file; "
                            "--preset NAME runs a packaged preset, 'otlt presets' lists them)")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, resolved))
        raise OtltError(f"config {path}: the base: chain is a cycle ({cycle})")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    require(isinstance(base, str) and base.strip() != "",
            f"config {path}: base: must be one file path (relative to the config) or "
            f"{PRESET_PREFIX}NAME, got {base!r}")
    return _merge(load_raw(base_path(path, base.strip()), (*_chain, resolved)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], parsed value); the value is read as YAML."""
    require("=" in text, f"override {text!r} must look like key=value (e.g. optim.epochs=30)")
    key, value = text.split("=", 1)
    require(bool(key.strip()), f"override {text!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with every ``key=value`` override applied."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            require(isinstance(node, dict), f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return raw


def dump_config(cfg: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (a refused write: one-line :class:`OtltError`)."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

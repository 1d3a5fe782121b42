"""``otlt sweep``: train one config over a list of values of one key (paper Fig. 8).

Every value is an ordinary ``otlt train`` run named ``<name>_<key>=<value>`` in the config's
``out_dir`` (or ``--out-dir``), run one after another. Running the same sweep again skips
finished runs (they have ``eval.json``) and resumes interrupted ones from their ``last.pt``,
so a sweep can be stopped at any time. ``otlt report`` on the sweep's run directories
detects that they differ in one key and plots the error against its value.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from otlt.config import RunConfig, apply_overrides, build_config, load_raw, parse_override, to_dict
from otlt.engine.factory import create_trainer
from otlt.engine.preflight import check_components
from otlt.engine.runtime import run_dir_path
from otlt.errors import OtltError, require


@dataclass(frozen=True)
class SweepRun:
    """One point of a sweep: the value (as typed), its config and its run directory."""

    value: str
    config: RunConfig
    run_dir: Path

    @property
    def state(self) -> str:
        """``done`` (has eval.json), ``partial`` (has last.pt) or ``new``."""
        if (self.run_dir / "eval.json").is_file():
            return "done"
        if (self.run_dir / "last.pt").is_file():
            return "partial"
        return "new"


def parse_values(text: str) -> list[str]:
    """Split ``"0.0,0.05,0.5"`` into its values; empty items and duplicates are errors."""
    values = [v.strip() for v in text.split(",")]
    require(all(values), f"--values {text!r} has an empty item (expected e.g. 0.0,0.05,0.5)")
    require(len(set(values)) == len(values), f"--values {text!r} repeats a value")
    for v in values:
        require("/" not in v and not v.startswith("."),
                f"sweep value {v!r} cannot be part of a run directory name")
    return values


def plan_sweep(config: str | Path, key: str, values: Sequence[str],
               overrides: Sequence[str] = (), out_dir: str | Path | None = None,
               data: str | None = None) -> list[SweepRun]:
    """Build and validate every run's config before any training starts, so a typo in the
    key or a value out of range fails at once, not hours into the sweep."""
    require(bool(key) and "=" not in key, f"--key {key!r} must be a config key such as "
                                          "mix.params.omega")
    require(len(values) >= 1, "--values needs at least one value")
    raw = load_raw(config)
    overrides = list(overrides) + ([f"out_dir={out_dir}"] if out_dir is not None else []) \
        + ([f"data.path={data}"] if data is not None else [])
    base = build_config(apply_overrides(raw, overrides))
    runs = []
    for value in values:
        parse_override(f"{key}={value}")
        name = f"{base.name}_{key}={value}"
        cfg = build_config(apply_overrides(raw, [*overrides, f"{key}={value}", f"name={name}"]))
        check_components(cfg)
        runs.append(SweepRun(value, cfg, run_dir_path(cfg)))
    return runs


def _same_config(stored: Path, cfg: RunConfig) -> bool:
    """Whether a run directory's ``config.yaml`` is this config (the data path may move)."""
    old = yaml.safe_load(stored.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    for d in (old, new):
        d.get("data", {}).pop("path", None)
    return old == new


def run_sweep(runs: Sequence[SweepRun], log: Callable[[str], None] = print) -> list[Path]:
    """Train every run of a sweep in turn (skip done ones, resume partial ones); return the
    run directories."""
    for run in runs:
        stored = run.run_dir / "config.yaml"
        if run.state != "new" and not _same_config(stored, run.config):
            raise OtltError(f"{run.run_dir} holds a run with a different config; remove it or "
                            "sweep under another name (--set name=...)")
    for i, run in enumerate(runs, 1):
        state = run.state
        head = f"otlt sweep: [{i}/{len(runs)}] {run.run_dir.name}"
        if state == "done":
            log(f"{head}: done, skipped")
            continue
        if state == "new":
            _clear_unstarted(run.run_dir)
        log(f"{head}: {'resuming' if state == 'partial' else 'training'}")
        create_trainer(run.config, run_dir=run.run_dir, resume=state == "partial").fit()
    return [run.run_dir for run in runs]


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a run killed before its first epoch wrote (no last.pt yet), so the sweep
    can start it again; a folder with anything else in it is left alone."""
    starts = {"config.yaml", "splits.json", "metrics.jsonl", "tb", ".lock"}
    if not run_dir.is_dir():
        return
    present = {p.name for p in run_dir.iterdir()}
    if not present or not present <= starts:
        return
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        return
    for name in ("config.yaml", "splits.json", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


def summary(runs: Sequence[SweepRun], key: str) -> str:
    """Plain-text table of the sweep's top-1 errors read from each ``eval.json``."""
    lines = [f"{key:>20}  top-1 error  run directory"]
    for run in runs:
        path = run.run_dir / "eval.json"
        error = json.loads(path.read_text())["top1_error"] if path.is_file() else None
        shown = "   –" if error is None else f"{error:6.2f}%"
        lines.append(f"{run.value:>20}  {shown:>11}  {run.run_dir}")
    return "\n".join(lines)


__all__ = ["SweepRun", "check_components", "parse_values", "plan_sweep", "run_sweep", "summary"]

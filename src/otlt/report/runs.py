"""Reading run directories and the numbers a report shows (tables, sweeps, statistics)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from otlt.config.compare import SAFE_ON_RESUME
from otlt.engine.logging import evaluation_share, read_metrics
from otlt.errors import OtltError, is_finite_number, require

#: config keys that name or place a run rather than define it (ignored by sweep detection)
IGNORED_KEYS = ("name", "out_dir", *SAFE_ON_RESUME, "train.amp", "train.channels_last",
                "train.keep_epochs", "train.keep_every", "train.deterministic",
                "mix.params.plan_epochs")
"""Keys that say how a run executed or what it kept, not what it trained: rows and their
base rows are matched without them (a config written before a key existed lacks it, and
``train.keep_epochs`` and ``mix.params.plan_epochs``, which epochs' weights and OT plans are
saved, may be written relative, ``[-4, -1]``, or resolved, ``[236, 239]``)."""
GROUPS = ("many", "medium", "few")

# ---------------------------------------------------------------------- reading runs


@dataclass
class RunData:
    """What a report needs from one run directory (missing files give empty fields)."""

    path: Path
    label: str
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    eval: dict[str, Any] | None
    splits: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        if self.eval and self.eval.get("classes"):
            return list(self.eval["classes"])
        if self.splits.get("classes"):
            return list(self.splits["classes"])
        return [str(k) for k in range(len(self.counts))]

    @property
    def counts(self) -> list[int]:
        if self.eval and self.eval.get("class_counts_train"):
            return list(self.eval["class_counts_train"])
        return list(self.splits.get("counts", {}).get("train", []))

    @property
    def total_epochs(self) -> int | None:
        return (self.config.get("optim") or {}).get("epochs")

    @property
    def method(self) -> str:
        loss = (self.config.get("loss") or {}).get("name", "?")
        mix_cfg = self.config.get("mix") or {}
        mix = mix_cfg.get("name", "none")
        model = (self.config.get("model") or {}).get("name", "?")
        reweight = (self.config.get("reweight") or {}).get("stage1")
        if mix not in (None, "none"):
            # The partner (foreground) sampler changes results a lot (mix.sampler_r).
            sampler = mix_cfg.get("sampler_r")
            mix += f" (r={sampler:g})" if isinstance(sampler, (int, float)) else ""
        return (f"{model}, {loss}" + ("" if mix in (None, "none") else f" + {mix}")
                + (" + OT re-weighting" if reweight else ""))

    @property
    def paper(self) -> dict[str, Any]:
        paper = self.config.get("paper")
        return paper if isinstance(paper, dict) else {}

    @property
    def is_otmix(self) -> bool:
        return (self.config.get("mix") or {}).get("name") == "otmix"

    def plan_files(self) -> list[Path]:
        """``plans/epoch_XXXX.json`` files, oldest epoch first."""
        return sorted((self.path / "plans").glob("epoch_*.json"))


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OtltError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return data if isinstance(data, dict) else None


def load_run(path: str | Path, label: str | None = None) -> RunData:
    """Read one run directory; a folder without ``config.yaml`` is a user error."""
    path = Path(path)
    config_path = path / "config.yaml"
    require(path.is_dir(), f"run directory {path} does not exist")
    require(config_path.is_file(), f"{path} is not an otlt run directory (no config.yaml; "
                                   "expected the folder 'otlt train' wrote)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OtltError(f"{config_path} is not valid YAML: {exc}") from None
    require(isinstance(config, dict), f"{config_path} must be a mapping")
    return RunData(path=path, label=label or path.name, config=config,
                   metrics=read_metrics(path / "metrics.jsonl"),
                   eval=read_json(path / "eval.json"),
                   splits=read_json(path / "splits.json") or {})


def load_runs(paths: Sequence[str | Path]) -> list[RunData]:
    """Read several run directories with unique labels (``parent/name`` on a clash)."""
    require(len(paths) > 0, "give at least one run directory")
    paths = [Path(p) for p in paths]
    names = [p.resolve().name for p in paths]
    labels = []
    for p, name in zip(paths, names, strict=True):
        clash = names.count(name) > 1
        labels.append(f"{p.resolve().parent.name}/{name}" if clash else name)
    require(len(set(labels)) == len(labels),
            f"run directories given twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return [load_run(p, label) for p, label in zip(paths, labels, strict=True)]


# ---------------------------------------------------------------------- numbers


def comparison_rows(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One row per run: top-1/many/medium/few error from ``eval.json`` (None when missing)
    and the paper's reported top-1 error when the config names a paper row."""
    rows = []
    for run in runs:
        e = run.eval or {}
        paper = run.paper.get("top1_error")
        ours = e.get("top1_error")
        rows.append({
            "label": run.label, "method": run.method, "split": e.get("split"),
            "epoch": None if "epoch" not in e else int(e["epoch"]) + 1,
            "epochs": run.total_epochs, "epochs_done": len(run.metrics),
            "top1_error": ours, **{f"{g}_error": e.get(f"{g}_error") for g in GROUPS},
            # eval.json before eval.bn_stats existed: the running statistics, the only choice
            "bn_stats": e.get("bn_stats", "running") if e else None,
            "paper_top1_error": paper, "paper_row": paper_name(run.paper),
            "delta": None if ours is None or paper is None else ours - float(paper),
            "wall_seconds": sum(r.get("epoch_seconds", 0.0) for r in run.metrics
                                if is_finite_number(r.get("epoch_seconds"))),
            "outside_steps_share": evaluation_share(run.metrics),
        })
    return rows


def best_test_epoch(run: RunData) -> tuple[int, float] | None:
    """``(epoch, test error)`` of the best ``test_diag_acc`` (ties to the earlier epoch),
    None without the diagnostic."""
    points = [(-m["test_diag_acc"], int(m["epoch"])) for m in run.metrics
              if is_finite_number(m.get("test_diag_acc"))]
    if not points:
        return None
    neg_acc, epoch = min(points)
    return epoch, 100.0 + neg_acc


def paper_name(paper: dict[str, Any]) -> str | None:
    if not paper.get("row") and not paper.get("table"):
        return None
    return ", ".join(str(paper[k]) for k in ("table", "row") if paper.get(k))


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table; ``–`` for missing."""
    return "–" if value is None else f"{value:.{digits}f}"


def cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`comparison_rows` (errors in %, lower is better)."""
    lines = ["| run | method | epochs | BN statistics | top-1 error | many | medium | few "
             "| paper top-1 | ours − paper |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        done = f"{r['epochs_done']}/{r['epochs'] if r['epochs'] is not None else '?'}"
        paper = fmt(r["paper_top1_error"])
        if r["paper_row"] and r["paper_top1_error"] is not None:
            paper += f" ({cell(r['paper_row'])})"
        delta = "–" if r["delta"] is None else f"{r['delta']:+.2f}"
        lines.append(f"| {cell(r['label'])} | {cell(r['method'])} | {done} | "
                     f"{r.get('bn_stats') or '–'} | {fmt(r['top1_error'])} | "
                     f"{fmt(r['many_error'])} | {fmt(r['medium_error'])} | "
                     f"{fmt(r['few_error'])} | {paper} | {delta} |")
    return "\n".join(lines)


def mix_statistics(metrics: Sequence[dict[str, Any]]) -> list[tuple[str, int, list]]:
    """The ``mix_pairs`` matrices to show: the last OT epoch and the last random-pairing
    (CMO-like) epoch that mixed anything, as ``(kind, epoch, matrix)``, random first."""
    found: dict[str, tuple[int, list]] = {}
    for record in metrics:
        pairs = record.get("mix_pairs")
        if not isinstance(pairs, list) or not pairs or "ot_epoch" not in record:
            continue
        if sum(sum(row) for row in pairs) <= 0:
            continue  # clean epochs (skip_first / skip_last) count no pairs
        kind = "OT pairing" if record["ot_epoch"] else "random pairing (CMO-like)"
        found[kind] = (int(record.get("epoch", -1)), pairs)
    return [(kind, *found[kind]) for kind in ("random pairing (CMO-like)", "OT pairing")
            if kind in found]


def class_weight_series(metrics: Sequence[dict[str, Any]], num_classes: int,
                        classes: Sequence[str] = (), *,
                        first: bool = False) -> tuple[str, int, list[float]] | None:
    """Per-class weight statistics of a re-weighting run: the last record's (``first``: the
    first record's) ``weight_*`` entry that holds one number per class (a ``mean`` statistic
    preferred), as ``(key, epoch, values)``; None when the run logged none. Read
    defensively: the format belongs to the re-weighting code."""
    for record in (metrics if first else reversed(metrics)):
        candidates = []
        for key, value in record.items():
            if not key.startswith("weight_"):
                continue
            values = per_class_values(value, num_classes, classes)
            if values is not None:
                candidates.append((("mean" not in key), key, values))
        if candidates:
            _, key, values = min(candidates, key=lambda c: (c[0], c[1]))
            return key, int(record.get("epoch", -1)), values
    return None


def per_class_values(value: Any, num_classes: int, classes: Sequence[str]) -> list[float] | None:
    if isinstance(value, dict):
        names = {str(name): k for k, name in enumerate(classes)}
        keyed = {}
        for key, v in value.items():
            k = names.get(str(key), int(key) if str(key).isdigit() else None)
            if k is not None:
                keyed[k] = v
        value = [keyed.get(k) for k in range(num_classes)]
    if not isinstance(value, list) or len(value) != num_classes:
        return None
    if not all(v is None or is_finite_number(v) for v in value):
        return None
    return [None if v is None else float(v) for v in value]


def scalar_weight_stats(metrics: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Scalar ``weight_*`` entries of the last record that has any."""
    for record in reversed(metrics):
        stats = {k: float(v) for k, v in record.items()
                 if k.startswith("weight_") and is_finite_number(v)}
        if stats:
            return stats
    return {}


# ---------------------------------------------------------------------- sweeps


@dataclass
class Sweep:
    """Runs that differ in exactly one numeric config key, sorted by its value."""

    key: str
    values: list[Any]
    runs: list[RunData]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"mix.params.omega": 0.05, ...}`` (lists become tuples)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def detect_sweep(runs: Sequence[RunData]) -> Sweep | None:
    """Return the sweep when 2+ runs differ in exactly one config key with numeric values
    (names, output folders, device settings and ``paper:`` ignored)."""
    if len(runs) < 2:
        return None
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat))
    differing = [k for k in keys if not _ignored(k)
                 and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    if len(differing) != 1:
        return None
    key = differing[0]
    values = [f.get(key) for f in flat]
    if not all(is_finite_number(v) for v in values) or len(set(values)) != len(values):
        return None
    order = sorted(range(len(runs)), key=lambda i: values[i])
    return Sweep(key, [values[i] for i in order], [runs[i] for i in order])


def _ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key == "paper" or key.startswith("paper.")

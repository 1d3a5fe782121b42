"""The report being written: Markdown lines and figure paths under one output folder, and the
small text helpers every section uses."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from otlt.report import figure_style
from otlt.report.runs import (
    RunData,
)

# ---------------------------------------------------------------------- the report


class Report:
    """Accumulates Markdown and figures under one output folder."""

    def __init__(self, out: Path, runs: Sequence[RunData]):
        self.out = Path(out)
        self.colors = {r.label: figure_style.run_color(i) for i, r in enumerate(runs)}
        self.figures = self.out / "figures"
        self.lines: list[str] = []

    def figure_path(self, name: str) -> Path:
        return self.figures / f"{slug(name)}.png"

    def image(self, path: Path, alt: str) -> None:
        self.lines += [f"![{alt}]({path.relative_to(self.out).as_posix()})", ""]

    def add(self, *lines: str) -> None:
        self.lines += list(lines)


def slug(text: str) -> str:
    """A file-name-safe version of a run label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"


def wrap(text: str, width: int = 90) -> str:
    return figure_style.wrap_label(text, width)


def class_names_for(classes: Sequence[str], k: int) -> list[str]:
    names = list(classes)
    return names + [str(i) for i in range(len(names), k)]


def significant(value: float | None) -> str:
    """Four significant digits; ``–`` for missing (weights span 0.05 to 4 and move by 1e-4)."""
    return "–" if value is None else f"{value:.4g}"


def by_dataset(runs: Sequence[RunData]) -> list[tuple[list[str], list[RunData]]]:
    """Group runs that share class names and training counts (their per-class figures are
    comparable), in the order they were given."""
    groups: dict[tuple, list[RunData]] = {}
    for run in runs:
        groups.setdefault((tuple(run.classes), tuple(run.counts)), []).append(run)
    return [(list(key[0]), group) for key, group in groups.items()]

"""``report.md`` and its figures: one section per concern, from the runs' own files.

This module assembles the report and holds the general sections (comparison table, sweep,
curves, per-class accuracy, gallery, t-SNE); :mod:`~otlt.report.bn_sections` and
:mod:`~otlt.report.method_sections` hold the BatchNorm and the method sections, on
:class:`~otlt.report.document.Report`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from otlt.atomic import write_text_atomic
from otlt.errors import OtltError
from otlt.report import heatmaps, plots

# ---------------------------------------------------------------------- the report
from otlt.report.bn_sections import section_batchnorm
from otlt.report.document import Report, by_dataset, slug, wrap
from otlt.report.method_sections import section_otmix, section_weights
from otlt.report.rows import section_rows
from otlt.report.runs import (
    GROUPS,
    RunData,
    cell,
    comparison_rows,
    comparison_table,
    detect_sweep,
    fmt,
    load_runs,
)
from otlt.report.trained import (
    mixed_pairs,
    tsne_embedding,
)


@dataclass
class ReportOptions:
    """Switches for :func:`write_report`; the checkpoint-based figures are opt-in."""

    gallery: bool = False
    gallery_size: int = 8
    tsne: bool = False
    tsne_samples: int = 2000
    data_path: str | None = None
    seed: int = 0
    device: str = "cpu"
    #: read the Rows table under this BatchNorm procedure for every run (None: each run's own)
    bn_stats: str | None = None


def write_report(run_dirs: Sequence[str | Path], out: str | Path,
                 options: ReportOptions | None = None,
                 notice: Callable[[str], None] | None = None) -> Path:
    """Write ``out/report.md`` and ``out/figures/*.png`` for the given run directories.

    A run the gallery skips (not a mixing run, no ``last.pt`` as in committed results, its
    data not found) gets one line in the report and one through ``notice``; when
    ``options.gallery`` is set and no run could be drawn, the report is still written and
    an :class:`OtltError` says why the gallery is missing.
    """
    options = options or ReportOptions()
    runs = load_runs(run_dirs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OtltError(f"cannot create report folder {out} ({exc.strerror or exc})") from None
    report = Report(out, runs)
    report.add("# otlt report", "",
               f"{len(runs)} run(s). Errors are top-1 test errors in percent at the last "
               "epoch (lower is better), read from each run's `eval.json`; "
               f"{_groups_sentence(runs)}", "")
    _section_table(report, runs)
    section_rows(report, runs, options.bn_stats)
    _section_sweep(report, runs)
    _section_curves(report, runs)
    datasets = by_dataset([r for r in runs if r.eval and r.eval.get("per_class_accuracy")])
    for classes, group in datasets:
        _section_per_class(report, classes, group, many_groups=len(datasets) > 1)
    section_batchnorm(report, runs)
    section_otmix(report, runs)
    section_weights(report, runs)
    skipped: list[str] = []
    drawn = _section_gallery(report, runs, options, skipped) if options.gallery else 0
    if options.tsne:
        _section_tsne(report, runs, options)
    path = out / "report.md"
    write_text_atomic(path, "\n".join(report.lines).rstrip() + "\n")
    if notice is not None:
        for line in skipped:
            notice(line)
    if options.gallery and not drawn:
        raise OtltError(f"--gallery drew nothing ({'; '.join(skipped)}); {path} was written "
                        "without it")
    return path


def _groups_sentence(runs: Sequence[RunData]) -> str:
    """How many / medium / few were defined (the thresholds stored in ``eval.json``)."""
    found = {(t.get("many"), t.get("few")) for r in runs if r.eval
             for t in [r.eval.get("shot_thresholds") or {}] if t}
    if len(found) != 1:
        return "many / medium / few thresholds: see each run's `eval.json` (`shot_thresholds`)."
    many, few = found.pop()
    return (f"many / medium / few: classes with more than {many}, {few} to {many}, fewer "
            f"than {few} training images.")


def _section_table(report: Report, runs: Sequence[RunData]) -> None:
    rows = comparison_rows(runs)
    report.add("## Results", "", "Each run's own `eval.json`: the last epoch on test under "
               "the BatchNorm statistics it was evaluated with (*BN statistics*; `running` for "
               "runs made before `eval.bn_stats` existed). Rows under different statistics do "
               "not compare; the Rows section below reads every run under one procedure when "
               "the report is made with `--bn-stats`.", "", comparison_table(rows), "")
    unfinished = [r["label"] for r in rows if r["top1_error"] is None]
    if unfinished:
        report.add(f"No `eval.json` (unfinished or not evaluated): {', '.join(unfinished)}.", "")
    report.add("| run | directory | evaluated | wall time (sum of epochs) | outside the training "
               "steps |", "|---|---|---|---:|---:|")
    for run, r in zip(runs, rows, strict=True):
        evaluated = "–" if r["epoch"] is None else f"{r['split']} split, epoch {r['epoch']}"
        share = r["outside_steps_share"]
        report.add(f"| {cell(run.label)} | `{run.path}` | {evaluated} | "
                   f"{_duration(r['wall_seconds'])} | "
                   f"{'–' if share is None else f'{100 * share:.0f}%'} |")
    report.add("", "*Outside the training steps*: `1 − Σ steps_seconds / Σ epoch_seconds` over "
               "the epochs of `metrics.jsonl` that time their steps (BatchNorm recalibration, "
               "validation, probes, the per-epoch test diagnostic, the mixer's epoch end).", "")


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "–"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _section_sweep(report: Report, runs: Sequence[RunData]) -> None:
    sweep = detect_sweep(runs)
    if sweep is None:
        return
    errors = {"overall": [(r.eval or {}).get("top1_error") for r in sweep.runs]}
    for g in GROUPS:
        errors[g] = [(r.eval or {}).get(f"{g}_error") for r in sweep.runs]
    path = plots.sweep_plot(sweep.key, sweep.values, errors, report.figure_path(
        f"sweep_{sweep.key}"), title=f"test error against {sweep.key} ({len(sweep.runs)} runs)")
    report.add(f"## Sweep over `{sweep.key}`", "",
               f"The runs differ only in `{sweep.key}` (paper Fig. 8).", "",
               f"| {sweep.key} | run | top-1 error | many | medium | few |",
               "|---:|---|---:|---:|---:|---:|")
    for value, run, *errs in zip(sweep.values, sweep.runs, errors["overall"],
                                 *(errors[g] for g in GROUPS), strict=True):
        report.add(f"| {value} | {cell(run.label)} | " + " | ".join(fmt(e) for e in errs) + " |")
    report.add("")
    report.image(path, f"test error against {sweep.key}")


def _section_curves(report: Report, runs: Sequence[RunData]) -> None:
    with_metrics = [r for r in runs if r.metrics]
    if not with_metrics:
        return
    report.add("## Learning curves", "")
    if len(with_metrics) > 1:
        path = plots.validation_overlay([(_legend(r), r.metrics) for r in with_metrics],
                                        report.figure_path("validation_accuracy"),
                                        colors=[report.colors[r.label] for r in with_metrics])
        report.image(path, "validation accuracy of every run")
    for run in with_metrics:
        path = plots.learning_curves(run.label, run.metrics,
                                     report.figure_path(f"curves_{run.label}"))
        report.image(path, f"learning curves of {run.label}")


def _legend(run: RunData) -> str:
    """A run's legend entry: its label and, for a mixing run, the method with its sampler."""
    mix = (run.config.get("mix") or {}).get("name", "none")
    return run.label if mix in (None, "none") else f"{run.label} ({run.method})"


def _section_per_class(report: Report, classes: list[str], group: list[RunData],
                       many_groups: bool) -> None:
    counts = group[0].counts
    suffix = f" ({len(classes)} classes)" if many_groups else ""
    tag = f"_{len(classes)}_{slug(group[0].label)}" if many_groups else ""
    thresholds = (group[0].eval or {}).get("shot_thresholds") or {}
    colors = [report.colors[r.label] for r in group]
    report.add(f"## Per-class test accuracy{suffix}", "",
               "Classes ordered by training count, most frequent first (paper Fig. 7).", "")
    path = plots.per_class_bars(
        classes, counts, [(r.label, r.eval["per_class_accuracy"]) for r in group],
        report.figure_path(f"per_class_accuracy{tag}"),
        title="per-class test accuracy", colors=colors,
        thresholds=(thresholds["many"], thresholds["few"]) if thresholds else None)
    report.image(path, "per-class test accuracy")
    report.add(f"## Confusion matrices{suffix}", "",
               "Test split, rows normalised: row = true class, column = prediction "
               "(paper Fig. 6).", "")
    panels = [(f"{wrap(r.label, 42)}\ntop-1 error {fmt(r.eval.get('top1_error'))}%",
               r.eval["confusion_matrix"]) for r in group if r.eval.get("confusion_matrix")]
    for start in range(0, len(panels), 6):  # at most 2 rows of 3 panels per figure
        part = f"_{start // 6 + 1}" if len(panels) > 6 else ""
        path = heatmaps.confusion_matrices(panels[start:start + 6], classes,
                                           report.figure_path(f"confusion{tag}{part}"))
        report.image(path, "confusion matrices")


def _section_gallery(report: Report, runs: Sequence[RunData], options: ReportOptions,
                     skipped: list[str]) -> int:
    """Draw each mixing run's gallery; return how many were drawn, a line per skipped run
    appended to ``skipped``."""
    mixing = [r for r in runs if (r.config.get("mix") or {}).get("name", "none") != "none"]
    report.add("## Mixed images", "")
    if not mixing:
        skipped.append("--gallery: no mixing run among the runs")
        report.add("No mixing run among the runs.", "")
        return 0
    report.add("Drawn with each run's mixer and trained model (`last.pt`) as a training step "
               "would: a uniform background batch, a class-weighted foreground batch; "
               "OTmix uses an OT epoch and the validation confusion matrix. λ is the "
               "background's label weight (paper Fig. 5).", "")
    drawn = 0
    for run in mixing:
        if not (run.path / "last.pt").is_file():
            reason = "no last.pt (committed results keep no checkpoint; train the run to draw it)"
        else:
            try:
                g = mixed_pairs(run.path, n=options.gallery_size, data_path=options.data_path,
                                seed=options.seed, device=options.device)
                reason = ""
            except OtltError as exc:  # e.g. its dataset not found: say so, draw the others
                reason = str(exc)
        if reason:
            skipped.append(f"--gallery: skipped {run.label}: {reason}")
            report.add(f"{run.label}: skipped, {reason}.", "")
            continue
        drawn += 1
        kind = "OT-chosen backgrounds" if g.ot else "random backgrounds"
        path = plots.mixed_gallery(g.partners, g.bases, g.mixed, g.partner_labels, g.base_labels,
                                   g.lams, run.classes, report.figure_path(f"gallery_{run.label}"),
                                   title=f"{run.label}: {kind}; λ = the background's share "
                                         "of the pixels and of the label")
        report.image(path, f"mixed images of {run.label}")
    return drawn


def _section_tsne(report: Report, runs: Sequence[RunData], options: ReportOptions) -> None:
    with_ckpt = [r for r in runs if (r.path / "last.pt").is_file()]
    report.add("## Feature embedding (t-SNE)", "")
    if not with_ckpt:
        report.add("No run has a `last.pt`.", "")
        return
    for classes, group in by_dataset(with_ckpt):
        panels = []
        for run in group:
            emb, labels = tsne_embedding(run.path, options.tsne_samples, options.data_path,
                                         options.seed, options.device)
            panels.append((run.label, emb, labels))
        path = plots.tsne_panels(panels, classes, group[0].counts,
                                 report.figure_path(f"tsne_{slug(group[0].label)}"))
        report.add(f"t-SNE of the pooled penultimate features of {len(panels[0][1])} random "
                   "test images (scikit-learn), coloured by class (paper Fig. 4).", "")
        report.image(path, "t-SNE of test features")


def linked_figures(report_path: Path) -> list[Path]:
    """The PNG files a report links, in order (for messages and tests)."""
    text = Path(report_path).read_text()
    return [Path(report_path).parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)]


__all__ = ["ReportOptions", "by_dataset", "linked_figures", "slug", "write_report"]

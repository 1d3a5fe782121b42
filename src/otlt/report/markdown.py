"""``report.md`` and its figures: one section per concern, from the runs' own files."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otlt import plots
from otlt.errors import OtltError
from otlt.report.runs import (
    GROUPS,
    RunData,
    Sweep,
    cell,
    class_weight_series,
    comparison_rows,
    comparison_table,
    detect_sweep,
    flatten,
    fmt,
    load_run,
    load_runs,
    mix_statistics,
    read_json,
    scalar_weight_stats,
)
from otlt.report.trained import (
    Gallery,
    mixed_pairs,
    tsne_embedding,
)

# ---------------------------------------------------------------------- the report


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


class _Report:
    """Accumulates Markdown and figures under one output folder."""

    def __init__(self, out: Path, runs: Sequence[RunData]):
        self.out = Path(out)
        self.colors = {r.label: plots.run_color(i) for i, r in enumerate(runs)}
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


def write_report(run_dirs: Sequence[str | Path], out: str | Path,
                 options: ReportOptions | None = None) -> Path:
    """Write ``out/report.md`` and ``out/figures/*.png`` for the given run directories."""
    options = options or ReportOptions()
    runs = load_runs(run_dirs)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OtltError(f"cannot create report folder {out} ({exc.strerror or exc})") from None
    report = _Report(out, runs)
    report.add("# otlt report", "",
               f"{len(runs)} run(s). Errors are top-1 test errors in percent at the last "
               "epoch (lower is better), read from each run's `eval.json`; "
               f"{_groups_sentence(runs)}", "")
    _section_table(report, runs)
    _section_sweep(report, runs)
    _section_curves(report, runs)
    datasets = by_dataset([r for r in runs if r.eval and r.eval.get("per_class_accuracy")])
    for classes, group in datasets:
        _section_per_class(report, classes, group, many_groups=len(datasets) > 1)
    _section_batchnorm(report, runs)
    _section_otmix(report, runs)
    _section_weights(report, runs)
    if options.gallery:
        _section_gallery(report, runs, options)
    if options.tsne:
        _section_tsne(report, runs, options)
    path = out / "report.md"
    path.write_text("\n".join(report.lines).rstrip() + "\n")
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


def _section_table(report: _Report, runs: Sequence[RunData]) -> None:
    rows = comparison_rows(runs)
    report.add("## Results", "", comparison_table(rows), "")
    unfinished = [r["label"] for r in rows if r["top1_error"] is None]
    if unfinished:
        report.add(f"No `eval.json` (unfinished or not evaluated): {', '.join(unfinished)}.", "")
    report.add("| run | directory | evaluated | wall time (sum of epochs) |",
               "|---|---|---|---:|")
    for run, r in zip(runs, rows, strict=True):
        evaluated = "–" if r["epoch"] is None else f"{r['split']} split, epoch {r['epoch']}"
        report.add(f"| {cell(run.label)} | `{run.path}` | {evaluated} | "
                   f"{_duration(r['wall_seconds'])} |")
    report.add("")


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "–"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _section_sweep(report: _Report, runs: Sequence[RunData]) -> None:
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


def _section_curves(report: _Report, runs: Sequence[RunData]) -> None:
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


def by_dataset(runs: Sequence[RunData]) -> list[tuple[list[str], list[RunData]]]:
    """Group runs that share class names and training counts (their per-class figures are
    comparable), in the order they were given."""
    groups: dict[tuple, list[RunData]] = {}
    for run in runs:
        groups.setdefault((tuple(run.classes), tuple(run.counts)), []).append(run)
    return [(list(key[0]), group) for key, group in groups.items()]


def _section_per_class(report: _Report, classes: list[str], group: list[RunData],
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
    panels = [(f"{_wrap(r.label, 42)}\ntop-1 error {fmt(r.eval.get('top1_error'))}%",
               r.eval["confusion_matrix"]) for r in group if r.eval.get("confusion_matrix")]
    for start in range(0, len(panels), 6):  # at most 2 rows of 3 panels per figure
        part = f"_{start // 6 + 1}" if len(panels) > 6 else ""
        path = plots.confusion_matrices(panels[start:start + 6], classes,
                                        report.figure_path(f"confusion{tag}{part}"))
        report.image(path, "confusion matrices")


def bn_probe_series(run: RunData) -> dict[str, list[tuple[int, float]]]:
    """Validation accuracy per BatchNorm procedure: the in-run ``bn_probe`` records of
    ``metrics.jsonl``, then ``otlt probe``'s ``probe_val.json`` (epochs counted from 1)."""
    series: dict[str, dict[int, float]] = {}
    for r in run.metrics:
        for mode, values in (r.get("bn_probe") or {}).items():
            series.setdefault(mode, {})[int(r["epoch"]) + 1] = values["val_acc"]
    probe = read_json(run.path / "probe_val.json") or {}
    for r in probe.get("records", []):
        series.setdefault(r["bn_stats"], {}).setdefault(int(r["epoch"]) + 1,
                                                        100.0 - r["top1_error"])
    return {mode: sorted(points.items()) for mode, points in series.items()}


def bn_procedure_rows(run: RunData) -> list[dict[str, Any]]:
    """One row per (epoch, procedure) found in ``probe_val.json`` and ``probe_test.json``."""
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for split in ("val", "test"):
        for r in (read_json(run.path / f"probe_{split}.json") or {}).get("records", []):
            row = rows.setdefault((int(r["epoch"]), r["bn_stats"]),
                                  {"epoch": int(r["epoch"]), "bn_stats": r["bn_stats"]})
            for key in ("top1_error", *(f"{g}_error" for g in GROUPS)):
                row[f"{split}_{key}"] = r.get(key)
    return [rows[k] for k in sorted(rows)]


def bn_batches_rows(run: RunData) -> list[tuple[int, str, int, float]]:
    """``(recalibration batches, procedure, epoch, validation error)`` from the run's
    ``probe_val_bn<N>.json`` files (``otlt probe --bn-batches N``), sorted."""
    rows = []
    for path in run.path.glob("probe_val_bn*.json"):
        probe = read_json(path) or {}
        for r in probe.get("records", []):
            rows.append((int(probe["bn_batches"]), r["bn_stats"], int(r["epoch"]),
                         r["top1_error"]))
    return sorted(rows)


def _bn_batches_table(report: _Report, run: RunData) -> None:
    rows = bn_batches_rows(run)
    if not rows:
        return
    modes = sorted({m for _, m, _, _ in rows})
    counts = sorted({n for n, _, _, _ in rows})
    by = {(n, m): (e, err) for n, m, e, err in rows}
    epochs = sorted({e for _, _, e, _ in rows})
    report.add(f"### {run.label}: validation error (%) against the number of recalibration "
               f"batches (epoch {', '.join(str(e + 1) for e in epochs)})", "",
               "| batches of `optim.batch_size` | " + " | ".join(modes) + " |",
               "|---:|" + "---:|" * len(modes))
    for n in counts:
        report.add(f"| {n} | " + " | ".join(fmt(by[(n, m)][1]) if (n, m) in by else "–"
                                          for m in modes) + " |")
    report.add("")


def _section_batchnorm(report: _Report, runs: Sequence[RunData]) -> None:
    """BatchNorm procedures: per-run probe curves, the (epoch, procedure) table, the
    validation-selected checkpoint and the opt-in official-protocol diagnostic."""
    curves = [(r, bn_probe_series(r)) for r in runs]
    curves = [(r, s) for r, s in curves if s]
    tables = [(r, bn_procedure_rows(r)) for r in runs]
    tables = [(r, t) for r, t in tables if t or bn_batches_rows(r)]
    selected = [r for r in runs if r.eval and r.eval.get("selected")]
    diagnostic = [r for r in runs if any("test_diag_acc" in m for m in r.metrics)]
    if not (curves or tables or selected or diagnostic or any(r.eval and "bn_stats" in r.eval
                                                               for r in runs)):
        return
    report.add("## BatchNorm statistics and checkpoint selection", "",
               "Evaluation-time BatchNorm statistics: `running` (as training left them), "
               "`train` (re-estimated on batches drawn as the run trains, mixing included), "
               "`clean` (clean long-tailed batches), `balanced` (class-balanced clean "
               "batches); see `otlt.engine.batchnorm`.", "")
    report.add("| run | procedure of `eval.json` | last epoch: test error | validation-selected "
               "epoch | its test error |", "|---|---|---:|---:|---:|")
    for run in runs:
        e = run.eval or {}
        sel = e.get("selected") or {}
        report.add(f"| {cell(run.label)} | {e.get('bn_stats', 'running (before procedures)')} | "
                   f"{fmt(e.get('top1_error'))} | "
                   f"{'–' if 'epoch' not in sel else int(sel['epoch']) + 1} | "
                   f"{fmt(sel.get('top1_error'))} |")
    report.add("")
    for run, rows in tables:
        _bn_batches_table(report, run)
        if not rows:
            continue
        report.add(f"### {run.label}: error (%) by epoch and procedure", "",
                   "Post-hoc `otlt probe` of kept weights (epochs counted from 1).", "",
                   "| epoch | BN statistics | val top-1 | val many | val medium | test top-1 "
                   "| test many | test medium | test few |",
                   "|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            report.add(f"| {r['epoch'] + 1} | {r['bn_stats']} | {fmt(r.get('val_top1_error'))} | "
                       f"{fmt(r.get('val_many_error'))} | {fmt(r.get('val_medium_error'))} | "
                       f"{fmt(r.get('test_top1_error'))} | {fmt(r.get('test_many_error'))} | "
                       f"{fmt(r.get('test_medium_error'))} | {fmt(r.get('test_few_error'))} |")
        report.add("")
    for run, series in curves:
        path = plots.bn_probe_curves(f"{run.label}: validation accuracy by BN statistics",
                                     series, report.figure_path(f"bn_probe_{run.label}"))
        report.image(path, f"validation accuracy of {run.label} under each BN procedure")
    if diagnostic:
        report.add("### Best test epoch (official protocol, optimistic)", "",
                   "`eval.test_every_epoch` logged test accuracy every epoch. The official "
                   "repositories report the best of these; selecting on test is optimistic, so "
                   "this is a diagnostic only and nothing reads it.", "",
                   "| run | best test epoch | its test error | ours: last epoch |",
                   "|---|---:|---:|---:|")
        for run in diagnostic:
            points = [(m["test_diag_acc"], m["epoch"]) for m in run.metrics
                      if plots.is_number(m.get("test_diag_acc"))]
            acc, epoch = max(points)
            report.add(f"| {cell(run.label)} | {epoch + 1} | {fmt(100.0 - acc)} | "
                       f"{fmt((run.eval or {}).get('top1_error'))} |")
        report.add("")


def _section_otmix(report: _Report, runs: Sequence[RunData]) -> None:
    otmix = [r for r in runs if r.is_otmix or any("mix_pairs" in m for m in r.metrics)]
    if not otmix:
        return
    report.add("## OTmix: mixing statistics and transport plans", "",
               "Mixing statistics: mixed images per (foreground class, background class) in "
               "one epoch, from `metrics.jsonl` `mix_pairs` (paper Fig. 9). Transport plan: "
               "one sampled batch from `plans/` (paper Fig. 3; a run writes them at the epochs "
               "in `mix.params.plan_epochs`).", "")
    for run in otmix:
        report.add(f"### {run.label}", "")
        shown = _mix_pairs_figure(report, run) + _plan_figure(report, run)
        if not shown:
            report.add("No mixed epoch or sampled plan logged yet.", "")


def _mix_pairs_figure(report: _Report, run: RunData) -> int:
    stats = mix_statistics(run.metrics)
    if not stats:
        return 0
    panels = [(f"{kind}, epoch {epoch + 1}", matrix) for kind, epoch, matrix in stats]
    path = plots.mix_pair_matrices(panels, _names_for(run.classes, len(stats[0][2])),
                                   report.figure_path(f"mix_pairs_{run.label}"))
    report.image(path, f"mixing statistics of {run.label}")
    return 1


def _plan_figure(report: _Report, run: RunData) -> int:
    files = run.plan_files()
    plan = read_json(files[-1]) if files else None
    if not plan or not {"cost", "plan", "fore_labels", "back_labels"} <= set(plan):
        return 0
    title = (f"{run.label}: sampled batch, epoch {int(plan.get('epoch', -1)) + 1} "
             f"(eps={plan.get('eps', '?')}, omega={plan.get('omega', '?')})")
    names = _names_for(run.classes, 1 + max(plan["fore_labels"] + plan["back_labels"]))
    path = plots.transport_plan(plan, names, report.figure_path(f"plan_{run.label}"),
                                _wrap(title))
    report.image(path, f"transport plan of {run.label}")
    if len(files) > 1:
        report.add(f"({len(files)} sampled plans in `{run.path / 'plans'}`; the last is "
                   "shown.)", "")
    return 1


def _wrap(text: str, width: int = 90) -> str:
    return plots.wrap_label(text, width)


def _names_for(classes: Sequence[str], k: int) -> list[str]:
    names = list(classes)
    return names + [str(i) for i in range(len(names), k)]


def _section_weights(report: _Report, runs: Sequence[RunData]) -> None:
    found = {r.label: class_weight_series(r.metrics, len(r.classes), r.classes) for r in runs}
    weighted = [r for r in runs if found[r.label] is not None]
    scalars = {r.label: scalar_weight_stats(r.metrics) for r in runs}
    if not weighted and not any(scalars.values()):
        return
    report.add("## Re-weighting: learned weights per class", "",
               "Per-class statistic of the learned example weights, from `metrics.jsonl` "
               "(the last epoch that logged one).", "")
    for classes, group in by_dataset(weighted):
        name = ", ".join(sorted({found[r.label][0] for r in group}))
        path = plots.per_class_bars(
            classes, group[0].counts,
            [(f"{r.label} (epoch {found[r.label][1] + 1})", found[r.label][2]) for r in group],
            report.figure_path(f"class_weights_{slug(group[0].label)}"),
            title=f"learned weight per class ({name})", ylabel=name,
            colors=[report.colors[r.label] for r in group])
        report.image(path, "learned weight per class")
    for run in weighted:
        _weight_change_table(report, run, found[run.label])
    for label, stats in scalars.items():
        if stats:
            report.add(f"{label}: " + ", ".join(f"`{k}` {v:.4g}" for k, v in sorted(stats.items())),
                       "")


def _weight_change_table(report: _Report, run: RunData,
                         last: tuple[str, int, list[float]]) -> None:
    """How far the per-class statistic moved between the first and the last logged epoch."""
    start = class_weight_series(run.metrics, len(run.classes), run.classes, first=True)
    key, last_epoch, after = last
    if start is None or start[0] != key or start[1] == last_epoch:
        return
    before = start[2]
    report.add(f"{run.label}: `{key}` after epoch {start[1] + 1} and after epoch "
               f"{last_epoch + 1}.", "",
               f"| class | train n | epoch {start[1] + 1} | epoch {last_epoch + 1} | change |",
               "|---|---:|---:|---:|---:|")
    counts = run.counts or [None] * len(run.classes)
    for name, n, a, b in zip(run.classes, counts, before, after, strict=True):
        change = f"{b - a:+.4g}" if a is not None and b is not None else "–"
        report.add(f"| {name} | {'–' if n is None else int(n)} | {_significant(a)} | "
                   f"{_significant(b)} | {change} |")
    moved = [(abs(b - a) / abs(a), name)
             for name, a, b in zip(run.classes, before, after, strict=True)
             if a and b is not None]
    if moved:
        share, name = max(moved)
        report.add("", f"Largest relative change: {100 * share:.2g}% ({name}).")
    report.add("")


def _significant(value: float | None) -> str:
    """Four significant digits; ``–`` for missing (weights span 0.05 to 4 and move by 1e-4)."""
    return "–" if value is None else f"{value:.4g}"


def _section_gallery(report: _Report, runs: Sequence[RunData], options: ReportOptions) -> None:
    mixing = [r for r in runs if (r.config.get("mix") or {}).get("name", "none") != "none"]
    report.add("## Mixed images", "")
    if not mixing:
        report.add("No mixing run among the runs.", "")
        return
    report.add("Drawn with each run's mixer and trained model (`last.pt`) as a training step "
               "would: a uniform background batch, a class-weighted foreground batch; "
               "OTmix uses an OT epoch and the validation confusion matrix. λ is the "
               "background's label weight (paper Fig. 5).", "")
    for run in mixing:
        if not (run.path / "last.pt").is_file():
            report.add(f"{run.label}: no `last.pt`, skipped.", "")
            continue
        g = mixed_pairs(run.path, n=options.gallery_size, data_path=options.data_path,
                        seed=options.seed, device=options.device)
        kind = "OT-chosen backgrounds" if g.ot else "random backgrounds"
        path = plots.mixed_gallery(g.fore, g.back, g.mixed, g.fore_labels, g.back_labels,
                                   g.lams, run.classes, report.figure_path(f"gallery_{run.label}"),
                                   title=f"{run.label}: {kind}; λ = the background's share "
                                         "of the pixels and of the label")
        report.image(path, f"mixed images of {run.label}")


def _section_tsne(report: _Report, runs: Sequence[RunData], options: ReportOptions) -> None:
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


__all__ = [
    "Gallery",
    "ReportOptions",
    "RunData",
    "Sweep",
    "class_weight_series",
    "comparison_rows",
    "by_dataset",
    "comparison_table",
    "linked_figures",
    "detect_sweep",
    "flatten",
    "load_run",
    "load_runs",
    "mix_statistics",
    "mixed_pairs",
    "tsne_embedding",
    "write_report",
]

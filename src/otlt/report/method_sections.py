"""The method sections of the report: OTmix (mixing pairs, Fig. 9; a sampled transport plan,
Fig. 3) and OT re-weighting (learned weights per class and how far they moved)."""

from __future__ import annotations

from collections.abc import Sequence

from otlt.report import heatmaps, plots

# ---------------------------------------------------------------------- the report
from otlt.report.document import Report, by_dataset, class_names_for, significant, slug, wrap
from otlt.report.runs import (
    RunData,
    class_weight_series,
    mix_statistics,
    read_json,
    scalar_weight_stats,
)


def section_otmix(report: Report, runs: Sequence[RunData]) -> None:
    otmix = [r for r in runs if r.is_otmix or any("mix_pairs" in m for m in r.metrics)]
    if not otmix:
        return
    report.add("## OTmix: mixing statistics and transport plans", "",
               "Mixing statistics: mixed images per (foreground class, background class) in "
               "one epoch, from `metrics.jsonl` `mix_pairs` (paper Fig. 9). Transport plan: "
               "one sampled batch from `plans/` (paper Fig. 3; a run writes them at the epochs "
               "in `mix.params.plan_epochs`, or at the next OT epoch after one that paired "
               "at random).", "")
    for run in otmix:
        report.add(f"### {run.label}", "")
        shown = _mix_pairs_figure(report, run) + _plan_figure(report, run)
        if not shown:
            report.add("No mixed epoch or sampled plan logged yet.", "")


def _mix_pairs_figure(report: Report, run: RunData) -> int:
    stats = mix_statistics(run.metrics)
    if not stats:
        return 0
    panels = [(f"{kind}, epoch {epoch + 1}", matrix) for kind, epoch, matrix in stats]
    path = heatmaps.mix_pair_matrices(panels, class_names_for(run.classes, len(stats[0][2])),
                                      report.figure_path(f"mix_pairs_{run.label}"))
    report.image(path, f"mixing statistics of {run.label}")
    return 1


def _plan_figure(report: Report, run: RunData) -> int:
    files = run.plan_files()
    plan = read_json(files[-1]) if files else None
    if not plan or not {"cost", "plan", "fore_labels", "back_labels"} <= set(plan):
        return 0
    title = (f"{run.label}: sampled batch, epoch {int(plan.get('epoch', -1)) + 1} "
             f"(eps={plan.get('eps', '?')}, omega={plan.get('omega', '?')})")
    names = class_names_for(run.classes, 1 + max(plan["fore_labels"] + plan["back_labels"]))
    path = heatmaps.transport_plan(plan, names, report.figure_path(f"plan_{run.label}"),
                                   wrap(title))
    report.image(path, f"transport plan of {run.label}")
    if len(files) > 1:
        report.add(f"({len(files)} sampled plans in `{run.path / 'plans'}`; the last is "
                   "shown.)", "")
    return 1


def section_weights(report: Report, runs: Sequence[RunData]) -> None:
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


def _weight_change_table(report: Report, run: RunData,
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
        report.add(f"| {name} | {'–' if n is None else int(n)} | {significant(a)} | "
                   f"{significant(b)} | {change} |")
    moved = [(abs(b - a) / abs(a), name)
             for name, a, b in zip(run.classes, before, after, strict=True)
             if a and b is not None]
    if moved:
        share, name = max(moved)
        report.add("", f"Largest relative change: {100 * share:.2g}% ({name}).")
    report.add("")

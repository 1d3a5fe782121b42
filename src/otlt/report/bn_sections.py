"""The report's "BatchNorm statistics and checkpoint selection" section: the procedure of
``eval.json``, last vs validation-selected, probe curves, the (epoch, procedure) table and
the recalibration-batches table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from otlt.report import plots

# ---------------------------------------------------------------------- the report
from otlt.report.document import Report
from otlt.report.runs import (
    GROUPS,
    RunData,
    best_test_epoch,
    cell,
    fmt,
    read_json,
)


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


def _bn_batches_table(report: Report, run: RunData) -> None:
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


def section_batchnorm(report: Report, runs: Sequence[RunData]) -> None:
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
            epoch, error = best_test_epoch(run)
            report.add(f"| {cell(run.label)} | {epoch + 1} | {fmt(error)} | "
                       f"{fmt((run.eval or {}).get('top1_error'))} |")
        report.add("")

"""The paper-table view of a group of runs: one row per method, seeds pooled.

Runs whose configs agree on every key but ``seed`` (names, folders, device settings and
``paper:`` ignored, as in sweep detection) are one *row*; its numbers are the mean and the
sample standard deviation over the seeds,

    mean = (1/n) sum_s e_s,    std = sqrt(sum_s (e_s - mean)^2 / (n - 1))    (n >= 2)

(:mod:`otlt.report.seedstats`, which also gives a pair's Student-t interval), of each seed's
own file: ``eval.json`` (the last epoch under the run's ``eval.bn_stats``, and
``selected``, the validation-selected epoch), the opt-in ``test_diag_acc`` of
``metrics.jsonl`` (best test epoch: the official protocol, optimistic), and the post-hoc
``probe_test.json`` / ``eval_last_<mode>.json`` for the other BatchNorm procedures. A mixing
row is paired with its *base*: the row whose config equals it once every ``mix.*`` key is
dropped and ``mix.name`` is ``none``.

With one procedure for the whole group (``otlt report --bn-stats MODE``), every run's numbers
are read under ``MODE``: the last epoch from ``eval.json`` when it used ``MODE``, else from the
post-hoc files above, and the validation-selected checkpoint from ``eval_best_<MODE>.json``.
``eval.bn_stats`` then leaves the row identity: it changes evaluation only, never training
(the trajectory is bit-identical under every procedure), so a run evaluated under another
procedure still pools with, and pairs with, its twins.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from otlt.config import BN_STATS
from otlt.errors import require
from otlt.report.document import Report
from otlt.report.runs import (
    IGNORED_KEYS,
    RunData,
    best_test_epoch,
    cell,
    flatten,
    fmt,
    read_json,
)
from otlt.report.seedstats import mean_std, t_interval

_SEED_SUFFIX = re.compile(r"_seed\d+$")


@dataclass
class Row:
    """The runs of one method that differ only in ``seed``, seed order."""

    label: str
    runs: list[RunData]

    @property
    def seeds(self) -> list[int]:
        return [int(r.config.get("seed", 0)) for r in self.runs]

    @property
    def is_mixing(self) -> bool:
        return (self.runs[0].config.get("mix") or {}).get("name", "none") not in (None, "none")


#: per-seed keys besides ``seed``: a stage-2 run names its own seed's stage-1 run
PER_SEED_KEYS = ("seed", "reweight.stage1")


#: what leaves the row identity when the report reads every run under one procedure
PROCEDURE_KEYS = ("eval.bn_stats",)


def _identity(run: RunData, drop_mix: bool = False, ignore: Sequence[str] = ()) -> str:
    """The config as a key: everything but the per-seed keys, the ignored keys, ``paper`` and
    ``ignore`` (and, with ``drop_mix``, every ``mix.*`` key)."""
    flat = {k: v for k, v in flatten(run.config).items()
            if k not in PER_SEED_KEYS and k not in IGNORED_KEYS and k not in ignore
            and k != "paper" and not k.startswith("paper.")
            and not (drop_mix and k.startswith("mix."))}
    return json.dumps(flat, sort_keys=True, default=str)


def seed_rows(runs: Sequence[RunData], ignore: Sequence[str] = ()) -> list[Row]:
    """Group runs into rows (configs equal but for ``seed`` and the keys in ``ignore``), in
    first-appearance order; the label is the first run's with a trailing ``_seed<k>``
    removed."""
    rows: dict[str, Row] = {}
    for run in runs:
        key = _identity(run, ignore=ignore)
        if key not in rows:
            rows[key] = Row(_SEED_SUFFIX.sub("", run.label), [])
        rows[key].runs.append(run)
    for row in rows.values():
        row.runs.sort(key=lambda r: int(r.config.get("seed", 0)))
        seeds = row.seeds
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        require(not twice, f"runs {', '.join(r.label for r in row.runs)} have the same config "
                           f"and seed {twice}: the same run given twice? (pass one of them)")
    return list(rows.values())


def recipe(row: Row, ignore: Sequence[str] = ()) -> str:
    """The row's config without ``mix.*`` and ``ignore``: what a mixer is added on top of."""
    return _identity(row.runs[0], drop_mix=True, ignore=ignore)


def base_of(row: Row, rows: Sequence[Row], ignore: Sequence[str] = ()) -> Row | None:
    """The row ``row`` mixes on top of (same :func:`recipe`, no mixer)."""
    if not row.is_mixing:
        return None
    return next((other for other in rows
                 if not other.is_mixing and recipe(other, ignore) == recipe(row, ignore)), None)


def run_procedure(run: RunData) -> str:
    """The BatchNorm procedure of the run's ``eval.json`` (``running`` before there was one)."""
    return (run.eval or {}).get("bn_stats") or "running"


def last_error(run: RunData, mode: str | None = None) -> float | None:
    """Last-epoch test error: ``eval.json``'s, or under ``mode`` (:func:`procedure_error`)."""
    if mode is None or run_procedure(run) == mode:
        return (run.eval or {}).get("top1_error")
    return procedure_error(run, mode)


def selected_error(run: RunData, mode: str | None = None) -> float | None:
    """Test error of the validation-selected checkpoint: ``eval.json``'s ``selected``, or under
    ``mode`` from ``eval_best_<mode>.json`` (``otlt eval --checkpoint best --bn-stats mode``;
    the checkpoint is the one selected under the run's own procedure)."""
    if mode is None or run_procedure(run) == mode:
        return ((run.eval or {}).get("selected") or {}).get("top1_error")
    posthoc = read_json(run.path / f"eval_best_{mode}.json") or {}
    return posthoc.get("top1_error") if posthoc.get("split", "test") == "test" else None


def procedure_error(run: RunData, mode: str) -> float | None:
    """Test error of the last epoch under ``mode``: ``eval.json`` when it used ``mode``,
    else ``probe_test.json`` at the last epoch, else ``eval_last_<mode>.json``."""
    e = run.eval or {}
    last = e.get("epoch", (run.total_epochs or 0) - 1)
    if e.get("bn_stats") == mode and e.get("split") == "test":
        return e.get("top1_error")
    for r in (read_json(run.path / "probe_test.json") or {}).get("records", []):
        if r.get("bn_stats") == mode and int(r.get("epoch", -1)) == int(last):
            return r.get("top1_error")
    posthoc = read_json(run.path / f"eval_last_{mode}.json") or {}
    return posthoc.get("top1_error") if posthoc.get("split", "test") == "test" else None


def row_summary(row: Row, mode: str | None = None) -> dict[str, Any]:
    """The row's numbers: per-seed lists and their (mean, std, n); ``last`` and ``selected``
    under ``mode`` when given (else each run's own procedure). ``reevaluated``: the runs whose
    ``eval.json`` used another procedure than ``mode``."""
    per_seed = {"last": [last_error(r, mode) for r in row.runs],
                "selected": [selected_error(r, mode) for r in row.runs],
                "best_test": [(b or (None, None))[1] for b in map(best_test_epoch, row.runs)]}
    for procedure in BN_STATS:
        per_seed[f"bn_{procedure}"] = [procedure_error(r, procedure) for r in row.runs]
    paper = row.runs[0].paper.get("top1_error")
    return {"label": row.label, "seeds": row.seeds, "per_seed": per_seed,
            "stats": {k: mean_std(v) for k, v in per_seed.items()},
            "bn_stats": mode or (row.runs[0].config.get("eval") or {}).get("bn_stats", "running"),
            "reevaluated": [r.label for r in row.runs
                            if mode is not None and run_procedure(r) != mode],
            "paper": None if paper is None else float(paper),
            "selected_epochs": [None if ((r.eval or {}).get("selected") or {}).get("epoch")
                                is None else int(r.eval["selected"]["epoch"]) + 1
                                for r in row.runs]}


def format_stat(stat: tuple[float | None, float | None, int], n_seeds: int,
                signed: bool = False) -> str:
    """``12.34``, ``12.34 ± 0.56`` or, when some seeds lack it, ``12.34 (2 of 3)``;
    ``signed``: a difference, ``+0.18`` for a positive mean."""
    mean, std, n = stat
    if mean is None:
        return "–"
    shown = f"{mean:+.2f}" if signed else fmt(mean)
    text = shown if std is None else f"{shown} ± {fmt(std)}"
    return text if n == n_seeds else f"{text} ({n} of {n_seeds})"


def section_rows(report: Report, runs: Sequence[RunData], bn_stats: str | None = None) -> None:
    """"Rows": last and validation-selected epoch per method over seeds, the official
    protocol's best test epoch, the paper; then the BN procedures and mixing gains. With
    ``bn_stats``, every run is read under that procedure (module docstring)."""
    if not any((r.eval or {}).get("selected") for r in runs):
        return  # runs from before the protocol: the Results table says all there is
    ignore = PROCEDURE_KEYS if bn_stats else ()
    rows = seed_rows(runs, ignore)
    summaries = {id(row): row_summary(row, bn_stats) for row in rows}
    under = (f"under `{bn_stats}` BatchNorm statistics for every run" if bn_stats
             else "under the run's `eval.bn_stats`")
    report.add("## Rows (seeds pooled)", "",
               "One row per method: runs whose configs differ only in `seed`. Test error (%) "
               f"as mean ± sample std over seeds. *Last*: the last epoch, {under}; "
               "*selected*: the epoch with the best validation "
               "`eval.select_metric`. *Best test epoch* is the official code's protocol "
               "(test evaluated every epoch, the best reported): optimistic, a diagnostic "
               "that nothing reads. Each number is the run's own evaluation file; under "
               "`train` statistics a second evaluation of the same weights (a probe, `otlt "
               "eval`) redraws its recalibration batches and, with a mixer, their mixing, so "
               "it can differ by a few tenths of a point.", "",
               "| row | seeds | BN statistics | last epoch | validation-selected | selected "
               "epoch | best test epoch (optimistic) | paper | last − paper |",
               "|---|---|---|---:|---:|---|---:|---:|---:|")
    for row in rows:
        s = summaries[id(row)]
        n, st = len(row.runs), s["stats"]
        delta = (None if st["last"][0] is None or s["paper"] is None
                 else st["last"][0] - s["paper"])
        mark = " †" if s["reevaluated"] else ""
        report.add(f"| {cell(row.label)} | {', '.join(map(str, s['seeds']))} | "
                   f"{s['bn_stats']}{mark} | "
                   f"{format_stat(st['last'], n)} | {format_stat(st['selected'], n)} | "
                   f"{', '.join('–' if e is None else str(e) for e in s['selected_epochs'])} | "
                   f"{format_stat(st['best_test'], n)} | {fmt(s['paper'])} | "
                   f"{'–' if delta is None else f'{delta:+.2f}'} |")
    report.add("")
    reevaluated = [name for row in rows for name in summaries[id(row)]["reevaluated"]]
    if reevaluated:
        report.add(f"† Re-evaluated under `{bn_stats}` after training (its `eval.json` used "
                   f"another procedure): {', '.join(map(cell, reevaluated))}. Last epoch from "
                   "`probe_test.json` or `eval_last_<mode>.json`; the validation-selected "
                   "checkpoint, chosen under the run's own procedure, from "
                   "`eval_best_<mode>.json`. Its *best test epoch* is the per-epoch "
                   "diagnostic logged while it trained, under its own procedure.", "")
    seeded = [row for row in rows if len(row.runs) > 1]
    for row in seeded:
        ps = summaries[id(row)]["per_seed"]
        report.add(f"- {cell(row.label)}, per seed (last / selected): " + "; ".join(
            f"seed {seed}: {fmt(a)} / {fmt(b)}"
            for seed, a, b in zip(row.seeds, ps["last"], ps["selected"], strict=True)))
    if seeded:
        report.add("")
    _procedure_table(report, rows, summaries)
    _gains_table(report, rows, summaries, ignore)


def _procedure_table(report: Report, rows: Sequence[Row], summaries: dict[int, Any]) -> None:
    if not any(summaries[id(r)]["stats"][f"bn_{m}"][0] is not None
               for r in rows for m in BN_STATS if m != summaries[id(r)]["bn_stats"]):
        return
    report.add("### Last epoch under each BatchNorm procedure", "",
               "Test error (%) of the last epoch's weights with BatchNorm statistics from "
               "each procedure (`otlt probe --split test` or `otlt eval --bn-stats`); in bold the "
               "run's own `eval.bn_stats`, the one its `eval.json` used.", "",
               "| row | " + " | ".join(BN_STATS) + " |", "|---|" + "---:|" * len(BN_STATS))
    for row in rows:
        s = summaries[id(row)]
        cells = []
        for mode in BN_STATS:
            text = format_stat(s["stats"][f"bn_{mode}"], len(row.runs))
            cells.append(f"**{text}**" if mode == s["bn_stats"] and text != "–" else text)
        report.add(f"| {cell(row.label)} | " + " | ".join(cells) + " |")
    report.add("")


def mixer_name(row: Row) -> str:
    return str((row.runs[0].config.get("mix") or {}).get("name", "none"))


def rival_pairs(rows: Sequence[Row], ignore: Sequence[str] = ()) -> list[tuple[Row, Row]]:
    """``(otmix_row, other)`` for every OTmix row and every row with another mixer on the
    same :func:`recipe`: OTmix against random pairing (CMO) and the other mixers, as the
    paper's tables compare them."""
    return [(row, other) for row in rows if mixer_name(row) == "otmix"
            for other in rows if other.is_mixing and mixer_name(other) != "otmix"
            and recipe(other, ignore) == recipe(row, ignore)]


def pair_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Row ``a`` minus row ``b`` (two :func:`row_summary` results) over the seeds both have:
    ``last``, ``selected`` and ``best_test`` (each run's best test epoch, the optimistic
    official protocol) as :func:`paired_difference`, ``last_interval`` the 95% t interval of
    the last-epoch difference (None with one seed), ``paper`` as a number or None."""
    common = [s for s in a["seeds"] if s in b["seeds"]]
    return {"seeds": common,
            **{key: paired_difference(a, b, key, common)
               for key in ("last", "selected", "best_test")},
            "last_interval": t_interval(paired_values(a, b, "last", common)),
            "paper": None if a["paper"] is None or b["paper"] is None
            else a["paper"] - b["paper"]}


def _gains_table(report: Report, rows: Sequence[Row], summaries: dict[int, Any],
                 ignore: Sequence[str] = ()) -> None:
    bases = [(row, base) for row in rows if (base := base_of(row, rows, ignore)) is not None]
    tables = (
        (bases, "### What mixing changes against its base row",
         "Mixing row minus its base (same config without the mixer)", "mixing row", "base row"),
        (rival_pairs(rows, ignore), "### OTmix against another mixer on the same recipe",
         "OTmix row minus each row with another mixer and otherwise the same config (CMO is "
         "OTmix's foreground sampler, box and loss with random pairing)", "OTmix row",
         "other mixer"))
    for pairs, title, what, first, other in tables:
        if not pairs:
            continue
        report.add(title, "", f"{what}, in points of test error (negative: the first row is "
                   "better): mean ± sample std over the seeds both rows have of the per-seed "
                   "differences; the 95% interval is Student's t over the per-seed "
                   "differences (two or more seeds). *Best test epoch*: each run's best "
                   "per-epoch test error (`eval.test_every_epoch`), the official protocol the "
                   "paper's numbers come from: optimistic, a diagnostic beside the paper's "
                   "difference, never a result.", "",
                   f"| {first} | {other} | seeds | last epoch | last epoch, 95% t interval | "
                   "validation-selected | best test epoch (optimistic) | paper |",
                   "|---|---|---|---:|---:|---:|---:|---:|")
        for row, base in pairs:
            d = pair_differences(summaries[id(row)], summaries[id(base)])
            n = len(d["seeds"])
            paper = "–" if d["paper"] is None else f"{d['paper']:+.2f}"
            interval = ("–" if d["last_interval"] is None
                        else "{} to {}".format(*map(fmt, d["last_interval"]))
                        + ("" if d["last"][2] == n else f" ({d['last'][2]} of {n})"))
            report.add(f"| {cell(row.label)} | {cell(base.label)} | "
                       f"{', '.join(map(str, d['seeds'])) or '–'} | "
                       f"{format_stat(d['last'], n, True)} | {interval} | "
                       f"{format_stat(d['selected'], n, True)} | "
                       f"{format_stat(d['best_test'], n, True)} | {paper} |")
        report.add("")


def paired_values(a: dict[str, Any], b: dict[str, Any], key: str,
                  seeds: Sequence[int]) -> list[float | None]:
    """``a - b`` per seed (two :func:`row_summary` results, ``key`` one of their per-seed
    lists) over ``seeds``; ``None`` where either side lacks the number."""
    values = []
    for seed in seeds:
        x = a["per_seed"][key][a["seeds"].index(seed)]
        y = b["per_seed"][key][b["seeds"].index(seed)]
        values.append(None if x is None or y is None else x - y)
    return values


def paired_difference(a: dict[str, Any], b: dict[str, Any], key: str,
                      seeds: Sequence[int]) -> tuple[float | None, float | None, int]:
    """``mean_std`` of :func:`paired_values` (a seed missing a number is left out)."""
    return mean_std(paired_values(a, b, key, seeds))


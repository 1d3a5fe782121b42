"""One run's evaluation under every BatchNorm procedure, as a Markdown table.

    python scripts/bn_procedure_table.py RUN_DIR [--compare LABEL=RUN_DIR ...]

Rows: the four ``eval.bn_stats`` procedures (``otlt.config.BN_STATS`` order). Columns:
validation and test error (%) at the last epoch, at the last mixing epoch
(``optim.epochs - mix.skip_last``, counted from 1), and
the test error of the validation-selected checkpoint (``best.safetensors``, selected under
the run's own procedure) re-evaluated under each procedure. Every number is read from the
run's files through the report's readers (``bn_probe_series``, ``bn_procedure_rows``),
never computed here:

- validation, last epoch: the in-run ``bn_probe`` of ``metrics.jsonl``, else ``probe_val.json``;
- validation, other epochs: ``probe_val.json`` (``otlt probe RUN --split val``);
- test: ``eval.json`` for the run's own procedure, ``probe_test.json`` (``otlt probe RUN
  --split test``), ``eval_<checkpoint>_<mode>.json`` (``otlt eval RUN --checkpoint best
  --bn-stats MODE``).

``--compare`` adds a line per other run with its ``eval.json`` (e.g. a committed baseline).
A missing number is ``–``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from otlt.config import BN_STATS
from otlt.report import RunData, bn_probe_series, bn_procedure_rows, load_run, read_json


def table(run: RunData) -> list[str]:
    """The Markdown table of one run (rows: procedures in ``BN_STATS`` order)."""
    cfg, e = run.config, run.eval or {}
    last = int(cfg["optim"]["epochs"]) - 1
    mixing_last = last - int((cfg.get("mix") or {}).get("skip_last", 3))  # schema default
    own = (cfg.get("eval") or {}).get("bn_stats", "running")
    # validation: in-run probes first, then otlt probe (epochs counted from 1 in the series)
    val = {(epoch - 1, mode): 100.0 - acc
           for mode, points in bn_probe_series(run).items() for epoch, acc in points}
    test = {(r["epoch"], r["bn_stats"]): r.get("test_top1_error")
            for r in bn_procedure_rows(run)}

    def test_of(epoch: int, mode: str, checkpoint: str) -> float | None:
        if mode == own and checkpoint == "last" and epoch == last:
            return e.get("top1_error")
        if mode == own and checkpoint == "best":
            return (e.get("selected") or {}).get("top1_error")
        if checkpoint == "last" and test.get((epoch, mode)) is not None:
            return test[(epoch, mode)]
        return (read_json(run.path / f"eval_{checkpoint}_{mode}.json") or {}).get("top1_error")

    selected = e.get("selected", {}).get("epoch")
    sel = "–" if selected is None else str(int(selected) + 1)
    lines = [f"| BN statistics | val, last epoch ({last + 1}) | test, last epoch | "
             f"val, last mixing epoch ({mixing_last + 1}) | test, last mixing epoch | "
             f"test, validation-selected (epoch {sel}) |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode in BN_STATS:
        cells = [val.get((last, mode)), test_of(last, mode, "last"),
                 val.get((mixing_last, mode)), test.get((mixing_last, mode)),
                 test_of(last, mode, "best")]
        name = f"**{mode}**" if mode == own else mode
        lines.append(f"| {name} | " + " | ".join(fmt(c) for c in cells) + " |")
    return lines


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--compare", action="append", default=[], metavar="LABEL=RUN_DIR")
    args = parser.parse_args()
    print("\n".join(table(load_run(args.run))))
    if args.compare:
        print()
        for item in args.compare:
            label, _, path = item.rpartition("=")  # a label may hold "="
            e = read_json(Path(path) / "eval.json") or {}
            print(f"- {label}: {fmt(e.get('top1_error'))} (last epoch, "
                  f"{e.get('bn_stats', 'running')} statistics; `{path}`)")


if __name__ == "__main__":
    main()

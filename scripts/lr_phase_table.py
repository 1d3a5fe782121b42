"""Mean (and population sd) of a metrics.jsonl key over epoch ranges, one column per run:
how a per-epoch curve behaves in each learning-rate phase.

    python scripts/lr_phase_table.py RUN_DIR [RUN_DIR ...] [--key test_diag_acc]
        [--phases 101-159,161-200,201-237,238-240]

Epochs are counted from 1, ranges inclusive. docs/research.md's table of the Table 1 runs'
test diagnostic by phase is this script on results/cifar10_lt_r100_table1/cifar10_lt_r100_{erm,
erm_otmix,drw,drw_otmix} with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from otlt.engine.logging import read_metrics


def phase_stats(records: list[dict], key: str, first: int, last: int) -> tuple[float, float]:
    """Mean and population sd of ``key`` over epochs ``first..last`` (from 1, inclusive)."""
    values = [r[key] for r in records if first <= r["epoch"] + 1 <= last and key in r]
    return statistics.mean(values), statistics.pstdev(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--key", default="test_diag_acc")
    parser.add_argument("--phases", default="101-159,161-200,201-237,238-240")
    args = parser.parse_args()
    phases = [tuple(int(v) for v in p.split("-")) for p in args.phases.split(",")]
    records = {run.name: read_metrics(run / "metrics.jsonl") for run in args.runs}
    print("| epochs | " + " | ".join(records) + " |")
    print("|---|" + "---:|" * len(records))
    for first, last in phases:
        cells = [phase_stats(r, args.key, first, last) for r in records.values()]
        print(f"| {first}-{last} | " + " | ".join(f"{m:.2f} (sd {s:.2f})" for m, s in cells)
              + " |")


if __name__ == "__main__":
    main()

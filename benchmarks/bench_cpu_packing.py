"""Is a small CPU better used by one training with every thread or by one training per core?

Runs ``otlt train`` on a preset for a few epochs in two layouts, one after the other, on the
same machine and data:

- ``one``: one process with ``--threads-per-run`` x ``--runs`` torch threads;
- ``packed``: ``--runs`` processes side by side, ``--threads-per-run`` threads each.

and reports each layout's epoch throughput from the runs' own ``metrics.jsonl``
(``epoch_seconds``, the whole epoch: training steps, BatchNorm recalibration, validation, the
per-epoch test diagnostic when the preset's command logs it). The first ``--warmup`` epochs
of every run are left out. The figure that decides is

    packed_gain = (runs / median packed epoch seconds) / (1 / median one-process epoch seconds)

the number of epochs per second the packed layout finishes, over the one-process layout's:
above 1, packing finishes a set of runs sooner. Each run's thread count is part of what it
computes (bf16 reductions run in a thread-dependent order: docs/research.md), so a series
keeps one layout per run; a resume must keep the run's thread count to stay bit-exact.

    python benchmarks/bench_cpu_packing.py --data ../shared/data/cifar10-jpeg.zip \\
        --json benchmarks/cpu_packing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the Table 1 series' command (results/collect.sh), less its output folder
SERIES_SETTINGS = ["data.meta_per_class=0", "eval.test_every_epoch=true", "train.progress=false"]


def start_run(config: str, data: str, out: Path, name: str, threads: int,
              epochs: int, settings: list[str]) -> subprocess.Popen:
    """``otlt train`` of ``config`` for ``epochs`` epochs with ``threads`` torch threads, the
    series' settings, then ``settings``, then its own folder and name."""
    cmd = [sys.executable, "-m", "otlt.cli", "train", "--config", config, "--data", data,
           "--stop-after", str(epochs)]
    for setting in [*SERIES_SETTINGS, *settings, f"out_dir={out}", f"name={name}"]:
        cmd += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def epoch_seconds(run_dir: Path, warmup: int) -> list[float]:
    return [r["epoch_seconds"] for r in read_jsonl(run_dir / "metrics.jsonl")[warmup:]]


def cpu_description() -> dict:
    """The CPU's model name (``cpu``), its identity (``cpu_identity``: vendor, family, model,
    bf16 instruction sets) and whether it has ``avx512_bf16``; both None where
    :func:`otlt.engine.provenance.cpu_identity` reads no identity (off Linux x86)."""
    from otlt.engine.provenance import cpu_identity, cpu_name  # the driver times nothing itself

    identity = cpu_identity()
    return {"cpu": cpu_name(), "cpu_identity": identity,
            "avx512_bf16": None if identity is None or identity["bf16"] is None
            else "avx512_bf16" in identity["bf16"]}


def run_layout(label: str, n_runs: int, threads: int, args, out: Path) -> dict:
    """Start ``n_runs`` trainings at once, wait for all, return their epoch times."""
    started = time.perf_counter()
    names = [f"{label}_{i}" for i in range(n_runs)]
    procs = [start_run(args.config, args.data, out, n, threads, args.epochs, args.set)
             for n in names]
    codes = [p.wait() for p in procs]
    if any(codes):
        logs = "\n".join((out / f"{n}.log").read_text()[-2000:] for n in names)
        raise SystemExit(f"{label}: a training failed (exit codes {codes}):\n{logs}")
    times = {n: epoch_seconds(out / n, args.warmup) for n in names}
    # what each run recorded of itself: torch threads, torch version, commit
    sittings = {n: read_jsonl(out / n / "sittings.jsonl")[0] for n in names}
    median = statistics.median(t for ts in times.values() for t in ts)
    return {"runs": n_runs, "threads_per_run": threads,
            "threads_recorded": {n: s.get("threads") for n, s in sittings.items()},
            "torch_version": sittings[names[0]].get("torch_version"),
            "git_commit": sittings[names[0]].get("git_commit"),
            "git_dirty": sittings[names[0]].get("git_dirty"),
            "epoch_seconds": times,
            "median_epoch_s": round(median, 3),
            "epochs_per_s": round(n_runs / median, 5),
            "wall_s": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/cifar10_lt_r100_drw.yaml")
    parser.add_argument("--data", required=True, help="the dataset (zip or folder)")
    parser.add_argument("--runs", type=int, default=2, help="processes in the packed layout")
    parser.add_argument("--threads-per-run", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run")
    parser.add_argument("--warmup", type=int, default=1, help="first epochs left out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (repeatable)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.epochs <= args.warmup:
        parser.error("--epochs must exceed --warmup")
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="otlt_packing_") as tmp:
        out = Path(tmp)
        one = run_layout("one", 1, args.threads_per_run * args.runs, args, out)
        packed = run_layout("packed", args.runs, args.threads_per_run, args, out)
    result = {"config": args.config, "settings": [*SERIES_SETTINGS, *args.set],
              "epochs": args.epochs,
              "warmup": args.warmup, "one": one, "packed": packed,
              "packed_gain": round(packed["epochs_per_s"] / one["epochs_per_s"], 3),
              **cpu_description(), "cores": os.cpu_count(),
              "load_before": load_before, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run several ``otlt train`` configs side by side (e.g. on one GPU) and report progress.

    python scripts/run_many.py --out runs configs/a.yaml configs/b.yaml [--set k=v ...]

Each config runs in its own process with its log in ``<out>/<name>.log``; small CIFAR models
leave most of a modern GPU idle, so running them together finishes the set far sooner than
one after another. A run directory that already exists is resumed. ``--jobs N`` runs at most
N at a time (a queue, in the order given) and ``--threads T`` gives each child T torch
threads (``OMP_NUM_THREADS``): on a 2-core CPU ``--jobs 2 --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def launch(config: Path, out: Path, overrides: list[str], name: str | None,
           threads: int | None = None) -> subprocess.Popen:
    run_name = name or config.stem
    run_dir = out / run_name
    log = open(out / f"{run_name}.log", "a")  # noqa: SIM115 - owned by the child's lifetime
    if (run_dir / "last.pt").exists():
        cmd = ["otlt", "train", "--resume", str(run_dir)]
    else:
        sets = [a for o in [*overrides, f"name={run_name}", f"out_dir={out}",
                            "train.progress=false"] for a in ("--set", o)]
        cmd = ["otlt", "train", "--config", str(config), *sets]
    cmd = [sys.executable, "-m", "otlt", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def progress(out: Path, names: list[str]) -> str:
    parts = []
    for name in names:
        metrics = out / name / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        done = (out / name / "eval.json").exists()
        last = json.loads(lines[-1]) if lines else {}
        parts.append(f"{name}: {len(lines)} ep" + (" done" if done else "")
                     + (f" {last['epoch_seconds']:.1f}s/ep" if last else ""))
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files; CONFIG:NAME renames a run")
    parser.add_argument("--out", default="runs", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--poll", type=float, default=60.0, help="seconds between reports")
    parser.add_argument("--jobs", type=int, default=0, help="at most this many at once (0: all)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    queue, names = [], []
    for spec in args.configs:
        path, _, name = spec.partition(":")
        extra = []
        if "@" in name:  # CONFIG:NAME@key=value,key=value adds per-run overrides
            name, _, sets = name.partition("@")
            extra = sets.split(",")
        names.append(name or Path(path).stem)
        queue.append((Path(path), args.overrides + extra, name or None))
    jobs = args.jobs if args.jobs > 0 else len(queue)
    procs: list[subprocess.Popen] = []
    start = time.time()
    while queue or any(p.poll() is None for p in procs):
        while queue and sum(p.poll() is None for p in procs) < jobs:
            path, overrides, name = queue.pop(0)
            procs.append(launch(path, args.out, overrides, name, args.threads))
        time.sleep(args.poll)
        print(f"--- {time.time() - start:.0f}s\n{progress(args.out, names)}", flush=True)
    codes = [p.returncode for p in procs]
    print(f"finished in {time.time() - start:.0f}s, exit codes {codes}", flush=True)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())

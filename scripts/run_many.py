"""Run several ``otlt train`` configs side by side (e.g. on one GPU) and report progress.

    python scripts/run_many.py --out runs configs/a.yaml configs/b.yaml [--set k=v ...]

Each config runs in its own process with its log in ``<out>/<name>.log``; small CIFAR models
leave most of a modern GPU idle, so running them together finishes the set far sooner than
one after another. A run directory that already exists is resumed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def launch(config: Path, out: Path, overrides: list[str], name: str | None) -> subprocess.Popen:
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
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


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
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    procs, names = [], []
    for spec in args.configs:
        path, _, name = spec.partition(":")
        extra = []
        if "@" in name:  # CONFIG:NAME@key=value,key=value adds per-run overrides
            name, _, sets = name.partition("@")
            extra = sets.split(",")
        names.append(name or Path(path).stem)
        procs.append(launch(Path(path), args.out, args.overrides + extra, name or None))
    start = time.time()
    while any(p.poll() is None for p in procs):
        time.sleep(args.poll)
        print(f"--- {time.time() - start:.0f}s\n{progress(args.out, names)}", flush=True)
    codes = [p.returncode for p in procs]
    print(f"finished in {time.time() - start:.0f}s, exit codes {codes}", flush=True)
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())

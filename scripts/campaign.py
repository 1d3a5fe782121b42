"""A packed campaign on one GPU: presets x seeds through run_many, returned in at most 8 files.

    python3 scripts/campaign.py --presets cifar10_lt_r100_erm,cifar10_lt_r100_erm_otmix \
        --seeds 0,1,2 --deadline 540 --data-archive .devdata/cifar10-jpeg.tar.xz \
        --work /tmp/campaign --out "$OUT"

Steps: (1) the data: ``--data-archive`` (a .tar.xz/.tar.gz/.tar) is unpacked into
``<work>/data`` unless an earlier call did (a marker names the archive and its size; a zip
is read as it is), or ``--data`` names a folder or zip to use directly; (2) the runs:
``scripts/run_many.py`` with one process per run, the CUDA MPS daemon when there is one (see
its docstring), ``--threads`` torch threads each (default 1), every run under the Table 1
protocol of ``results/cifar10_lt_r100_table1``: ``--set data.meta_per_class=0 --set
eval.test_every_epoch=true --set train.progress=false``, seed k > 0 as ``--set seed=k`` and
the name ``<preset>_seed<k>`` (the names results/collect.sh collects), seed 0 under the
preset's own name, plus any ``--set`` given here; run directories in ``<work>/runs``;
(3) the return: the runs' small files (config.yaml, metrics.jsonl, eval.json, splits.json,
sittings.jsonl, the post-hoc eval_*/probe_*.json, plans/), their logs, run_many's summary
and the MPS logs, the last and validation-selected weights as fp16 safetensors
(``scripts/collect_results.py``'s export, ``--keep-epochs`` adds kept epochs), and
``last.pt`` of every run that did not finish (so it can be resumed elsewhere: ``otlt train
--resume``), packed into tar.gz files of at most ``--max-file-mb`` (15) each,
``--max-total-mb`` (60) in all, in that order of priority, with ``summary.json`` beside
them: at most 8 files in ``--out``, counting files another step of the same command left
there before it (``scripts/device_check.py``'s JSON and log tar: run the check first). What
did not fit is named in ``summary.json`` (``left_behind``).

``--deadline SECONDS`` is the whole command's wall-clock budget: the runs get what is left
after the unpacking minus ``--pack-seconds`` (30) for step 3, and each stops, resumable, at
an epoch boundary before that (run_many's ``--deadline``, ``otlt train --time-limit``).
Running the same command again (same ``--work``) skips finished runs, resumes stopped ones
and starts the ones never started. A preset may also be a YAML file (its stem names the
runs), which with ``--data`` and ``--set`` is how the CPU dry run of the tests works.

On a lent GPU machine (no otlt install there: this script puts ``src`` on the path itself;
``../shared`` does not travel): here, once, ``mkdir -p .devdata && cp
../shared/data/cifar10-jpeg.tar.xz .devdata/`` (``/.devdata/`` is ignored by git), then
``run`` with ``carry=[".devdata"]``, ``timeout_s=600`` and the command above (``timeout_s``
bounds the command alone; the session's 15 minutes of device time also pay the machine's
start-up, the transfers and idle time, so a device check and a campaign do not both fit at
full length: give each a share, e.g. ``--budget 300`` to the check and ``--deadline 240``
here, in one command, the check first). The working tree travels too:
``tests/test_weights_archive.py`` keeps it and the carried archive inside the 64 MiB a call
takes.

On a GPU, ``--set train.bn_stack=20 --set train.eval_batch_size=10000`` cut each epoch's
evaluation to a few forwards (statistics equal to rounding, not bit for bit: README, "One step
without launch overhead") and ``--set train.cuda_graphs=true`` the step's launches, once
``scripts/device_check.py --only graphs`` has passed there.

Not run on a GPU yet: only the CPU dry run of tests/test_campaign.py has run it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = ["data.meta_per_class=0", "eval.test_every_epoch=true", "train.progress=false"]
SMALL = ("config.yaml", "metrics.jsonl", "eval.json", "splits.json")
MB = 1_000_000
MAX_FILES = 8
OUR_ARCHIVE = re.compile(r"runs(_\d+)?\.tar\.gz")


def ensure_otlt_importable() -> None:
    """Put ``<repo>/src`` on this process's path and the children's PYTHONPATH when otlt is
    not installed (a lent GPU machine)."""
    if importlib.util.find_spec("otlt") is None:  # found without importing torch
        src = str(REPO / "src")
        sys.path.insert(0, src)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH")) if p)


def preset_file(preset: str) -> tuple[Path, str]:
    """(config file, run name) of a preset name or a YAML file."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path.resolve(), path.stem
    from otlt.config import preset_path

    return preset_path(preset), preset


def unpack(archive: Path, work: Path) -> Path:
    """The data folder of ``archive`` unpacked under ``work/data`` (once; a zip as it is)."""
    if archive.suffix == ".zip":
        return archive.resolve()
    target = work / "data"
    marker = target / f".unpacked-{archive.name}"
    stamp = str(archive.stat().st_size)
    if not (marker.is_file() and marker.read_text() == stamp):
        start = time.monotonic()
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tops = {m.name.split("/")[0] for m in tar.getmembers()}
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target, **extra)
        (target / f".top-{archive.name}").write_text("\n".join(sorted(tops)))
        marker.write_text(stamp)
        print(f"campaign: unpacked {archive} in {time.monotonic() - start:.0f}s", flush=True)
    tops = (target / f".top-{archive.name}").read_text().split("\n")
    return target / tops[0] if len(tops) == 1 else target


def run_specs(presets: list[str], seeds: list[int]) -> list[str]:
    """run_many's CONFIG:NAME[@seed=k] for every preset and seed."""
    specs = []
    for preset in presets:
        config, name = preset_file(preset)
        for k in seeds:
            specs.append(f"{config}:{name}" if k == 0 else f"{config}:{name}_seed{k}@seed={k}")
    return specs


def pack_items(runs_dir: Path, stage: Path, keep_epochs: list[int]) -> list[tuple[Path, str]]:
    """(file, name in the archive) in order of priority: small files, logs and fp16 weights of
    every run first, then ``last.pt`` of each run that did not finish."""
    from collect_results import export_weights

    from otlt.errors import OtltError

    summary = json.loads((runs_dir / "summary.json").read_text())
    first, resume = [], []
    for extra in [runs_dir / "summary.json", *sorted((runs_dir / "mps" / "log").glob("*"))]:
        if extra.is_file():
            first.append((extra, str(extra.relative_to(runs_dir))))
    for r in summary["runs"]:
        run, name = runs_dir / r["name"], r["name"]
        if (runs_dir / f"{name}.log").is_file():
            first.append((runs_dir / f"{name}.log", f"{name}.log"))
        if not run.is_dir():
            continue
        files = [run / f for f in SMALL] + sorted(run.glob("eval_*.json")) + sorted(
            run.glob("probe_*.json")) + sorted(p for p in run.glob("plans/**/*") if p.is_file())
        files.append(run / "sittings.jsonl")  # machine and threads per sitting, if written
        first += [(f, str(f.relative_to(runs_dir))) for f in files if f.is_file()]
        try:
            for w in export_weights(run, stage / name, keep_epochs):
                first.append((w, str(w.relative_to(stage))))
        except (SystemExit, OtltError, OSError) as exc:  # refused (over 1 MB), damaged,
            # or not writable: the run's other files still go; its weights stay behind
            print(f"campaign: {name}: fp16 weights not exported ({exc})", flush=True)
        if r["state"] != "finished" and (run / "last.pt").is_file():
            resume.append((run / "last.pt", f"{name}/last.pt"))
    return first + resume


def archive_places(out: Path) -> int:
    """How many archives ``out`` can take: files another step of the same device command
    put there (device_check's JSON and log tar) come back too, and summary.json takes one
    place; this script's own archives of an earlier call are overwritten, so they count as
    free."""
    def ours(path: Path) -> bool:
        return path.parent == out and (path.name == "summary.json"
                                       or OUR_ARCHIVE.fullmatch(path.name) is not None)

    others = [p for p in out.rglob("*") if p.is_file() and not ours(p)]
    return max(MAX_FILES - 1 - len(others), 0)


def pack(items: list[tuple[Path, str]], out: Path, max_file: int, max_total: int,
         max_chunks: int = MAX_FILES - 1) -> tuple[list[str], list[str]]:
    """Greedy tar.gz chunks under ``out`` (sizes bounded by the uncompressed bytes): the
    files written and the archive names left behind. A file that cannot go (over
    ``max_file`` or the ``max_total`` left) is left behind before it can open a chunk, so
    every chunk holds files and at most ``max_chunks`` are written (summary.json and any
    other file already in ``out`` take the rest of the ``MAX_FILES``)."""
    chunks: list[list[tuple[Path, str]]] = []
    sizes: list[int] = []
    left = []
    for path, name in items:
        size = path.stat().st_size
        if size > max_file or sum(sizes) + size > max_total:
            left.append(name)
            continue
        if not chunks or sizes[-1] + size > max_file:
            if len(chunks) >= max_chunks:
                left.append(name)
                continue
            chunks.append([])
            sizes.append(0)
        chunks[-1].append((path, name))
        sizes[-1] += size
    written = []
    for i, chunk in enumerate(chunks):
        target = out / ("runs.tar.gz" if i == 0 else f"runs_{i + 1}.tar.gz")
        with tarfile.open(target, "w:gz") as tar:
            for path, name in chunk:
                tar.add(path, arcname=name)
        written.append(target.name)
    return written, left


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", required=True,
                        help="comma-separated preset names or YAML files")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-archive", type=Path, help="a .tar.xz/.tar.gz of the dataset")
    data.add_argument("--data", help="a dataset folder or zip, used as it is")
    parser.add_argument("--out", type=Path, required=True, help="where the <= 8 files go")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "campaign",
                        help="data and run directories (default runs/campaign)")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="wall-clock budget of the whole command")
    parser.add_argument("--pack-seconds", type=float, default=30.0,
                        help="kept back from the deadline for packing (default 30)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="more overrides for every run")
    parser.add_argument("--jobs", type=int, default=0, help="at most this many at once (0: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="run_many --grace (default 10)")
    parser.add_argument("--mps", choices=["auto", "off"], default="auto")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between reports")
    parser.add_argument("--keep-epochs", default="",
                        help="comma-separated kept epochs to return as fp16 too")
    parser.add_argument("--max-file-mb", type=float, default=15.0)
    parser.add_argument("--max-total-mb", type=float, default=60.0)
    args = parser.parse_args(argv)
    ensure_otlt_importable()
    presets = [p for p in args.presets.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    work = args.work.resolve()
    runs_dir = work / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data_path = (unpack(args.data_archive.resolve(), work) if args.data_archive
                 else Path(args.data).resolve())
    overrides = [*PROTOCOL, f"data.path={data_path}", *args.overrides]
    cmd = [sys.executable, str(REPO / "scripts" / "run_many.py"), "--out", str(runs_dir),
           "--jobs", str(args.jobs), "--threads", str(args.threads), "--grace", str(args.grace),
           "--mps", args.mps, "--poll", str(args.poll),
           *[a for o in overrides for a in ("--set", o)], *run_specs(presets, seeds)]
    if args.deadline is not None:
        left = args.deadline - (time.monotonic() - start) - args.pack_seconds
        cmd[2:2] = ["--deadline", f"{max(left, 0.0):.1f}"]
    print(f"campaign: {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd).returncode
    sys.path.insert(0, str(REPO / "scripts"))  # collect_results beside this file
    stage = work / "pack"
    shutil.rmtree(stage, ignore_errors=True)
    keep = [int(e) for e in args.keep_epochs.split(",") if e.strip()]
    items = pack_items(runs_dir, stage, keep) if (runs_dir / "summary.json").is_file() else []
    for stale in args.out.glob("runs*.tar.gz"):  # an earlier call's: replaced, not added to
        if OUR_ARCHIVE.fullmatch(stale.name):
            stale.unlink()
    written, left_behind = pack(items, args.out, int(args.max_file_mb * MB),
                                int(args.max_total_mb * MB), archive_places(args.out))
    summary = json.loads((runs_dir / "summary.json").read_text()) if items else {}
    summary.update({"campaign": {"presets": presets, "seeds": seeds, "data": str(data_path),
                                 "overrides": overrides, "deadline": args.deadline,
                                 "run_many_exit_code": code, "files": written,
                                 "left_behind": left_behind,
                                 "seconds": round(time.monotonic() - start, 1)}})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"campaign: {len(written)} archive(s) + summary.json in {args.out}"
          + (f"; left behind: {', '.join(left_behind)}" if left_behind else "")
          + f"; {time.monotonic() - start:.0f}s in all", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

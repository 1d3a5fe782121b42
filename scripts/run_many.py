"""Run several ``otlt train`` configs side by side (e.g. packed on one GPU) and report progress.

    python scripts/run_many.py --out runs configs/a.yaml configs/b.yaml [--set k=v ...]
        [--jobs N] [--threads T] [--deadline SECONDS] [--grace SECONDS] [--mps auto|off]

Each config runs in its own process with its log in ``<out>/<name>.log``; small CIFAR
models are expected to leave most of a modern GPU idle, so that running them together
finishes the set sooner than one after another (see the last paragraph: not measured here
yet). ``CONFIG:NAME`` renames a run and ``CONFIG:NAME@key=value,key=value`` adds overrides
to that run alone. A run directory that already exists is resumed (``otlt train
--resume``, passing ``data.path`` on if ``--set`` gives one); one that already holds
``eval.json`` is finished and is not started again, so the same command, run again,
continues a set where it stopped. ``--jobs N`` runs at most N at a time (a queue, in the
order given) and ``--threads T`` gives each child T torch threads (``OMP_NUM_THREADS``): on a
2-core CPU ``--jobs 2 --threads 1``; on a GPU, too, one thread each keeps N launch-bound
processes from fighting over the cores.

**One GPU, many processes.** With ``--mps auto`` (the default), when
``nvidia-cuda-mps-control`` is on PATH and ``nvidia-smi -L`` lists a GPU, the CUDA MPS
control daemon is started first (``nvidia-cuda-mps-control -d``, a user-space daemon that
changes no GPU setting; its pipe and log folders are ``<out>/mps/{pipe,log}`` through
``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``, so it needs no root, and the
children get the same variables), so the runs' kernels are expected to share the GPU at once
instead of time-slicing between contexts. A one-line CUDA client must then run under it
within 30 s, else the daemon is stopped again and the runs are plain processes, with the
reason in the summary. It is stopped at the end (``echo quit |
nvidia-cuda-mps-control``), also after an error, Ctrl-C or SIGTERM. Without it the runs are
plain processes, and the script says so. (A pipe folder whose path is too long for a unix
socket goes under /tmp instead.)

**A deadline.** ``--deadline SECONDS`` (wall clock from the start of this script): every
child gets ``otlt train --time-limit`` = the time left minus ``--grace`` (default 10 s), so
each stops by itself at an epoch boundary when its next epoch would not fit (``last.pt`` at
that epoch, resumable: run the same command again). A queued run is started only while time
is left for it; the rest are reported as not started. A child still running at the deadline
(its first epoch, or its final evaluation, outlasting the estimate) is terminated (SIGTERM,
SIGKILL 15 s later): every file otlt writes is written atomically, so it resumes from its
last ``last.pt``.

**The summary.** At the end it prints, and writes to ``<out>/summary.json``, per run: its
state (``finished``, ``stopped`` resumable (also a child that exited 130 or 143 on a signal sent
to it from elsewhere), ``failed`` with the exit code, ``not started``),
epochs done / total (lines of ``metrics.jsonl`` / ``optim.epochs`` of its ``config.yaml``;
a damaged line before the last is named instead of counted past),
the test top-1 error of ``eval.json`` when finished, the seconds its process ran here and
the training seconds logged over all its sessions; and whether MPS was used. The exit code
is 0 unless a run failed (then the largest failing code, 1 for a signal) or the script was
interrupted (130).

MPS packing has not been run on a GPU through this script yet, and no committed result of
this project measures it: that runs pack well under the daemon is an expectation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from otlt.cli.parser import set_flags
from otlt.engine.logging import evaluation_share, read_metrics
from otlt.errors import OtltError

MPS_CONTROL = "nvidia-cuda-mps-control"
MAX_PIPE_PATH = 80  # unix socket paths end at 108 bytes; the daemon adds its own names
PIPE_PREFIX = "otlt-mps-"


#: otlt's exit codes after Ctrl-C (130) and SIGTERM (143): stopped at a resumable point,
#: also when the signal came from elsewhere (a cgroup-wide kill), not a failure
STOPPED_CODES = (130, 143)


@dataclass
class Run:
    config: Path
    name: str
    overrides: list[str]
    proc: subprocess.Popen | None = None
    started: float | None = None
    ended: float | None = None
    terminated: bool = False
    skipped: bool = False  # finished before this call
    log_files: list = field(default_factory=list)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def child_command(run: Run, out: Path, time_limit: float | None) -> list[str]:
    """The ``otlt train`` command line of ``run``: a fresh run with the overrides, or a
    resume of its directory (passing ``data.path`` on: the data may live elsewhere now)."""
    run_dir = out / run.name
    if (run_dir / "config.yaml").exists():  # without last.pt it died in epoch 1: afresh
        data = [o for o in run.overrides if o.startswith("data.path=")][-1:]
        cmd = ["train", "--resume", str(run_dir), *set_flags(data)]
    else:
        cmd = ["train", "--config", str(run.config), *set_flags(
            [*run.overrides, f"name={run.name}", f"out_dir={out}", "train.progress=false"])]
    if time_limit is not None:
        cmd += ["--time-limit", f"{max(time_limit, 0.01):.2f}"]
    return [sys.executable, "-m", "otlt", *cmd]


def launch(run: Run, out: Path, env: dict[str, str], time_limit: float | None) -> None:
    log = open(out / f"{run.name}.log", "a")  # noqa: SIM115 - owned by the child's lifetime
    run.log_files.append(log)
    cmd = child_command(run, out, time_limit)
    log.write(f"# run_many: {' '.join(cmd)}\n")
    log.flush()
    run.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    run.started = time.monotonic()


def run_metrics(run_dir: Path) -> tuple[list[dict], str | None]:
    """``run_dir``'s ``metrics.jsonl`` records (:func:`otlt.engine.logging.read_metrics`: a
    torn last line, a write a kill cut short, is dropped) and None; or, when a line before the
    last is damaged, no records and the error, so the run is reported damaged (its epoch count
    unknown) while the other runs go on."""
    try:
        return read_metrics(run_dir / "metrics.jsonl"), None
    except OtltError as exc:
        return [], str(exc)


def progress(out: Path, names: list[str]) -> str:
    parts = []
    for name in names:
        records, damaged = run_metrics(out / name)
        if damaged:
            parts.append(f"{name}: {damaged}")
            continue
        done = (out / name / "eval.json").exists()
        last = records[-1] if records else {}
        parts.append(f"{name}: {len(records)} ep" + (" done" if done else "")
                     + (f" {last['epoch_seconds']:.1f}s/ep" if "epoch_seconds" in last else ""))
    return "\n".join(parts)


def gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def start_mps(out: Path) -> tuple[dict[str, str] | None, str]:
    """Start the MPS control daemon for this set of runs: (its environment variables, a
    note), or (None, why not)."""
    control = shutil.which(MPS_CONTROL)
    if control is None:
        return None, f"{MPS_CONTROL} is not on PATH: plain processes"
    if not gpu_present():
        return None, "no GPU (nvidia-smi -L lists none): plain processes"
    pipe, log = (out / "mps" / "pipe").resolve(), (out / "mps" / "log").resolve()
    if len(str(pipe)) > MAX_PIPE_PATH:
        pipe = Path(tempfile.mkdtemp(prefix=PIPE_PREFIX))
    pipe.mkdir(parents=True, exist_ok=True)
    log.mkdir(parents=True, exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
    try:
        started = subprocess.run([control, "-d"], env={**os.environ, **env},
                                 capture_output=True, text=True, timeout=MPS_START_TIMEOUT)
    except OSError as exc:
        return None, f"{MPS_CONTROL} -d failed ({exc}): plain processes"
    except subprocess.TimeoutExpired as exc:  # killed after forking the daemon, perhaps
        return None, f"{MPS_CONTROL} -d failed ({exc}; {stop_mps(env)}): plain processes"
    except BaseException:  # SIGTERM or Ctrl-C while -d runs: it may have forked the daemon
        stop_mps(env)
        raise
    if started.returncode != 0:
        why = (started.stderr or started.stdout).strip().replace("\n", " ")
        return None, f"{MPS_CONTROL} -d failed (exit {started.returncode}: {why}): plain processes"
    # The daemon starting says nothing of its server: a client that cannot reach one hangs
    # or fails at its first CUDA call, and with it every run of the set.
    try:
        why = mps_probe_failure({**os.environ, **env})
    except BaseException:  # SIGTERM or Ctrl-C during the probe: leave no daemon behind
        stop_mps(env)
        raise
    if why:
        note = stop_mps(env)
        return None, (f"the MPS daemon started but a CUDA client failed ({why}; {note}): "
                      "plain processes")
    return env, f"MPS control daemon started and a CUDA client ran (pipe {pipe}, log {log})"


MPS_START_TIMEOUT = 60.0  # seconds for 'nvidia-cuda-mps-control -d' to return

# The probe client's Python code; $OTLT_MPS_PROBE replaces it (the tests' fake daemon has no
# CUDA behind it).
MPS_PROBE = "import torch; torch.ones(1, device='cuda').sum().item()"


def mps_probe_failure(env: dict[str, str], timeout: float = 30.0) -> str | None:
    """Run one tiny CUDA client under ``env`` (the MPS variables): None if it worked, else
    why not."""
    code = os.environ.get("OTLT_MPS_PROBE", MPS_PROBE)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if done.returncode != 0:
        return f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"
    return None


def stop_mps(env: dict[str, str]) -> str:
    try:
        done = subprocess.run([shutil.which(MPS_CONTROL) or MPS_CONTROL], input="quit\n",
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"stopping the MPS daemon failed: {exc}"
    finally:
        pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
        if pipe.name.startswith(PIPE_PREFIX):  # a folder of ours under /tmp
            shutil.rmtree(pipe, ignore_errors=True)
    return "MPS control daemon stopped" if done.returncode == 0 else (
        f"stopping the MPS daemon: exit {done.returncode} {done.stderr.strip()}")


def stop_children(runs: list[Run], grace: float = 15.0) -> None:
    """SIGTERM every running child, SIGKILL what still runs ``grace`` seconds later."""
    alive = [r for r in runs if r.running()]
    for r in alive:
        r.terminated = True
        r.proc.terminate()
    end = time.monotonic() + grace
    for r in alive:
        try:
            r.proc.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def run_summary(run: Run, out: Path) -> dict:
    """One run's line of the summary, read from its run directory and its process."""
    run_dir = out / run.name
    records, damaged = run_metrics(run_dir)
    total = None
    if (run_dir / "config.yaml").exists():
        total = (yaml.safe_load((run_dir / "config.yaml").read_text()).get("optim") or {}
                 ).get("epochs")
    finished = (run_dir / "eval.json").exists()
    code = run.proc.returncode if run.proc is not None else None
    if run.proc is None:
        state = "finished" if run.skipped else "not started"
    elif code == 0:
        state = "finished" if finished else "stopped"
    elif run.terminated or code in STOPPED_CODES:
        state = "stopped"
    else:
        state = "failed"
    error = json.loads((run_dir / "eval.json").read_text()).get("top1_error") if finished else None
    return {"name": run.name, "config": str(run.config), "state": state, "exit_code": code,
            "terminated": run.terminated,
            "epochs_done": None if damaged else len(records), "metrics_error": damaged,
            "epochs_total": total, "top1_error": error,
            "resumable": state == "stopped" and (run_dir / "last.pt").exists(),
            "seconds": (round(run.ended - run.started, 1)
                        if run.started is not None and run.ended is not None else None),
            # every logged epoch's seconds, steps and evaluation (steps alone: steps_seconds)
            "epochs_seconds": round(sum(r.get("epoch_seconds", 0.0) for r in records), 1),
            "evaluation_share": evaluation_share(records),
            "log": f"{run.name}.log"}


def format_summary(summary: dict) -> str:
    lines = [f"{'run':40s} {'state':12s} {'epochs':>9s} {'top-1 err':>9s} {'seconds':>8s}"]
    for r in summary["runs"]:
        state = r["state"] + (f" ({r['exit_code']})" if r["state"] == "failed" else "")
        done = r["epochs_done"] if r["epochs_done"] is not None else "?"
        epochs = f"{done}/{r['epochs_total'] if r['epochs_total'] else '?'}"
        error = f"{r['top1_error']:.2f}" if r["top1_error"] is not None else "-"
        seconds = f"{r['seconds']:.0f}" if r["seconds"] is not None else "-"
        lines.append(f"{r['name']:40s} {state:12s} {epochs:>9s} {error:>9s} {seconds:>8s}")
    lines += [f"{r['name']}: {r['metrics_error']}" for r in summary["runs"] if r["metrics_error"]]
    lines.append(f"MPS: {'yes' if summary['mps'] else 'no'} ({summary['mps_note']}); "
                 f"{summary['seconds']:.0f}s in all" + ("; interrupted" if summary["interrupted"]
                                                       else ""))
    return "\n".join(lines)


def parse_runs(specs: list[str], overrides: list[str]) -> list[Run]:
    runs = []
    for spec in specs:
        path, _, name = spec.partition(":")
        extra = []
        if "@" in name:  # CONFIG:NAME@key=value,key=value adds per-run overrides
            name, _, sets = name.partition("@")
            extra = sets.split(",")
        runs.append(Run(Path(path), name or Path(path).stem, overrides + extra))
    return runs


class Interrupted(Exception):
    """SIGTERM, raised where the main loop is (so the children and the daemon are stopped)."""


def _on_sigterm(signum, frame) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> int:
    start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config files; CONFIG:NAME renames a run, "
                                                   "CONFIG:NAME@k=v,k=v adds its overrides")
    parser.add_argument("--out", default="runs", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--poll", type=float, default=60.0, help="seconds between reports")
    parser.add_argument("--jobs", type=int, default=0, help="at most this many at once (0: all)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS per run")
    parser.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                        help="stop every run, resumable, before this many seconds from now")
    parser.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                        help="the children's time limits end this long before the deadline")
    parser.add_argument("--mps", choices=["auto", "off"], default="auto",
                        help="start the CUDA MPS daemon when there is one and a GPU (auto)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = parse_runs(args.configs, args.overrides)
    for run in runs:
        run.skipped = (args.out / run.name / "eval.json").exists()
    queue = [r for r in runs if not r.skipped]
    jobs = args.jobs if args.jobs > 0 else max(len(queue), 1)
    deadline = start + args.deadline if args.deadline is not None else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # from here on: the daemon too
    try:
        mps_env, mps_note = (None, "--mps off") if args.mps == "off" else (
            start_mps(args.out) if queue else (None, "nothing to run"))
    except (KeyboardInterrupt, Interrupted):  # start_mps stopped a daemon it had started
        signal.signal(signal.SIGTERM, previous)
        print("run_many: interrupted while starting the MPS daemon; nothing ran", flush=True)
        return 130
    print(f"run_many: {len(runs)} runs ({len(runs) - len(queue)} finished already), "
          f"{jobs} at a time; {mps_note}", flush=True)
    env.update(mps_env or {})
    interrupted = False
    try:
        last_report = time.monotonic()
        while True:
            now = time.monotonic()
            for run in runs:
                if run.proc is not None and run.ended is None and run.proc.poll() is not None:
                    run.ended = now
            if deadline is not None and now >= deadline:
                stop_children(runs)
                break
            while queue and sum(r.running() for r in runs) < jobs:
                left = deadline - now - args.grace if deadline is not None else None
                if left is not None and left <= 0:
                    break  # not started: no time left for it
                launch(queue.pop(0), args.out, env, left)
            if not any(r.running() for r in runs):
                if not queue or deadline is not None and deadline - now - args.grace <= 0:
                    break
            time.sleep(min(1.0, max(deadline - now, 0.05)) if deadline is not None else 1.0)
            if time.monotonic() - last_report >= args.poll:
                last_report = time.monotonic()
                print(f"--- {last_report - start:.0f}s\n"
                      f"{progress(args.out, [r.name for r in runs])}", flush=True)
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        print("run_many: interrupted; stopping the runs", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_children(runs)  # no-op unless an unexpected error left some running
        now = time.monotonic()
        for run in runs:
            if run.proc is not None and run.ended is None:
                run.ended = now
            for log in run.log_files:
                log.close()
        if mps_env is not None:
            mps_note += "; " + stop_mps(mps_env)
    summary = {"mps": mps_env is not None, "mps_note": mps_note, "deadline": args.deadline,
               "seconds": round(time.monotonic() - start, 1), "interrupted": interrupted,
               "runs": [run_summary(r, args.out) for r in runs]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_summary(summary), flush=True)
    if interrupted:
        return 130
    failed = [r["exit_code"] for r in summary["runs"] if r["state"] == "failed"]
    return max((c if c > 0 else 1) for c in failed) if failed else 0


if __name__ == "__main__":
    sys.exit(main())

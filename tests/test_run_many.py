"""``scripts/run_many.py``: the MPS daemon's life (with stand-in tools), the deadline's queue,
failures in the summary. The runs themselves are tested by tests/test_campaign.py (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import load_script, sets, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def fake_tools(bin_dir: Path, gpu: bool) -> Path:
    """Stand-ins for nvidia-smi and nvidia-cuda-mps-control that record their calls."""
    bin_dir.mkdir()
    calls = bin_dir / "calls.txt"
    (bin_dir / "nvidia-smi").write_text(
        "#!/bin/sh\n" + ("echo 'GPU 0: Fake (UUID: GPU-0)'\n" if gpu else "exit 9\n"))
    (bin_dir / "nvidia-cuda-mps-control").write_text(
        f"#!/bin/sh\nif [ \"$1\" = -d ]; then sleep ${{FAKE_MPS_START:-0}}; "
        f"echo \"start $CUDA_MPS_PIPE_DIRECTORY "
        f"$CUDA_MPS_LOG_DIRECTORY\" >> {calls}; else read line; echo \"stdin $line\" >> {calls}; "
        "fi\n")
    for tool in ("nvidia-smi", "nvidia-cuda-mps-control"):
        (bin_dir / tool).chmod(0o755)
    return calls


def assert_daemon_started_and_stopped(calls: Path, out: Path) -> None:
    start, stop = calls.read_text().splitlines()
    _, pipe, log = start.split()
    # The pipe folder is <out>/mps/pipe, or one under /tmp when that path is too long.
    assert pipe == str((out / "mps" / "pipe").resolve()) or "otlt-mps-" in pipe
    assert log == str((out / "mps" / "log").resolve()) and stop == "stdin quit"


def run_many(args: list[str], bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "OTLT_MPS_PROBE": "pass"}  # no CUDA behind the fake daemon
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_many.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_mps_daemon_started_and_stopped_and_a_failure_reported(tmp_path):
    calls = fake_tools(tmp_path / "bin", gpu=True)
    out = tmp_path / "out"
    result = run_many(["--out", str(out), "--poll", "1", str(tmp_path / "missing.yaml")],
                      tmp_path / "bin")
    assert result.returncode == 2, result.stdout + result.stderr  # otlt's exit code
    assert_daemon_started_and_stopped(calls, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mps"] and "stopped" in summary["mps_note"]
    (run,) = summary["runs"]
    assert run["state"] == "failed" and run["exit_code"] == 2 and run["epochs_done"] == 0
    assert "does not exist" in (out / "missing.log").read_text()
    assert "failed (2)" in result.stdout and "MPS: yes" in result.stdout


def test_no_gpu_means_plain_processes_and_a_spent_deadline_starts_nothing(tmp_path):
    calls = fake_tools(tmp_path / "bin", gpu=False)
    out = tmp_path / "out"
    result = run_many(["--out", str(out), "--deadline", "1", "--grace", "5",
                       "a.yaml", "a.yaml:b@seed=1"], tmp_path / "bin")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not calls.exists()  # no daemon without a GPU
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["mps"] and "no GPU" in summary["mps_note"]
    assert [(r["name"], r["state"]) for r in summary["runs"]] == [("a", "not started"),
                                                                 ("b", "not started")]
    assert not list(out.glob("*.log"))


def test_sigterm_stops_the_runs_and_the_daemon(tiny_zip, tmp_path):
    calls = fake_tools(tmp_path / "bin", gpu=True)
    out = tmp_path / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\nloss: {name: ce}\n")
    flags = sets(tiny_overrides(tiny_zip, out, epochs=100))
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "OTLT_MPS_PROBE": "pass"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run_many.py"), "--out",
                             str(out), *flags, str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = out / "tiny.log"  # written once the handler is set and the child is launched
    waited = time.monotonic()
    while not log.exists() and time.monotonic() - waited < 120 and proc.poll() is None:
        time.sleep(0.1)  # the script imports torch (otlt's metrics reader) first
    time.sleep(2.0)  # the child is importing or training by now
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert_daemon_started_and_stopped(calls, out)
    summary = json.loads((out / "summary.json").read_text())
    (run,) = summary["runs"]
    assert summary["interrupted"] and run["state"] == "stopped" and run["terminated"]


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_line_is_reported(tmp_path,
                                                                           monkeypatch):
    """The progress and the summary read metrics.jsonl as otlt does: a last line a kill cut
    short is not an epoch, a bad line before it is damage, named, not skipped and counted past;
    the other runs are read as before."""
    rm = load_script("run_many", monkeypatch)
    epoch = json.dumps({"epoch": 1, "epoch_seconds": 2.0})
    for name, text in (("torn", f"{epoch}\n{epoch}\n{{\"epoch\": 3, \"ep"),
                       ("damaged", f"{epoch}\n{{\"epo\n{epoch}\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(text)
    lines = rm.progress(tmp_path, ["torn", "damaged"]).splitlines()
    assert lines[0] == "torn: 2 ep 2.0s/ep"
    assert lines[1].startswith("damaged: ") and "line 2 is not JSON" in lines[1]
    runs = [rm.run_summary(rm.Run(Path("c.yaml"), name, []), tmp_path)
            for name in ("torn", "damaged")]
    assert [(r["epochs_done"], r["metrics_error"]) for r in runs[:1]] == [(2, None)]
    assert runs[1]["epochs_done"] is None and "damaged" in runs[1]["metrics_error"]
    text = rm.format_summary({"runs": runs, "mps": False, "mps_note": "--mps off",
                              "seconds": 1.0, "interrupted": False})
    assert " 2/? " in text and " ?/? " in text and "damaged: " in text


def test_evaluation_share_is_the_time_outside_the_steps(monkeypatch):
    rm = load_script("run_many", monkeypatch)
    records = [{"epoch_seconds": 2.0, "steps_seconds": 1.5},
               {"epoch_seconds": 2.0, "steps_seconds": 1.7}, {"epoch_seconds": 3.0}]
    assert rm.evaluation_share(records) == 0.2  # the untimed epoch is left out
    assert rm.evaluation_share([{"epoch_seconds": 3.0}]) is None
    # a record whose timing is null or zero is left out, not an error
    assert rm.evaluation_share([*records, {"epoch_seconds": 2.0, "steps_seconds": None},
                                {"epoch_seconds": 0.0, "steps_seconds": 0.0}]) == 0.2


def test_a_child_stopped_by_a_signal_from_elsewhere_is_stopped_not_failed(tmp_path,
                                                                          monkeypatch):
    """otlt exits 130 (Ctrl-C) or 143 (SIGTERM) at a resumable point, also when the signal
    did not come from run_many (a cgroup-wide kill); another non-zero code is a failure."""
    from types import SimpleNamespace

    rm = load_script("run_many", monkeypatch)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "last.pt").write_bytes(b"x")
    states = []
    for code in (143, 130, 1):
        run = rm.Run(Path("c.yaml"), "a", [], proc=SimpleNamespace(returncode=code))
        summary = rm.run_summary(run, tmp_path)
        states.append((summary["state"], summary["resumable"]))
    assert states == [("stopped", True), ("stopped", True), ("failed", False)]


def test_an_mps_daemon_whose_clients_fail_falls_back_to_plain_processes(tmp_path, monkeypatch):
    """``nvidia-cuda-mps-control -d`` exiting 0 says nothing of its server: a probe client
    that fails stops the daemon and the set runs as plain processes, saying why."""
    run_many = load_script("run_many", monkeypatch)
    calls = fake_tools(tmp_path / "bin", gpu=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OTLT_MPS_PROBE", "raise SystemExit(3)")
    env, note = run_many.start_mps(tmp_path / "out")
    assert env is None and "a CUDA client failed (exit 3" in note and "plain processes" in note
    assert calls.read_text().splitlines()[-1] == "stdin quit"  # the daemon was stopped
    monkeypatch.setenv("OTLT_MPS_PROBE", "pass")
    env, note = run_many.start_mps(tmp_path / "out2")
    assert env is not None and "a CUDA client ran" in note


def test_a_daemon_start_that_times_out_is_stopped(tmp_path, monkeypatch):
    """``-d`` killed at its time limit may have forked the daemon: it is told to quit."""
    run_many = load_script("run_many", monkeypatch)
    calls = fake_tools(tmp_path / "bin", gpu=True)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_START", "2")
    monkeypatch.setattr(run_many, "MPS_START_TIMEOUT", 0.3)
    env, note = run_many.start_mps(tmp_path / "out")
    assert env is None and "-d failed" in note and "plain processes" in note
    assert calls.read_text().splitlines() == ["stdin quit"]

"""The prepared GPU check (``scripts/device_check.py``) dry-runs on the CPU with gloo, so the
script a lent GPU runs is known to work before its minutes are spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def clean_env(**extra: str) -> dict:
    """This environment without $OUT (a device's return folder: a dry run must not write
    there) and with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_device_check_dry_run_passes_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    env = clean_env()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"),
                             "--device", "cpu", "--skip-tests", "--slow", "4",
                             "--out", str(out), "--work", str(tmp_path / "work")], env=env,
                            capture_output=True, text=True, timeout=1800)
    report = json.loads((out / "device_check.json").read_text())
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-2000:])
    # Only the JSON and the logs: the device tool brings back 8 files from $OUT, 2 folders
    # down, so the runs and the data cache must not be there.
    assert all(p.is_file() for p in out.iterdir()) and (tmp_path / "work" / "cache").is_dir()
    assert report["passed"] and report["runs"][0]["confusion_equal_to_one_process_eval"]
    for step in ("one_rank_group", "kill_resume", "cross_device", "nan_stops"):
        assert report[step]["passed"], (step, report[step])
    assert report["one_rank_group"]["max_weight_difference"] == 0.0
    assert report["kill_resume"]["killed_while_running"]
    assert 1 <= report["kill_resume"]["killed_after_epochs"] < 4
    assert report["cross_device"]["test_images_classified_differently_at_most"] == 0


def test_a_spent_budget_still_writes_the_report(tmp_path):
    """Every step's limit is cut to what is left of --budget: with none left each step is
    recorded as skipped (not passed) and the JSON is written, in seconds."""
    out = tmp_path / "out"
    env = clean_env()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"),
                             "--device", "cpu", "--budget", "0", "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    report = json.loads((out / "device_check.json").read_text())
    assert result.returncode == 1 and not report["passed"]
    assert report["cuda_tests"]["skipped"] and report["runs"][0]["train"]["skipped"]
    assert report["nan_stops"]["skipped"] and not report["nan_stops"]["passed"]
    assert report["sgd"] == {"fused": None}  # fused=True on CUDA only
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"),
                            "--device", "cpu", "--budget", "0", "--out", str(out),
                            "--work", str(tmp_path / "work"), "--only", "nan_stops",
                            "cross_device"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 1
    assert again.stdout.index("nan_stops passed") < again.stdout.index("cross_device passed")


def test_the_json_and_a_tar_of_the_logs_come_back_through_out(tmp_path):
    """On the device the command names no --out: the JSON and one tar of the step logs land in
    $OUT (two of the 8 files the tool brings back), the logs themselves in a temporary folder;
    an --out or --work inside $OUT is refused."""
    back = tmp_path / "back"
    env = clean_env(OUT=str(back), TMPDIR=str(tmp_path))
    script = [sys.executable, str(ROOT / "scripts" / "device_check.py"), "--device", "cpu",
              "--budget", "0"]
    result = subprocess.run([*script, "--only", "nan_stops", "runs", "--work",
                             str(tmp_path / "work")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert sorted(p.name for p in back.iterdir()) == ["dc_logs.tgz", "device_check.json"]
    report = json.loads((back / "device_check.json").read_text())
    assert report["nan_stops"]["skipped"] and "passed" in report
    assert isinstance(report["torchrun_shutdown_timeout"], bool)
    with tarfile.open(back / "dc_logs.tgz") as tar:
        assert {"nan.log", "torchrun1_train.log"} <= set(tar.getnames())
    inside = subprocess.run([*script, "--out", str(back / "dc")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert inside.returncode == 2 and "must lie outside --bring-back" in inside.stderr
    off = subprocess.run([*script, "--only", "nan_stops", "--out", str(tmp_path / "o"),
                          "--bring-back", ""], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert off.returncode == 1 and not (tmp_path / "device_check.json").exists()

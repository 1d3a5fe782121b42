"""The device check's bookkeeping (``scripts/device_check.py``): the ``graphs`` step's
verdict on run files written here (the step itself needs CUDA) and how a step that times out
is stopped; a mistake in either would cost a lent GPU's minutes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def device_check():
    return load_script("device_check")


def write_run(runs: Path, name: str, loss: float, error: float, skips: int | None) -> None:
    run = runs / name
    run.mkdir(parents=True)
    records = []
    for epoch in range(2):
        record = {"epoch": epoch, "train_loss": loss, "epoch_seconds": 2.0,
                  "steps_seconds": 1.5}
        if skips is not None:
            record.update(cuda_graph_skips=skips, cuda_graph_partitions=0)
        records.append(record)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "eval.json").write_text(json.dumps({"top1_error": error}))


BENCH = {"cuda_graph_counters": {"cuda_graph_skips": 0, "cuda_graph_partitions": 0}}
AGREE = {"stacked_vs_by_batch": {"mean": 2e-4, "var": 9e-4},
         "other_draw_vs_by_batch": {"mean": 0.016, "var": 0.029}}


def test_agreeing_runs_without_skips_pass(device_check, tmp_path):
    write_run(tmp_path, "eager", 2.0, 40.0, None)
    write_run(tmp_path, "graphed", 2.01, 41.0, 0)
    write_run(tmp_path, "graphed_stacked", 1.99, 39.5, 0)
    result = device_check.judge_graph_runs(tmp_path, BENCH, AGREE)
    assert result["passed"]
    assert result["evaluation_share"]["graphed_stacked"] == [0.25, 0.25]
    assert result["test_top1_error"] == {"eager": 40.0, "graphed": 41.0,
                                         "graphed_stacked": 39.5}
    assert result["cuda_graph_counters"]["graphed"] == {"skips": 0, "partitions": 0}


@pytest.mark.parametrize("name,loss,error,skips", [
    ("graphed_stacked", 2.0, 44.0, 0),   # the stacked evaluation's test error too far
    ("graphed", 2.2, 40.0, 0),           # the first epoch's loss too far
    ("graphed", 2.0, 40.0, 3),           # a graph fell back from CUDA graphs
    ("graphed_stacked", 2.0, 40.0, None),  # a record without the counter
])
def test_any_disagreement_or_fallback_fails(device_check, tmp_path, name, loss, error, skips):
    write_run(tmp_path, "eager", 2.0, 40.0, None)
    for other in ("graphed", "graphed_stacked"):
        if other == name:
            write_run(tmp_path, other, loss, error, skips)
        else:
            write_run(tmp_path, other, 2.0, 40.0, 0)
    assert not device_check.judge_graph_runs(tmp_path, BENCH, AGREE)["passed"]


def test_a_bench_with_skips_fails(device_check, tmp_path):
    for name in ("eager", "graphed", "graphed_stacked"):
        write_run(tmp_path, name, 2.0, 40.0, None if name == "eager" else 0)
    bench = {"cuda_graph_counters": {"cuda_graph_skips": 1, "cuda_graph_partitions": 0}}
    assert not device_check.judge_graph_runs(tmp_path, bench, AGREE)["passed"]


def test_stacked_statistics_far_from_batch_by_batch_fail(device_check, tmp_path):
    for name in ("eager", "graphed", "graphed_stacked"):
        write_run(tmp_path, name, 2.0, 40.0, None if name == "eager" else 0)
    far = {**AGREE, "stacked_vs_by_batch": {"mean": 2e-4, "var": 0.03}}
    assert device_check.judge_graph_runs(tmp_path, BENCH, AGREE)["passed"]
    assert not device_check.judge_graph_runs(tmp_path, BENCH, far)["passed"]


LAUNCHER = """
import signal, subprocess, sys, time
workers = []
def stop(signum, frame):  # torchrun passes a SIGTERM on to its workers
    for worker in workers:
        worker.terminate()
        worker.wait()
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)  # before the worker: a slow start races no SIGTERM
workers.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                start_new_session=True))  # as torchrun starts its workers
open(sys.argv[1], "w").write(str(workers[0].pid))
time.sleep(120)
"""


def test_a_step_that_times_out_is_stopped_with_its_workers(device_check, tmp_path):
    """A worker in a session of its own survives a SIGKILL of the launcher's group; the
    SIGTERM sent first reaches it through the launcher, so no step is left holding a GPU."""
    import os
    import sys
    import time

    pid_file = tmp_path / "worker.pid"
    result = device_check.command([sys.executable, "-c", LAUNCHER, str(pid_file)],
                                  tmp_path / "step.log", 6, dict(os.environ))
    assert result["rc"] == 124
    worker = int(pid_file.read_text())
    for _ in range(50):  # reparented to init, then reaped
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} outlived its step")

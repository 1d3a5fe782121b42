"""The verdict of the device check's ``graphs`` step (``scripts/device_check.py``), on run
files written here: the step itself needs CUDA, and a mistake in its bookkeeping would cost a
lent GPU's minutes."""

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

"""``otlt bench``: the harness runs end to end on synthetic data; its bookkeeping is exact.

No test asserts a timing: the machine is shared. They check the JSON's keys and sanity, the
interleaving order, and the closed forms that turn samples into ratios.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import sets
from otlt.bench import (
    TARGETS,
    check_targets,
    derived_ratios,
    interleaved_times,
    paired_ratio,
    scaling_markdown,
    scaling_transport,
    synthetic_data,
    trained_like_confusion,
)
from otlt.cli import main
from otlt.config import load_config
from otlt.data.longtail import long_tailed_counts
from otlt.errors import OtltError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cifar10_lt_r100_erm.yaml"
TINY = ["model.name=resnet20", "data.n_max=40", "data.imbalance_ratio=10",
        "data.val_per_class=2"]
REQUIRED = ("ratio_cmo_erm", "ratio_otmix_erm", "ratio_erm_model_only",
            "pairing_share_of_otmix_step", "data_share_of_erm_step", "device", "torch_version",
            "batch_size")


def test_quick_synthetic_run_writes_sane_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--synthetic", "--config", str(CONFIG), "--batch-size", "8",
            "--repeats", "2", "--device", "cpu", "--json", str(out)]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    for key in REQUIRED:
        assert key in result, key
    assert result["batch_size"] == 8 and result["device"] == "cpu"
    assert result["torch_version"] == torch.__version__
    assert result["model"] == "resnet20" and result["data"] == "synthetic"
    # The re-weighting step is timed when otlt.reweight provides it, else reported as null.
    if importlib.util.find_spec("otlt.reweight") is not None and \
            hasattr(importlib.import_module("otlt.reweight"), "OTReweighter"):
        assert result["reweight_step_s"] > 0 and result["ratio_reweight_erm"] > 0
        assert "reweight" in result["times"]
    else:
        assert result["reweight_step_s"] is None and result["ratio_reweight_erm"] is None
    names = {"model_only", "erm", "cmo", "otmix", "data", "fore_data", "features", "pairing"}
    assert names <= set(result["times"])
    for name, t in result["times"].items():
        assert len(t["samples_s"]) == 2, name
        assert 0 < t["min_s"] <= t["median_s"] <= t["max_s"], name
    for key in ("ratio_cmo_erm", "ratio_otmix_erm", "ratio_erm_model_only",
                "pairing_share_of_otmix_step", "data_share_of_erm_step",
                "feature_share_of_otmix_step"):
        assert math.isfinite(result[key]) and result[key] > 0, key
        low, high = result["spread"][key]
        assert low <= result[key] <= high, key
    # Every OT batch ran Sinkhorn (ot_probability = 1), so the iteration count is known.
    assert result["sinkhorn_mean_iters"] >= 1
    assert set(result["targets"]) == set(TARGETS)
    assert "ratio_otmix_erm" in printed and "model_only" in printed


def test_bad_steps_is_a_one_line_user_error(tmp_path, capsys):
    code = main(["bench", "--synthetic", "--config", str(CONFIG), "--steps", "0",
                 "--json", str(tmp_path / "b.json")])
    assert code == 2
    assert "steps" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_cuda_graphs_off_cuda_is_a_one_line_user_error(tmp_path, capsys):
    args = ["bench", "--quick", "--synthetic", "--config", str(CONFIG), "--batch-size", "8",
            "--device", "cpu", "--cuda-graphs", "--json", str(tmp_path / "b.json")]
    assert main(args + sets(TINY)) == 2
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_variants_are_interleaved_after_warmup():
    calls: list[str] = []
    variants = {name: (lambda n=name: calls.append(n)) for name in "ABC"}
    samples = interleaved_times(variants, steps=2, repeats=3, warmup=1, sync=lambda: None)
    assert calls[:3] == ["A", "B", "C"]  # one warm-up step each
    assert calls[3:] == ["A", "A", "B", "B", "C", "C"] * 3  # ABCABC..., `steps` at a time
    assert {k: len(v) for k, v in samples.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t >= 0 for v in samples.values() for t in v)


def test_paired_ratio_is_the_median_of_per_repeat_ratios():
    # A load spike in repeat 2 slows both variants: pairing cancels it, medians alone do not.
    num, den = [2.0, 20.0, 2.2], [1.0, 10.0, 1.0]
    assert paired_ratio(num, den) == {"median": 2.0, "min": 2.0, "max": 2.2}


def test_derived_ratios_closed_forms():
    samples = {"model_only": [1.0, 1.0, 1.0], "erm": [1.1, 1.1, 1.1],
               "cmo": [1.21, 1.21, 1.21], "otmix": [2.2, 2.2, 2.2],
               "data": [0.011, 0.011, 0.011], "features": [0.88, 0.88, 0.88],
               "pairing": [0.022, 0.022, 0.022]}
    r = derived_ratios(samples, mix_prob=0.5)
    assert r["ratio_erm_model_only"] == pytest.approx(1.1)
    assert r["ratio_cmo_erm"] == pytest.approx(1.1)
    assert r["ratio_otmix_erm"] == pytest.approx(2.0)
    assert r["ratio_otmix_erm_epoch"] == pytest.approx(1.5)  # 1 + 0.5 (2 - 1)
    assert r["ratio_cmo_erm_epoch"] == pytest.approx(1.05)
    assert r["pairing_share_of_otmix_step"] == pytest.approx(0.01)
    assert r["feature_share_of_otmix_step"] == pytest.approx(0.4)
    assert r["data_share_of_erm_step"] == pytest.approx(0.01)
    assert r["ratio_reweight_erm"] is None and r["reweight_step_s"] is None
    met = check_targets(r)
    assert met["ratio_cmo_erm"]["met"]  # 1.1 <= 1.10
    assert not met["ratio_otmix_erm_epoch"]["met"]  # 1.5 > 1.45
    assert met["pairing_share_of_otmix_step"]["met"]


def test_synthetic_data_follows_the_configured_long_tail():
    cfg = load_config(CONFIG, TINY)
    data = synthetic_data(cfg, torch.Generator().manual_seed(0))
    counts = long_tailed_counts(10, 40, 10)
    assert data.train_counts == counts
    assert data.train.images.shape == (sum(counts), 32, 32, 3)
    assert data.train.images.dtype.name == "uint8"
    assert [int((data.train.labels == k).sum()) for k in range(10)] == counts
    assert len(data.val) == 10 * 2 and len(data.meta) == 10 * cfg.data.meta_per_class
    again = synthetic_data(cfg, torch.Generator().manual_seed(0))
    assert (again.train.images == data.train.images).all()


def test_trained_like_confusion_is_row_stochastic_with_the_given_accuracy():
    c = trained_like_confusion(5, torch.Generator().manual_seed(0), accuracy=0.7)
    torch.testing.assert_close(c.sum(1), torch.ones(5))
    torch.testing.assert_close(c.diagonal(), torch.full((5,), 0.7))
    assert (c >= 0).all()


def test_scaling_transport_and_markdown():
    rows = scaling_transport(torch.device("cpu"), (8, 16), repeats=1, sync=lambda: None)
    assert [r["B"] for r in rows] == [8, 16]
    assert all(r["sinkhorn_ms"] > 0 and r["assignment_ms"] > 0 and r["sinkhorn_iters"] >= 1
               for r in rows)
    result = {"device": "cpu", "hardware": "x", "threads": 1, "torch_version": "t",
              "model": "resnet20", "amp": "None", "load_average_1m": 0.5,
              "load_average_1m_end": 0.5, "repeats": 1, "transport": rows,
              "otmix_step": [{"B": 64, "erm_ms": 100.0, "otmix_ms": 170.0,
                              "ratio_otmix_erm": 1.7, "features_ms": 60.0, "pairing_ms": 2.0,
                              "pairing_share": 0.012}]}
    text = scaling_markdown(result)
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table_rows) == 2 + len(rows) + 1  # two headers, transport rows, one step row
    assert "| 64 | 100 | 170 | 1.70 | 60 | 2.0 | 1.2% |" in text


def test_threads_follow_the_request_else_one_on_a_busy_cpu(monkeypatch):
    import otlt.bench as bench

    cpu = torch.device("cpu")
    assert bench.choose_threads(3, cpu) == (3, "requested")
    monkeypatch.setattr(bench.timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(bench.timing, "load_average", lambda: 4.0)
    threads, why = bench.choose_threads(None, cpu)
    assert threads == 1 and "busy" in why
    monkeypatch.setattr(bench.timing, "load_average", lambda: 0.2)
    assert bench.choose_threads(None, cpu) == (torch.get_num_threads(), "torch default")
    with pytest.raises(OtltError, match="threads"):
        bench.choose_threads(0, cpu)


def test_evaluation_bench_runs_and_reports_agreement(tmp_path):
    """benchmarks/bench_evaluation.py (the device check's evaluation bench) at tiny sizes:
    every variant timed, the ratios present, the stacked statistics close to batch by batch
    and far closer than another draw of batches."""
    out = tmp_path / "evaluation.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_evaluation.py"),
                    "--batches", "3", "--batch-size", "8", "--test-images", "40",
                    "--eval-batch-sizes", "10", "40", "--repeats", "1", "--json", str(out)],
                   env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["ms"]) == {"recalibrate_by_batch", "recalibrate_stack3", "test_batch10",
                                 "test_batch40"}
    assert result["ratio_stacked_by_batch"]["median"] > 0
    stacked, other = (result["agreement"][k] for k in ("stacked_vs_by_batch",
                                                       "other_draw_vs_by_batch"))
    assert max(stacked.values()) < 0.01 < max(other.values())

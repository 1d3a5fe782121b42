"""benchmarks/bench_cpu_packing.py on the tiny dataset: both layouts train, each run records
the thread count it was given, and the gain is the ratio of the layouts' epochs per second."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_packing_bench_compares_one_run_with_runs_side_by_side(tiny_zip, tmp_path):
    settings = [o for o in tiny_overrides(tiny_zip, tmp_path / "unused", epochs=3)
                if not o.startswith(("out_dir=", "name="))]
    out = tmp_path / "packing.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_packing.py"),
           "--config", str(ROOT / "configs" / "cifar10_lt_r100_drw_short.yaml"),
           "--data", str(tiny_zip), "--epochs", "2", "--warmup", "1", "--json", str(out),
           "--set", "loss.params.drw_epoch=1"]
    for s in settings:
        cmd += ["--set", s]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    one, packed = result["one"], result["packed"]
    assert one["threads_recorded"] == {"one_0": 2}
    assert packed["threads_recorded"] == {"packed_0": 1, "packed_1": 1}
    assert [len(v) for v in packed["epoch_seconds"].values()] == [1, 1]  # warm-up left out
    assert one["epochs_per_s"] == pytest.approx(1 / one["median_epoch_s"], rel=1e-3)
    assert result["packed_gain"] == pytest.approx(
        packed["epochs_per_s"] / one["epochs_per_s"], rel=1e-2)
    assert "eval.test_every_epoch=true" in result["settings"]
    identity = result["cpu_identity"]  # None off Linux x86
    assert identity is None or result["avx512_bf16"] == ("avx512_bf16" in identity["bf16"])

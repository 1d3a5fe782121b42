"""A run's numbers stay finite (:mod:`otlt.engine.stability`): the non-finite loss guard and
fp16 loss scaling, on tiny CPU runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import one_line_error, sets, tiny_overrides
from otlt.cli import main
from otlt.engine import runtime as runtime_module
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.stability import LossGuard
from otlt.errors import OtltError


def strict_records(path: Path) -> list[dict]:
    """Every line of ``metrics.jsonl`` through a JSON reader that refuses NaN and Infinity."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    if not path.exists():
        return []
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_guard_follows_the_first_bad_step_on_the_device():
    guard = LossGuard()
    for value in [2.5, 1.5, math.inf, 0.5, math.nan]:
        guard.update(torch.tensor(value * 4), 4)
    assert guard.first_bad_and_last_finite() == (2, 1.5)
    guard.check(12.0, epoch=0, epochs=3, steps=5)  # a finite epoch total: nothing to say
    with pytest.raises(OtltError, match=r"epoch 4/6 at step 3 of 5 \(last finite loss 1.5, "
                                        r"step 2\).*last.pt holds the run after epoch 3"):
        guard.check(math.nan, epoch=3, epochs=6, steps=5)


def test_a_loss_diverging_in_epoch_2_stops_the_run_at_epoch_1(tiny_zip, tmp_path, config,
                                                               capsys):
    """lr x 1e30 from epoch 2 on: one line naming the epoch, the step and the last finite
    loss; exit 2; last.pt and metrics.jsonl (strict JSON) hold epoch 1 only; no eval."""
    args = tiny_overrides(tiny_zip, tmp_path / "runs") + ["optim.milestones=[1]",
                                                         "optim.gammas=[1e30]"]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, "inf or NaN in epoch 2/3 at step ", "last finite loss",
                   "last.pt holds the run after epoch 1")
    run = tmp_path / "runs" / "tiny"
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert [r["epoch"] for r in strict_records(run / "metrics.jsonl")] == [0]
    assert not (run / "eval.json").exists()


def test_nan_weights_stop_the_run_at_its_first_step(tiny_zip, tmp_path, config, capsys,
                                                    monkeypatch):
    create = runtime_module.create_model  # what build_model calls

    def nan_model(*args, **kwargs):
        model = create(*args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
        return model

    monkeypatch.setattr(runtime_module, "create_model", nan_model)
    args = tiny_overrides(tiny_zip, tmp_path / "runs")
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, "epoch 1/3 at step 1 of ", "no finite loss", "no epoch was saved")
    run = tmp_path / "runs" / "tiny"
    assert not (run / "last.pt").exists()
    assert strict_records(run / "metrics.jsonl") == []


def test_bf16_runs_without_a_grad_scaler(tiny_zip, tmp_path, config, capsys):
    args = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1) + ["train.amp=bf16"]
    assert main(["train", "--config", str(config), *sets(args)]) == 0
    assert "scaler" not in load_checkpoint(tmp_path / "runs" / "tiny" / "last.pt")


@pytest.mark.slow  # float16 convolutions are slow on the CPU (~10 s an epoch here)
def test_fp16_trains_with_a_grad_scaler_and_resumes_exactly(tiny_zip, tmp_path, config,
                                                            capsys):
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2) + [
        "train.amp=fp16", "data.n_max=12", "data.imbalance_ratio=3", "data.val_per_class=2",
        "optim.batch_size=16"]
    assert main(["train", "--config", str(config), *sets([*base, "name=full"])]) == 0
    assert main(["train", "--config", str(config), "--stop-after", "1",
                 *sets([*base, "name=part"])]) == 0
    part = tmp_path / "runs" / "part"
    first = load_checkpoint(part / "last.pt")["scaler"]
    # the initial scale 2^16 overflows float16 gradients: the first steps are skipped
    assert first["scale"] < 65536.0
    assert main(["train", "--resume", str(part)]) == 0
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    b = load_checkpoint(part / "last.pt")
    assert a["scaler"] == b["scaler"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    records = strict_records(part / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) for r in records)

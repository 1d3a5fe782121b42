"""scripts/calibration_verdict.py: the data calibration's pre-registered rule (docs/research.md)
as code, at its bounds, and the sentence results/collect.sh puts into the group README."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def verdict(monkeypatch):
    return load_script("calibration_verdict", monkeypatch).verdict


@pytest.mark.parametrize("errors, case", [
    ([12.3, 12.3], "at or below 12.3: the JPEG re-encoding does not explain"),
    ([12.2, 12.4], "at or below 12.3"),
    ([13.96, 14.04], "between 12.3 and 14.0"),
    ([9.1, 9.6], "at or below 12.3"),
    ([12.2, 12.42], "between 12.3 and 14.0: the data explains at most about 2"),
    ([14.0, 14.0], "between 12.3 and 14.0"),
    ([13.9, 14.12], "above 14.0: our pipeline, not the data, is the first suspect"),
])
def test_each_case_of_the_rule_at_its_bounds(verdict, errors, case):
    """E is the mean of the two seeds; a bound itself belongs to the lower case."""
    sentence = verdict(errors)
    assert case in sentence
    assert sentence.startswith(f"E = {sum(errors) / 2:.2f} (seeds {errors[0]:.2f}, "
                               f"{errors[1]:.2f}, {abs(errors[0] - errors[1]):.2f} apart)")


def test_one_seed_is_no_verdict_and_three_are_refused(verdict):
    assert verdict([11.0]) == ("Only seed 0 has finished (11.00); the rule reads E, the mean of "
                               "seeds 0 and 1, so no verdict yet.")
    with pytest.raises(ValueError, match="two seeds"):
        verdict([11.0, 11.5, 12.0])
    with pytest.raises(ValueError, match="no finished run"):
        verdict([])


def test_the_script_reads_each_runs_eval_json_and_best_test_epoch(tmp_path):
    """Last-epoch errors from eval.json; the best test epoch from metrics.jsonl's per-epoch
    diagnostic (a record without it, as before eval.test_every_epoch, is skipped)."""
    runs = []
    for name, error, accs in (("seed0", 12.8, [80.0, 88.0, 87.5]),
                              ("seed1", 13.4, [81.0, 87.2, 87.6])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"top1_error": error}))
        lines = [json.dumps({"epoch": i, "test_diag_acc": a}) for i, a in enumerate(accs)]
        lines.insert(1, json.dumps({"epoch": 9}))
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        runs.append(str(tmp_path / name))
    script = [sys.executable, str(ROOT / "scripts" / "calibration_verdict.py")]
    out = subprocess.run([*script, *runs], capture_output=True, text=True, check=True).stdout
    assert out.startswith("E = 13.10 (seeds 12.80, 13.40, 0.60 apart): between 12.3 and 14.0")
    assert out.rstrip().endswith(
        "Data handicap: E − 11.8 = +1.30 points at the last epoch; with each seed's best test "
        "epoch (12.00, 12.40, the reference's protocol) +0.40.")
    one = subprocess.run([*script, runs[0]], capture_output=True, text=True, check=True).stdout
    assert "no verdict yet" in one and "handicap" not in one


def test_the_bounds_are_the_pre_registered_ones(monkeypatch):
    """The numbers in the code are the ones docs/research.md wrote down before the runs."""
    script = load_script("calibration_verdict", monkeypatch)
    research = " ".join((ROOT / "docs" / "research.md").read_text().split())
    assert f"**E at or below {script.NOT_THE_DATA}**" in research
    assert (f"**E between {script.NOT_THE_DATA} and {script.AT_MOST_TWO_POINTS}**: the data "
            "explains at most about 2") in research
    assert f"**E above {script.AT_MOST_TWO_POINTS}**" in research

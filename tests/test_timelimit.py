"""``otlt train --time-limit``: stop at an epoch boundary before the time runs out, resumable."""

from __future__ import annotations

import json

import pytest

from conftest import one_line_error, sets, tiny_overrides
from otlt.cli import main
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.timelimit import TimeLimit
from otlt.errors import OtltError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rule_budgets_the_longest_epoch_times_the_margin():
    clock = FakeClock()
    limit = TimeLimit(10.0, margin=1.2, clock=clock)
    # Epochs of 2 s (the trainer's record says 2 s too): each check asks for 2.4 s.
    clock.now = 2.0
    assert not limit.should_stop(1, 10, 2.0)  # 8 s left
    clock.now = 4.0
    assert not limit.should_stop(2, 10, 2.0)  # 6 s left
    clock.now = 7.5  # a slow epoch (3.5 s by the clock, 2 s by the record): budget 4.2 s
    assert limit.should_stop(3, 10, 2.0)  # 2.5 s left < 4.2 s
    assert limit.longest == 3.5 and limit.stopped_at == 3


def stop_point(deadline: float, check_times: list[float], total: int) -> int | None:
    """Epochs done when a limit of ``deadline`` s (margin 1) stops a run whose epochs end at
    ``check_times`` (None: it runs to the final evaluation)."""
    clock = FakeClock()
    limit = TimeLimit(deadline, margin=1.0, clock=clock)
    for done, t in enumerate(check_times, start=1):
        clock.now = t
        if limit.should_stop(done, total, 10.0):
            return limit.stopped_at
    return None


def test_rule_before_and_after_the_last_epoch():
    # 10 s epochs, 3 of them: the next epoch needs 10 s, the last one 20 (with the final
    # evaluation), and after it the final evaluation alone 10.
    assert stop_point(45, [10, 20, 30], 3) is None  # 35, 25, 15 s left: everything fits
    assert stop_point(35, [10, 20, 30], 3) == 2  # 15 s left before the last epoch: < 20
    assert stop_point(25, [10, 20, 30], 3) == 2  # 15 s left before the second epoch: fits
    assert stop_point(19, [10, 20, 30], 3) == 1  # 9 s left before the second: < 10
    # A slow last epoch (15 s): 7 s left, the final evaluation waits for the resume.
    assert stop_point(42, [10, 20, 35], 3) == 3
    # The first epoch always runs, however small the limit.
    assert stop_point(0.01, [10, 20, 30], 3) == 1


@pytest.mark.parametrize("seconds,margin,needle", [(0, 1.2, "--time-limit must be > 0"),
                                                   (-5, 1.2, "--time-limit must be > 0"),
                                                   (10, 0.5, "--time-margin must be >= 1")])
def test_bad_limits_are_refused(seconds, margin, needle):
    with pytest.raises(OtltError, match=needle):
        TimeLimit(seconds, margin)


def test_train_stops_at_an_epoch_boundary_and_resumes(tiny_zip, tmp_path, config, capsys):
    """A limit that allows one epoch at most (the first always runs: nothing is known before
    it) stops after it like --stop-after: exit 0, last.pt at epoch 0, no eval.json; the
    resume with a generous limit finishes the run."""
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3))
    assert main(["train", "--config", str(config), "--time-limit", "0.01", *args]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    assert "stopped after epoch 1 (time limit" in out and f"--resume {run}" in out
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    assert not (run / "eval.json").exists()
    assert main(["train", "--resume", str(run), "--time-limit", "3600"]) == 0
    assert "stopped" not in capsys.readouterr().out
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2] and (run / "eval.json").is_file()


def test_bad_time_limit_is_one_line(capsys):
    assert main(["train", "--preset", "cifar10_lt_r100_erm", "--time-limit", "0"]) == 2
    one_line_error(capsys, "--time-limit must be > 0")

"""Careful-user cases: one line `otlt: error: ...`, exit 2, nothing damaged, no code run."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_overrides
from otlt.cli import main
from otlt.data.lists import read_list_file
from otlt.engine.checkpoint import load_checkpoint, save_atomic
from otlt.errors import OtltError


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otlt: error: "), err
    assert "Traceback" not in err[0] and err[0].count("otlt: error:") == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("name: tiny\nloss: {name: ce}\n")
    return path


@pytest.mark.parametrize("override,needle", [
    ("optim.momentum=-1", "optim.momentum must be >= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("train.eval_batch_size=0", "train.eval_batch_size must be a positive integer"),
    ("data.n_max=0", "data.n_max must be >= 1"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
    ("mix.params={fraction: 0.5}", "set mix.fraction instead"),
    ("mix.params={prob: 0.5}", "set mix.prob instead"),
])
def test_bad_values_stop_before_any_data_is_read(tiny_zip, tmp_path, config, capsys,
                                                override, needle):
    args = tiny_overrides(tiny_zip, tmp_path / "runs") + [override]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("files,needle", [
    ({"c.yaml": ""}, "is empty"),
    ({"c.yaml": "name: [unclosed\n"}, "not valid YAML at line"),
    ({"c.yaml": "base: b.yaml\nname: a\n", "b.yaml": "base: c.yaml\n"}, "cycle"),
    ({"c.yaml": "base: c.yaml\nname: a\n"}, "cycle"),
    ({"c.yaml": "base: [1, 2]\nname: a\n"}, "base: must be one file path"),
])
def test_bad_config_files(tmp_path, capsys, files, needle):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    one_line_error(capsys, needle)


@pytest.mark.parametrize("value", ["-1", "0"])
def test_stop_after_must_be_positive(tiny_zip, tmp_path, config, capsys, value):
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs"))
    assert main(["train", "--config", str(config), "--stop-after", value, *args]) == 2
    one_line_error(capsys, "--stop-after must be >= 1")
    assert not (tmp_path / "runs" / "tiny").exists()


def test_list_labels_must_be_ascii_integers(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("a/0.jpg 1\na/1.jpg \u00b2\n")
    with pytest.raises(OtltError, match=r"train.txt:2: expected 'relative/path label'"):
        read_list_file(path)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_train_and_test_must_have_the_same_classes(tmp_path, config, capsys):
    data = tmp_path / "odd.zip"
    with zipfile.ZipFile(data, "w") as zf:
        for split, classes in (("train", ["a", "b", "c"]), ("test", ["a", "b"])):
            for cls in classes:
                for i in range(3):
                    zf.writestr(f"{split}/{cls}/{i}.png", _png())
    args = tiny_overrides(data, tmp_path / "runs") + ["data.num_classes=3", "data.n_max=3",
                                                      "data.val_per_class=0"]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, "test has no images of the train classes ['c']")


@pytest.fixture
def stopped_run(tiny_zip, tmp_path, config, capsys) -> Path:
    """A tiny run stopped (resumably) after 1 of 3 epochs."""
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3))
    assert main(["train", "--config", str(config), "--stop-after", "1", *args]) == 0
    capsys.readouterr()
    return tmp_path / "runs" / "tiny"


@pytest.mark.parametrize("extra,needle", [
    (["--set", "optim.lr=0.5"], "optim.lr 0.1 -> 0.5"),
    (["--set", "data.imbalance_ratio=1"], "data.imbalance_ratio 10.0 -> 1.0"),
    (["--set", "mix.name=otmix"], "mix.name 'none' -> 'otmix'"),
    (["--set", "seed=7"], "seed 0 -> 7"),
    (["--config", "configs/cifar10_lt_r100_erm.yaml"], "drop --config"),
])
def test_resume_refuses_to_become_another_run(stopped_run, capsys, extra, needle):
    before = {p.name: p.read_bytes() for p in stopped_run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(stopped_run), *extra]) == 2
    one_line_error(capsys, needle)
    after = {p.name: p.read_bytes() for p in stopped_run.iterdir() if p.is_file()}
    assert before == after


def test_resume_with_another_dataset_is_refused(stopped_run, tmp_path, capsys):
    from conftest import write_tiny_zip

    other = write_tiny_zip(tmp_path / "other.zip", train_per_class=30)
    assert main(["train", "--resume", str(stopped_run), "--data", str(other)]) == 2
    one_line_error(capsys, "gives other splits than")


def test_safe_resume_changes_are_recorded(stopped_run, capsys):
    assert main(["train", "--resume", str(stopped_run), "--set", "train.eval_batch_size=7",
                 "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert "eval_batch_size: 7" in (stopped_run / "config.yaml").read_text()
    records = [json.loads(x) for x in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["resumed_with"] == {"train.eval_batch_size": [1000, 7]}
    assert "resumed_with" not in records[0]


def test_a_flipped_byte_is_an_error(stopped_run, capsys):
    path = stopped_run / "last.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["train", "--resume", str(stopped_run)]) == 2
    one_line_error(capsys, "checksum does not match")
    assert main(["eval", str(stopped_run)]) == 2
    one_line_error(capsys, "checksum")


def test_stale_temp_files_are_removed_at_the_next_save(tmp_path):
    stale = tmp_path / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    save_atomic({"epoch": 0}, tmp_path / "last.pt")
    assert not stale.exists() and load_checkpoint(tmp_path / "last.pt")["epoch"] == 0


class _Payload:
    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


@pytest.mark.parametrize("entry", ["eval", "resume", "report", "stage1"])
def test_no_entry_point_runs_code_from_a_checkpoint(stopped_run, tmp_path, capsys, entry,
                                                    config):
    _Payload.target = str(tmp_path / "pwned")
    state = load_checkpoint(stopped_run / "last.pt")
    state["x"] = _Payload()
    torch.save(state, stopped_run / "last.pt")  # a foreign file, as anyone can write one
    commands = {
        "eval": ["eval", str(stopped_run)],
        "resume": ["train", "--resume", str(stopped_run)],
        "report": ["report", str(stopped_run), "--tsne", "--out", str(tmp_path / "rep")],
        "stage1": ["train", "--config", str(config), *sets(
            [*tiny_overrides(Path("unused.zip"), tmp_path / "r2"), "data.meta_per_class=3",
             f"reweight.stage1={stopped_run}"])],
    }
    assert main(commands[entry]) == 2
    one_line_error(capsys, "last.pt")
    assert not (tmp_path / "pwned").exists()


def test_a_run_that_died_in_epoch_one_can_be_restarted(tiny_zip, tmp_path, config, capsys):
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1))
    assert main(["train", "--config", str(config), "--stop-after", "1", *args]) == 0
    run = tmp_path / "runs" / "tiny"
    (run / "last.pt").unlink()
    (run / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert main(["train", "--config", str(config), *args]) == 2
    one_line_error(capsys, f"rm -r {run}", "--resume")
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "eval.json").is_file()


def test_batch_larger_than_the_training_set_warns(tiny_zip, tmp_path, config, capsys):
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1) + ["optim.batch_size=999"])
    assert main(["train", "--config", str(config), *args]) == 0
    assert "otlt: warning: optim.batch_size=999 is larger than the training set" in \
        capsys.readouterr().err


def test_version_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip().startswith("otlt 0.")
    assert main(["nonsense"]) == 2
    one_line_error(capsys, "invalid choice")


def test_user_errors_are_value_errors():
    """Library callers can catch the usual type; the config layer keeps its own message."""
    from otlt.config import load_config
    from otlt.errors import OtltError
    assert issubclass(OtltError, ValueError)
    with pytest.raises(ValueError, match="must be a list"):
        load_config(None, ["optim.milestones=3"])

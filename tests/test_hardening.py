"""Careful-user cases: one line `otlt: error: ...`, exit 2, nothing damaged, no code run."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import one_line_error, sets, tiny_overrides
from otlt.atomic import write_atomic
from otlt.cli import main
from otlt.data.lists import read_list_file
from otlt.engine import procedure as procedure_module
from otlt.engine import rundir
from otlt.engine import trainer as trainer_module
from otlt.engine.checkpoint import load_checkpoint, save_atomic
from otlt.engine.weights import load_weights
from otlt.errors import OtltError


@pytest.mark.parametrize("override,needle", [
    ("optim.momentum=-1", "optim.momentum must be >= 0"),
    ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
    ("train.eval_batch_size=0", "train.eval_batch_size must be a positive integer"),
    ("train.bn_stack=0", "train.bn_stack must be >= 1"),
    ("data.n_max=0", "data.n_max must be >= 1"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0"),
    ("mix.params={fraction: 0.5}", "set mix.fraction instead"),
    ("mix.params={prob: 0.5}", "set mix.prob instead"),
    ("optim.gammas=[-1]", "optim.gammas must be factors > 0"),
    ("optim.gammas=[0]", "optim.gammas must be factors > 0"),
    ("name=../..", "name must be a plain folder name"),
    ("name=a/b", "got 'a/b'"),
])
def test_bad_values_stop_before_any_data_is_read(tiny_zip, tmp_path, config, capsys,
                                                override, needle):
    args = tiny_overrides(tiny_zip, tmp_path / "runs") + [override]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("override,needle", [
    ("mix.params={bogus: 1}", "unknown option(s) bogus for mixer 'otmix'"),
    ("loss.params={bogus: 1}", "loss 'ce' got unknown parameter(s) bogus"),
    ("model.name=resnet21", "unknown model 'resnet21'"),
])
def test_a_bad_component_fails_before_data_or_run_directory(tiny_zip, tmp_path, config,
                                                            capsys, monkeypatch, override,
                                                            needle):
    """Issue 32 item 3: the loss, mixer and model are checked before the data is read."""
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the config was checked")

    monkeypatch.setattr("otlt.engine.feed.prepare_data", no_data)
    args = tiny_overrides(tiny_zip, tmp_path / "runs") + ["mix.name=otmix", override]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("made", [False, True])
def test_missing_data_leaves_no_run_directory_it_made(tmp_path, config, capsys, made):
    """A run directory this call made is removed when the trainer cannot be built; one that
    existed before stays (and so does what is in it)."""
    if made:
        (tmp_path / "runs" / "tiny").mkdir(parents=True)
        (tmp_path / "runs" / "keep.txt").write_text("")
    args = tiny_overrides(tmp_path / "missing.zip", tmp_path / "runs")
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, "missing.zip")
    if made:
        left = {p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*")}
        assert left - {"runs/tiny/.lock"} == {"runs/keep.txt", "runs/tiny"}
        # released (other tests' trainers may still hold their own directories)
        assert str((tmp_path / "runs" / "tiny").resolve()) not in rundir._HELD
    else:
        assert not (tmp_path / "runs").exists()


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


# ---- a run directory that defends itself (issue 33) ------------------------------------------
def _files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


def _edit_config(run: Path, key: str, value) -> None:
    """Change one key of the run's config.yaml by hand (None: delete it)."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    section, _, leaf = key.rpartition(".")
    node = raw[section] if section else raw
    if value is None:
        del node[leaf]
    else:
        node[leaf] = value
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lr", 0.5, "optim.lr 0.1 -> 0.5"),
    ("data.data_seed", 3, "data.data_seed 0 -> 3"),
    ("eval.bn_stats", "train", "eval.bn_stats 'running' -> 'train'"),
])
def test_a_hand_edited_config_is_refused_on_every_load(stopped_run, capsys, key, value,
                                                        needle):
    _edit_config(stopped_run, key, value)
    _edit_config(stopped_run, "train.eval_batch_size", 7)  # a key a resume may change
    # A checkpoint written before train.dist_timeout existed: defaults fill in on both sides.
    state = load_checkpoint(stopped_run / "last.pt")
    del state["config"]["train"]["dist_timeout"]
    save_atomic(state, stopped_run / "last.pt")
    _edit_config(stopped_run, "train.dist_timeout", None)
    before = _files(stopped_run)
    for command in (["train", "--resume"], ["eval"], ["probe"]):
        assert main([*command, str(stopped_run)]) == 2, command
        named = one_line_error(capsys, needle, "config.yaml", "last.pt", "edited").split(
            "; a resume may")[0]
        assert "eval_batch_size" not in named and "dist_timeout" not in named, named
    assert _files(stopped_run) == before
    _edit_config(stopped_run, key, load_checkpoint(stopped_run / "last.pt")["config"][
        key.split(".")[0]][key.split(".")[1]])  # undone: the safe edit alone is fine
    assert main(["eval", str(stopped_run)]) == 0


def test_eval_and_probe_read_last_pt_once(stopped_run, monkeypatch):
    """The config check and the weights share one read of ``last.pt`` (it holds the optimizer
    state too: on ImageNet-LT hundreds of MB)."""
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (
        reads.append(self.name) if self.name == "last.pt" else None, read_bytes(self))[1])
    for command in (["eval"], ["probe", "--bn-stats", "running"]):
        reads.clear()
        assert main([*command, str(stopped_run)]) == 0, command
        assert reads == ["last.pt"], command


def _hold_lock(folder: Path, pid: int, host: str) -> int:
    """Take the run directory's lock through a descriptor of our own, as another process
    would; returns the descriptor (closing it releases the lock)."""
    import fcntl

    fd = os.open(folder / rundir.LOCK_NAME, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": pid, "host": host}).encode())
    return fd


def test_the_lock_conflicts_within_one_process_and_is_released(tmp_path):
    """flock locks belong to open file descriptions: a second open() conflicts even here."""
    fcntl = pytest.importorskip("fcntl")
    rundir.lock_run_dir(tmp_path)
    rundir.lock_run_dir(tmp_path)  # this process holds it already: a no-op
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        rundir.release_run_dir(tmp_path)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
    finally:
        os.close(fd)


@pytest.mark.parametrize("entry", ["resume", "fresh"])
def test_a_second_trainer_refuses_a_locked_run_directory(stopped_run, config, tiny_zip,
                                                         tmp_path, capsys, entry):
    pytest.importorskip("fcntl")
    before = _files(stopped_run)
    fd = _hold_lock(stopped_run, 4242, "elsewhere")
    try:
        command = (["train", "--resume", str(stopped_run)] if entry == "resume" else
                   ["train", "--config", str(config),
                    *sets(tiny_overrides(tiny_zip, tmp_path / "runs"))])
        assert main(command) == 2
        one_line_error(capsys, f"run directory {stopped_run} is in use",
                       "PID 4242 on host elsewhere")
        before[".lock"] = (stopped_run / ".lock").read_bytes()
        assert _files(stopped_run) == before
    finally:
        os.close(fd)


def test_a_killed_lock_holder_frees_the_run_directory(stopped_run, capsys):
    """Two real processes: the second trainer names the first's PID and host; once the
    first dies (SIGKILL), the operating system has released its lock."""
    pytest.importorskip("fcntl")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from otlt.engine.rundir "
         "import lock_run_dir; lock_run_dir(Path(sys.argv[1])); print('locked', flush=True); "
         "sys.stdin.read()", str(stopped_run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "locked"
        metrics = (stopped_run / "metrics.jsonl").read_bytes()
        assert main(["train", "--resume", str(stopped_run), "--stop-after", "2"]) == 2
        one_line_error(capsys, f"PID {holder.pid} on host {socket.gethostname()}")
        assert (stopped_run / "metrics.jsonl").read_bytes() == metrics
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(stopped_run), "--stop-after", "2"]) == 0
    epochs = [json.loads(x)["epoch"]
              for x in (stopped_run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_refused_atomic_write_is_one_error_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"the previous checkpoint")

    def half_then_full(handle):
        handle.write(b"half a checkpoint")
        raise _enospc()

    with pytest.raises(OtltError, match=r"cannot write .*last.pt \(No space left on device\)"):
        write_atomic(target, half_then_full)
    assert target.read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint(stopped_run, capsys,
                                                             monkeypatch):
    before = (stopped_run / "last.pt").read_bytes()
    open_, fsync, checkpoint_fds = os.open, os.fsync, set()

    def recording_open(name, *args, **kwargs):
        fd = open_(name, *args, **kwargs)
        if Path(name).name.startswith(".last.pt."):
            checkpoint_fds.add(fd)
        return fd

    def full_disk_fsync(fd):  # the payload is written; the disk refuses to keep it
        if fd in checkpoint_fds:
            raise _enospc()
        fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", full_disk_fsync)
    assert main(["train", "--resume", str(stopped_run), "--stop-after", "2"]) == 2
    one_line_error(capsys, f"cannot write {stopped_run / 'last.pt'} (No space left on device)")
    assert checkpoint_fds and (stopped_run / "last.pt").read_bytes() == before
    assert not list(stopped_run.glob(".last.pt.*"))
    monkeypatch.undo()
    assert main(["train", "--resume", str(stopped_run), "--stop-after", "2"]) == 0
    assert load_checkpoint(stopped_run / "last.pt")["epoch"] == 1


def _best_epoch(run: Path) -> int:
    return load_weights(run / "best.safetensors").epoch


def _assert_best_settled(run: Path, epoch: int) -> None:
    """A finished run whose best file, ``eval.json`` and lack of a pending best agree."""
    assert _best_epoch(run) == epoch
    assert json.loads((run / "eval.json").read_text())["selected"]["epoch"] == epoch
    assert not (run / ".best.pending.safetensors").exists()


def test_a_stop_before_last_pt_keeps_the_best_last_pt_knows(stopped_run, monkeypatch):
    """Epoch 1 beats the best (validation patched to 100%), then the stop comes before
    ``last.pt`` records it. Its best must not replace the one ``last.pt`` names: on a GPU the
    redone epoch can train other weights, which here validate worse and are not selected."""
    monkeypatch.setattr(procedure_module, "select_value", lambda summary, metric: 100.0)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer_module, "save_atomic", stop)
        assert main(["train", "--resume", str(stopped_run), "--stop-after", "3"]) == 130
    assert load_checkpoint(stopped_run / "last.pt")["epoch"] == 0
    assert _best_epoch(stopped_run) == 0  # before the fix: 1, an epoch last.pt never saved
    monkeypatch.setattr(procedure_module, "select_value", lambda summary, metric: -1.0)
    assert main(["train", "--resume", str(stopped_run)]) == 0
    _assert_best_settled(stopped_run, 0)


def test_a_stop_after_last_pt_makes_its_best_the_best_on_resume(stopped_run, monkeypatch):
    """The stop comes after ``last.pt`` recorded the last epoch (2) as best but before its
    weights became ``best.safetensors``. ``otlt eval --checkpoint best`` already reads the
    best ``last.pt`` names, and the resume (no epoch left to train) finishes the rename, so
    file, checkpoint and ``eval.json`` agree."""
    monkeypatch.setattr(procedure_module, "select_value", lambda summary, metric: 100.0)
    commit, calls = procedure_module.EvaluationProcedure.commit_best, []

    def stop_at_the_second(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        commit(self)

    with monkeypatch.context() as m:
        m.setattr(procedure_module.EvaluationProcedure, "commit_best", stop_at_the_second)
        assert main(["train", "--resume", str(stopped_run)]) == 130
    assert load_checkpoint(stopped_run / "last.pt")["best"]["epoch"] == 2
    assert _best_epoch(stopped_run) == 1
    assert main(["eval", str(stopped_run), "--checkpoint", "best", "--split", "val"]) == 0
    record = json.loads(next(stopped_run.glob("eval_best_*_val.json")).read_text())
    assert record["epoch"] == 2 and record["checkpoint"] == "best"
    assert main(["train", "--resume", str(stopped_run)]) == 0
    _assert_best_settled(stopped_run, 2)


@pytest.mark.parametrize("locking", [True, False])
def test_resume_on_a_read_only_run_directory(stopped_run, capsys, monkeypatch, locking):
    """As root here, chmod would not stop a write: every write into the run directory is
    refused by patched os.open / open instead (EACCES, as a read-only folder gives)."""
    if locking:
        pytest.importorskip("fcntl")
    else:
        monkeypatch.setattr(rundir, "fcntl", None)  # as on Windows: no lock
    folder = str(stopped_run)
    before = _files(stopped_run)
    os_open, io_open = os.open, io.open

    def refused(path) -> bool:
        return (isinstance(path, (str, os.PathLike))
                and os.path.abspath(os.fspath(path)).startswith(folder))

    def read_only_os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return os_open(path, flags, *args, **kwargs)

    def read_only_open(file, mode="r", *args, **kwargs):
        if refused(file) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return io_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_os_open)
    monkeypatch.setattr(io, "open", read_only_open)
    monkeypatch.setattr(builtins, "open", read_only_open)
    assert main(["train", "--resume", str(stopped_run)]) == 2
    one_line_error(capsys, str(stopped_run), "(Permission denied)")
    monkeypatch.undo()
    assert _files(stopped_run) == before


# ---- issue 33, item 5: the smaller ones --------------------------------------------------


def test_resume_with_other_images_of_the_same_counts_is_refused(stopped_run, tiny_zip, tmp_path,
                                                                capsys):
    """splits.json records a digest of every split: other images behind the same images per
    class (another noise seed) are refused; the same images elsewhere (a copy) resume."""
    import shutil

    from conftest import write_tiny_zip

    splits = json.loads((stopped_run / "splits.json").read_text())
    assert set(splits) == {"classes", "counts", "digests"}
    assert sum(splits["counts"]["train"]) > 0 and len(splits["digests"]["train"]) == 64
    other = write_tiny_zip(tmp_path / "other.zip", seed=1)
    assert main(["train", "--resume", str(stopped_run), "--data", str(other)]) == 2
    one_line_error(capsys, "but other images or order in train, val, test", "--data PATH")
    same = shutil.copy(tiny_zip, tmp_path / "moved.zip")
    assert main(["train", "--resume", str(stopped_run), "--data", str(same),
                 "--stop-after", "2"]) == 0


def test_splits_json_without_digests_resumes_on_counts(stopped_run, tmp_path, capsys):
    """A run directory written before the digests existed still resumes (counts only)."""
    from conftest import write_tiny_zip

    path = stopped_run / "splits.json"
    splits = json.loads(path.read_text())
    del splits["digests"]
    path.write_text(json.dumps(splits, indent=1))
    other = write_tiny_zip(tmp_path / "other.zip", seed=1)
    assert main(["train", "--resume", str(stopped_run), "--data", str(other),
                 "--stop-after", "2"]) == 0
    assert load_checkpoint(stopped_run / "last.pt")["epoch"] == 1


def test_a_byte_order_mark_in_a_list_file_is_not_part_of_the_first_path(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes("\ufeffa/0.jpg 1\r\nb c/1.jpg 0\r\n".encode())
    paths, labels = read_list_file(path)
    assert paths == ["a/0.jpg", "b c/1.jpg"] and labels.tolist() == [1, 0]


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_class_folders_in_nfd_and_nfc_are_one_class(tmp_path, kind):
    """A test split copied from a Mac (NFD: 'e' + combining accent) matches train (NFC)."""
    import unicodedata

    from otlt.data.folders import read_image_folder

    nfc, nfd = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    assert nfc != nfd
    files = {f"{split}/{cls}/{i}.png": _png()
             for split, name in (("train", nfc), ("test", nfd))
             for cls in (name, "tea") for i in range(2)}
    data = tmp_path / "d.zip" if kind == "zip" else tmp_path / "d"
    if kind == "zip":
        with zipfile.ZipFile(data, "w") as zf:
            for name, blob in files.items():
                zf.writestr(name, blob)
    else:
        for name, blob in files.items():
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).write_bytes(blob)
    splits = read_image_folder(data, workers=1)
    assert splits["train"].classes == [nfc, "tea"] == splits["test"].classes
    assert splits["test"].labels.tolist() == [0, 0, 1, 1]


def test_a_newer_checkpoint_format_names_both_versions(tmp_path):
    save_atomic({"format": 2, "epoch": 0}, tmp_path / "last.pt")
    with pytest.raises(OtltError, match=r"has format version 2, newer than this build of otlt "
                                        r"reads \(version 1\); upgrade otlt"):
        load_checkpoint(tmp_path / "last.pt")
    save_atomic({"format": None, "epoch": 0}, tmp_path / "last.pt")
    with pytest.raises(OtltError, match=r"no format version; this build reads version 1"):
        load_checkpoint(tmp_path / "last.pt")


def test_weights_of_another_model_name_the_keys(stopped_run, capsys):
    state = load_checkpoint(stopped_run / "last.pt")
    model = state["model"]
    model["head.weight"] = model.pop("fc.weight")
    model["fc.bias"] = torch.zeros(3)
    save_atomic(state, stopped_run / "last.pt")
    for command in (["eval", str(stopped_run)], ["train", "--resume", str(stopped_run)]):
        assert main(command) == 2
        one_line_error(capsys, "missing keys fc.weight", "unexpected keys head.weight",
                       "shapes fc.bias [3] in the file, [10] here")


def test_quoted_reasons_are_cut_at_a_word_boundary():
    from otlt.errors import reason

    text = reason(RuntimeError("size mismatch for layer1.0.conv1.weight:\n\tcopying " * 9), 60)
    assert text == "RuntimeError: size mismatch for layer1.0.conv1.weight: copying size ..."
    assert reason(KeyError("model")) == "KeyError: 'model'"


def test_one_finite_number_test_for_values_records_and_reports():
    """The readers of logged records and the finite-number checks share one predicate: a
    flag (``True`` is an ``int`` to Python) and a NaN are never numbers, a NumPy scalar is one
    (a class count read with NumPy, a timing from ``np.mean``)."""
    from otlt.engine.logging import evaluation_share, tensorboard_scalars
    from otlt.errors import OtltError, is_finite_number
    from otlt.losses.base import check_counts
    from otlt.transport.entropic import sinkhorn

    numbers = [0, -2, 1.5, np.float32(0.25), np.int64(7)]
    others = [True, False, np.bool_(True), None, float("nan"), float("inf"), -float("inf"), "1",
              [1], torch.ones(())]
    assert all(is_finite_number(v) for v in numbers)
    assert not any(is_finite_number(v) for v in others)
    assert tensorboard_scalars({"epoch": 3, "ot_epoch": True, "train_loss": 0.5, "lr": float("nan"),
                                "steps": np.float32(2.0), "bn_probe": {"train": {
                                    "acc": 0.75, "err": float("inf"), "flag": True}}}) \
        == {"train/loss": 0.5, "steps": 2.0, "probe/train/acc": 0.75}
    assert evaluation_share([{"steps_seconds": True, "epoch_seconds": 2.0},
                             {"steps_seconds": np.float32(1.0), "epoch_seconds": 4.0}]) == 0.75
    assert check_counts(np.array([5, 3])).tolist() == [5, 3]
    for bad in ([5, True], [5, float("nan")]):
        with pytest.raises(OtltError, match="positive integers"):
            check_counts(bad)
    with pytest.raises(OtltError, match="eps must be a positive number"):
        sinkhorn(torch.ones(2, 2), eps=True)


def test_eval_refuses_a_checkpoint_of_another_run(stopped_run, tmp_path, capsys):
    """`otlt eval A --checkpoint B/last.pt` would file B's numbers under A, with A's config."""
    import shutil

    other = shutil.copytree(stopped_run, tmp_path / "runs" / "other")
    assert main(["eval", str(stopped_run), "--checkpoint", str(other / "last.pt")]) == 2
    one_line_error(capsys, f"belongs to run {other}, not to {stopped_run}",
                   f"otlt eval {other / 'last.pt'}")
    assert not list(stopped_run.glob("eval_*.json"))
    assert main(["eval", str(stopped_run), "--checkpoint", str(stopped_run / "last.pt")]) == 0
    assert list(stopped_run.glob("eval_last_*.json"))


def test_a_shortened_preset_says_how_to_shorten_its_schedule(tmp_path, capsys):
    """`--set optim.epochs=60` on the ERM-DRW preset: one line with the scaled fix, no run."""
    args = ["train", "--preset", "cifar10_lt_r100_drw", "--set", "optim.epochs=60",
            "--set", f"out_dir={tmp_path / 'runs'}"]
    assert main(args) == 2
    one_line_error(capsys, "optim.milestones=[100,160,200], loss.params.drw_epoch=160 reach "
                   "past optim.epochs=60", "--set optim.milestones=[25,40,50] "
                   "--set loss.params.drw_epoch=40")
    assert not (tmp_path / "runs" / "cifar10_lt_r100_drw" / "last.pt").exists()


def test_a_default_drw_start_past_the_run_is_refused_before_data_or_directory(config, tmp_path,
                                                                              capsys):
    """ERM-DRW's default start (160) in a 150-epoch run: one line, before the data (here a
    path that does not exist) is looked for or the run directory is made."""
    args = ["train", "--config", str(config), "--set", "loss.name=drw", "--set", "optim.epochs=150",
            "--set", "optim.milestones=[50]", "--set", "optim.gammas=[0.1]",
            "--set", f"data.path={tmp_path / 'no-data'}", "--set", f"out_dir={tmp_path / 'runs'}"]
    assert main(args) == 2
    one_line_error(capsys, "loss.params.drw_epoch=160 reach past optim.epochs=150",
                   "--set loss.params.drw_epoch=100")
    assert not (tmp_path / "runs").exists()


def test_kept_and_plan_epochs_count_from_the_end(tiny_zip, tmp_path):
    """`train.keep_epochs: [-1]` and OTmix `plan_epochs: [-1]` act at the last epoch."""
    config = tmp_path / "otmix.yaml"
    config.write_text("name: tiny\nmix: {name: otmix, skip_first: 0, skip_last: 0, prob: 1.0,"
                      " params: {ot_probability: 1.0, plan_epochs: [-1]}}\n")
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2) + [
        "train.keep_epochs=[-1]", "eval.bn_probe_every=0"])
    assert main(["train", "--config", str(config), *args]) == 0
    run = tmp_path / "runs" / "tiny"
    assert [p.name for p in (run / "kept").iterdir()] == ["epoch_001.safetensors"]
    assert [p.name for p in (run / "plans").iterdir()] == ["epoch_0001.json"]


def test_resume_of_a_finished_run_shows_its_eval_json_and_computes_nothing(stopped_run, capsys,
                                                                          monkeypatch):
    """A finished run's record is not recomputed by a resume (on another CPU the bf16
    numbers could move, and eval.json would silently change); an eval.json that is not the
    final record (another epoch) is, as after a stop during the final evaluation."""
    assert main(["train", "--resume", str(stopped_run)]) == 0
    path = stopped_run / "eval.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "top1_error": 12.34}))
    before = path.read_bytes()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(procedure_module.EvaluationProcedure, "final",
                  lambda self: pytest.fail("a finished run's final evaluation was recomputed"))
        assert main(["train", "--resume", str(stopped_run)]) == 0
    out = capsys.readouterr().out
    assert "had trained all 3 epochs already" in out and " 12.34%" in out
    assert path.read_bytes() == before
    path.write_text(json.dumps({**record, "epoch": 1}))
    assert main(["train", "--resume", str(stopped_run)]) == 0
    assert json.loads(path.read_text()) == record


def test_one_integer_test_for_counts_epochs_and_indices():
    """Every knob that must be an integer (an epoch, a count, an index) shares one predicate:
    a NumPy integer is one, a bool (an int to Python) and a whole float are not."""
    from otlt.errors import is_integer
    from otlt.integrations.lightning import OTMixCallback
    from otlt.losses.base import check_epoch
    from otlt.mixing import OTMix
    from otlt.models import create_model

    assert all(is_integer(v) for v in (0, -3, np.int64(7), np.uint8(2), torch.tensor(4)))
    assert not any(is_integer(v) for v in (True, np.bool_(False), torch.tensor(True), 2.0,
                                           np.float32(1), torch.tensor(1.0), "1", None))
    images, labels = torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    for good in (1, np.int64(1)):
        assert check_epoch("drw_epoch", good) == 1
        assert OTMix(class_counts=[3, 1], check_every=good).check_every == 1
        assert OTMixCallback(images, labels, 2, confusion_dataloader=good).confusion_dataloader == 1
    assert create_model("resnet32", num_classes=np.int64(3)) is not None
    for bad in (True, 1.0):
        with pytest.raises(OtltError, match="non-negative integer"):
            check_epoch("drw_epoch", bad)
        with pytest.raises(OtltError, match="check_every must be a positive integer"):
            OTMix(class_counts=[3, 1], check_every=bad)
        with pytest.raises(OtltError, match="index of a validation dataloader"):
            OTMixCallback(images, labels, 2, confusion_dataloader=bad)
        with pytest.raises(OtltError, match="num_classes must be an integer"):
            create_model("resnet32", num_classes=3.0 if isinstance(bad, float) else bad)


def test_a_finished_run_is_shown_by_a_launch_of_another_world_size(stopped_run, capsys):
    """A run trained by 2 processes, finished with its eval.json, is shown by a 1-process
    resume (it trains nothing); an unfinished one, or one without its final record, is
    still refused (the shards, and so the trajectory, depend on the world size)."""
    def as_if_trained_by(world: int) -> None:
        state = load_checkpoint(stopped_run / "last.pt")
        state["world_size"] = world
        save_atomic(state, stopped_run / "last.pt")

    as_if_trained_by(2)
    assert main(["train", "--resume", str(stopped_run)]) == 2
    one_line_error(capsys, "was trained by 2 process(es)", "this launch has 1")
    as_if_trained_by(1)
    assert main(["train", "--resume", str(stopped_run)]) == 0
    as_if_trained_by(2)
    capsys.readouterr()
    assert main(["train", "--resume", str(stopped_run)]) == 0
    assert "had trained all 3 epochs already" in capsys.readouterr().out
    path = stopped_run / "eval.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "epoch": 1}))
    assert main(["train", "--resume", str(stopped_run)]) == 2
    one_line_error(capsys, "was trained by 2 process(es)")

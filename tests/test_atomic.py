"""otlt.atomic: the old file or the whole new one, with the mode a plain write would give."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest

from otlt.atomic import STALE_AFTER_SECONDS, remove_stale_temps, write_atomic, write_text_atomic
from otlt.errors import OtltError


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_written_file_has_the_mode_of_a_plain_write(tmp_path, monkeypatch, umask, mode):
    """mkstemp makes 0600 files: with them a group could not read eval.json or the weights
    of a shared run directory. No chmod either (Windows before Python 3.13 has no fchmod,
    and some mounts refuse chmod): the temp file is created with the mode."""
    monkeypatch.delattr(os, "fchmod", raising=False)
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "eval.json", "{}")
        (tmp_path / "plain.json").write_text("{}")
        assert os.umask(umask) == umask  # the umask is left as it was
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "eval.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == mode


def test_text_replaces_the_old_file_whole(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("old")
    write_text_atomic(target, "seed: 0  # σ, λ\n")
    assert target.read_text(encoding="utf-8") == "seed: 0  # σ, λ\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_parents_creates_the_folders_and_a_folder_that_cannot_be_is_one_line(tmp_path):
    """Reports' figures, bench files, cache entries and plan artifacts go into folders that
    may not exist yet; a file where a folder should be is an OtltError naming the target,
    not a raw OSError."""
    write_text_atomic(tmp_path / "a" / "b" / "bench.json", "{}", parents=True)
    assert (tmp_path / "a" / "b" / "bench.json").read_text() == "{}"
    (tmp_path / "file").write_text("")
    with pytest.raises(OtltError, match=r"cannot write .*file/x/plot\.png"):
        write_text_atomic(tmp_path / "file" / "x" / "plot.png", "", parents=True)
    with pytest.raises(OtltError, match="cannot write"):  # without parents: no folder made
        write_text_atomic(tmp_path / "c" / "d.json", "{}")
    assert not (tmp_path / "c").exists()


def test_a_write_stopped_midway_keeps_the_old_file_and_no_temp(tmp_path):
    """Ctrl-C (or SIGTERM's exception) inside the write: the old bytes stay, the temp goes."""
    target = tmp_path / "eval.json"
    target.write_text("the old record")

    def stopped(handle):
        handle.write(b"half of a new rec")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, stopped)
    assert target.read_text() == "the old record"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_second_writer_of_the_same_file_leaves_the_first_ones_temp_alone(tmp_path):
    """Ranks or side-by-side jobs filling the same cache entry: a writer that starts while
    another is writing must not delete the other's temp file (its rename would fail)."""
    target = tmp_path / "cache.npz"

    def outer(handle):
        handle.write(b"outer")
        write_atomic(target, lambda inner: inner.write(b"inner"))  # starts meanwhile

    write_atomic(target, outer)
    assert target.read_bytes() == b"outer"  # the later rename wins; both succeeded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz"]


def test_stale_temps_are_those_of_gone_writers_old_ones_and_the_old_naming(tmp_path):
    target = tmp_path / "last.pt"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    gone = tmp_path / f".last.pt.{done.stdout.strip()}.0a1b2c3d.tmp"
    old = tmp_path / f".last.pt.{os.getpid()}.0a1b2c3e.tmp"
    unnamed = tmp_path / ".last.pt.abc123.tmp"  # before the PID was in the name
    live = tmp_path / f".last.pt.{os.getpid()}.0a1b2c3f.tmp"
    other = tmp_path / f".last.pt.json.{done.stdout.strip()}.0a1b2c40.tmp"  # another file's
    for path in (gone, old, unnamed, live, other):
        path.write_bytes(b"half")
    hours_ago = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(old, (hours_ago, hours_ago))
    remove_stale_temps(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])

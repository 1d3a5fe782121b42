"""otlt.atomic: the old file or the whole new one, with the mode a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from otlt.atomic import write_atomic, write_text_atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_written_file_has_the_mode_of_a_plain_write(tmp_path, umask, mode):
    """mkstemp makes 0600 files: without the chmod a group could not read eval.json or the
    weights of a shared run directory."""
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

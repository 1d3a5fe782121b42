"""The repository travels to a GPU machine, and the weights it keeps in history come back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
TRAVEL_LIMIT = 64 * 2**20  # what a device call sends: the working tree and the carried data
DATA_BYTES = 18_640_140  # cifar10-jpeg.tar.xz, carried for a campaign on the real data
MARGIN = 4 * 2**20  # room for the next results without a surprise at the device

archive = load_script("weights_archive")


def is_checkout() -> bool:
    return (ROOT / ".git").exists()


@pytest.mark.skipif(not is_checkout(), reason="not a git checkout")
def test_the_working_tree_travels_to_a_gpu_machine_with_the_data():
    """At 87 MB the tree could not be sent at all (every device call refused): weights of
    later seeds and kept epochs live in history (scripts/weights_archive.py) and report
    figures are palette PNGs."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    size = sum((ROOT / p).stat().st_size for p in tracked if p and (ROOT / p).is_file())
    assert size + DATA_BYTES <= TRAVEL_LIMIT - MARGIN, (
        f"tracked files {size / 1e6:.1f} MB + data {DATA_BYTES / 1e6:.1f} MB leave less than "
        f"{MARGIN / 2**20:.0f} MiB of the {TRAVEL_LIMIT / 2**20:.0f} MiB a device call takes")


@pytest.mark.skipif(not is_checkout(), reason="not a git checkout")
def test_every_archived_weight_file_is_in_the_history():
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT,
                             capture_output=True, text=True).stdout.strip()
    if shallow == "true":
        pytest.skip("a shallow clone holds no history")
    files = archive.read_manifest()
    assert files, "the manifest lists the archived weights"
    assert archive.check() == []


def _repo(tmp_path: Path, monkeypatch) -> Path:
    # The user's own git settings (a global excludes file) must not reach the test's repo.
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    for key in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{key}_NAME", "t")
        monkeypatch.setenv(f"GIT_{key}_EMAIL", "t@example.com")
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / ".gitignore").write_text("/results/**/*_seed[1-9]*/*.safetensors\n")
    for run, data in (("r_seed1", b"seed one"), ("r", b"seed zero")):
        (repo / "results" / "g" / run).mkdir(parents=True)
        (repo / "results" / "g" / run / "last.safetensors").write_bytes(data)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-f", "results/g/r_seed1/last.safetensors"], cwd=repo,
                   check=True)
    subprocess.run(["git", "commit", "-qm", "results"], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    return repo


def test_archive_then_restore_gives_the_same_bytes(tmp_path, monkeypatch):
    repo = _repo(tmp_path, monkeypatch)
    seed1 = "results/g/r_seed1/last.safetensors"
    assert archive.archive(["./results/g/"], root=repo) == [seed1]  # a folder: what is ignored
    subprocess.run(["git", "commit", "-qm", "archive"], cwd=repo, check=True)
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True,
                             text=True).stdout.split()
    assert seed1 not in tracked and archive.MANIFEST in tracked
    assert list(archive.read_manifest(repo)) == [seed1]
    (repo / seed1).unlink()
    with pytest.raises(SystemExit, match="no archived file under results/g/r$"):
        archive.restore(["results/g/r"], root=repo)  # a prefix is a whole folder
    monkeypatch.chdir(repo / "results")  # prefixes are paths from the current folder
    assert archive.restore(["g"], root=repo) == [seed1]
    assert (repo / seed1).read_bytes() == b"seed one"
    assert archive.restore([], root=repo) == []  # already there
    assert archive.check(root=repo) == []
    (repo / seed1).write_bytes(b"a new collection")  # untracked: git holds no copy of it
    assert archive.restore([], root=repo) == []
    assert (repo / seed1).read_bytes() == b"a new collection"
    assert archive.restore([], root=repo, force=True) == [seed1]
    assert (repo / seed1).read_bytes() == b"seed one"
    with pytest.raises(SystemExit, match="outside the repository"):
        archive.restore([str(tmp_path)], root=repo)
    (repo / archive.MANIFEST).write_text("{")
    with pytest.raises(SystemExit, match="is damaged"):
        archive.read_manifest(repo)


def test_a_squashed_archive_commit_is_found_out(tmp_path, monkeypatch):
    """The manifest names the commit that holds a file; squashed away, the file survives only
    as a dangling object a clone does not copy, so check() requires the commit in HEAD's
    history."""
    repo = _repo(tmp_path, monkeypatch)
    archive.archive(["results/g"], root=repo)
    subprocess.run(["git", "commit", "-qm", "archive"], cwd=repo, check=True)
    subprocess.run(["git", "update-ref", "-d", "HEAD"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "squashed"], cwd=repo, check=True)
    assert any("not in HEAD's history" in p for p in archive.check(root=repo))


def test_check_names_an_entry_its_commit_does_not_hold(tmp_path, monkeypatch):
    repo = _repo(tmp_path, monkeypatch)
    (seed1,) = archive.archive(["results/g"], root=repo)
    subprocess.run(["git", "commit", "-qm", "archive"], cwd=repo, check=True)
    files = archive.read_manifest(repo)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()
    files[seed1]["commit"] = head  # the archive commit untracked the file
    archive.write_manifest(files, repo)
    assert archive.check(root=repo) == [
        f"{seed1} is not in commit {head[:12]} (was that commit squashed or rebased away?)"]


def test_archive_refuses_what_would_come_back_or_is_not_committed(tmp_path, monkeypatch):
    repo = _repo(tmp_path, monkeypatch)
    with pytest.raises(SystemExit, match="does not cover results/g/r/last.safetensors"):
        archive.archive(["results/g/r/last.safetensors"], root=repo)
    with (repo / ".git" / "info" / "exclude").open("a") as f:  # this clone's rule alone
        f.write("/results/g/r/*.safetensors\n")
    with pytest.raises(SystemExit, match="does not cover results/g/r/last.safetensors"):
        archive.archive(["results/g/r/last.safetensors"], root=repo)
    (repo / "results/g/r_seed1/last.safetensors").write_bytes(b"changed")
    with pytest.raises(SystemExit, match="differs from HEAD"):
        archive.archive(["results/g/r_seed1/last.safetensors"], root=repo)
    with pytest.raises(SystemExit, match="is not tracked"):
        archive.archive(["results/g/r_seed2/last.safetensors"], root=repo)
    assert not (repo / archive.MANIFEST).exists()


def test_a_collection_outside_a_checkout_says_it_cannot_tell(tmp_path, capsys, monkeypatch):
    collect = load_script("collect_results", monkeypatch)
    monkeypatch.setattr(collect, "ROOT", tmp_path)  # a copy of the tree without .git
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    collect.warn_if_ignored([tmp_path / "results" / "g" / "r_seed1" / "last.safetensors"])
    assert "which weight files git ignores is unknown" in capsys.readouterr().err


@pytest.mark.skipif(not is_checkout(), reason="not a git checkout")
def test_a_collection_says_which_weights_a_plain_git_add_would_skip(capsys, monkeypatch):
    warn = load_script("collect_results", monkeypatch).warn_if_ignored
    group = ROOT / "results" / "cifar10_lt_r100_table1"
    warn([group / "run" / "last.safetensors", group / "run_seed1" / "last.safetensors"])
    err = capsys.readouterr().err
    assert "git ignores 1 weight file(s) (results/cifar10_lt_r100_table1/run_seed1/" \
           "last.safetensors by .gitignore, ...): commit them with git add -f" in err
    warn([group / "run" / "best.safetensors"])
    assert capsys.readouterr().err == ""
    warn([ROOT.parent / "elsewhere" / "last.safetensors"])  # outside the checkout: skipped
    assert capsys.readouterr().err == ""


def test_only_a_gitignore_pattern_that_is_not_re_included_counts(tmp_path, monkeypatch):
    """What archiving and restoring rely on: a ``.gitignore`` (shared by every clone) covers
    the file, not a clone's own ``info/exclude``, and a ``!`` pattern re-includes it."""
    repo = _repo(tmp_path, monkeypatch)
    (repo / ".gitignore").write_text("/results/**/*.safetensors\n!/results/g/r/last.*\n")
    (repo / ".git" / "info" / "exclude").write_text("/own.bin\n")
    paths = ["results/g/r_seed1/last.safetensors", "results/g/r/last.safetensors",
             "own.bin", "results/g/r/plain.txt"]
    sources = archive.ignore_sources(paths, root=repo)
    assert sorted(sources) == ["own.bin", "results/g/r_seed1/last.safetensors"]
    assert sources["own.bin"].endswith("info/exclude")
    assert archive.gitignored(paths, root=repo) == ["results/g/r_seed1/last.safetensors"]
    assert archive.ignore_sources([], root=repo) == {}

"""The prepared GPU campaign (``scripts/campaign.py``) dry-runs on the CPU with tiny settings:
a deadline stops a run at an epoch boundary (resumable) and leaves the next one unstarted; the
same command again resumes the first and runs the second to completion; the return is at most
8 files (the packing alone: fast tests of ``pack``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import load_script, sets, tiny_overrides
from otlt.engine.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def files(folder: Path, sizes: list[int]) -> list[tuple[Path, str]]:
    """Files ``f0``, ``f1``, ... of ``sizes`` bytes in ``folder/in``, as pack() takes them."""
    folder = folder / "in"
    folder.mkdir()
    items = []
    for i, size in enumerate(sizes):
        path = folder / f"f{i}"
        path.write_bytes(b"x" * size)
        items.append((path, path.name))
    return items


def test_a_file_left_behind_opens_no_chunk(tmp_path, monkeypatch):
    """A file over the per-file limit between two that share a chunk leaves them sharing it
    (it once opened an empty chunk first: two archives for what fits in one)."""
    pack = load_script("campaign", monkeypatch).pack
    items = files(tmp_path, [40, 500, 40])
    written, left = pack(items, tmp_path, max_file=100, max_total=1000)
    assert written == ["runs.tar.gz"] and left == ["f1"]
    assert members(tmp_path) == {"f0", "f2"}


def test_at_most_seven_archives_and_nothing_empty(tmp_path, monkeypatch):
    """Files over the limits interleaved with ones that fill a chunk each: seven archives
    (summary.json is the eighth file), each holding files, the rest named as left behind."""
    campaign_script = load_script("campaign", monkeypatch)
    items = files(tmp_path, [90, 500] * 9)
    written, left = campaign_script.pack(items, tmp_path, max_file=100, max_total=10_000)
    assert len(written) == campaign_script.MAX_FILES - 1
    assert left == ["f1", "f3", "f5", "f7", "f9", "f11", "f13", "f14", "f15", "f16", "f17"]
    for archive in written:
        with tarfile.open(tmp_path / archive) as tar:
            assert len(tar.getnames()) == 1


def test_archives_leave_room_for_files_already_in_out(tmp_path, monkeypatch):
    """The device check of the same command leaves its JSON and log tar in $OUT: with them
    the archives get five places, so all that comes back stays within 8 files."""
    campaign_script = load_script("campaign", monkeypatch)
    items = files(tmp_path, [90] * 9)
    written, left = campaign_script.pack(items, tmp_path, max_file=100, max_total=10_000,
                                         max_chunks=5)
    assert len(written) == 5 and left == ["f5", "f6", "f7", "f8"]
    assert campaign_script.pack(items, tmp_path, 100, 10_000, max_chunks=0)[0] == []
    out = tmp_path / "out"
    out.mkdir()
    for name in ("runs.tar.gz", "runs_3.tar.gz", "summary.json"):  # an earlier call's
        (out / name).write_bytes(b"")
    assert campaign_script.archive_places(out) == 7
    for name in ("device_check.json", "dc_logs.tgz"):
        (out / name).write_bytes(b"")
    assert campaign_script.archive_places(out) == 5
    (out / "sub").mkdir()  # files in folders come back too
    (out / "sub" / "runs.tar.gz").write_bytes(b"")
    assert campaign_script.archive_places(out) == 4


def test_nothing_to_pack_writes_nothing(tmp_path, monkeypatch):
    pack = load_script("campaign", monkeypatch).pack
    assert pack([], tmp_path, max_file=100, max_total=1000) == ([], [])


def campaign(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "campaign.py"), *args],
                          env=env, capture_output=True, text=True, timeout=1200)


def by_name(summary: dict) -> dict[str, dict]:
    return {r["name"]: r for r in summary["runs"]}


def members(out: Path) -> set[str]:
    names = set()
    for archive in out.glob("*.tar.gz"):
        with tarfile.open(archive) as tar:
            names |= set(tar.getnames())
    return names


@pytest.mark.slow
def test_campaign_dry_run_stops_resumes_and_packs(tiny_zip, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("name: tiny\nloss: {name: ce}\n")
    flags = sets([o for o in tiny_overrides(tiny_zip, tmp_path / "unused", epochs=3)
                  if not o.startswith(("name=", "out_dir=", "data.path="))])
    work = tmp_path / "work"
    base = ["--presets", str(config), "--seeds", "0,1", "--data", str(tiny_zip), "--work",
            str(work), "--threads", "1", "--poll", "5", "--pack-seconds", "0", "--mps", "off",
            *flags]
    # 40 s, of which the children's time limits leave the last 38.5: the first run gets
    # about a second, less than its start-up, so it stops after its first epoch (the first
    # always runs); the second, queued behind it (--jobs 1), finds no time left and is not
    # started.
    first = campaign([*base, "--jobs", "1", "--deadline", "40", "--grace", "38.5",
                      "--out", str(tmp_path / "out1")])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((tmp_path / "out1" / "summary.json").read_text())
    runs = by_name(summary)
    assert runs["tiny"]["state"] == "stopped" and runs["tiny"]["resumable"]
    assert (runs["tiny"]["epochs_done"], runs["tiny"]["epochs_total"]) == (1, 3)
    assert runs["tiny"]["top1_error"] is None and runs["tiny"]["exit_code"] == 0
    assert runs["tiny_seed1"]["state"] == "not started"
    assert not summary["mps"] and summary["campaign"]["left_behind"] == []
    assert load_checkpoint(work / "runs" / "tiny" / "last.pt")["epoch"] == 0
    assert "stopped after epoch 1 (time limit" in (work / "runs" / "tiny.log").read_text()
    packed = members(tmp_path / "out1")
    for name in ("summary.json", "tiny.log", "tiny/config.yaml", "tiny/metrics.jsonl",
                 "tiny/splits.json", "tiny/last.safetensors", "tiny/last.pt"):
        assert name in packed, (name, packed)

    # The same command again, with time to spare and both at once: the stopped run resumes
    # to its end, the unstarted one runs whole.
    second = campaign([*base, "--jobs", "2", "--deadline", "900",
                       "--out", str(tmp_path / "out2")])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    summary = json.loads((tmp_path / "out2" / "summary.json").read_text())
    for name, seed in (("tiny", 0), ("tiny_seed1", 1)):
        run = by_name(summary)[name]
        assert run["state"] == "finished" and (run["epochs_done"], run["epochs_total"]) == (3, 3)
        assert 0 <= run["top1_error"] <= 100
        run_dir = work / "runs" / name
        assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2
        epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text()
                  .splitlines()]
        assert epochs == [0, 1, 2]
        stored = (run_dir / "config.yaml").read_text()
        assert f"seed: {seed}\n" in stored and "test_every_epoch: true" in stored
        assert "meta_per_class: 0" in stored
    files = sorted(p.name for p in (tmp_path / "out2").iterdir())
    assert files == ["runs.tar.gz", "summary.json"]
    packed = members(tmp_path / "out2")
    for name in ("tiny", "tiny_seed1"):
        assert {f"{name}/eval.json", f"{name}/last.safetensors", f"{name}/best.safetensors",
                f"{name}.log"} <= packed
        assert f"{name}/last.pt" not in packed  # finished: the fp16 weights suffice
    with tarfile.open(tmp_path / "out2" / "runs.tar.gz") as tar:
        tar.extract("tiny/best.safetensors", tmp_path / "x")
    with safe_open(tmp_path / "x" / "tiny" / "best.safetensors", "pt") as f:
        weights = [f.get_tensor(k) for k in f.keys() if k.endswith("conv1.weight")]
    assert weights and all(str(w.dtype) == "torch.float16" for w in weights)

"""End-to-end CLI behaviour on a tiny dataset: training, exact resume, eval, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import error_line, sets, tiny_overrides
from otlt.cli import main
from otlt.engine.checkpoint import load_checkpoint
from otlt.errors import OtltError


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_train_writes_run_directory_and_eval(tiny_zip, config, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    code, out, err = run_cli(["train", "--config", str(config),
                              *sets(tiny_overrides(tiny_zip, out_dir, epochs=2))], capsys)
    assert code == 0, err
    run = out_dir / "tiny"
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "eval.json", "splits.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    for key in ("lr", "train_loss", "train_acc", "val_acc", "val_many_acc", "epoch_seconds",
                "steps_seconds"):
        assert key in records[0]
    result = json.loads((run / "eval.json").read_text())
    for key in ("top1_error", "many_error", "medium_error", "few_error", "per_class_accuracy",
                "confusion_matrix", "split", "epoch"):
        assert key in result
    assert result["split"] == "test" and result["epoch"] == 1
    assert sum(map(sum, result["confusion_matrix"])) == 80  # the whole test split, once
    splits = json.loads((run / "splits.json").read_text())["counts"]
    assert splits["val"] == [5] * 10 and splits["test"] == [8] * 10
    assert "top-1 error" in out


COMPILED = pytest.param(["train.compile=true"], id="compiled", marks=[
    pytest.mark.slow, pytest.mark.skipif(shutil.which("g++") is None and
                                         shutil.which("c++") is None,
                                         reason="torch.compile on the CPU needs a C++ compiler")])


@pytest.mark.parametrize("extra", [pytest.param([], id="eager"), COMPILED])
def test_resume_gives_exactly_the_uninterrupted_weights(tiny_zip, config, tmp_path,
                                                        capsys, extra):
    """Also for a compiled step model (the CPU stand-in for train.cuda_graphs, which compiles
    the same way in another mode): its resume is exact too."""
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3) + extra
    full = [*base, "name=full"]
    part = [*base, "name=part"]
    assert run_cli(["train", "--config", str(config), *sets(full)], capsys)[0] == 0
    code, out, _ = run_cli(["train", "--config", str(config), "--stop-after", "1",
                            *sets(part)], capsys)
    assert code == 0 and "resume" in out
    part_dir = tmp_path / "runs" / "part"
    assert not (part_dir / "eval.json").exists()
    assert run_cli(["train", "--resume", str(part_dir)], capsys)[0] == 0
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    b = load_checkpoint(part_dir / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    lines = (part_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    ea = json.loads((tmp_path / "runs" / "full" / "eval.json").read_text())
    eb = json.loads((part_dir / "eval.json").read_text())
    assert ea["confusion_matrix"] == eb["confusion_matrix"]
    # Each sitting says where it ran: the interrupted run has two, the other one.
    sittings = [json.loads(x) for x in (part_dir / "sittings.jsonl").read_text().splitlines()]
    assert [s["start_epoch"] for s in sittings] == [0, 1]
    assert len((tmp_path / "runs" / "full" / "sittings.jsonl").read_text().splitlines()) == 1
    first = sittings[0]
    assert first["device"] == "cpu" and first["threads"] == torch.get_num_threads()
    assert first["world_size"] == 1 and first["torch_version"] == torch.__version__
    assert first["started"].endswith("Z") and "git_commit" in first and first["hardware"]


def test_a_run_stopped_between_log_and_checkpoint_resumes_with_every_record(
        tiny_zip, config, tmp_path, capsys, monkeypatch):
    """Stopped as epoch 1's record is about to be written (the process ended there): its
    last.pt must not be written yet, so the resume redoes epoch 1 and metrics.jsonl has each
    epoch once (saving first would lose the record of an epoch the checkpoint holds); a last
    line cut short mid-write is dropped."""
    from otlt.engine.logging import MetricsLogger

    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3)
    log = MetricsLogger.log

    def stop_at_epoch_1(self, record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt  # as if the session ended here
        log(self, record)

    monkeypatch.setattr(MetricsLogger, "log", stop_at_epoch_1)
    code, _, err = run_cli(["train", "--config", str(config),
                            *sets([*base, "name=part"])], capsys)
    assert code == 130 and "interrupted" in err
    monkeypatch.setattr(MetricsLogger, "log", log)
    run = tmp_path / "runs" / "part"
    assert load_checkpoint(run / "last.pt")["epoch"] == 0
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"epoch": 2, "train_lo')  # a write cut short
    assert run_cli(["train", "--resume", str(run)], capsys)[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2]
    (run / "metrics.jsonl").write_text('{"epoch": 0, "tra\n' + "\n".join(lines) + "\n")
    code, _, err = run_cli(["train", "--resume", str(run), "--set", "optim.epochs=3"], capsys)
    assert code == 2 and "line 1 is not JSON" in err  # damage before the end: refused


def test_eval_command_matches_training_eval(tiny_zip, config, tmp_path, capsys):
    out_dir = tmp_path / "runs"
    run_cli(["train", "--config", str(config),
             *sets(tiny_overrides(tiny_zip, out_dir, epochs=1))], capsys)
    run = out_dir / "tiny"
    at_train = json.loads((run / "eval.json").read_text())
    code, out, err = run_cli(["eval", str(run)], capsys)
    assert code == 0, err
    again = json.loads((run / "eval_last_running.json").read_text())
    assert again["checkpoint"] == "last" and again["bn_stats"] == "running"
    assert again["confusion_matrix"] == at_train["confusion_matrix"]
    assert "few error" in out and "class0" in out


def test_a_gpu_trained_run_is_evaluated_and_probed_on_the_cpu_with_device(
        tiny_zip, config, tmp_path, capsys, monkeypatch):
    """A run whose config.yaml says train.device: cuda (trained on a GPU) on a machine
    without one: eval and probe refuse in one line, and with --device cpu give the in-run
    numbers; config.yaml is left as it was."""
    out_dir = tmp_path / "runs"
    run_cli(["train", "--config", str(config),
             *sets(tiny_overrides(tiny_zip, out_dir, epochs=1))], capsys)
    run = out_dir / "tiny"
    stored = run / "config.yaml"
    text = stored.read_text()
    assert text.count("device: cpu") == 1
    stored.write_text(text.replace("device: cpu", "device: cuda"))
    before = digest(stored)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (["eval", str(run)], ["probe", str(run)]):
        code, _, err = run_cli(command, capsys)
        assert_user_error(code, err, "train.device=cuda", "no CUDA device", "--device cpu")
    at_train = json.loads((run / "eval.json").read_text())
    code, _, err = run_cli(["eval", str(run), "--device", "cpu"], capsys)
    assert code == 0, err
    again = json.loads((run / "eval_last_running.json").read_text())
    assert again["confusion_matrix"] == at_train["confusion_matrix"]
    assert again["top1_error"] == at_train["top1_error"]
    code, _, err = run_cli(["probe", str(run), "--device", "cpu", "--split", "test",
                            "--bn-stats", "running"], capsys)
    assert code == 0, err
    [record] = json.loads((run / "probe_test.json").read_text())["records"]
    assert record["epoch"] == at_train["epoch"]
    assert record["top1_error"] == at_train["top1_error"]
    assert record["per_class_accuracy"] == at_train["per_class_accuracy"]
    assert digest(stored) == before  # --device is not written into the run's config
    for command in (["eval", str(run)], ["probe", str(run), "--split", "test"]):
        code, _, err = run_cli([*command, "--device", "tpu"], capsys)
        assert_user_error(code, err, "--device must be auto, cpu or cuda[:N], got 'tpu'")
        code, _, err = run_cli([*command, "--device", "cuda:0"], capsys)
        assert_user_error(code, err, "--device cuda:0: no CUDA device", "use --device cpu")


def test_a_moved_run_keeps_its_posthoc_results(tiny_zip, config, tmp_path, capsys,
                                               monkeypatch):
    """The results record the paths they read as typed; a run evaluated again under another
    path (moved, copied, or named absolutely) holds the same numbers and is left alone,
    not refused as "other numbers"."""
    import shutil

    out_dir = tmp_path / "runs"
    run_cli(["train", "--config", str(config),
             *sets(tiny_overrides(tiny_zip, out_dir, epochs=1))], capsys)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["eval", "runs/tiny"], capsys)[0] == 0
    assert run_cli(["probe", "runs/tiny", "--split", "test", "--bn-stats", "running"],
                   capsys)[0] == 0
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(out_dir / "tiny", moved)
    files = {name: (moved / name).read_bytes()
             for name in ("eval_last_running.json", "probe_test.json")}
    code, out, err = run_cli(["eval", str(moved)], capsys)
    assert code == 0 and "holds these numbers already" in out, err
    code, out, err = run_cli(["probe", str(moved), "--split", "test", "--bn-stats", "running"],
                             capsys)
    assert code == 0 and "holds these numbers already" in out, err
    assert {name: (moved / name).read_bytes() for name in files} == files


# ---- bad input: one line, exit 2, nothing damaged --------------------------------------

def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    error_line(err, *needles)


@pytest.mark.parametrize("override,needles", [
    ("data.imbalance_ratio=0.5", ["imbalance_ratio", ">= 1"]),
    ("data.imbalance_ratio=abc", ["imbalance_ratio", "number"]),
    ("optim.batch_size=0", ["batch_size", "positive"]),
    ("model.name=resnet33", ["resnet33", "resnet32"]),
    ("loss.name=hinge", ["hinge", "ce"]),
    ("optim.lr_typo=1", ["optim.lr_typo"]),
    ("data.num_classes=100", ["100", "10"]),
])
def test_bad_config_values(override, needles, tiny_zip, config, tmp_path, capsys):
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs") + [override])
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, *needles)


def test_missing_data_path(config, tmp_path, capsys):
    missing = tmp_path / "nowhere.zip"
    args = sets(tiny_overrides(missing, tmp_path / "runs"))
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, str(missing))


def test_truncated_zip(tiny_zip, config, tmp_path, capsys):
    broken = tmp_path / "broken.zip"
    broken.write_bytes(tiny_zip.read_bytes()[: tiny_zip.stat().st_size // 2])
    args = sets(tiny_overrides(broken, tmp_path / "runs"))
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, "broken.zip")


def test_corrupt_image(tiny_zip, config, tmp_path, capsys):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(tiny_zip) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("train/class3/0001.png"):
                data = b"not an image at all"
            dst.writestr(item, data)
    args = sets(tiny_overrides(bad, tmp_path / "runs"))
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, "class3/0001.png")


def test_unknown_config_file(tmp_path, capsys):
    code, _, err = run_cli(["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    assert_user_error(code, err, "nope.yaml")


def test_unknown_command_and_missing_argument(capsys):
    code, _, err = run_cli(["fly"], capsys)
    assert_user_error(code, err, "fly")
    code, _, err = run_cli(["train"], capsys)
    assert_user_error(code, err, "--config")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_directory(tiny_zip, config, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    args = sets(tiny_overrides(tiny_zip, locked))
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, "not writable")


def test_run_directory_that_is_a_file(tiny_zip, config, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a folder")
    args = sets(tiny_overrides(tiny_zip, blocker))
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, "not writable")
    assert blocker.read_text() == "a file, not a folder"


def test_existing_run_is_not_overwritten(tiny_zip, config, tmp_path, capsys):
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1))
    assert run_cli(["train", "--config", str(config), *args], capsys)[0] == 0
    run = tmp_path / "runs" / "tiny"
    before = {p.name: digest(p) for p in run.iterdir() if p.is_file()}
    code, _, err = run_cli(["train", "--config", str(config), *args], capsys)
    assert_user_error(code, err, "already holds a run", "--resume")
    assert {p.name: digest(p) for p in run.iterdir() if p.is_file()} == before


def test_resume_missing_or_corrupt_checkpoint(tiny_zip, config, tmp_path, capsys):
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "absent")], capsys)
    assert_user_error(code, err, "absent")
    args = sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2))
    run_cli(["train", "--config", str(config), "--stop-after", "1", *args], capsys)
    run = tmp_path / "runs" / "tiny"
    (run / "last.pt").write_bytes(b"garbage")
    metrics_before = digest(run / "metrics.jsonl")
    code, _, err = run_cli(["train", "--resume", str(run)], capsys)
    assert_user_error(code, err, "last.pt", "corrupt")
    assert (run / "last.pt").read_bytes() == b"garbage"
    assert digest(run / "metrics.jsonl") == metrics_before
    code, _, err = run_cli(["eval", str(run)], capsys)
    assert_user_error(code, err, "corrupt")


def test_tensorboard_tags_are_grouped():
    from otlt.engine.logging import tensorboard_scalars, tensorboard_tag

    assert [tensorboard_tag(k) for k in ("train_loss", "val_acc", "val_many_acc",
                                         "ot_batch_fraction", "epoch_seconds", "lr",
                                         "ot_loss", "test_diag_few_acc")] == [
        "train/loss", "val/acc", "val/many", "mix/ot_batch_fraction", "time/epoch", "lr",
        "reweight/ot_loss", "test_diag/few"]
    scalars = tensorboard_scalars({"epoch": 3, "lr": 0.1, "mix_pairs": [[1]], "val_few_acc": None,
                        "bn_probe": {"clean": {"val_acc": 50.0, "val_many_acc": None}}})
    assert scalars == {"lr": 0.1, "probe/clean/acc": 50.0}


def test_presets_are_packaged_listed_and_usable_by_name(tmp_path, capsys, monkeypatch):
    from otlt.config import list_presets, preset_path

    names = list_presets()
    assert "cifar10_lt_r100_erm_otmix" in names and len(names) > 300
    assert preset_path("cifar10_lt_r100_erm").read_text() == \
        (Path(__file__).resolve().parents[1] / "configs" / "cifar10_lt_r100_erm.yaml").read_text()
    monkeypatch.chdir(tmp_path)  # from any directory
    assert main(["presets", "r100_drw_otmix"]) == 0
    out = capsys.readouterr().out
    assert "cifar10_lt_r100_drw_otmix " in out and "OTmix + ERM-DRW" in out
    assert main(["train", "--preset", "cifar10_lt_r100_erm_otmx"]) == 2
    assert "did you mean cifar10_lt_r100_erm_otmix" in capsys.readouterr().err
    assert main(["train", "--preset", "cifar10_lt_r100_erm", "--config", "x.yaml"]) == 2
    assert "--config and --preset exclude each other" in capsys.readouterr().err


def test_the_wheel_ships_the_presets(tmp_path):
    import subprocess
    import sys

    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(root), "-w", str(tmp_path)], check=True,
                   capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("otlt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "otlt/presets/cifar10_lt_r100_erm_otmix.yaml" in names


def test_tensorboard_gets_the_final_test_numbers_and_hparams(tiny_zip, config, tmp_path,
                                                             capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out_dir = tmp_path / "runs"
    assert run_cli(["train", "--config", str(config),
                    *sets(tiny_overrides(tiny_zip, out_dir, epochs=1))], capsys)[0] == 0
    events = EventAccumulator(str(out_dir / "tiny" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "val/acc" in tags and "test/top1_error" in tags
    result = json.loads((out_dir / "tiny" / "eval.json").read_text())
    assert events.Scalars("test/top1_error")[-1].value == pytest.approx(result["top1_error"])
    assert list((out_dir / "tiny" / "tb").glob("hparams/events.out.tfevents.*"))


@pytest.mark.slow
def test_installed_wheel_trains_a_preset_outside_the_checkout(tiny_zip, tmp_path):
    """The wheel (with the lightning extra's import available) in a fresh virtualenv outside
    the checkout: ``otlt presets``, ``otlt train --preset <short one> --data <zip>`` and
    ``otlt report`` on the result. The new environment reuses this one's installed
    dependencies through a path file (no network), but imports otlt from the wheel."""
    import site
    import subprocess
    import sys
    import sysconfig

    pytest.importorskip("setuptools")
    pytest.importorskip("lightning")
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", str(root), "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("otlt-*.whl")
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    new_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                    "get_paths()['purelib'])"], check=True, text=True,
                                   capture_output=True).stdout.strip())
    # dependencies from this environment, after the new one's own site-packages
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
            if Path(p).is_dir()]
    (new_site / "otlt_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(new_site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OTLT_DATA")}
    env["OMP_NUM_THREADS"] = "1"

    def otlt(*args: str) -> str:
        done = subprocess.run([str(python), "-m", "otlt", *args], cwd=work, env=env,
                              text=True, capture_output=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    where = subprocess.run([str(python), "-c", "import otlt, otlt.integrations.lightning; "
                            "print(otlt.__file__)"], cwd=work, env=env, text=True,
                           capture_output=True, check=True).stdout
    assert where.startswith(str(new_site)), where  # the wheel, not the checkout
    assert "cifar10_lt_r100_erm_short" in otlt("presets", "erm_short")
    overrides = ["data.dataset=folder", "data.num_classes=10", "data.n_max=40",
            "data.imbalance_ratio=10", "data.val_per_class=5", "model.name=resnet20",
            "optim.batch_size=32", "optim.epochs=1", "optim.milestones=[]", "optim.gammas=[]",
            "train.progress=false", "train.device=cpu", "eval.bn_probe_every=0",
            "train.keep_epochs=[]"]
    otlt("train", "--preset", "cifar10_lt_r100_erm_short", "--data", str(tiny_zip),
         *sets(overrides))
    run = work / "runs" / "cifar10_lt_r100_erm_short"
    assert json.loads((run / "eval.json").read_text())["top1_error"] is not None
    otlt("report", str(run), "--out", str(work / "report"))
    assert "cifar10_lt_r100_erm_short" in (work / "report" / "report.md").read_text()


def test_a_users_config_and_sweep_can_start_from_a_preset(tmp_path, monkeypatch, capsys):
    """Issue 32 item 8: outside the checkout a config's ``base:`` names a packaged preset
    (``preset:NAME``, or a bare name when no such file is beside it), and ``otlt sweep``
    takes ``--preset`` like ``otlt train``."""
    from otlt.config import build_config, load_raw, preset_path
    from otlt.sweep import plan_sweep

    monkeypatch.chdir(tmp_path)
    preset = build_config(load_raw(preset_path("cifar10_lt_r100_drw_otmix")))
    for base in ("preset:cifar10_lt_r100_drw_otmix", "cifar10_lt_r100_drw_otmix",
                 "cifar10_lt_r100_drw_otmix.yaml"):
        (tmp_path / "mine.yaml").write_text(f"base: {base}\nname: mine\nseed: 3\n")
        cfg = build_config(load_raw(tmp_path / "mine.yaml"))
        assert (cfg.name, cfg.seed) == ("mine", 3)
        assert (cfg.loss, cfg.mix, cfg.optim) == (preset.loss, preset.mix, preset.optim)
    # a file of that name beside the config wins over the preset
    (tmp_path / "cifar10_lt_r100_drw_otmix.yaml").write_text("name: local\nseed: 5\n")
    assert build_config(load_raw(tmp_path / "mine.yaml")).mix.name == "none"
    (tmp_path / "bad.yaml").write_text("base: preset:cifar10_lt_r100_drw_otmx\n")
    with pytest.raises(OtltError, match="did you mean cifar10_lt_r100_drw_otmix"):
        load_raw(tmp_path / "bad.yaml")

    runs = plan_sweep(preset_path("cifar10_lt_r100_erm_otmix_short"), "mix.params.omega",
                      ["0.0", "0.5"], out_dir=tmp_path / "runs")
    assert [r.run_dir.name for r in runs] == ["cifar10_lt_r100_erm_otmix_short_mix.params."
                                              f"omega={v}" for v in ("0.0", "0.5")]
    assert main(["sweep", "--preset", "cifar10_lt_r100_erm_otmx", "--key", "seed",
                 "--values", "1"]) == 2
    assert "did you mean cifar10_lt_r100_erm_otmix" in capsys.readouterr().err
    assert main(["sweep", "--preset", "a", "--config", "b.yaml", "--key", "seed",
                 "--values", "1"]) == 2
    assert "--config and --preset exclude each other" in capsys.readouterr().err
    assert main(["sweep", "--key", "seed", "--values", "1"]) == 2
    assert "give --config FILE or --preset NAME" in capsys.readouterr().err


def test_hints_name_presets_not_the_checkouts_configs_folder(tmp_path, capsys):
    """Issue 32 item 8: an installed wheel has no ``configs/``; its hints name presets."""
    (tmp_path / "empty.yaml").write_text("")
    for args in (["train", "--config", str(tmp_path / "missing.yaml")],
                 ["train", "--config", str(tmp_path / "empty.yaml")]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "configs/" not in err and "otlt presets" in err, err


def test_sigterm_stops_a_real_training_process_resumably(tiny_zip, config, tmp_path):
    """A scheduler's preemption (or scripts/run_many.py's deadline) sends SIGTERM: the process
    ends as on Ctrl-C, with one line and exit code 143, not silently killed by the signal,
    and the resume picks up after the last finished epoch with every epoch logged once."""
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "runs" / "tiny"
    command = [sys.executable, "-m", "otlt.cli", "train", "--config", str(config),
               *sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=200))]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "otlt: terminated (SIGTERM); the last finished epoch, if one finished, is in the run "
        f"directory's last.pt: 'otlt train --resume {run}' goes on from it (or starts "
        "afresh without it)"]
    done = load_checkpoint(run / "last.pt")["epoch"]
    assert 0 <= done < 199
    assert main(["train", "--resume", str(run), "--stop-after", str(done + 2)]) == 0
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(done + 2))


def test_main_leaves_the_process_sigterm_handler_as_it_found_it(capsys):
    """main() in a caller's process (a notebook, these tests) puts SIGTERM's default back
    when the command returns, and never replaces a handler the caller installed."""
    import signal

    from otlt import cli

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert main(["presets"]) == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    def own(signum, frame):
        pass

    signal.signal(signal.SIGTERM, own)
    try:
        assert not cli.stop_on_sigterm()
        assert main(["presets"]) == 0
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    capsys.readouterr()


@pytest.mark.parametrize("stop, code, line", [
    (KeyboardInterrupt, 130, "otlt: interrupted"),
    ("terminated", 143, "otlt: terminated (SIGTERM)")])
def test_a_stopped_command_that_trains_nothing_does_not_speak_of_last_pt(
        monkeypatch, capsys, stop, code, line):
    from otlt import cli

    error = cli.Terminated if stop == "terminated" else stop

    def stopped(args):
        raise error

    monkeypatch.setitem(cli.COMMANDS, "presets", stopped)
    assert main(["presets"]) == code
    assert capsys.readouterr().err == line + "\n"


def test_a_second_sigterm_while_the_first_unwinds_ends_the_process_at_once():
    """The handler puts SIGTERM's default back before it raises, so a repeated SIGTERM (a
    cgroup-wide kill, then a launcher's) is not a second exception mid-cleanup."""
    import signal

    from otlt import cli

    assert cli.stop_on_sigterm()
    try:
        with pytest.raises(cli.Terminated):
            signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_a_stopped_sweep_says_how_to_continue(monkeypatch, capsys):
    from otlt import cli

    def stopped(args):
        raise cli.Terminated

    monkeypatch.setitem(cli.COMMANDS, "sweep", stopped)
    assert main(["sweep", "--config", "c.yaml", "--key", "seed", "--values", "0,1"]) == 143
    assert capsys.readouterr().err == ("otlt: terminated (SIGTERM); the same otlt sweep command "
                                       "resumes the stopped run and runs the rest\n")


def test_a_demo_that_finds_no_data_leaves_no_run_directory(tmp_path):
    """Each failed ``otlt demo`` used to leave a ``runs/demo-<time>/.lock`` behind."""
    from otlt.demo import run_demo

    with pytest.raises(OtltError):
        run_demo(data=str(tmp_path / "nowhere.zip"), epochs=1, out=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []

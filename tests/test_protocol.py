"""The evaluation protocol end to end: BN procedures, selection, post-hoc eval, weight files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import load_script, one_line_error, sets, tiny_overrides
from otlt.cli import main
from otlt.engine import posthoc
from otlt.engine import weights as weights_module
from otlt.engine.checkpoint import load_checkpoint
from otlt.engine.weights import load_weights, read_weights, save_weights, weights_epoch
from otlt.errors import OtltError
from otlt.metrics import select_value

OTMIX = ["mix.name=otmix", "mix.skip_first=0", "mix.skip_last=1", "mix.prob=0.5",
         "eval.bn_batches=3", "train.keep_every=1"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_zip, tmp_path_factory):
    """Tiny 3-epoch ERM+OTmix runs that differ only in their evaluation settings."""
    root = tmp_path_factory.mktemp("protocol")
    config = root / "c.yaml"
    config.write_text("name: c\nloss: {name: ce}\n")
    variants = {
        "running": ["eval.bn_stats=running"],
        "train": ["eval.bn_stats=train", "eval.bn_probe_every=2", "eval.test_every_epoch=true"],
        "train_quiet": ["eval.bn_stats=train"],
        "clean": ["eval.bn_stats=clean"],
        "balanced": ["eval.bn_stats=balanced", "eval.select_metric=few_acc"],
    }
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTLT_CACHE", str(root / "cache"))
        for name, extra in variants.items():
            args = tiny_overrides(tiny_zip, root / "runs", epochs=3) + OTMIX + extra
            assert main(["train", "--config", str(config), *sets(args + [f"name={name}"])]) == 0
    return root / "runs"


def test_training_is_bit_identical_under_every_procedure(runs):
    base = load_checkpoint(runs / "running" / "last.pt")
    base_records = records(runs / "running")
    for name in ("train", "train_quiet", "clean", "balanced"):
        other = load_checkpoint(runs / name / "last.pt")
        for key, value in base["model"].items():
            assert torch.equal(value, other["model"][key]), (name, key)
        assert torch.equal(base["generator"], other["generator"]), name
        for a, b in zip(base_records, records(runs / name), strict=True):
            for key in ("train_loss", "train_acc", "mix_pairs", "ot_mean_cost"):
                assert a.get(key) == b.get(key), (name, key)
            # OTmix's confusion always comes from the running statistics
            assert a["val_acc"] == b["val_running_acc"], name


def test_test_diagnostic_changes_no_validation_number(runs):
    loud, quiet = records(runs / "train"), records(runs / "train_quiet")
    for a, b in zip(loud, quiet, strict=True):
        for key in ("val_acc", "val_many_acc", "val_few_acc", "val_select", "val_running_acc"):
            assert a[key] == b[key], key
        assert "test_diag_acc" in a and "test_diag_acc" not in b
    assert [("bn_probe" in r) for r in loud] == [False, True, True]  # every 2nd and the last
    assert set(loud[1]["bn_probe"]) == {"running", "train", "clean", "balanced"}
    assert loud[1]["bn_probe"]["train"]["val_acc"] == loud[1]["val_acc"]
    assert loud[1]["bn_probe"]["running"]["val_acc"] == loud[1]["val_running_acc"]


@pytest.mark.parametrize("name,metric", [("train", "val_select"), ("balanced", "val_select")])
def test_best_holds_the_epoch_with_the_best_validation_metric(runs, name, metric):
    recs = records(runs / name)
    values = [r[metric] for r in recs]
    expected = max(range(len(values)), key=lambda i: (values[i], i))  # ties: the later epoch
    best = load_weights(runs / name / "best.safetensors")
    assert best.epoch == expected
    assert best.meta["val_value"] == values[expected]
    assert best.meta["bn_stats"] == name
    evaluated = best.evaluated_model()
    assert not torch.equal(evaluated["bn1.running_mean"], best.model["bn1.running_mean"])
    result = json.loads((runs / name / "eval.json").read_text())
    assert result["bn_stats"] == name and result["checkpoint"] == "last"
    assert result["selected"]["epoch"] == expected
    assert result["selected"]["checkpoint"] == "best"


def test_balanced_accuracy_is_the_mean_per_class_accuracy():
    summary = {"per_class_accuracy": [100.0, 50.0, None], "top1_accuracy": 80.0,
               "few_error": None, "many_error": 25.0}
    assert select_value(summary, "balanced_acc") == 75.0
    assert select_value(summary, "top1_acc") == 80.0
    assert select_value(summary, "many_acc") == 75.0
    assert select_value(summary, "few_acc") is None


@pytest.mark.parametrize("name", ["train", "balanced", "running"])
def test_post_hoc_eval_equals_the_in_run_numbers(runs, name, capsys):
    run = runs / name
    in_run = json.loads((run / "eval.json").read_text())
    assert main(["eval", str(run)]) == 0
    last = json.loads((run / f"eval_last_{name}.json").read_text())
    assert last["confusion_matrix"] == in_run["confusion_matrix"]
    assert main(["eval", str(run), "--checkpoint", "best"]) == 0
    best = json.loads((run / f"eval_best_{name}.json").read_text())
    if "selected" in in_run:
        assert best["confusion_matrix"] == in_run["selected"]["confusion_matrix"]
    # A kept epoch's validation number under the run's procedure is the logged one.
    epoch = 1
    assert main(["eval", str(run), "--checkpoint", f"epoch_{epoch:03d}", "--split", "val"]) == 0
    val = json.loads((run / f"eval_epoch_{epoch:03d}_{name}_val.json").read_text())
    assert val["top1_accuracy"] == records(run)[epoch]["val_acc"]
    assert main(["eval", str(run), "--bn-stats", "clean", "--checkpoint", "best"]) == 0
    capsys.readouterr()


def test_post_hoc_eval_builds_no_trainer_and_no_optimizer(runs, tmp_path):
    """``otlt eval`` rebuilds model + feed + procedure only: in a fresh process the trainer
    module is never imported and no optimizer is constructed."""
    code = textwrap.dedent(f"""
        import sys, torch
        built = []
        init = torch.optim.Optimizer.__init__
        def counted(self, *args, **kwargs):
            built.append(1)
            init(self, *args, **kwargs)
        torch.optim.Optimizer.__init__ = counted
        from otlt.cli import main
        assert main(["eval", {str(runs / "train")!r}, "--bn-stats", "train",
                     "--out", {str(tmp_path / "e.json")!r}]) == 0
        assert "otlt.engine.trainer" not in sys.modules
        assert not built
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert json.loads((tmp_path / "e.json").read_text())["bn_stats"] == "train"


def test_post_hoc_eval_never_overwrites_other_numbers(runs, capsys):
    run = runs / "clean"
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run)]) == 0  # the same numbers again: fine
    assert "otlt: kept " in capsys.readouterr().out
    path = run / "eval_last_clean.json"
    record = json.loads(path.read_text())
    record["top1_error"] = -1
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    one_line_error(capsys, "--overwrite", "differing: top1_error")
    assert json.loads(path.read_text())["top1_error"] == -1
    assert main(["eval", str(run), "--overwrite"]) == 0
    record = json.loads(path.read_text())
    assert record["top1_error"] != -1
    assert record["evaluated_with"]["threads"] == torch.get_num_threads()
    assert record["evaluated_with"]["device"] == "cpu"
    # A file from before evaluated_with, or from another thread count, with the same numbers
    # is left as it is; other numbers from another thread count are refused with the reason.
    older = {k: v for k, v in record.items() if k != "evaluated_with"}
    path.write_text(json.dumps(older))
    assert main(["eval", str(run)]) == 0
    assert json.loads(path.read_text()) == older
    elsewhere = {**record, "top1_error": -1,
                 "evaluated_with": {**record["evaluated_with"], "threads": 99}}
    path.write_text(json.dumps(elsewhere))
    capsys.readouterr()
    assert main(["eval", str(run)]) == 2
    one_line_error(capsys, "--overwrite", "threads 99; now threads")
    other = {"vendor": "NoSuchVendor", "family": 0, "model": 0, "bf16": []}
    where = {**record["evaluated_with"], "cpu": other}
    path.write_text(json.dumps({**elsewhere, "evaluated_with": where}))
    assert main(["eval", str(run)]) == 2  # another CPU model under the same thread count
    one_line_error(capsys, "--overwrite",
                   "computed with cpu NoSuchVendor family 0 model 0, bf16: none; now cpu ")
    del where["cpu"]  # a file from before the field: its CPU is not called a difference
    path.write_text(json.dumps({**elsewhere, "evaluated_with": where}))
    assert main(["eval", str(run)]) == 2
    assert "computed with" not in one_line_error(capsys, "--overwrite", "differing: top1_error")
    path.write_text("[1, 2]")
    assert main(["eval", str(run)]) == 2
    one_line_error(capsys, "--overwrite", "holds no result record")
    path.write_text("{not json")
    assert main(["eval", str(run)]) == 2
    one_line_error(capsys, "--overwrite", "not a readable JSON result")


def test_resume_is_exact_with_recalibration_and_selection(tiny_zip, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nloss: {name: ce}\n")
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3) + OTMIX + [
        "eval.bn_stats=train", "eval.bn_probe_every=1"]
    assert main(["train", "--config", str(config), *sets(base + ["name=full"])]) == 0
    assert main(["train", "--config", str(config), "--stop-after", "2",
                 *sets(base + ["name=part"])]) == 0
    assert main(["train", "--resume", str(tmp_path / "runs" / "part")]) == 0
    capsys.readouterr()
    full, part = tmp_path / "runs" / "full", tmp_path / "runs" / "part"
    def untimed(run):
        return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in records(run)]

    assert untimed(full) == untimed(part)
    assert all(0 < r["steps_seconds"] < r["epoch_seconds"] for r in records(full))
    a, b = load_weights(full / "best.safetensors"), load_weights(part / "best.safetensors")
    assert a.epoch == b.epoch and all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert json.loads((full / "eval.json").read_text())["selected"] == \
        json.loads((part / "eval.json").read_text())["selected"]


class _HeaderOnly:
    """``safe_open`` whose tensors cannot be read."""

    def __init__(self, *args, **kwargs):
        self.inner = safe_open(*args, **kwargs)

    def __enter__(self):
        self.handle = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def metadata(self):
        return self.handle.metadata()

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        raise RuntimeError("a tensor was read")


def test_weight_files_round_trip_and_refuse_damage(tmp_path, monkeypatch):
    state = {"w": torch.randn(3, 2), "steps": torch.tensor(7)}
    path = tmp_path / "w.safetensors"
    save_weights(path, state, epoch=4, mixer={"confusion": torch.eye(2), "note": None},
                 meta={"bn_stats": "train"}, dtype=torch.float16)
    back = load_weights(path)
    assert back.epoch == 4 and back.meta == {"bn_stats": "train"}
    with monkeypatch.context() as m:  # the header alone: a tensor read would fail
        m.setattr(weights_module, "safe_open", _HeaderOnly)
        assert weights_epoch(path) == 4
        with pytest.raises(OtltError, match="a tensor was read"):
            load_weights(path)
    assert back.model["w"].dtype == torch.float32
    torch.testing.assert_close(back.model["w"], state["w"], atol=2e-3, rtol=1e-3)
    assert torch.equal(back.model["steps"], state["steps"])
    assert torch.equal(back.mixer["confusion"], torch.eye(2))
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(raw[:20]))
    for read in (load_weights, weights_epoch):
        with pytest.raises(OtltError, match="corrupt"):
            read(path)
    with pytest.raises(OtltError, match="does not exist"):
        read_weights(tmp_path / "missing.safetensors")


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def test_a_checkpoint_cannot_run_code(tmp_path):
    _Payload.target = str(tmp_path / "pwned")
    path = tmp_path / "last.pt"
    torch.save({"format": 1, "epoch": 0, "x": _Payload()}, path)
    with pytest.raises(OtltError, match="corrupt or not an otlt checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("override,needle", [
    ("eval.bn_stats=precise", "eval.bn_stats must be one of running, train, clean, balanced"),
    ("eval.bn_batches=0", "eval.bn_batches must be >= 1"),
    ("eval.bn_probe_every=-1", "eval.bn_probe_every must be >= 0"),
    ("eval.select_metric=loss", "eval.select_metric must be one of"),
    ("eval.test_every_epoch=maybe", "eval.test_every_epoch must be true or false"),
    ("train.keep_every=-2", "train.keep_every must be >= 0"),
    ("train.keep_epochs=[0,99]", "train.keep_epochs=[0,99] reach past optim.epochs=3"),
    ("mix.params.feature_mode=gap", "feature_mode must be one of pooled_eval, official"),
    ("reweight.bn=eval", "reweight.bn must be one of frozen, train_meta"),
])
def test_bad_protocol_keys_give_one_line(tiny_zip, tmp_path, capsys, override, needle):
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nloss: {name: ce}\nmix: {name: otmix}\n")
    args = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3) + [override]
    assert main(["train", "--config", str(config), *sets(args)]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "runs" / "tiny" / "last.pt").exists()


def test_eval_of_missing_weights_gives_one_line(runs, capsys):
    for args in (["--checkpoint", "epoch_099"], ["--checkpoint", "nowhere.pt"],
                 ["--bn-stats", "precise"]):
        assert main(["eval", str(runs / "clean"), *args]) == 2
        one_line_error(capsys)
    assert main(["eval", str(runs / "clean"), "--checkpoint", "epoch_099"]) == 2
    one_line_error(capsys, "kept epochs: epoch_000, epoch_001, epoch_002)")
    assert main(["eval", str(runs / "clean"), "--checkpoint", "/nowhere/last.pt"]) == 2
    assert "(looked for /nowhere/last.pt; kept" in one_line_error(capsys)


def test_probe_of_kept_weights_equals_the_in_run_probe_and_feeds_the_report(runs, tmp_path,
                                                                            capsys):
    run = runs / "train"
    assert main(["probe", str(run), "--epochs", "1,-1"]) == 0  # -1: the last (2 of 0-2)
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith("epoch_")]
    assert rows == [["epoch_001", "(2)"], ["epoch_002", "(3)"]]  # kept files' names, then from 1
    assert re.search(r"best balanced accuracy under train: epoch_00\d \(epoch \d\), ", out)
    with pytest.MonkeyPatch.context() as mp:  # another probe in the file: refused before work
        mp.setattr(posthoc, "evaluation_procedure", lambda *a, **k: pytest.fail("computed"))
        assert main(["probe", str(run), "--epochs", "1"]) == 2
        one_line_error(capsys, "probe_val.json exists and holds another probe (val split, "
                               "epoch_001, epoch_002 under running, train, clean, balanced)")
    probe = json.loads((run / "probe_val.json").read_text())
    logged = {r["epoch"]: r["bn_probe"] for r in records(run) if "bn_probe" in r}
    assert {(r["epoch"], r["bn_stats"]) for r in probe["records"]} == {
        (e, m) for e in (1, 2) for m in ("running", "train", "clean", "balanced")}
    for r in probe["records"]:
        logged_acc = logged[r["epoch"]][r["bn_stats"]]["val_acc"]
        assert 100.0 - r["top1_error"] == pytest.approx(logged_acc)
    assert main(["probe", str(run), "--epochs", "1,-4,3"]) == 2  # outside the 3 epochs
    one_line_error(capsys, "--epochs -4,3: the run has 3 epochs, 0 to 2 (or -3 to -1")
    (run / "kept" / "epoch_000.safetensors").rename(run / "epoch_000.safetensors")
    try:
        assert main(["probe", str(run), "--epochs", "-3"]) == 2  # epoch 0, not kept
        one_line_error(capsys, "keeps no weights for epoch(s) [0] (kept: [1, 2]")
    finally:
        (run / "epoch_000.safetensors").rename(run / "kept" / "epoch_000.safetensors")
    assert main(["report", str(run), str(runs / "running"), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## BatchNorm statistics and checkpoint selection" in text
    assert "Best test epoch (official protocol, optimistic)" in text
    assert "| 2 | balanced |" in text  # the (epoch, procedure) table from probe_val.json
    assert (tmp_path / "rep" / "figures" / "bn_probe_train.png").is_file()


def test_committed_fp16_weights_re_evaluate_close_to_the_run(runs, tmp_path, capsys,
                                                            monkeypatch):
    """scripts/collect_results.py --weights: fp16 safetensors under 1 MB that otlt eval reads
    from the result folder (no last.pt there), giving the run's numbers to fp16 precision."""
    import shutil

    export_weights = load_script("collect_results", monkeypatch).export_weights

    run, dest = runs / "train", tmp_path / "result"
    dest.mkdir()
    for name in ("config.yaml", "splits.json"):
        shutil.copy2(run / name, dest / name)
    written = export_weights(run, dest, keep_epochs=[1])
    assert sorted(p.name for p in written) == ["best.safetensors", "epoch_001.safetensors",
                                               "last.safetensors"]
    assert all(p.stat().st_size < 1_000_000 for p in written)
    assert load_weights(dest / "last.safetensors").model["fc.weight"].dtype == torch.float32
    assert main(["eval", str(dest), "--checkpoint", "last"]) == 0
    capsys.readouterr()
    ours = json.loads((dest / "eval_last_train.json").read_text())
    theirs = json.loads((run / "eval.json").read_text())
    assert ours["num_samples"] == theirs["num_samples"]
    assert abs(ours["top1_error"] - theirs["top1_error"]) <= 100.0 * 2 / ours["num_samples"]


def test_logit_adjusted_diagnostic_gives_otlt_evals_number_unadjusted(runs, capsys,
                                                                     monkeypatch):
    """scripts/logit_adjusted_eval.py: its unadjusted error is the run's own (the same
    procedure, batches and layout as otlt eval), and tau = 0 adjusts nothing."""
    evaluate = load_script("logit_adjusted_eval", monkeypatch).evaluate

    run = runs / "running"  # no last.safetensors: the weights of last.pt
    record = evaluate(run, tau=1.0, bn_stats=None)
    theirs = json.loads((run / "eval.json").read_text())
    assert record["bn_stats"] == "running" and record["weights"].endswith("last.pt")
    assert record["test_plain_error"] == round(theirs["top1_error"], 2)
    assert record["test_plain_per_class_acc"] == [round(a, 1)
                                                  for a in theirs["per_class_accuracy"]]
    none = evaluate(run, tau=0.0, bn_stats=None)  # tau 0: no adjustment at all
    assert none["test_adjusted_error"] == none["test_plain_error"]
    assert set(record) >= {"val_plain_error", "val_adjusted_error", "test_adjusted_error"}
    assert record["evaluated_with"]["threads"] == record["threads"]  # as otlt eval records it
    assert record["evaluated_with"]["device"] == "cpu"


def test_result_readme_quotes_the_machine_record_of_each_sitting(tmp_path, monkeypatch):
    sittings_line = load_script("collect_results", monkeypatch).sittings_line

    assert sittings_line(tmp_path / "sittings.jsonl") is None  # runs before the file
    common = {"device": "cpu", "hardware": "AMD EPYC", "torch_version": "2.13.0+cpu"}
    lines = [{"start_epoch": 0, "started": "2026-12-05T01:01:15Z", "threads": 2,
              "git_commit": "277f6ee4893b", "git_dirty": False, **common},
             {"start_epoch": 14, "started": "2026-12-05T01:51:42Z", "threads": 1,
              "git_commit": None, "git_dirty": None, **common,
              "cpu": {"vendor": "AuthenticAMD", "family": 25, "model": 17,
                      "bf16": ["avx512_bf16"]}}]
    (tmp_path / "sittings.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines)
                                             + '{"start_epoch": 30, "sta')  # cut by a kill
    assert sittings_line(tmp_path / "sittings.jsonl") == (
        "Sittings (2, from `sittings.jsonl`): from epoch 1 on 2026-12-05 01:01 UTC, cpu AMD "
        "EPYC, torch threads 2, torch 2.13.0+cpu, code 277f6ee; from epoch 15 on 2026-12-05 "
        "01:51 UTC, cpu AMD EPYC (AuthenticAMD family 25 model 17, bf16: avx512_bf16), "
        "torch threads 1, torch 2.13.0+cpu, code unknown.")


def test_result_readme_gives_each_seeded_run_the_command_that_reproduces_it(tmp_path,
                                                                           monkeypatch):
    """A seed-k run was trained from its preset with ``--set seed=k --set name=...``: its
    README must name the preset's config, not a file ``configs/<name>_seed<k>.yaml`` that
    does not exist, and carry the settings that made it that seed."""
    collect = load_script("collect_results", monkeypatch)
    group_command, run_command = collect.group_command, collect.run_command

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "erm.yaml").write_text("seed: 0\nname: erm\n")
    (configs / "x_seed1.yaml").write_text("name: x_seed1\n")  # seed from the schema: 0
    template = "otlt train --config configs/{preset}.yaml --set out_dir=runs{seed_settings}"

    def command(name, seed):
        return run_command(template, name, seed, configs)

    assert command("erm", 0) == "otlt train --config configs/erm.yaml --set out_dir=runs"
    assert command("erm_seed2", 2) == (
        "otlt train --config configs/erm.yaml --set out_dir=runs --set seed=2 --set name=erm_seed2")
    # a seed set under the preset's own name, and a preset whose name ends like a seed
    assert command("erm", 3) == (
        "otlt train --config configs/erm.yaml --set out_dir=runs --set seed=3")
    assert command("x_seed1", 1) == (
        "otlt train --config configs/x_seed1.yaml --set out_dir=runs --set seed=1")
    with pytest.raises(SystemExit, match="no preset"):
        command("renamed_run", 0)  # nothing in configs/ reproduces it
    assert run_command("otlt train --config configs/{name}.yaml", "a_seed1", 1, configs) == (
        "otlt train --config configs/a_seed1.yaml")  # the older templates are unchanged
    assert group_command(template) == (
        "otlt train --config configs/{preset}.yaml --set out_dir=runs (a seed k > 0 adds "
        "--set seed=k --set name={preset}_seed{k})")

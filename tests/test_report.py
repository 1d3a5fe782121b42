"""Reports, figures and sweeps: from synthetic and tiny real run directories to report.md."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import TINY_CLASSES, sets, tiny_overrides
from otlt.cli import main
from otlt.engine.checkpoint import load_checkpoint, save_atomic
from otlt.errors import OtltError
from otlt.report import (
    best_test_epoch,
    class_weight_series,
    comparison_rows,
    detect_sweep,
    figure_style,
    heatmaps,
    linked_figures,
    load_runs,
    mix_statistics,
    mixed_pairs,
    plots,
    write_report,
)
from otlt.sweep import parse_values, plan_sweep, run_sweep

K = 10
COUNTS = [500, 300, 180, 110, 65, 40, 24, 14, 8, 5]


# ---------------------------------------------------------------------- synthetic runs


def _confusion(rng: np.random.Generator, per_class: int = 20) -> list[list[int]]:
    """A random confusion matrix with ``per_class`` test images per true class."""
    rows = []
    for k in range(K):
        correct = int(rng.integers(per_class // 4, per_class + 1))
        wrong = rng.multinomial(per_class - correct, np.ones(K - 1) / (K - 1)).tolist()
        rows.append(wrong[:k] + [correct] + wrong[k:])
    return rows


def _eval(confusion: list[list[int]]) -> dict:
    """eval.json as the trainer writes it (metrics.summarize on the confusion matrix)."""
    import torch

    from otlt.metrics import summarize

    return {"split": "test", "epoch": 5, "classes": TINY_CLASSES,
            **summarize(torch.tensor(confusion), COUNTS, many=100, few=20)}


def make_run(root: Path, name: str, seed: int, *, mix: str = "none", omega: float = 0.05,
             lr: float = 0.1,
             paper: float | None = None, weights: bool = False, finished: bool = True,
             epochs: int = 6) -> Path:
    """Write config.yaml, splits.json, metrics.jsonl, eval.json and (OTmix) plans/."""
    rng = np.random.default_rng(seed)
    run = root / name
    (run / "plans").mkdir(parents=True)
    config = {"name": name, "seed": 0, "out_dir": str(root),
              "data": {"dataset": "folder", "num_classes": K, "imbalance_ratio": 100.0},
              "model": {"name": "resnet20"}, "optim": {"epochs": epochs, "lr": lr},
              "loss": {"name": "ce", "params": {}},
              "mix": {"name": mix, "params": {"omega": omega, "eps": 0.01} if mix == "otmix"
                      else {}, "sampler_r": 0.0},
              "paper": None if paper is None else {"table": "OTmix Table 1", "row": "OTmix + ERM",
                                                  "top1_error": paper}}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "splits.json").write_text(json.dumps({"classes": TINY_CLASSES,
                                                 "counts": {"train": COUNTS}}))
    records = []
    for epoch in range(epochs if finished else epochs - 2):
        r = {"epoch": epoch, "lr": 0.1 if epoch < 4 else 0.01,
             "train_loss": 2.0 / (epoch + 1), "train_acc": 30.0 + 10 * epoch,
             "val_acc": 40.0 + 5 * epoch, "val_many_acc": 50.0 + 5 * epoch,
             "val_medium_acc": 30.0 + 5 * epoch, "val_few_acc": 10.0 + 5 * epoch,
             "epoch_seconds": 1.5}
        if mix == "otmix":
            pairs = rng.integers(0, 30, (K, K)) if 0 < epoch < epochs - 1 else np.zeros((K, K))
            r.update({"ot_epoch": epoch >= 3, "mix_pairs": pairs.astype(int).tolist(),
                      "ot_batch_fraction": 1.0 if epoch >= 3 else 0.0})
        if weights:
            r["weight_class_mean"] = (1.0 / np.asarray(COUNTS) * (1 + 0.1 * epoch)).tolist()
            r["weight_entropy"] = 3.0 - 0.1 * epoch
        records.append(r)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if mix == "otmix":
        m = 6
        cost = rng.uniform(0, 2, (m, m))
        plan = rng.dirichlet(np.ones(m), m) / m
        for epoch in (2, 4):
            (run / "plans" / f"epoch_{epoch:04d}.json").write_text(json.dumps({
                "epoch": epoch, "eps": 0.01, "omega": omega,
                "fore_labels": rng.integers(0, K, m).tolist(),
                "back_labels": rng.integers(0, K, m).tolist(),
                "cost": cost.tolist(), "plan": plan.tolist(),
                "argmax": plan.argmax(1).tolist()}))
    if finished:
        (run / "eval.json").write_text(json.dumps(_eval(_confusion(rng))))
    return run


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[list[Path], Path]:
    """Four synthetic runs (ERM, OTmix with a paper row, re-weighting, unfinished) and the
    report written from them (written once: figures take a while)."""
    root = tmp_path_factory.mktemp("synthetic")
    runs = [make_run(root / "runs", "erm", 1),
            make_run(root / "runs", "erm_otmix", 2, mix="otmix", paper=21.7),
            make_run(root / "runs", "ot_reweight", 3, weights=True),
            make_run(root / "runs", "unfinished", 4, finished=False)]
    return runs, write_report(runs, root / "out")


def assert_png(path: Path, min_side: int = 300) -> tuple[int, int]:
    """The file is a PNG that PIL can decode, of a sane size; returns (width, height)."""
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        width, height = image.size
    assert min_side <= width <= 4000 and min_side <= height <= 4000, (path, image.size)
    return width, height


# ---------------------------------------------------------------------- numbers


def test_table_numbers_equal_eval_json(synthetic):
    synthetic_runs, report = synthetic
    runs = load_runs(synthetic_runs)
    rows = comparison_rows(runs)
    for run_dir, row in zip(synthetic_runs, rows, strict=True):
        path = run_dir / "eval.json"
        if not path.exists():
            assert row["top1_error"] is None and row["delta"] is None
            continue
        e = json.loads(path.read_text())
        for key in ("top1_error", "many_error", "medium_error", "few_error"):
            assert row[key] == e[key], (run_dir.name, key)
    ot = rows[1]
    assert ot["paper_top1_error"] == 21.7
    assert ot["delta"] == pytest.approx(ot["top1_error"] - 21.7)

    text = report.read_text()
    caption, table = text.split("## Results")[1].split("\n\n")[1:3]
    assert "BatchNorm statistics it was evaluated with" in caption
    for run_dir in synthetic_runs[:3]:
        e = json.loads((run_dir / "eval.json").read_text())
        line = next(x for x in table.splitlines() if x.startswith(f"| {run_dir.name} |"))
        assert f"| {e.get('bn_stats', 'running')} |" in line  # which statistics it is under
        numbers = [float(v) for v in re.findall(r"(?<![\w.])[+-]?\d+\.\d\d(?!\d)", line)]
        expected = [round(e[k], 2) for k in ("top1_error", "many_error", "medium_error",
                                             "few_error")]
        assert numbers[:4] == expected, line
    ot_line = next(x for x in table.splitlines() if x.startswith("| erm_otmix |"))
    assert "ce + otmix (r=0) |" in ot_line  # the foreground sampler is part of the method
    unfinished = next(x for x in table.splitlines() if x.startswith("| unfinished |"))
    assert "| 4/6 |" in unfinished and unfinished.count("–") >= 4


def test_mix_statistics_pick_last_ot_and_last_random_epoch_with_pairs(synthetic):
    metrics = load_runs([synthetic[0][1]])[0].metrics
    stats = mix_statistics(metrics)
    assert [(kind, epoch) for kind, epoch, _ in stats] == [
        ("random pairing (CMO-like)", 2), ("OT pairing", 4)]  # epoch 5 mixed nothing
    assert stats[1][2] == metrics[4]["mix_pairs"]


def test_class_weights_read_defensively():
    counts = [3.0, 2.0, 1.0]
    metrics = [{"epoch": 0, "weight_class_mean": counts, "weight_entropy": 1.0},
               {"epoch": 1, "weight_per_class_max": [9.0, 9.0, 9.0],
                "weight_class_mean": {"b": 5.0, "a": 4.0}, "weight_bad": [1, "x", 2]},
               {"epoch": 2, "train_loss": 1.0}]
    key, epoch, values = class_weight_series(metrics, 3, ["a", "b", "c"])
    assert (key, epoch, values) == ("weight_class_mean", 1, [4.0, 5.0, None])
    assert class_weight_series(metrics, 3, ["a", "b", "c"], first=True) == (
        "weight_class_mean", 0, counts)
    assert class_weight_series([{"weight_x": [1.0, 2.0]}], 3) is None  # wrong length
    assert class_weight_series([{"epoch": 0, "train_loss": 1.0}], 3) is None


def test_detect_sweep_needs_exactly_one_differing_numeric_key(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, f"ot_omega={w}", i, mix="otmix", omega=w)
            for i, w in enumerate([0.5, 0.0, 0.05])]
    sweep = detect_sweep(load_runs(runs))
    assert sweep is not None and sweep.key == "mix.params.omega"
    assert sweep.values == [0.0, 0.05, 0.5]
    assert [r.label for r in sweep.runs] == ["ot_omega=0.0", "ot_omega=0.05", "ot_omega=0.5"]
    other = make_run(root, "erm", 9)  # differs in mix.name too: not a sweep
    assert detect_sweep(load_runs([*runs, other])) is None
    assert detect_sweep(load_runs(runs[:1])) is None


def _protocol_run(root: Path, name: str, seed: int, last: float, selected: float, *,
                  mix: str = "none", lr: float = 0.1, paper: float | None = None,
                  diag: list[float] | None = None) -> Path:
    """A run as the protocol-era trainer leaves it: ``seed`` in config.yaml, ``eval.json``
    with ``bn_stats`` and ``selected``, and optionally ``test_diag_acc`` per epoch."""
    run = make_run(root, name, seed, mix=mix, lr=lr, paper=paper)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["seed"] = seed
    config["eval"] = {"bn_stats": "running"}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    e = json.loads((run / "eval.json").read_text())
    e.update(top1_error=last, bn_stats="running",
             selected={"checkpoint": "best", "epoch": 3, "top1_error": selected})
    (run / "eval.json").write_text(json.dumps(e))
    if diag is not None:
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for r, acc in zip(records, diag, strict=True):
            r["test_diag_acc"] = acc
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_rows_pool_seeds_with_mean_and_sample_std(tmp_path):
    from otlt.report.rows import base_of, row_summary, seed_rows
    from otlt.report.seedstats import mean_std

    root = tmp_path / "runs"
    erm = [_protocol_run(root, "erm" + ("" if s == 0 else f"_seed{s}"), s, last, last - 1,
                         paper=26.9)
           for s, last in [(2, 34.0), (0, 30.0), (1, 32.0)]]
    ot = _protocol_run(root, "erm_otmix", 0, 29.5, 27.0, mix="otmix", paper=21.7,
                       diag=[50.0, 70.0, 75.5, 75.5, 74.0, 73.0])
    other_lr = _protocol_run(root, "erm_lr", 0, 40.0, 39.0, lr=0.05)
    runs = load_runs([*erm, ot, other_lr])
    rows = seed_rows(runs)
    assert [r.label for r in rows] == ["erm", "erm_otmix", "erm_lr"]  # lr makes a new row
    assert rows[0].seeds == [0, 1, 2]
    s = row_summary(rows[0])
    assert s["per_seed"]["last"] == [30.0, 32.0, 34.0]
    assert s["stats"]["last"] == (32.0, pytest.approx(2.0), 3)  # sample std (n - 1)
    assert mean_std([1.0, None]) == (1.0, None, 1)
    assert base_of(rows[1], rows) is rows[0] and base_of(rows[0], rows) is None
    # best test epoch: highest accuracy, the earlier of two equal epochs (the official `>`)
    assert best_test_epoch(runs[3]) == (2, pytest.approx(24.5))
    assert row_summary(rows[1])["per_seed"]["best_test"] == [pytest.approx(24.5)]

    text = write_report([*erm, ot, other_lr], tmp_path / "out").read_text()
    section = text.split("## Rows (seeds pooled)")[1].split("\n## ")[0]
    assert ("| erm | 0, 1, 2 | running | 32.00 ± 2.00 | 31.00 ± 2.00 | 4, 4, 4 | – | 26.90 "
            "| +5.10 |") in section
    assert "| erm_otmix | 0 | running | 29.50 | 27.00 | 4 | 24.50 | 21.70 | +7.80 |" in section
    assert "- erm, per seed (last / selected): seed 0: 30.00 / 29.00; seed 1: 32.00 / " \
        "31.00; seed 2: 34.00 / 33.00" in section
    # mixing minus its base over the seeds both have (seed 0: 29.5 - 30.0), and the paper's
    # one seed: no t; ERM logged no per-epoch test accuracy, so no best-test-epoch difference
    assert "| erm_otmix | erm | 0 | -0.50 | – | -2.00 | – | -5.20 |" in section
    assert "each BatchNorm procedure" not in section  # no probe files yet
    assert "| 3 | 24.50 |" in text.split("### Best test epoch")[1]  # epochs counted from 1


def test_otmix_rows_are_compared_with_the_other_mixers_on_their_recipe(tmp_path):
    """OTmix minus CMO per common seed (the paper's OT-against-random-pairing gap), beside the
    paper's difference; a CMO row on another recipe is no rival."""
    from otlt.report.rows import rival_pairs, seed_rows

    root = tmp_path / "runs"
    def diag(best):  # six epochs of per-epoch test accuracy, the best one `best`
        return [50.0, best - 2.0, best, best - 1.0, best - 1.5, best - 1.0]

    paths = [_protocol_run(root, "erm", 0, 36.0, 35.0, paper=26.9),
             _protocol_run(root, "cmo", 0, 36.5, 34.0, mix="cmo", paper=25.0, diag=diag(67.0)),
             _protocol_run(root, "cmo_seed1", 1, 35.5, 33.0, mix="cmo", paper=25.0,
                           diag=diag(68.0)),
             _protocol_run(root, "otmix", 0, 35.0, 32.0, mix="otmix", paper=21.7,
                           diag=diag(68.5)),
             _protocol_run(root, "otmix_seed1", 1, 35.0, 32.5, mix="otmix", paper=21.7,
                           diag=diag(70.5)),
             _protocol_run(root, "otmix_seed2", 2, 30.0, 30.0, mix="otmix", paper=21.7),
             _protocol_run(root, "cmo_lr", 0, 40.0, 39.0, mix="cmo", lr=0.05)]
    rows = seed_rows(load_runs(paths))
    assert [(a.label, b.label) for a, b in rival_pairs(rows)] == [("otmix", "cmo")]
    text = write_report(paths, tmp_path / "out").read_text()
    table = text.split("### OTmix against another mixer on the same recipe")[1].split("\n\n")[2]
    # seeds 0 and 1: last -1.5 and -0.5, selected -2.0 and -0.5, best test epochs (100 - the
    # best accuracy) 31.5 - 33.0 and 29.5 - 32.0; seed 2 has no CMO run;
    # the last epoch's 95% t interval: -1.0 ± tan(0.475 pi) 0.5 (one degree of freedom)
    assert table.splitlines()[2] == ("| otmix | cmo | 0, 1 | -1.00 ± 0.71 | -7.35 to 5.35 | "
                                     "-1.25 ± 1.06 | -2.00 ± 0.71 | -3.30 |")
    assert len(table.splitlines()) == 3


def test_rows_pair_a_mixing_row_with_the_base_that_shares_its_recipe(tmp_path):
    from otlt.report.rows import base_of, seed_rows

    root = tmp_path / "runs"
    runs = load_runs([_protocol_run(root, "erm", 0, 30.0, 29.0),
                      _protocol_run(root, "erm_lr", 0, 40.0, 39.0, lr=0.05),
                      _protocol_run(root, "otmix_lr", 0, 35.0, 34.0, mix="otmix", lr=0.05),
                      _protocol_run(root, "otmix_lr_seed1", 1, 36.0, 34.0, mix="otmix",
                                    lr=0.05)])
    rows = seed_rows(runs)
    assert [r.label for r in rows] == ["erm", "erm_lr", "otmix_lr"]
    assert base_of(rows[2], rows) is rows[1]  # same lr, not the first non-mixing row
    alone = seed_rows(load_runs([root / "erm", root / "otmix_lr"]))
    assert base_of(alone[1], alone) is None  # no row with its recipe
    text = write_report([root / n for n in ("erm", "erm_lr", "otmix_lr", "otmix_lr_seed1")],
                        tmp_path / "out").read_text()
    assert "| otmix_lr | erm_lr | 0 | -5.00 | – | -5.00 | – |" in text  # seed 1 has no base


def test_rows_refuse_the_same_run_given_twice(tmp_path):
    from otlt.report.rows import seed_rows

    a = _protocol_run(tmp_path / "a", "erm", 0, 30.0, 29.0)
    b = _protocol_run(tmp_path / "b", "erm_copy", 0, 30.0, 29.0)
    with pytest.raises(OtltError, match="same config and seed"):
        seed_rows(load_runs([a, b]))


def test_rows_read_other_procedures_from_post_hoc_files(tmp_path):
    from otlt.report.rows import procedure_error

    root = tmp_path / "runs"
    runs = [_protocol_run(root, "mix" + ("" if s == 0 else f"_seed{s}"), s, 30.0 + s, 29.0,
                          mix="otmix") for s in (0, 1)]
    last = 5  # make_run's eval.json epoch
    (runs[0] / "probe_test.json").write_text(json.dumps({"split": "test", "records": [
        {"epoch": last - 1, "bn_stats": "train", "top1_error": 99.0},  # another epoch
        {"epoch": last, "bn_stats": "train", "top1_error": 27.0},
        {"epoch": last, "bn_stats": "clean", "top1_error": 28.0}]}))
    (runs[1] / "eval_last_train.json").write_text(json.dumps(
        {"split": "test", "bn_stats": "train", "top1_error": 29.0}))
    (runs[0] / "eval_last_train.json").write_text(json.dumps(
        {"split": "test", "bn_stats": "train", "top1_error": 50.0}))  # the probe comes first
    (runs[1] / "eval_last_balanced.json").write_text(json.dumps(
        {"split": "val", "bn_stats": "balanced", "top1_error": 1.0}))  # not test: ignored
    data = load_runs(runs)
    assert procedure_error(data[0], "train") == 27.0
    assert procedure_error(data[0], "running") == 30.0  # eval.json's own procedure
    assert procedure_error(data[1], "train") == 29.0
    assert procedure_error(data[1], "balanced") is None
    text = write_report(runs, tmp_path / "out").read_text()
    table = text.split("### Last epoch under each BatchNorm procedure")[1].split("\n\n")[2]
    assert table.splitlines()[2] == \
        "| mix | **30.50 ± 0.71** | 28.00 ± 1.41 | 28.00 (1 of 2) | – |"  # BN_STATS order


def test_rows_under_one_procedure_read_reevaluated_runs_and_pair_them(tmp_path):
    """A base evaluated under ``train`` and a mixing twin whose eval.json used ``running``:
    by default they are different recipes (no pairing); with ``bn_stats="train"`` the twin is
    read from its post-hoc files and the gain is train minus train."""
    from otlt.report import ReportOptions

    root = tmp_path / "runs"
    base = _protocol_run(root, "drw", 0, 32.0, 32.5)
    config = yaml.safe_load((base / "config.yaml").read_text())
    config["eval"]["bn_stats"] = "train"
    (base / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    e = json.loads((base / "eval.json").read_text())
    (base / "eval.json").write_text(json.dumps({**e, "bn_stats": "train"}))
    mix = _protocol_run(root, "drw_otmix", 0, 30.0, 24.5, mix="otmix")
    last = json.loads((mix / "eval.json").read_text())["epoch"]
    (mix / "probe_test.json").write_text(json.dumps({"split": "test", "records": [
        {"epoch": last, "bn_stats": "train", "top1_error": 25.0}]}))
    (mix / "eval_best_train.json").write_text(json.dumps(
        {"split": "test", "bn_stats": "train", "top1_error": 24.0}))

    def rows_section(options):
        text = write_report([base, mix], tmp_path / "out", options).read_text()
        return text.split("## Rows (seeds pooled)")[1].split("\n## ")[0]

    default = rows_section(None)
    assert "| drw_otmix | 0 | running | 30.00 | 24.50 |" in default
    assert "What mixing changes" not in default and "†" not in default
    train = rows_section(ReportOptions(bn_stats="train"))
    assert "| drw | 0 | train | 32.00 | 32.50 |" in train
    assert "| drw_otmix | 0 | train † | 25.00 | 24.00 |" in train
    assert "† Re-evaluated under `train`" in train and "drw_otmix" in train.split("†")[-1]
    assert "| drw_otmix | drw | 0 | -7.00 | – | -8.50 | – |" in train
    # a run with no file under the procedure gives no number rather than its own one
    (mix / "eval_best_train.json").unlink()
    train = rows_section(ReportOptions(bn_stats="train"))
    assert "| drw_otmix | 0 | train † | 25.00 | – |" in train


def test_rows_section_needs_protocol_era_runs(synthetic):
    assert "## Rows (seeds pooled)" not in synthetic[1].read_text()


# ---------------------------------------------------------------------- figures


def test_report_writes_every_figure_with_relative_links(synthetic):
    path = synthetic[1]
    out = path.parent
    text = path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all(not Path(link).is_absolute() and link.startswith("figures/")
                         for link in links)
    names = {Path(link).name for link in links}
    for expected in ("validation_accuracy.png", "curves_erm.png", "curves_unfinished.png",
                     "per_class_accuracy.png", "confusion.png", "mix_pairs_erm_otmix.png",
                     "plan_erm_otmix.png", "class_weights_ot_reweight.png"):
        assert expected in names, expected
    for figure in linked_figures(path):
        assert_png(figure)
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(names)
    assert "OTmix Table 1, OTmix + ERM" in text
    assert "`weight_entropy` 2.5" in text
    # the per-class weight table: 1/n after epoch 1, 1.5/n after epoch 6
    assert "ot_reweight: `weight_class_mean` after epoch 1 and after epoch 6." in text
    assert f"| {TINY_CLASSES[0]} | 500 | 0.002 | 0.003 | +0.001 |" in text
    assert f"| {TINY_CLASSES[9]} | 5 | 0.2 | 0.3 | +0.1 |" in text
    assert "Largest relative change: 50% (" in text
    assert "Sweep" not in text


def test_per_class_bars_order_classes_by_training_count(tmp_path):
    counts = [5, 500, 40]
    path = plots.per_class_bars(["c", "a", "b"], counts, [("run", [10.0, 90.0, None])],
                                tmp_path / "bars.png", title="t", thresholds=(100, 20))
    assert list(plots.count_order(counts)) == [1, 2, 0]
    assert_png(path)


def test_figures_are_palette_pngs_close_to_their_render(tmp_path):
    """Report figures are written as 256-colour palette PNGs, smaller than the full-colour
    render and within a small mean pixel distance of it; galleries of images stay full colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.imshow(np.linspace(0, 1, 400).reshape(20, 20), cmap="viridis")
    ax.plot([0, 19], [0, 19], "r-")
    full = figure_style.save_figure(fig, tmp_path / "full.png", palette=False)
    small = figure_style.save_figure(fig, tmp_path / "small.png")
    image = Image.open(small)
    assert image.mode == "P" and Image.open(full).mode in ("RGB", "RGBA")
    assert small.stat().st_size < full.stat().st_size
    direct = np.asarray(Image.open(full).convert("RGB"), int)
    assert np.abs(np.asarray(image.convert("RGB"), int) - direct).mean() < 1.0
    bars = plots.per_class_bars(["a", "b"], [50, 5], [("run", [90.0, 10.0])],
                                tmp_path / "bars.png", title="t", thresholds=(100, 20))
    assert Image.open(bars).mode == "P"
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    gallery = plots.mixed_gallery(images, images, images, [0, 1], [1, 0], [0.5, 0.5],
                                  ["a", "b"], tmp_path / "gallery.png", "t")
    assert Image.open(gallery).mode in ("RGB", "RGBA")  # photographs keep every colour


def test_figures_scale_to_a_hundred_classes(tmp_path):
    rng = np.random.default_rng(0)
    classes = [f"c{k}" for k in range(100)]
    counts = sorted(rng.integers(5, 500, 100).tolist(), reverse=True)
    conf = rng.integers(0, 5, (100, 100)) + np.eye(100, dtype=int) * 50
    bars = plots.per_class_bars(classes, counts, [("a", rng.uniform(0, 100, 100).tolist()),
                                                  ("b", rng.uniform(0, 100, 100).tolist())],
                                tmp_path / "bars.png", title="t", thresholds=(100, 20))
    mats = heatmaps.confusion_matrices([("a", conf.tolist())], classes, tmp_path / "conf.png")
    width, _ = assert_png(bars)
    assert width > 1200  # wide enough for 200 bars
    assert_png(mats)
    assert heatmaps.normalize_rows(conf).sum(1) == pytest.approx(np.ones(100))


def test_sweep_section_and_plot(tmp_path):
    root = tmp_path / "runs"
    runs = [make_run(root, f"erm_optim.lr={v}", i, lr=v) for i, v in enumerate([0.2, 0.05, 0.1])]
    path = write_report(runs, tmp_path / "out")
    text = path.read_text()
    assert "## Sweep over `optim.lr`" in text
    sweep_png = tmp_path / "out" / "figures" / "sweep_optim.lr.png"
    assert_png(sweep_png)
    for run in runs:
        e = json.loads((run / "eval.json").read_text())
        assert f"| {run.name} | {e['top1_error']:.2f} |" in text
    order = [text.index(f"| {v} | erm_optim.lr={v} |") for v in (0.05, 0.1, 0.2)]
    assert order == sorted(order)


def test_tsne_without_scikit_learn_is_a_clear_error(synthetic, monkeypatch):
    from otlt.report import tsne_embedding

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(OtltError, match="scikit-learn"):
        tsne_embedding(synthetic[0][0])


def test_bad_run_directory_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "not an otlt run directory" in err and err.count("\n") == 1


def test_report_out_defaults_to_reports_and_the_first_run_name(synthetic, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(synthetic[0][0]), str(synthetic[0][1])]) == 0
    assert (tmp_path / "reports" / "erm" / "report.md").is_file()


def test_gallery_without_checkpoints_says_why_and_fails(synthetic, tmp_path, capsys):
    """Committed results keep no last.pt: each skipped run gets one line, and a --gallery
    that drew nothing is an error (the rest of the report is still written)."""
    out = tmp_path / "out"
    code = main(["report", str(synthetic[0][0]), str(synthetic[0][1]), "--out", str(out),
                 "--gallery"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and (out / "report.md").is_file()
    assert err[0] == ("otlt: --gallery: skipped erm_otmix: no last.pt (committed results keep "
                      "no checkpoint; train the run to draw it)")
    assert len(err) == 2 and err[1].startswith("otlt: error: --gallery drew nothing"), err
    assert "erm_otmix: skipped, no last.pt" in (out / "report.md").read_text()


# ---------------------------------------------------------------------- real tiny runs


@pytest.fixture(scope="module")
def otmix_run(tiny_zip, tmp_path_factory) -> Path:
    """One epoch of resnet20 + OTmix on the tiny zip, mixing every batch (an OT epoch:
    P(OT) = (t/T)^mu = 1 for the last epoch)."""
    out = tmp_path_factory.mktemp("otmix_runs")
    config = out / "otmix.yaml"
    config.write_text("name: tiny_otmix\nmix:\n  name: otmix\n  params: {omega: 0.05, "
                      "plan_epochs: [0], plan_size: 6}\n  skip_first: 0\n  skip_last: 0\n"
                      "  prob: 1.0\n")
    args = ["train", "--config", str(config),
            *sets([*tiny_overrides(tiny_zip, out, epochs=1), "name=tiny_otmix"])]
    assert main(args) == 0
    return out / "tiny_otmix"


def test_gallery_shows_the_pairs_the_mixer_chose(otmix_run):
    g = mixed_pairs(otmix_run, n=6, seed=0)
    assert g.ot and g.partners.shape == g.bases.shape == g.mixed.shape == (6, 32, 32, 3)
    for i in range(6):
        # CutMix: every mixed pixel comes from the foreground or the chosen background
        from_partner = np.isclose(g.mixed[i], g.partners[i]).all(-1)
        from_base = np.isclose(g.mixed[i], g.bases[i]).all(-1)
        assert (from_partner | from_base).all()
        assert g.lams[i] == pytest.approx(from_base.mean(), abs=1 / 32)
    assert len(set(g.partner_labels)) > 1  # one foreground per class first


def test_gallery_mixes_the_runs_fraction_of_rows(otmix_run, tmp_path):
    """The gallery builds the run's mixer through its recipe, mix.fraction included (it once
    left it out and showed every row mixed)."""
    state = load_checkpoint(otmix_run / "last.pt")
    state["config"]["mix"]["fraction"] = 0.25
    quarter = tmp_path / "quarter"
    quarter.mkdir()
    save_atomic(state, quarter / "last.pt")
    assert len(mixed_pairs(otmix_run, n=32, seed=0).lams) == 32  # batch 32, every row mixed
    assert len(mixed_pairs(quarter, n=32, seed=0).lams) == 8  # round(0.25 * 32) rows


def test_tsne_embeds_a_test_subsample(otmix_run, tmp_path):
    from otlt.report import tsne_embedding

    emb, labels = tsne_embedding(otmix_run, n=40, seed=1)
    assert emb.shape == (40, 2) and np.isfinite(emb).all()
    assert labels.shape == (40,) and len(set(labels.tolist())) > 3  # a random subsample
    again, labels_again = tsne_embedding(otmix_run, n=40, seed=1)
    np.testing.assert_array_equal(labels, labels_again)
    np.testing.assert_allclose(emb, again, atol=1e-4)
    counts = json.loads((otmix_run / "splits.json").read_text())["counts"]["train"]
    assert_png(plots.tsne_panels([("run", emb, labels)], TINY_CLASSES, counts,
                                 tmp_path / "tsne.png"))


@pytest.mark.slow
def test_report_with_gallery_and_tsne_from_a_real_run(otmix_run, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["report", str(otmix_run), "--out", str(out), "--gallery", "--tsne",
                 "--tsne-samples", "60", "--gallery-size", "5"])
    assert code == 0, capsys.readouterr().err
    text = (out / "report.md").read_text()
    figures = {p.name for p in linked_figures(out / "report.md")}
    assert {"gallery_tiny_otmix.png", "tsne_tiny_otmix.png", "plan_tiny_otmix.png",
            "mix_pairs_tiny_otmix.png", "confusion.png"} <= figures
    for figure in linked_figures(out / "report.md"):
        assert_png(figure)
    e = json.loads((otmix_run / "eval.json").read_text())
    assert f"| {e['top1_error']:.2f} |" in text


@pytest.mark.slow
def test_sweep_runs_each_value_once_and_resumes(tiny_zip, tmp_path, capsys):
    config = tmp_path / "base.yaml"
    config.write_text("name: sw\n")
    args = ["sweep", "--config", str(config), "--key", "optim.lr", "--values", "0.1,0.05",
            *sets(tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1)[:-1])]
    assert main(args) == 0, capsys.readouterr().err
    dirs = [tmp_path / "runs" / f"sw_optim.lr={v}" for v in ("0.1", "0.05")]
    for d, lr in zip(dirs, (0.1, 0.05), strict=True):
        assert (d / "eval.json").is_file()
        assert yaml.safe_load((d / "config.yaml").read_text())["optim"]["lr"] == lr
    stamps = [(d / "eval.json").stat().st_mtime_ns for d in dirs]
    capsys.readouterr()
    assert main(args) == 0
    assert "done, skipped" in capsys.readouterr().out
    assert [(d / "eval.json").stat().st_mtime_ns for d in dirs] == stamps
    sweep = detect_sweep(load_runs(dirs))
    assert sweep is not None and sweep.key == "optim.lr" and sweep.values == [0.05, 0.1]
    before = json.loads((dirs[0] / "eval.json").read_text())
    (dirs[0] / "eval.json").unlink()  # interrupted after its last epoch: resumed, not redone
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[1/2] sw_optim.lr=0.1: resuming" in out and "otlt report" in out
    after = json.loads((dirs[0] / "eval.json").read_text())
    assert after["confusion_matrix"] == before["confusion_matrix"]
    assert len((dirs[0] / "metrics.jsonl").read_text().splitlines()) == 1


def test_sweep_rejects_bad_input_before_training(tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text("name: sw\nmix: {name: otmix}\n")
    with pytest.raises(OtltError, match="omega"):
        plan_sweep(config, "mix.params.omega", ["0.05", "2.0"], out_dir=tmp_path)
    with pytest.raises(OtltError, match="unknown config key"):
        plan_sweep(config, "optim.lrr", ["0.1"], out_dir=tmp_path)
    with pytest.raises(OtltError, match="repeats"):
        parse_values("0.1,0.1")
    assert not list(tmp_path.glob("sw_*"))


def test_sweep_refuses_a_directory_with_another_config(tiny_zip, tmp_path):
    config = tmp_path / "base.yaml"
    config.write_text("name: sw\n")
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=1)[:-1]
    runs = plan_sweep(config, "optim.lr", ["0.1"], base)
    runs[0].run_dir.mkdir(parents=True)
    other = plan_sweep(config, "optim.lr", ["0.1"], [*base, "seed=7"])[0].config
    from otlt.config import dump_config

    dump_config(other, runs[0].run_dir / "config.yaml")
    (runs[0].run_dir / "last.pt").write_bytes(b"")
    with pytest.raises(OtltError, match="different config"):
        run_sweep(runs, log=lambda _: None)



def test_the_run_table_gives_the_share_of_time_outside_the_training_steps(tmp_path):
    """``1 - Σ steps_seconds / Σ epoch_seconds`` over the epochs that time their steps; a run
    older than the key shows a dash."""
    root = tmp_path / "runs"
    timed, old = make_run(root, "timed", 0), make_run(root, "old", 1)
    records = [json.loads(x) for x in (timed / "metrics.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):  # 6 epochs of 1.5 s; steps 1.2 s in all but the last
        if i < len(records) - 1:
            r["steps_seconds"] = 1.2
    (timed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = write_report([timed, old], tmp_path / "out").read_text()
    table = text.split("| run | directory |")[1].split("\n\n")[0]
    assert "| 0.1 min | 20% |" in table.splitlines()[2]
    assert table.splitlines()[3].endswith("| 0.1 min | – |")


def test_seeds_pool_across_plan_epochs_written_from_the_end_or_resolved(tmp_path):
    """A seed run of today's preset writes ``plan_epochs: [-2]``; the committed seed 0 of the
    same preset wrote it resolved, ``[4]`` in a run of 6 epochs: one row. Which epochs' OT
    plans a run saves is what it kept, not what it trained (as ``train.keep_epochs``), so
    another plan epoch pools too; another ``omega`` does not."""
    from otlt.report.rows import seed_rows

    root = tmp_path / "runs"
    runs = [_protocol_run(root, name, seed, 30.0 + seed, 29.0, mix="otmix")
            for name, seed in (("ot", 0), ("ot_seed1", 1), ("ot_seed2", 2), ("ot_omega", 3))]
    for run, plan in zip(runs, ([4], [-2], [3], [4]), strict=True):
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["mix"].setdefault("params", {})["plan_epochs"] = plan
        if run.name == "ot_omega":
            config["mix"]["params"]["omega"] = 0.5
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = seed_rows(load_runs(runs))
    assert [(r.label, r.seeds) for r in rows] == [("ot", [0, 1, 2]), ("ot_omega", [3])]


def test_a_base_row_is_found_across_execution_only_keys(tmp_path):
    """A mixing run written by older code (no ``train.deterministic`` key, kept epochs
    resolved) still pairs with its base: how a run executed or what it kept is no part of
    what it trained."""
    from otlt.report.rows import base_of, seed_rows

    root = tmp_path / "runs"
    base = _protocol_run(root, "erm", 0, 36.0, 35.9)
    mixed = _protocol_run(root, "erm_otmix", 0, 35.4, 32.0, mix="otmix")
    for run, train in ((base, {"keep_epochs": [-4, -1], "deterministic": False}),
                       (mixed, {"keep_epochs": [236, 239], "workers": 2})):
        config = yaml.safe_load((run / "config.yaml").read_text())
        config.setdefault("train", {}).update(train)
        (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rows = seed_rows(load_runs([base, mixed]))
    assert base_of(rows[1], rows) is rows[0]
    with_lr = _protocol_run(root, "erm_otmix_lr", 0, 35.0, 32.0, mix="otmix", lr=0.05)
    rows = seed_rows(load_runs([base, with_lr]))
    assert base_of(rows[1], rows) is None  # what it trained differs


def test_a_pair_interval_says_when_a_seed_lacks_its_number(tmp_path):
    """A seed whose last-epoch error is missing leaves the mean, the std and the t interval
    alike, and each says over how many of the pair's seeds it runs."""
    root = tmp_path / "runs"
    paths = [_protocol_run(root, "erm" + ("" if s == 0 else f"_seed{s}"), s, 30.0 + s, 29.0)
             for s in range(3)]
    paths += [_protocol_run(root, "otmix" + ("" if s == 0 else f"_seed{s}"), s, last, 27.0,
                            mix="otmix")
              for s, last in [(0, 28.0), (1, 30.0), (2, None)]]
    text = write_report(paths, tmp_path / "out").read_text()
    table = text.split("### What mixing changes against its base row")[1].split("\n\n")[2]
    # seeds 0 and 1: -2.0 and -1.0, so -1.5 ± 0.71 and -1.5 ± tan(0.475 pi) 0.5
    assert table.splitlines()[2] == ("| otmix | erm | 0, 1, 2 | -1.50 ± 0.71 (2 of 3) | "
                                     "-7.85 to 4.85 (2 of 3) | -2.00 ± 0.00 | – | – |")

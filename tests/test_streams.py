"""List-file datasets (ImageNet-LT / iNaturalist format) streamed through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_line_error, sets
from otlt.cli import main
from otlt.config import DataConfig
from otlt.data.streams import prepare_stream_data
from otlt.engine.checkpoint import load_checkpoint
from otlt.errors import OtltError

TRAIN_COUNTS = [12, 6, 3, 2]
CLASSES = ["n001", "n002", "n003", "n004"]


def write_list_dataset(root: Path) -> Path:
    """An ImageNet-LT-shaped root: ``train|val|test/<wnid>/*.jpg`` and the three list files.

    Images have varied sizes and a class colour, so a small network can learn them.
    """
    rng = np.random.default_rng(0)
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])
    per_split = {"train": TRAIN_COUNTS, "val": [2] * 4, "test": [3] * 4}
    names = {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt",
             "test": "ImageNet_LT_test.txt"}
    for split, counts in per_split.items():
        lines = []
        for label, count in enumerate(counts):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(36, 60, size=2)
                noise = rng.integers(-30, 30, size=(h, w, 3))
                img = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.jpg", quality=90)
                lines.append(f"{split}/{CLASSES[label]}/{i}.jpg {label}")
        (root / names[split]).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def list_root(tmp_path_factory) -> Path:
    return write_list_dataset(tmp_path_factory.mktemp("imagenet_lt"))


def stream_overrides(root: Path, out_dir: Path, name: str, epochs: int = 2) -> list[str]:
    """``--config`` and ``--set`` arguments for a seconds-long CPU run on the tiny lists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / f"{name}.yaml"
    config.write_text(f"name: {name}\n")
    overrides = [f"data.path={root}", "data.dataset=imagenet_lt", "data.num_classes=4",
            "data.image_size=32", "data.val_per_class=0", "model.name=resnet20",
            f"optim.epochs={epochs}", "optim.batch_size=8",
            f"optim.milestones={'[1]' if epochs > 1 else '[]'}",
            f"optim.gammas={'[0.1]' if epochs > 1 else '[]'}", "optim.warmup_epochs=0",
            "train.progress=false",
            "train.amp=off", "train.device=cpu", "train.workers=0", "train.eval_batch_size=5",
            f"out_dir={out_dir}", f"name={name}"]
    return ["--config", str(config), *sets(overrides)]


OTMIX = ["--set", "mix.name=otmix", "--set", "mix.prob=1.0", "--set", "mix.skip_first=0",
         "--set", "mix.skip_last=0", "--set", "mix.params={mu: 0.0}"]


def test_lists_are_used_as_given(list_root):
    data = prepare_stream_data(DataConfig(dataset="imagenet_lt", path=str(list_root),
                                          num_classes=4, val_per_class=0, image_size=32),
                               4, seed=0)
    assert data.train_counts == TRAIN_COUNTS and data.classes == CLASSES
    counts = data.split_counts()
    assert counts["val"] == [2] * 4 and counts["test"] == [3] * 4 and counts["meta"] == [0] * 4
    x, y = data.test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and y == 0


def test_stream_digests_cover_the_list_entries(list_root, tmp_path):
    """splits.json's digest of a streamed split is over its list entries: another order
    behind the same counts differs; the same entries in another list file do not."""
    def digests(train_list: Path) -> dict:
        cfg = DataConfig(dataset="list", path=str(list_root), num_classes=4, val_per_class=0,
                         train_list=str(train_list), val_list="ImageNet_LT_val.txt",
                         test_list="ImageNet_LT_test.txt", image_size=32)
        return prepare_stream_data(cfg, 4, seed=0).split_digests()

    lines = (list_root / "ImageNet_LT_train.txt").read_text().splitlines()
    same, swapped = tmp_path / "same.txt", tmp_path / "swapped.txt"
    same.write_text("\n".join(lines) + "\n")
    swapped.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    base = digests(list_root / "ImageNet_LT_train.txt")
    assert base == digests(same) and base["meta"] is None and base["val"] is not None
    other = digests(swapped)
    assert other["train"] != base["train"] and other["test"] == base["test"]


@pytest.mark.parametrize(("change", "message"), [
    ({"num_classes": 3}, "label 3.*expects 3 classes"),
    ({"meta_per_class": 10}, "meta_per_class must be 0"),
    ({"dataset": "list", "train_list": "ImageNet_LT_train.txt",
      "test_list": "ImageNet_LT_test.txt", "val_per_class": 5}, "no validation list"),
    ({"val_list": "missing.txt"}, "missing.txt does not exist"),
])
def test_bad_list_configs_are_clear_errors(list_root, change, message):
    base = {"dataset": "imagenet_lt", "path": str(list_root), "num_classes": 4,
            "val_per_class": 0}
    cfg = DataConfig(**{**base, **change})
    with pytest.raises(OtltError, match=message):
        prepare_stream_data(cfg, cfg.num_classes, seed=0)


def test_train_with_otmix_and_eval_from_a_list_dataset(list_root, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", *stream_overrides(list_root, out, "ot"), *OTMIX,
                 "--set", "eval.bn_stats=train", "--set", "eval.bn_batches=2"]) == 0
    run = out / "ot"
    result = json.loads((run / "eval.json").read_text())
    assert result["split"] == "test" and sum(map(sum, result["confusion_matrix"])) == 12
    splits = json.loads((run / "splits.json").read_text())
    assert splits["classes"] == CLASSES and splits["counts"]["train"] == TRAIN_COUNTS
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc" in r for r in records)
    # mu = 0: every epoch pairs by OT; every training row is mixed with a foreground.
    assert all(r["ot_epoch"] and sum(map(sum, r["mix_pairs"])) == sum(TRAIN_COUNTS)
               for r in records)
    capsys.readouterr()
    assert result["bn_stats"] == "train"
    assert main(["eval", str(run)]) == 0  # post-hoc, the same streamed recalibration
    again = json.loads((run / "eval_last_train.json").read_text())
    assert again["confusion_matrix"] == result["confusion_matrix"]
    assert main(["eval", str(run), "--bn-stats", "balanced"]) == 0
    assert (run / "eval_last_balanced.json").is_file()


@pytest.mark.slow
def test_stream_resume_is_exact_and_independent_of_worker_count(list_root, tmp_path):
    out = tmp_path / "runs"
    full = [*stream_overrides(list_root, out, "full", epochs=3), *OTMIX,
            "--set", "train.workers=2"]
    part = [*stream_overrides(list_root, out, "part", epochs=3), *OTMIX]
    assert main(["train", *full]) == 0
    assert main(["train", *part, "--stop-after", "1"]) == 0
    assert main(["train", "--resume", str(out / "part")]) == 0
    a = load_checkpoint(out / "full" / "last.pt")["model"]
    b = load_checkpoint(out / "part" / "last.pt")["model"]
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_foreground_images_are_decoded_only_for_mixed_steps(list_root, tmp_path, monkeypatch):
    """With mix.prob 0.5 the foreground loader decodes exactly the mixed steps' rows."""
    from otlt.data.lists import ListFileDataset

    decoded = {"other": 0, "fore": 0}
    plain_getitem = ListFileDataset.__getitem__

    def counting_getitem(self, index):
        if self.seed == 1:  # the foreground loader's dataset (seed + 1; the run's seed is 0)
            decoded["fore"] += 1
        else:
            decoded["other"] += 1
        return plain_getitem(self, index)

    monkeypatch.setattr(ListFileDataset, "__getitem__", counting_getitem)
    out = tmp_path / "runs"
    half = [*OTMIX, "--set", "mix.prob=0.5", "--set", "optim.batch_size=2"]
    assert main(["train", *stream_overrides(list_root, out, "half", epochs=2), *half]) == 0
    records = [json.loads(x) for x in (out / "half" / "metrics.jsonl").read_text().splitlines()]
    steps = 2 * -(-sum(TRAIN_COUNTS) // 2)  # 2 epochs of ceil(23 / 2) steps
    mixed_steps = sum(r["mixed_batches"] for r in records)
    assert 0 < mixed_steps < steps  # the coin fell both ways
    mixed_rows = sum(sum(map(sum, r["mix_pairs"])) for r in records)
    assert decoded["fore"] == mixed_rows  # one foreground image per mixed row, none wasted


def test_a_non_finite_loss_stops_a_stream_run(list_root, tmp_path, capsys):
    """The streaming trainer shares the engine's epoch loop, and so its loss guard."""
    out = tmp_path / "runs"
    assert main(["train", *stream_overrides(list_root, out, "nan"),
                 "--set", "optim.lr=1e38"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training loss became inf or NaN in epoch 1/2 at step" in err[0]
    assert not (out / "nan" / "last.pt").exists()


def test_a_worker_error_is_one_line(tmp_path, capsys):
    """A missing image in the middle of a list, decoded by 2 workers: one line, exit 2."""
    root = write_list_dataset(tmp_path / "lists")
    (root / "train" / CLASSES[0] / "3.jpg").unlink()
    args = stream_overrides(root, tmp_path / "runs", "broken", epochs=1)
    assert main(["train", *args, "--set", "train.workers=2"]) == 2
    one_line_error(capsys, "3.jpg")

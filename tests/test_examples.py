"""The runnable examples run as written, from the data files to the report (issue 32 item 7)."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from otlt.config import OptimConfig, RunConfig
from otlt.engine.evaluation import model_confusion
from otlt.engine.schedule import step_lr
from otlt.errors import OtltError
from otlt.metrics import confusion_matrix
from otlt.mixing import OTMix
from otlt.models import create_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_plain_loop_example_refuses_a_wrong_path_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["otmix_cifar_lt.py", "--data", str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(EXAMPLES / "otmix_cifar_lt.py"), run_name="__main__")
    assert str(info.value).startswith("otmix_cifar_lt.py: error: data path ")
    assert "\n" not in str(info.value)


def test_the_plain_loop_example_trains_mixes_and_reports(tiny_zip, tmp_path, monkeypatch,
                                                         capsys):
    out = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", [
        "otmix_cifar_lt.py", "--data", str(tiny_zip), "--dataset", "folder", "--n-max", "40",
        "--imbalance-ratio", "10", "--val-per-class", "5", "--model", "resnet20",
        "--epochs", "8", "--batch-size", "32", "--device", "cpu", "--out", str(out)])
    seen = []
    real_call = OTMix.__call__

    def spy(self, x, y, *args, **kwargs):  # the mixing epochs mix float NCHW batches
        seen.append((x.dtype, x.shape[1]))
        return real_call(self, x, y, *args, **kwargs)

    monkeypatch.setattr(OTMix, "__call__", spy)
    lrs = []
    real_step = torch.optim.SGD.step

    def record_lr(self, *args, **kwargs):  # the learning rate each step trains with
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", record_lr)
    runpy.run_path(str(EXAMPLES / "otmix_cifar_lt.py"), run_name="__main__")
    text = capsys.readouterr().out
    assert "train 154 images per class [35, 30, 23, 18, 14, 11, 8, 6, 5, 4]" in text
    assert text.count("\nepoch ") == 8 and "epoch 8/8  loss" in text
    assert "OTmix, last epoch (8), test split" in text and "top-1 error" in text
    assert "\nclass9 " in text  # the per-class table names the classes
    report = json.loads(out.read_text())
    assert report["num_samples"] == 80 and sum(map(sum, report["confusion_matrix"])) == 80
    assert report["class_counts_train"] == [35, 30, 23, 18, 14, 11, 8, 6, 5, 4]
    assert seen and all(dtype == torch.float32 and channels == 3 for dtype, channels in seen)
    # the engine's schedule (per-step warm-up), the preset's scaled to 8 epochs as the _short
    # presets scale theirs: 1 warm-up epoch, milestones round(8/240 * (100, 160, 200))
    cfg = RunConfig(optim=OptimConfig(epochs=8, milestones=(3, 5, 7), warmup_epochs=1))
    steps = 5  # 154 images in batches of 32
    assert lrs == pytest.approx([step_lr(cfg, e, s, steps) for e in range(8) for s in range(steps)])
    assert lrs[:steps] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert lrs[-1] == pytest.approx(1e-5)


def test_model_confusion_takes_uint8_nhwc_or_float_nchw_and_refuses_the_rest():
    torch.manual_seed(0)
    model = create_model("resnet20", 3).eval()
    images = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    conf = model_confusion(model, images, labels, 3, batch_size=3)
    assert conf.shape == (3, 3) and conf.sum() == 7 and conf.sum(1).tolist() == [3, 2, 2]
    from otlt.data.augment import eval_transform

    with torch.no_grad():
        preds = model(eval_transform(images)).argmax(1)
    assert torch.equal(conf, confusion_matrix(preds, labels, 3))
    assert torch.equal(model_confusion(model, eval_transform(images), labels, 3), conf)
    for bad in (images.permute(0, 3, 1, 2), images.float()[..., 0]):
        with pytest.raises(OtltError, match="must be"):
            model_confusion(model, bad, labels, 3)
    for bad_images, bad_labels in ((images[:0], labels[:0]), (images, labels[:5])):
        with pytest.raises(OtltError, match="one label per image and at least one image"):
            model_confusion(model, bad_images, bad_labels, 3)


def test_mixers_refuse_the_loaders_uint8_nhwc_layout_in_one_line():
    """Issue 32 item 7: OTMix given loader images raised a raw conv2d error, and CutMix-style
    mixers cut their box across width and channels without a word."""
    from otlt.mixing import create_mixer

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0])
    otmix = OTMix(class_counts=[5, 3, 2])
    otmix.set_epoch(0, 1, generator=g)
    model = create_model("resnet20", 3)
    cases = [(otmix, (raw, y, raw, y), {"model": model}),
             (otmix, (raw.permute(0, 3, 1, 2), y, raw.permute(0, 3, 1, 2), y), {"model": model}),
             (create_mixer("cmo"), (raw, y, raw, y), {}), (create_mixer("cutmix"), (raw, y), {})]
    for mixer, args, kwargs in cases:
        with pytest.raises(OtltError, match=r"takes model inputs, float \(B, C, H, W\); got "
                                            r"torch.uint8 .*BatchAugment"):
            mixer(*args, generator=g, **kwargs)
    from otlt.data.augment import BatchAugment

    x = BatchAugment()(raw, g)  # what the message says to do, and it mixes
    assert otmix(x, y, x, y, generator=g, model=model).images.shape == (4, 3, 32, 32)
    ints = raw.permute(0, 3, 1, 2)  # integer model-layout images still paste (the gallery)
    assert create_mixer("cutmix")(ints, y, generator=g).images.dtype == torch.uint8

"""The README's library example runs as written."""

import re
from pathlib import Path

import pytest
import torch

from otlt.models import create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def test_otmix_loop_example_runs(monkeypatch):
    from otlt.mixing import MixRecipe

    text = README.read_text()
    block = re.search(r"```python\n(import torch\nfrom otlt import model_confusion\n.*?)```",
                      text, re.S)
    assert block, "README lost its OTmix example"
    g = torch.Generator().manual_seed(0)
    counts = [20, 10, 5]
    train_labels = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    train_images = torch.randn(len(train_labels), 3, 32, 32, generator=g)
    model = create_model("resnet20", 3)
    mixed_rows = []
    real_step = MixRecipe.step

    def counting_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        mixed_rows.append(0 if out is None else out.plan.num_mixed)
        return out

    monkeypatch.setattr(MixRecipe, "step", counting_step)
    namespace = {
        "counts": counts, "train_labels": train_labels, "train_images": train_images,
        "model": model, "epochs": 8, "opt": torch.optim.SGD(model.parameters(), lr=0.01),
        "loader": [(train_images[:8], train_labels[:8]), (train_images[8:16], train_labels[8:16])],
        "val_images": train_images[::5], "val_labels": train_labels[::5],
    }
    before = [p.detach().clone() for p in model.parameters()]
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["otmix"].confusion is not None
    assert len(mixed_rows) == 4 and 8 in mixed_rows  # epochs 3 and 4 mix; a batch was mixed
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_lightning_example_runs(tmp_path, monkeypatch):
    """As written: the network in ``self.model``, ``otmix.mix(self, x, y)`` (issue 32 item 4)."""
    pytest.importorskip("lightning")
    from otlt.integrations.lightning import OTMixCallback

    text = README.read_text()
    block = re.search(r"```python\n(import lightning\n.*?)```", text, re.S)
    assert block, "README lost its Lightning example"
    mixed = []
    real_mix = OTMixCallback.mix

    def counting_mix(self, module, x, y):
        out = real_mix(self, module, x, y)
        mixed.append(out is not None and self.otmix.ot_epoch)
        return out

    monkeypatch.setattr(OTMixCallback, "mix", counting_mix)
    monkeypatch.chdir(tmp_path)  # Lightning's checkpoints land here
    g = torch.Generator().manual_seed(0)
    counts = [12, 6, 4]
    train_labels = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    train_images = torch.randn(len(train_labels), 3, 16, 16, generator=g)
    data = torch.utils.data.TensorDataset(train_images, train_labels)
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    namespace = {"train_images": train_images, "train_labels": train_labels, "num_classes": 3,
                 "counts": counts, "model": create_model("resnet20", 3), "epochs": 8,
                 "train_loader": loader, "val_loader": loader}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["trainer"].current_epoch == 8
    assert namespace["otmix"].otmix.confusion is not None
    assert any(mixed)  # some batch of the window (epochs 3, 4) was OT-paired


def test_cmo_loop_example_runs():
    text = README.read_text()
    block = re.search(r"```python\n(from otlt.data.samplers import sample_weights\n.*?)```", text,
                      re.S)
    assert block, "README lost its CMO example"
    g = torch.Generator().manual_seed(0)
    counts = [20, 10, 5]
    train_labels = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    train_images = torch.randn(len(train_labels), 3, 32, 32, generator=g)
    model = create_model("resnet20", 3)
    namespace = {"torch": torch, "g": g, "counts": counts, "train_labels": train_labels,
                 "train_images": train_images, "model": model,
                 "opt": torch.optim.SGD(model.parameters(), lr=0.01),
                 "loader": [(train_images[:8], train_labels[:8])]}
    before = [p.detach().clone() for p in model.parameters()]
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["mixed"].plan.num_mixed == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_reweighting_example_runs():
    text = README.read_text()
    block = re.search(r"```python\n(import torch.nn.functional as F\nfrom otlt.reweight.*?)```",
                      text, re.S)
    assert block, "README lost its re-weighting example"
    g = torch.Generator().manual_seed(0)
    labels = torch.repeat_interleave(torch.arange(3), torch.tensor([12, 6, 3]))
    images = torch.randn(len(labels), 3, 32, 32, generator=g)
    model = create_model("resnet20", 3)
    idx = torch.arange(8)
    namespace = {"train_labels": labels, "num_classes": 3, "model": model,
                 "meta_features": torch.randn(9, model.feature_dim, generator=g),
                 "meta_labels": torch.arange(3).repeat(3),
                 "loader": [(images[idx], labels[idx], idx)],
                 "opt": torch.optim.SGD(model.parameters(), lr=0.01)}
    before = namespace["opt"].param_groups[0]["params"][-1].detach().clone()
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["weights"].shape == (8,)
    assert not torch.equal(before, model.fc.bias)


def test_inline_mixer_examples_run():
    text = README.read_text()
    lines = re.findall(r"`(mixed = create_mixer\(.*?\))`", text)
    assert len(lines) == 2, lines
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 0, 0, 1, 1, 2])
    from otlt.mixing import create_mixer

    for line in lines:
        namespace = {"create_mixer": create_mixer, "x": x, "y": y, "g": g, "counts": [3, 2, 1]}
        exec(line, namespace)
        assert namespace["mixed"].images.shape == x.shape

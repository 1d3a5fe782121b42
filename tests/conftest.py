"""Shared fixtures: a tiny CIFAR-like dataset written as an image-folder zip."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_CLASSES = [f"class{k}" for k in range(10)]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OTLT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def write_tiny_zip(path: Path, train_per_class: int = 40, test_per_class: int = 8,
                   size: int = 32, seed: int = 0) -> Path:
    """A learnable 10-class dataset: each class has its own mean colour plus noise."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for split, n in (("train", train_per_class), ("test", test_per_class)):
            for k, name in enumerate(TINY_CLASSES):
                colour = np.array([(k * 37) % 256, (k * 91) % 256, (k * 53) % 256])
                for i in range(n):
                    noise = rng.integers(-40, 40, (size, size, 3))
                    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="PNG")
                    zf.writestr(f"tiny/{split}/{name}/{i:04d}.png", buf.getvalue())
    return path


@pytest.fixture(scope="session")
def tiny_zip(tmp_path_factory) -> Path:
    return write_tiny_zip(tmp_path_factory.mktemp("data") / "tiny.zip")


def tiny_overrides(data: Path, out_dir: Path, epochs: int = 3) -> list[str]:
    """Config overrides for a seconds-long CPU run on the tiny dataset (the lr drops at
    epoch 2 of longer runs; a milestone the run never reaches is refused)."""
    step = "[2]" if epochs > 2 else "[]"
    return [f"data.path={data}", "data.dataset=folder", "data.num_classes=10",
            "data.n_max=40", "data.imbalance_ratio=10", "data.val_per_class=5",
            "model.name=resnet20", f"optim.epochs={epochs}", "optim.batch_size=32",
            f"optim.milestones={step}", f"optim.gammas={'[0.1]' if epochs > 2 else '[]'}",
            "train.progress=false", "train.amp=off", "train.device=cpu", f"out_dir={out_dir}",
            "name=tiny"]

"""Shared fixtures and helpers: a tiny CIFAR-like dataset written as an image-folder zip, the
overrides and config of a seconds-long run on it, a run stopped after its first epoch, and
the checks of the CLI's one-line errors. Test modules import the plain functions
(``from conftest import sets``); pytest finds the fixtures."""

from __future__ import annotations

import importlib.util
import io
import socket
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from otlt.cli import main
from otlt.cli.parser import set_flags

TINY_CLASSES = [f"class{k}" for k in range(10)]
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str, monkeypatch: pytest.MonkeyPatch | None = None):
    """``scripts/<name>.py`` as a module, without putting ``scripts/`` on ``sys.path``. With
    ``monkeypatch`` the module is in ``sys.modules`` for the test only (a script whose
    dataclasses look their own module up needs it)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


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


def sets(overrides: list[str]) -> list[str]:
    """``--set KEY=VALUE`` arguments for ``otlt train`` from config overrides."""
    return set_flags(overrides)


def error_line(err: str, *needles: str) -> str:
    """The one line of ``err`` (stderr), an ``otlt: error: ...`` without a traceback that
    contains every needle."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("otlt: error: "), lines
    assert "Traceback" not in lines[0] and lines[0].count("otlt: error:") == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def one_line_error(capsys, *needles: str) -> str:
    """:func:`error_line` of what the command wrote to stderr (captured by ``capsys``)."""
    return error_line(capsys.readouterr().err, *needles)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process group's store)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path) -> Path:
    """The smallest config file: ``tiny_overrides`` set the rest."""
    path = tmp_path / "c.yaml"
    path.write_text("name: tiny\nloss: {name: ce}\n")
    return path


def train_stopped(config: Path, overrides: list[str]) -> Path:
    """Train ``config`` with ``overrides`` (``tiny_overrides`` and more) and stop it,
    resumably, after its first epoch; return its run directory (``out_dir/name``)."""
    assert main(["train", "--config", str(config), "--stop-after", "1", *sets(overrides)]) == 0
    values = dict(o.split("=", 1) for o in overrides)
    return Path(values["out_dir"]) / values["name"]


@pytest.fixture
def stopped_run(tiny_zip, tmp_path, config, capsys) -> Path:
    """A tiny run stopped (resumably) after 1 of 3 epochs."""
    run = train_stopped(config, tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3))
    capsys.readouterr()
    return run


def write_image_folder(root: Path, spec: dict[str, dict[str, list[np.ndarray]]],
                       ext: str = "png") -> dict[str, dict[str, list[np.ndarray]]]:
    """Write ``spec[split][class] = [images]`` as ``root/split/class/NNNN.ext``."""
    for split, per_class in spec.items():
        for cls, images in per_class.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(images):
                opts = {"quality": 95, "subsampling": 0} if ext == "jpg" else {}
                Image.fromarray(img).save(root / split / cls / f"{i:04d}.{ext}", **opts)
    return spec

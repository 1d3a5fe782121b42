"""Large long-tailed datasets given as list files (ImageNet-LT, iNaturalist 2018), streamed.

These datasets ship their long-tailed splits as ``relative/path label`` lists under one image
root, so nothing is subsampled or carved here: the lists are used as given, and the images
are decoded lazily by :class:`otlt.data.lists.ListFileDataset` in DataLoader workers.

Default list names (relative to the root, ``data.path``; override with ``data.train_list``,
``data.val_list``, ``data.test_list``):

============  =========================  =======================  ========================
dataset       train                      validation               test
============  =========================  =======================  ========================
imagenet_lt   ImageNet_LT_train.txt      ImageNet_LT_val.txt      ImageNet_LT_test.txt
inat2018      iNaturalist18_train.txt    (none)                   iNaturalist18_val.txt
============  =========================  =======================  ========================

iNaturalist 2018 has no labelled test set; the literature reports on its official
validation list, which is therefore the *test* split here and is evaluated only at the end.
Without a validation list no validation accuracy is logged and OTmix's class cost stays
uniform over the other classes (no confusion matrix is ever known), so its pairing then
rests on the feature cost alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from otlt.config import DataConfig
from otlt.data.lists import ListFileDataset
from otlt.data.sources import find_data
from otlt.errors import OtltError, require

__all__ = ["LIST_FILES", "StreamData", "is_list_dataset", "prepare_stream_data"]

LIST_FILES: dict[str, tuple[str, str | None, str]] = {
    "imagenet_lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "inat2018": ("iNaturalist18_train.txt", None, "iNaturalist18_val.txt"),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def is_list_dataset(cfg: DataConfig) -> bool:
    """True when ``cfg`` names a list-file dataset (streamed) rather than in-memory arrays."""
    return cfg.dataset in LIST_FILES or cfg.train_list is not None


@dataclass
class StreamData:
    """The splits of a streamed run; ``val`` is ``None`` without a validation list.

    ``train`` augments (RandomResizedCrop + flip, seeded per item); ``val`` and ``test``
    resize and centre-crop. ``train_counts[k]`` drives many/medium/few and the samplers.
    """

    train: ListFileDataset
    val: ListFileDataset | None
    test: ListFileDataset
    train_counts: list[int]
    classes: list[str]

    def split_counts(self) -> dict[str, list[int]]:
        """Images per class of every split (recorded in the run directory)."""
        k = len(self.classes)

        def count(split: ListFileDataset | None) -> list[int]:
            if split is None:
                return [0] * k
            return np.bincount(split.labels, minlength=k).tolist()

        return {"train": list(self.train_counts), "val": count(self.val), "meta": [0] * k,
                "test": count(self.test)}

    def split_digests(self) -> dict[str, str | None]:
        """A digest of every split's list entries (:meth:`ListFileDataset.digest`; None for
        a split the run has not)."""
        val = None if self.val is None else self.val.digest()
        return {"train": self.train.digest(), "val": val, "meta": None,
                "test": self.test.digest()}


def _list_path(root: Path, given: str | None, default: str | None) -> Path | None:
    name = given if given is not None else default
    if name is None:
        return None
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise OtltError(f"list file {path} does not exist (data.path {root} is the image root; "
                        "set data.train_list/val_list/test_list to the list files)")
    return path


def _class_names(paths: list[str], labels: np.ndarray, num_classes: int) -> list[str]:
    """Name class ``k`` after the folder of its first training image (``train/n0144/x.jpg``
    gives ``n0144``), or ``class_k`` when images of several classes share a folder."""
    names = [f"class_{k}" for k in range(num_classes)]
    taken: set[str] = set()
    for path, label in zip(paths, labels.tolist(), strict=True):
        folder = Path(path).parent.name
        if folder and names[label] == f"class_{label}" and folder not in taken:
            names[label] = folder
            taken.add(folder)
    return names


def prepare_stream_data(cfg: DataConfig, num_classes: int, seed: int) -> StreamData:
    """Open the list files of ``cfg`` under its image root and check them; images are
    ``cfg.image_size`` square, training crops seeded by ``seed``.

    Raises :class:`OtltError` for a missing root or list, for labels outside
    ``[0, num_classes)``, for an empty training class, and for options that do not apply to
    list datasets (``meta_per_class > 0``; ``val_per_class > 0`` without a validation list).
    """
    defaults = LIST_FILES.get(cfg.dataset, (None, None, None))
    if cfg.train_list is None and defaults[0] is None:
        raise OtltError(f"dataset {cfg.dataset!r} needs data.train_list and data.test_list")
    root = find_data(cfg.dataset, cfg.path)
    require(root.is_dir(), f"data path {root} must be the image root folder of the list files")
    train_list = _list_path(root, cfg.train_list, defaults[0])
    val_list = _list_path(root, cfg.val_list, defaults[1])
    test_list = _list_path(root, cfg.test_list, defaults[2])
    require(test_list is not None, "data.test_list is required for a list-file dataset")
    require(cfg.meta_per_class == 0, "data.meta_per_class must be 0 for list-file datasets "
                                     "(their splits are used as given; no meta set is carved)")
    require(val_list is not None or cfg.val_per_class == 0,
            f"dataset {cfg.dataset!r} has no validation list: set data.val_list, or "
            "data.val_per_class=0 to train without validation")
    assert train_list is not None
    size = cfg.image_size
    train = ListFileDataset(root, train_list, size, train=True, seed=seed)
    val = None if val_list is None else ListFileDataset(root, val_list, size, train=False)
    test = ListFileDataset(root, test_list, size, train=False)
    for name, split in (("train", train), ("val", val), ("test", test)):
        if split is not None and int(split.labels.max()) >= num_classes:
            raise OtltError(f"{name} list has label {int(split.labels.max())}, but the config "
                            f"expects {num_classes} classes (labels 0..{num_classes - 1})")
    counts = np.bincount(train.labels, minlength=num_classes).tolist()
    empty = [k for k, c in enumerate(counts) if c == 0]
    require(not empty, f"train list has no image of class(es) {empty[:10]}; expected "
                       f"{num_classes} classes")
    return StreamData(train, val, test, counts, _class_names(train.paths, train.labels,
                                                            num_classes))

"""From a config to the four splits a run uses: long-tailed train, balanced val/meta, test."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from otlt.config import DATASET_DEFAULTS, DataConfig
from otlt.data.longtail import build_splits
from otlt.data.sources import find_data, load_dataset
from otlt.data.streams import is_list_dataset
from otlt.data.types import ImageArrays
from otlt.errors import require

logger = logging.getLogger(__name__)


@dataclass
class LongTailedData:
    """The splits of one run. ``train_counts[k]`` drives many/medium/few and the samplers."""

    train: ImageArrays
    val: ImageArrays
    meta: ImageArrays
    test: ImageArrays
    train_counts: list[int]

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def split_counts(self) -> dict[str, list[int]]:
        """Images per class of every split (recorded in the run directory)."""
        def count(split: ImageArrays) -> list[int]:
            out = [0] * split.num_classes
            for label in split.labels.tolist():
                out[label] += 1
            return out

        return {"train": list(self.train_counts), "val": count(self.val),
                "meta": count(self.meta), "test": count(self.test)}

    def split_digests(self) -> dict[str, str]:
        """A digest of every split's images and labels (:meth:`ImageArrays.digest`)."""
        return {"train": self.train.digest(), "val": self.val.digest(),
                "meta": self.meta.digest(), "test": self.test.digest()}


def prepare_data(cfg: DataConfig, num_classes: int, *, warn: bool = True) -> LongTailedData:
    """Locate and read the dataset, then carve val/meta and subsample the long tail.

    ``warn``: log what the data cannot give as the config asks (a distributed caller passes
    it on one rank only)."""
    require(not is_list_dataset(cfg), f"dataset {cfg.dataset!r} is a list-file dataset, "
            "streamed by the training engine; this command needs an in-memory dataset")
    path = find_data(cfg.dataset, cfg.path)
    splits = load_dataset(cfg.dataset, path, num_classes=num_classes)
    require("test" in splits, f"dataset at {path} has no test split (found: {sorted(splits)})")
    source = splits["train"]
    n_max = cfg.n_max if cfg.n_max is not None else (
        DATASET_DEFAULTS.get(cfg.dataset, (0, 0))[1]
        or int(max(source.labels.tolist().count(k) for k in range(num_classes))))
    idx = build_splits(source.labels, num_classes, imbalance_ratio=cfg.imbalance_ratio,
                       n_max=n_max, profile=cfg.profile, val_per_class=cfg.val_per_class,
                       meta_per_class=cfg.meta_per_class, data_seed=cfg.data_seed)
    if warn:
        if "val" in splits:
            logger.warning("%s has a val split; otlt carves validation from train "
                           "(data.val_per_class) and does not use it", path)
        if cfg.imbalance_ratio != 1:  # 1: the classes as the data gives them, on purpose
            _warn_of_short_classes(idx.shortfall, idx.train_counts,
                                   cfg.val_per_class + cfg.meta_per_class, cfg.imbalance_ratio)
    return LongTailedData(source.subset(idx.train), source.subset(idx.val),
                          source.subset(idx.meta), splits["test"], idx.train_counts)


def _warn_of_short_classes(shortfall: list[int], counts: list[int], carve: int,
                           wanted: float) -> None:
    """Warn when a class holds fewer images than the profile asks of it: short by more than
    the ``carve`` validation and meta images taken from it first (which the largest class
    of the presets gives up by design), as for ``n_max`` above what a class holds or a
    folder that is long-tailed already."""
    short = {k: s for k, s in enumerate(shortfall) if s > carve}
    if not short:
        return
    present = [c for c in counts if c > 0]
    got = max(present) / min(present) if present else 1.0
    logger.warning("the long-tailed profile asks for an imbalance of %.3g, the classes give "
                   "%.3g: class(es) %s hold %s fewer training images than it asks (training "
                   "images per class %s); set data.n_max to what the largest class holds "
                   "after the carve-out, or data.imbalance_ratio 1 for a folder that is "
                   "long-tailed already", wanted, got, sorted(short), list(short.values()),
                   counts)

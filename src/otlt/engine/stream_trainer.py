"""The engine for list-file datasets (ImageNet-LT, iNaturalist 2018): images streamed from disk.

Everything but the data path is :class:`otlt.engine.trainer.Trainer`: the schedule, losses,
mixers (CMO and OTmix included), checkpoints, exact resume and honest evaluation. The
differences:

- Images are decoded and augmented (RandomResizedCrop + flip) by
  :class:`otlt.data.sources.ListFileDataset` in ``train.workers`` DataLoader workers; the
  training device only normalises them (ImageNet mean and std).
- The epoch's order is a permutation from the run's generator, as for in-memory data, and
  each item's crop is seeded by ``(seed, epoch, index)``, so a resumed run sees exactly the
  images and crops of an uninterrupted one, whatever the number of workers.
- Mixers with a partner batch (CMO, OTmix) get their class-weighted foreground batches from
  a second loader that runs in lockstep with the first (its items use ``seed + 1``, so an
  image drawn as foreground is cropped independently of its background draw). The
  epoch's mixing coins and the foreground indices of its mixed steps are drawn when the epoch
  starts, so the workers decode foreground images only for the steps that mix (with the
  official ``mix.prob: 0.5``, a quarter less decoding than a foreground batch every step).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from otlt.config import BN_STATS
from otlt.data.augment import normalize
from otlt.data.lists import ListFileDataset
from otlt.data.streams import IMAGENET_MEAN, IMAGENET_STD, prepare_stream_data
from otlt.engine.batchnorm import preserved_batchnorm, recalibration_indices
from otlt.engine.distributed import (
    global_batches,
    rank,
    rank_slice,
    unwrap,
    world_size,
)
from otlt.engine.evaluation import summed_confusion
from otlt.engine.trainer import Trainer
from otlt.errors import require

Batch = tuple[torch.Tensor, torch.Tensor]


def model_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``(B, 3, S, S)`` uint8 from a list-file loader to normalised float on ``device``."""
    x = images.to(device, non_blocking=True).permute(0, 2, 3, 1)
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def batch_loader(dataset: ListFileDataset, batches: list[list[int]], workers: int,
                 device: torch.device) -> DataLoader:
    """A DataLoader yielding ``dataset``'s items in the given index batches."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def eval_loader(dataset: ListFileDataset, batch_size: int, workers: int,
                device: torch.device, shard: bool = False) -> Iterator[Batch]:
    """Batches ``(x, y)`` of ``dataset`` in list order, normalised and on ``device``
    (``shard``: only this rank's every ``world``-th item, for a summed confusion matrix)."""
    order = list(range(rank(), len(dataset), world_size())) if shard else \
        list(range(len(dataset)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return ((model_input(x, device), y.to(device))
            for x, y in batch_loader(dataset, batches, workers, device))


Step = tuple[torch.Tensor, torch.Tensor, bool, Batch | None]


class _Lockstep:
    """Sized iterable of steps ``(images uint8 (B, 3, S, S), labels (B,), coin, foreground)``.

    ``coins[i]`` is step i's mixing coin; ``fore`` yields one batch per heads coin, in order
    (None when no step needs one), and a tails step gets ``None`` as its foreground.
    """

    def __init__(self, main: DataLoader, coins: list[bool], fore: DataLoader | None) -> None:
        self.main, self.coins, self.fore = main, coins, fore

    def __len__(self) -> int:
        return len(self.main)

    def __iter__(self) -> Iterator[Step]:
        fore = iter(self.fore) if self.fore is not None else None
        for (x, y), coin in zip(self.main, self.coins, strict=True):
            yield x, y, coin, (next(fore) if coin and fore is not None else None)


class StreamTrainer(Trainer):
    """:class:`Trainer` over streamed list-file splits (see the module docstring)."""

    def _prepare_data(self) -> Any:
        return prepare_stream_data(self.cfg.data, self.num_classes, self.cfg.seed)

    def _place_data(self) -> None:
        self.train: ListFileDataset = self.data.train
        self.val: ListFileDataset | None = self.data.val
        self.test: ListFileDataset = self.data.test
        self.fore_set = copy.copy(self.train)
        self.fore_set.seed = self.train.seed + 1

    def _loader(self, dataset: ListFileDataset, batches: list[list[int]]) -> DataLoader:
        return batch_loader(dataset, batches, self.cfg.train.workers, self.device)

    def epoch_batches(self, epoch: int) -> _Lockstep:
        self.train.set_epoch(epoch)
        self.fore_set.set_epoch(epoch)
        order = torch.randperm(len(self.train), generator=self.generator)
        # Global batches drawn alike on every rank; each rank loads its rows of each.
        global_steps = global_batches(order, self.cfg.optim.batch_size, world_size())
        batches = [b[rank_slice(len(b))].tolist() for b in global_steps]
        coins = [False] * len(batches)
        fore = None
        if self._mixing_on(epoch):
            coins = (torch.rand(len(batches), generator=self.generator)
                     < self.cfg.mix.prob).tolist()
            sizes = [len(b) for b, coin in zip(global_steps, coins, strict=True) if coin]
            if sizes and getattr(self.mixer, "needs_partner_batch", False):
                draws = torch.multinomial(self.fore_weights, sum(sizes), replacement=True,
                                          generator=self.generator)
                fore = self._loader(self.fore_set, [d[rank_slice(len(d))].tolist()
                                                    for d in draws.split(sizes)])
        return _Lockstep(self._loader(self.train, batches), coins, fore)

    def train_step(self, item: Step, mixing: bool) -> tuple[float, float, int]:
        """One step on a lockstep item: its coin and foreground were drawn at epoch start
        (:meth:`epoch_batches`) and go to the base step as arguments."""
        images, labels, coin, foreground = item
        return self.sgd_step(model_input(images, self.device), labels.to(self.device), mixing,
                              coin=coin, foreground=None if foreground is None
                              else self._on_device(foreground))

    def confusion_on(self, split: str,
                     model: torch.nn.Module | None = None) -> torch.Tensor | None:
        dataset = self.val if split == "val" else self.test
        if dataset is None:
            return None
        batches = eval_loader(dataset, self.cfg.train.eval_batch_size, self.cfg.train.workers,
                              self.device, shard=True)
        return summed_confusion(model or self.model, batches, self.num_classes, self.amp_dtype,
                                self.cfg.train.channels_last)

    def bn_batches(self, mode: str, epoch: int) -> Iterator[torch.Tensor]:
        """Recalibration batches as :meth:`Trainer.bn_batches` says, streamed: the images
        are decoded by copies of the training list whose augmentation seeds differ from
        training's, and the indices come from the (seed, epoch) recalibration generator."""
        require(mode in BN_STATS[1:], f"no recalibration batches for bn_stats={mode!r}")
        g = self.bn_generator(epoch)
        # Global batches, coins and foregrounds drawn alike on every rank; each loads its rows.
        global_steps = list(recalibration_indices(mode, self.train.labels,
                                                  self.cfg.optim.batch_size,
                                                  self.cfg.eval.bn_batches, g))
        batches = [b[rank_slice(len(b))].tolist() for b in global_steps]
        mixer = copy.deepcopy(self.mixer) if mode == "train" else None
        coins = [False] * len(batches)
        fore = None
        if mixer is not None:
            coins = (torch.rand(len(batches), generator=g) < self.cfg.mix.prob).tolist()
            sizes = [len(b) for b, coin in zip(global_steps, coins, strict=True) if coin]
            if sizes and getattr(mixer, "needs_partner_batch", False):
                draws = torch.multinomial(self.fore_weights, sum(sizes), replacement=True,
                                          generator=g)
                fore = self._loader(self._recalibration_set(epoch, 3),
                                    [d[rank_slice(len(d))].tolist()
                                     for d in draws.split(sizes)])
        steps = _Lockstep(self._loader(self._recalibration_set(epoch, 2), batches), coins, fore)
        with preserved_batchnorm(unwrap(self.model)):
            for images, labels, coin, foreground in steps:
                x, y = model_input(images, self.device), labels.to(self.device)
                if coin:
                    mixer.set_epoch(epoch, self.cfg.optim.epochs, generator=g)
                    x = self._apply_mixer(mixer, x, y, g,
                                          lambda _n, f=foreground: self._on_device(f)).images
                yield x

    def _recalibration_set(self, epoch: int, offset: int) -> ListFileDataset:
        dataset = copy.copy(self.train)
        dataset.seed = self.train.seed + offset
        dataset.set_epoch(epoch)
        return dataset

    def _on_device(self, batch: Batch | None) -> Batch:
        assert batch is not None, "foreground loader not running"
        images, labels = batch
        return model_input(images, self.device), labels.to(self.device)

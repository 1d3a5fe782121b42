"""The engine for list-file datasets (ImageNet-LT, iNaturalist 2018): images streamed from disk.

Everything but the data path is :class:`otlt.engine.trainer.Trainer`: the schedule, losses,
mixers (CMO and OTmix included), checkpoints, exact resume and honest evaluation. The
differences:

- Images are decoded and augmented (RandomResizedCrop + flip) by
  :class:`otlt.data.lists.ListFileDataset` in ``train.workers`` DataLoader workers; the
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
    rank,
    rank_slice,
    world_size,
)
from otlt.engine.evaluation import summed_confusion
from otlt.engine.trainer import Trainer
from otlt.errors import require
from otlt.mixing import MixRecipe

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
        global_steps = self._batches()  # drawn alike on every rank; each loads its rows
        recipe = self.recipe if self.recipe.in_window(epoch, self.cfg.optim.epochs) else None
        return self._lockstep(self.train, self.fore_set, global_steps, recipe, self.generator)

    def _lockstep(self, dataset: ListFileDataset, fore_set: ListFileDataset,
                  global_steps: list[torch.Tensor], recipe: MixRecipe | None,
                  generator: torch.Generator) -> _Lockstep:
        """This rank's rows of ``global_steps`` from ``dataset``, with the steps' coins and
        foregrounds (from ``fore_set``) drawn now by ``recipe`` (:meth:`MixRecipe.epoch_draws`;
        None: every step clean, nothing drawn)."""
        sizes = [len(b) for b in global_steps]
        coins, fores = [False] * len(sizes), []
        if recipe is not None:
            coins, fores = recipe.epoch_draws(sizes, generator)
        fore = self._loader(fore_set, [d[rank_slice(len(d))].tolist() for d in fores]) \
            if fores else None
        batches = [b[rank_slice(len(b))].tolist() for b in global_steps]
        return _Lockstep(self._loader(dataset, batches), coins, fore)

    def train_step(self, item: Step, mixing: bool) -> tuple[float, float, int]:
        """One step on a lockstep item: its coin and foreground were drawn at epoch start
        (:meth:`epoch_batches`); heads mixes it by the recipe."""
        images, labels, coin, foreground = item
        x, y = model_input(images, self.device), labels.to(self.device)
        mixed = None
        if mixing and coin:
            mixed = self.recipe.mix(x, y, self.generator, partner=self._on_device(foreground),
                                    embed=self.embed_for(self.mixer))
        return self.sgd_step(x, y, mixed)

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
        recipe = self.recalibration_recipe(mode, epoch)
        embed = self.embed_for(recipe.mixer if recipe is not None else None)
        steps = self._lockstep(self._recalibration_set(epoch, 2),
                               self._recalibration_set(epoch, 3), global_steps, recipe, g)
        with preserved_batchnorm(self.model):
            for images, labels, coin, foreground in steps:
                x, y = model_input(images, self.device), labels.to(self.device)
                if coin and recipe is not None:
                    x = recipe.mix(x, y, g, partner=self._on_device(foreground),
                                   embed=embed).images
                yield x

    def _recalibration_set(self, epoch: int, offset: int) -> ListFileDataset:
        dataset = copy.copy(self.train)
        dataset.seed = self.train.seed + offset
        dataset.set_epoch(epoch)
        return dataset

    def _on_device(self, batch: Batch | None) -> Batch | None:
        if batch is None:  # a mixer without a partner batch
            return None
        images, labels = batch
        return model_input(images, self.device), labels.to(self.device)

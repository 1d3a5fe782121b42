"""The feed of list-file datasets (ImageNet-LT, iNaturalist 2018): images streamed from disk.

It answers what :class:`otlt.engine.feed.DeviceFeed` answers (the module docstring of
:mod:`otlt.engine.feed`), so the trainer, its schedule, losses, mixers (CMO and OTmix
included), checkpoints, exact resume and evaluation procedure are the same. The differences:

- Images are decoded and augmented (RandomResizedCrop + flip) by
  :class:`otlt.data.lists.ListFileDataset` in ``train.workers`` DataLoader workers; the
  training device only normalises them (ImageNet mean and std).
- The epoch's order is a permutation from the run's generator, as for in-memory data, and
  each item's crop is seeded by ``(seed, epoch, index)``, so a resumed run sees exactly the
  images and crops of an uninterrupted one, whatever the number of workers.
- Mixers with a partner batch (CMO, OTmix: their foregrounds) get their class-weighted
  partner batches from a second loader that runs in lockstep with the first (its items use
  ``seed + 1``, so an image drawn as a partner is cropped independently of its draw as a
  base). The epoch's mixing coins and the partner indices of its mixed steps are drawn when
  the epoch starts, so the workers decode partner images only for the steps that mix (with
  the official ``mix.prob: 0.5``, a quarter less decoding than a partner batch every step).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from otlt.config import BN_STATS, RunConfig
from otlt.data.augment import normalize
from otlt.data.lists import ListFileDataset
from otlt.data.streams import IMAGENET_MEAN, IMAGENET_STD, prepare_stream_data
from otlt.engine.batchnorm import recalibration_indices
from otlt.engine.distributed import global_batches, rank, rank_slice, world_size
from otlt.engine.evaluation import summed_confusion
from otlt.engine.step import EpochBatches, TrainBatch
from otlt.errors import require
from otlt.mixing import MixRecipe
from otlt.models.features import Embed

Batch = tuple[torch.Tensor, torch.Tensor]
Item = tuple[torch.Tensor, torch.Tensor, bool, Batch | None]


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


class _Lockstep:
    """Sized iterable of items ``(images uint8 (B, 3, S, S), labels (B,), coin, partner)``.

    ``coins[i]`` is step i's mixing coin; ``partners`` yields one batch per heads coin, in
    order (None when no step needs one), and a tails step gets ``None`` as its partner batch.
    """

    def __init__(self, main: DataLoader, coins: list[bool],
                 partners: DataLoader | None) -> None:
        self.main, self.coins, self.partners = main, coins, partners

    def __len__(self) -> int:
        return len(self.main)

    def __iter__(self) -> Iterator[Item]:
        partners = iter(self.partners) if self.partners is not None else None
        for (x, y), coin in zip(self.main, self.coins, strict=True):
            yield x, y, coin, (next(partners) if coin and partners is not None else None)


class StreamFeed:
    """The streamed splits of ``cfg.data`` (a list-file dataset) for a run on ``device``."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.data = prepare_stream_data(cfg.data, cfg.num_classes, cfg.seed)
        self.train: ListFileDataset = self.data.train
        self.val: ListFileDataset | None = self.data.val
        self.test: ListFileDataset = self.data.test
        self.counts = list(self.data.train_counts)
        self.classes = list(self.data.classes)
        self.labels = self.train.labels
        self.has_val = self.val is not None
        self.partner_set = self._copy(seed_offset=1)

    def __len__(self) -> int:
        return len(self.train)

    def _copy(self, seed_offset: int, epoch: int | None = None) -> ListFileDataset:
        """The training list whose augmentation seeds are training's plus ``seed_offset``."""
        dataset = copy.copy(self.train)
        dataset.seed = self.train.seed + seed_offset
        if epoch is not None:
            dataset.set_epoch(epoch)
        return dataset

    def _loader(self, dataset: ListFileDataset, batches: list[list[int]]) -> DataLoader:
        return batch_loader(dataset, batches, self.cfg.train.workers, self.device)

    def epoch(self, epoch: int, recipe: MixRecipe | None, generator: torch.Generator,
              embed: Embed | None) -> EpochBatches:
        """The epoch's steps: the global batches of a permutation from ``generator``, and
        (with ``recipe``) the coins and partners of the whole epoch, drawn now; each rank
        loads its rows."""
        self.train.set_epoch(epoch)
        self.partner_set.set_epoch(epoch)
        global_steps = global_batches(torch.randperm(len(self.train), generator=generator),
                                      self.cfg.optim.batch_size, world_size())
        items = self._lockstep(self.train, self.partner_set, global_steps, recipe, generator)
        return EpochBatches(items, lambda item: self._batch(item, recipe, generator, embed))

    def _lockstep(self, dataset: ListFileDataset, partner_set: ListFileDataset,
                  global_steps: list[torch.Tensor], recipe: MixRecipe | None,
                  generator: torch.Generator) -> _Lockstep:
        """This rank's rows of ``global_steps`` from ``dataset``, with the steps' coins and
        partners (from ``partner_set``) drawn now by ``recipe`` (:meth:`MixRecipe.epoch_draws`;
        None: every step clean, nothing drawn)."""
        sizes = [len(b) for b in global_steps]
        coins, draws = [False] * len(sizes), []
        if recipe is not None:
            coins, draws = recipe.epoch_draws(sizes, generator)
        partners = self._loader(partner_set, [d[rank_slice(len(d))].tolist() for d in draws]) \
            if draws else None
        batches = [b[rank_slice(len(b))].tolist() for b in global_steps]
        return _Lockstep(self._loader(dataset, batches), coins, partners)

    def _batch(self, item: Item, recipe: MixRecipe | None, generator: torch.Generator,
              embed: Embed | None) -> TrainBatch:
        """A lockstep item on the device; heads (its coin, drawn at epoch start) mixes it."""
        images, labels, coin, partner = item
        x, y = model_input(images, self.device), labels.to(self.device)
        mixed = None
        if coin and recipe is not None:
            mixed = recipe.mix(x, y, generator, partner=self._on_device(partner),
                               embed=embed)
        return TrainBatch(x, y, None, mixed)

    def recalibration(self, mode: str, epoch: int, recipe: MixRecipe | None,
                      generator: torch.Generator, embed: Embed | None,
                      ) -> Iterator[torch.Tensor]:
        """Recalibration batches as :meth:`otlt.engine.feed.DeviceFeed.recalibration` says,
        streamed: the images are decoded by copies of the training list whose augmentation
        seeds differ from training's; the global batches, coins and partners are drawn from
        ``generator`` alike on every rank, and each rank loads its rows."""
        require(mode in BN_STATS[1:], f"no recalibration batches for bn_stats={mode!r}")
        global_steps = list(recalibration_indices(mode, self.labels, self.cfg.optim.batch_size,
                                                  self.cfg.eval.bn_batches, generator))
        steps = self._lockstep(self._copy(2, epoch), self._copy(3, epoch), global_steps,
                               recipe, generator)
        for item in steps:
            yield self._batch(item, recipe, generator, embed).model_input

    def confusion(self, split: str, model: torch.nn.Module,
                  amp_dtype: torch.dtype | None) -> torch.Tensor | None:
        """Confusion matrix of ``model`` on ``val`` or ``test`` (None: no such split), each
        rank evaluating every ``world``-th image, summed."""
        dataset = self.val if split == "val" else self.test
        if dataset is None:
            return None
        t = self.cfg.train
        batches = eval_loader(dataset, t.eval_batch_size, t.workers, self.device, shard=True)
        return summed_confusion(model, batches, len(self.classes), amp_dtype, t.channels_last)

    def _on_device(self, batch: Batch | None) -> Batch | None:
        if batch is None:  # a mixer without a partner batch
            return None
        images, labels = batch
        return model_input(images, self.device), labels.to(self.device)


__all__ = ["StreamFeed", "batch_loader", "eval_loader", "model_input"]

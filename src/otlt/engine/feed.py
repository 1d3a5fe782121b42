"""Where a run's images come from: the feed the trainer and the evaluation procedure read.

A feed owns the data access of one run, whichever way the data lives. It gives:

- ``epoch(epoch, recipe, generator, embed)``: the epoch's training steps, a sized iterable
  of :class:`otlt.engine.step.TrainBatch` (this rank's rows of each global batch, augmented,
  mixed by ``recipe`` when it is given: its coin, partner draw and mixer call);
- ``recalibration(mode, epoch, recipe, generator, embed)``: the ``eval.bn_batches`` input
  batches of a BatchNorm procedure other than ``running``;
- ``confusion(split, model, amp_dtype)``: the ``(K, K)`` confusion matrix of ``model`` on
  ``val`` or ``test`` (None: the run has no such split), summed over the ranks;
- ``counts``, ``classes``, ``labels`` (training labels), ``has_val``, ``len()`` and ``data``
  (the prepared splits, for the run directory's ``splits.json``).

:class:`DeviceFeed` keeps small datasets on the training device as uint8 tensors: a step
gathers its batch by index and augments it with one batched gather
(:class:`otlt.data.augment.BatchAugment`). :class:`otlt.engine.stream_feed.StreamFeed` streams
list-file datasets (ImageNet-LT, iNaturalist 2018) through DataLoader workers.

Each draws in one fixed order from the caller's generator, which the committed results depend
on. In memory: the epoch's permutation, then per step the augmentation of the batch, the
coin, the partner indices (and their augmentation), the mixer's plan. Streamed: the
permutation, then every step's coin and partner indices at once (the crops are seeded per
item by the datasets, not drawn from the generator), then per mixed step the plan. Every
rank draws the same global batches, coins and partners and keeps its own rows
(:func:`otlt.engine.distributed.rank_slice`), so every rank issues the same collectives.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from otlt.config import BN_STATS, RunConfig
from otlt.data.augment import BatchAugment
from otlt.data.prepare import LongTailedData, prepare_data
from otlt.data.streams import is_list_dataset
from otlt.engine.batchnorm import recalibration_indices
from otlt.engine.distributed import global_batches, is_main_process, rank_slice, world_size
from otlt.engine.evaluation import evaluate
from otlt.engine.runtime import DeviceSplit
from otlt.engine.step import EpochBatches, TrainBatch
from otlt.engine.stream_feed import StreamFeed
from otlt.errors import require
from otlt.mixing import MixRecipe
from otlt.models.features import Embed


class Feed(Protocol):
    """What the engine reads of a feed (see the module docstring)."""

    data: Any
    counts: list[int]
    classes: list[str]
    labels: Any  # (N,) training labels: a numpy array or a tensor
    has_val: bool

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, recipe: MixRecipe | None, generator: torch.Generator,
              embed: Embed | None) -> EpochBatches: ...

    def recalibration(self, mode: str, epoch: int, recipe: MixRecipe | None,
                      generator: torch.Generator, embed: Embed | None,
                      ) -> Iterator[torch.Tensor]: ...

    def confusion(self, split: str, model: torch.nn.Module,
                  amp_dtype: torch.dtype | None) -> torch.Tensor | None: ...


class DeviceFeed:
    """The splits of ``data`` on ``device`` as uint8 ``(N, H, W, 3)`` images (see the module
    docstring); ``cfg`` gives the global batch (``optim.batch_size``), the evaluation batch,
    the memory format and the number of recalibration batches."""

    def __init__(self, cfg: RunConfig, data: LongTailedData, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.counts = list(data.train_counts)
        self.classes = list(data.classes)
        self.train = DeviceSplit(data.train, device)
        self.val = DeviceSplit(data.val, device) if len(data.val) else None
        self.test = DeviceSplit(data.test, device)
        self.labels = data.train.labels
        self.has_val = self.val is not None
        self.augment = BatchAugment()

    def __len__(self) -> int:
        return len(self.train)

    def gather(self, idx: torch.Tensor, generator: torch.Generator,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch ``idx``, augmented. Crops and flips are drawn
        for the whole global batch from ``generator``, so every rank's generator stays in
        step; each rank keeps its rows."""
        idx = idx.to(self.device)
        x = self.augment(self.train.images[idx], generator)
        mine = rank_slice(len(idx))
        return x[mine], self.train.labels[idx][mine]

    def epoch(self, epoch: int, recipe: MixRecipe | None, generator: torch.Generator,
              embed: Embed | None) -> EpochBatches:
        """The epoch's steps: a seeded permutation every rank draws alike, cut into
        ``optim.batch_size`` global batches (the last one padded to split over the ranks);
        each step mixed by ``recipe`` (coin, partners, plan) when given."""
        order = torch.randperm(len(self.train), generator=generator)
        batches = global_batches(order, self.cfg.optim.batch_size, world_size())
        return EpochBatches(batches, lambda idx: self.batch(idx, recipe, generator, embed))

    def batch(self, idx: torch.Tensor, recipe: MixRecipe | None, generator: torch.Generator,
              embed: Embed | None) -> TrainBatch:
        """The step of global batch ``idx``: this rank's rows, augmented, and (with
        ``recipe``) its coin and on heads its mix."""
        idx = idx.to(self.device)  # once: gather's move is then a no-op
        x, y = self.gather(idx, generator)
        mixed = None
        if recipe is not None:
            mixed = recipe.step(x, y, generator, size=len(idx), embed=embed,
                                load=lambda i: self.gather(i, generator))
        return TrainBatch(x, y, idx[rank_slice(len(idx))], mixed)

    def recalibration(self, mode: str, epoch: int, recipe: MixRecipe | None,
                      generator: torch.Generator, embed: Embed | None,
                      ) -> Iterator[torch.Tensor]:
        """``eval.bn_batches`` float batches ``(B, 3, H, W)`` for procedure ``mode``, drawn
        lazily from ``generator``: ``clean``, augmented batches of successive random
        permutations of the training set; ``balanced``, augmented class-balanced draws;
        ``train``, ``clean`` batches mixed by ``recipe`` (its coin, partners and mixer)."""
        require(mode in BN_STATS[1:], f"no recalibration batches for bn_stats={mode!r}")
        indices = recalibration_indices(mode, self.labels, self.cfg.optim.batch_size,
                                        self.cfg.eval.bn_batches, generator)
        for idx in indices:  # drawn as a training step draws (augment, coin, partners, plan)
            yield self.batch(idx, recipe, generator, embed).model_input

    def confusion(self, split: str, model: torch.nn.Module,
                  amp_dtype: torch.dtype | None) -> torch.Tensor | None:
        """Confusion matrix of ``model`` on ``val`` or ``test`` (None: no such split)."""
        data = self.val if split == "val" else self.test
        if data is None:
            return None
        t = self.cfg.train
        return evaluate(model, data, len(self.classes), t.eval_batch_size, amp_dtype,
                        t.channels_last)


def create_feed(cfg: RunConfig, device: torch.device,
                data: LongTailedData | None = None) -> DeviceFeed | StreamFeed:
    """The feed of ``cfg.data``: streamed for list-file datasets, else on ``device``
    (``data``: splits prepared already, for the in-memory feed)."""
    if is_list_dataset(cfg.data):
        return StreamFeed(cfg, device)
    return DeviceFeed(cfg, data or prepare_data(cfg.data, cfg.num_classes,
                                                warn=is_main_process()), device)


__all__ = ["DeviceFeed", "Feed", "StreamFeed", "create_feed"]

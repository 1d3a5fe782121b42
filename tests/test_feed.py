"""The in-memory feed: what it yields for an epoch, for recalibration and for evaluation."""

from __future__ import annotations

import torch

from conftest import tiny_overrides
from otlt.config import load_config
from otlt.data.prepare import prepare_data
from otlt.engine.batchnorm import recalibration_indices
from otlt.engine.feed import DeviceFeed
from otlt.mixing import MixRecipe
from otlt.mixing.random import CMO


def tiny_feed(tiny_zip, tmp_path, batch_size: int = 32) -> DeviceFeed:
    cfg = load_config(None, tiny_overrides(tiny_zip, tmp_path) +
                      [f"optim.batch_size={batch_size}", "eval.bn_batches=3"])
    return DeviceFeed(cfg, prepare_data(cfg.data, cfg.num_classes), torch.device("cpu"))


def test_an_epoch_is_one_permutation_in_global_batches_with_their_labels(tiny_zip, tmp_path):
    feed = tiny_feed(tiny_zip, tmp_path)
    g = torch.Generator().manual_seed(3)
    steps = feed.epoch(0, None, g, None)
    order = torch.randperm(len(feed), generator=torch.Generator().manual_seed(3))
    assert len(steps) == -(-len(feed) // 32)
    seen = []
    for batch in steps:
        assert batch.mixed is None and batch.images.dtype == torch.float32
        assert batch.images.shape[1:] == (3, 32, 32)
        assert torch.equal(batch.labels, feed.train.labels[batch.indices])
        seen.append(batch.indices)
    assert torch.equal(torch.cat(seen), order)


def test_a_recipe_mixes_heads_steps_and_draws_from_the_callers_generator(tiny_zip, tmp_path):
    feed = tiny_feed(tiny_zip, tmp_path)
    recipe = MixRecipe(CMO(), feed.labels, prob=0.5)
    g = torch.Generator().manual_seed(0)
    mixed = [b.mixed is not None for b in feed.epoch(0, recipe, g, None)]
    assert any(mixed) and not all(mixed)
    again = [b.mixed is not None
             for b in feed.epoch(0, recipe, torch.Generator().manual_seed(0), None)]
    assert again == mixed  # the caller's generator is the only source of randomness


def test_recalibration_batches_follow_the_procedures_indices(tiny_zip, tmp_path):
    feed = tiny_feed(tiny_zip, tmp_path, batch_size=16)
    for mode in ("clean", "balanced"):
        batches = list(feed.recalibration(mode, 0, None, torch.Generator().manual_seed(5),
                                          None))
        assert len(batches) == 3 and all(x.shape == (16, 3, 32, 32) for x in batches)
        h = torch.Generator().manual_seed(5)  # the same draws, by hand
        expected = []
        for idx in recalibration_indices(mode, feed.labels, 16, 3, h):
            expected.append(feed.augment(feed.train.images[idx], h))
        assert all(torch.equal(a, b) for a, b in zip(batches, expected, strict=True))


def test_confusion_of_a_missing_split_is_none_and_counts_every_test_image(tiny_zip, tmp_path):
    feed = tiny_feed(tiny_zip, tmp_path)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
    confusion = feed.confusion("test", model, None)
    assert confusion.shape == (10, 10) and int(confusion.sum()) == len(feed.test)
    feed.val = None
    assert feed.confusion("val", model, None) is None

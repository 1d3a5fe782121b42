"""MixRecipe: the window, the coin, the class-weighted foreground draw and the mixer call."""

from __future__ import annotations

import copy

import pytest
import torch

from otlt.config import build_config
from otlt.data.samplers import sample_weights
from otlt.errors import OtltError
from otlt.mixing import CMO, CutMix, MixRecipe, OTMix

COUNTS = [60, 25, 10, 5]
LABELS = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
IMAGES = torch.randn(len(LABELS), 3, 8, 8, generator=torch.Generator().manual_seed(1))


def embed(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1)[:, :16].float()


def gather(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return IMAGES[idx], LABELS[idx]


def otmix() -> OTMix:
    mixer = OTMix(class_counts=COUNTS, ot_probability=1.0)
    mixer.set_epoch(0, 1, generator=torch.Generator().manual_seed(0))
    return mixer


def test_window_leaves_the_first_and_last_epochs_clean():
    recipe = MixRecipe(CMO(), LABELS, skip_first=2, skip_last=3)
    assert recipe.window(10) == range(2, 7)
    assert [e for e in range(10) if recipe.in_window(e, 10)] == [2, 3, 4, 5, 6]
    assert not recipe.window(5) and not any(recipe.in_window(e, 5) for e in range(5))
    no_mixer = MixRecipe(None, LABELS, skip_first=0, skip_last=0)
    assert not any(no_mixer.in_window(e, 10) for e in range(10))


def test_start_epoch_draws_the_mixers_switch_and_says_whether_it_mixes():
    recipe = MixRecipe(OTMix(class_counts=COUNTS, mu=1.0), LABELS, skip_first=1, skip_last=1)
    g, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert recipe.start_epoch(0, 4, g) is False  # before the window: still one draw
    assert recipe.start_epoch(3, 4, g) is False  # after it
    assert recipe.start_epoch(1, 4, g) is True
    for _ in range(3):  # OTMix.set_epoch: one uniform per epoch
        torch.rand((), generator=twin)
    assert torch.equal(g.get_state(), twin.get_state())
    untouched = torch.Generator().manual_seed(3)
    assert MixRecipe(None, LABELS).start_epoch(1, 4, untouched) is False
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(3).get_state())


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_the_coin_is_heads_with_probability_prob(prob):
    recipe = MixRecipe(CutMix(), LABELS, prob=prob)
    g = torch.Generator().manual_seed(0)
    n = 20000
    heads = sum(recipe.coin(g) for _ in range(n)) / n
    assert abs(heads - prob) <= 4 * (prob * (1 - prob) / n) ** 0.5
    coins, fores = recipe.epoch_draws([4] * n, g)
    assert abs(sum(coins) / n - prob) <= 4 * (prob * (1 - prob) / n) ** 0.5 and fores == []


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_foreground_classes_follow_q_k_proportional_to_n_k_to_the_minus_r(r):
    recipe = MixRecipe(CMO(), LABELS, sampler_r=r)
    n = 40000
    idx = recipe.draw_partners(n, torch.Generator().manual_seed(0))
    assert idx.shape == (n,) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < len(LABELS)  # global training indices
    freq = torch.bincount(LABELS[idx], minlength=4).double() / n
    q = torch.tensor(COUNTS, dtype=torch.float64) ** -r
    q /= q.sum()
    assert torch.allclose(freq, q, atol=4 * (0.25 / n) ** 0.5)
    if r == 0:
        assert torch.allclose(q, torch.full((4,), 0.25, dtype=torch.float64))


def test_epoch_draws_give_one_global_index_batch_per_heads_step():
    recipe = MixRecipe(CMO(), LABELS, prob=0.5)
    sizes = [8, 8, 8, 8, 8, 8, 4]
    coins, fores = recipe.epoch_draws(sizes, torch.Generator().manual_seed(2))
    heads = [s for s, c in zip(sizes, coins, strict=True) if c]
    assert 0 < len(heads) < len(sizes)
    assert [len(f) for f in fores] == heads
    assert all(int(f.min()) >= 0 and int(f.max()) < len(LABELS) for f in fores)
    without = MixRecipe(None, LABELS)
    g = torch.Generator().manual_seed(2)
    assert without.epoch_draws(sizes, g) == ([False] * len(sizes), [])
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(2).get_state())


def test_mix_hands_embed_to_mixers_with_features_and_needs_partners_for_cmo():
    calls = []

    def counting(images):
        calls.append(len(images))
        return embed(images)

    x, y = gather(torch.arange(0, 100, 10))
    g = torch.Generator().manual_seed(0)
    MixRecipe(CutMix(), LABELS).mix(x, y, g, embed=counting)  # ignored, no partner needed
    assert calls == []
    mixed = MixRecipe(otmix(), LABELS).mix(x, y, g, load=gather, embed=counting)
    assert calls == [2 * len(y)] and mixed.plan.num_mixed == len(y)
    with pytest.raises(OtltError, match="needs a partner batch"):
        MixRecipe(CMO(), LABELS).mix(x, y, g)
    assert MixRecipe(None, LABELS).step(x, y, g) is None


def test_mix_draws_size_global_foregrounds_and_load_keeps_its_rows():
    """A rank of two: ``size`` = the global batch; ``load`` keeps this rank's half."""
    seen = []

    def load(idx):
        seen.append(idx)
        return gather(idx[: len(idx) // 2])

    x, y = gather(torch.arange(4))
    MixRecipe(CMO(), LABELS).mix(x, y, torch.Generator().manual_seed(0), load=load, size=8)
    assert len(seen) == 1 and seen[0].shape == (8,)


# ---- the same draws as the hand-written recipe it replaced --------------------------------


def old_step(mixer, weights, x, y, g, prob):
    """The engine's step before the recipe (engine/trainer.py at a420530)."""
    if torch.rand((), generator=g).item() >= prob:
        return None
    partner_idx = torch.multinomial(weights, len(y), replacement=True, generator=g)
    x_partner, y_partner = gather(partner_idx)
    return mixer(x, y, x_partner, y_partner, generator=g, embed=embed)


@pytest.mark.parametrize("r", [0.0, 1.0])
def test_step_draws_what_the_hand_written_recipe_drew(r):
    mixer = otmix()
    recipe = MixRecipe(copy.deepcopy(mixer), LABELS, prob=0.5, sampler_r=r)
    weights = sample_weights(LABELS, r)
    g, h = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for step in range(12):
        x, y = gather(torch.randperm(len(LABELS), generator=g)[:10])
        torch.randperm(len(LABELS), generator=h)
        new = recipe.step(x, y, g, load=gather, embed=embed)
        old = old_step(mixer, weights, x, y, h, 0.5)
        assert (new is None) == (old is None), step
        if new is not None:
            assert torch.equal(new.images, old.images) and torch.equal(new.lam, old.lam)
        assert torch.equal(g.get_state(), h.get_state())


def test_epoch_draws_are_the_streaming_paths_old_draws():
    recipe = MixRecipe(CMO(), LABELS, prob=0.5, sampler_r=1.0)
    sizes = [16] * 9 + [5]
    coins, fores = recipe.epoch_draws(sizes, torch.Generator().manual_seed(4))
    h = torch.Generator().manual_seed(4)  # engine/stream_trainer.py at a420530
    old_coins = (torch.rand(len(sizes), generator=h) < 0.5).tolist()
    heads = [s for s, c in zip(sizes, old_coins, strict=True) if c]
    draws = torch.multinomial(sample_weights(LABELS, 1.0), sum(heads), replacement=True,
                              generator=h).split(heads)
    assert coins == old_coins
    assert all(torch.equal(a, b) for a, b in zip(fores, draws, strict=True))


def test_recalibration_copy_redraws_the_switch_after_the_coin_and_leaves_the_run_alone():
    mixer = OTMix(class_counts=COUNTS, mu=1.0)
    mixer.set_epoch(5, 10, generator=torch.Generator().manual_seed(0))
    recipe = MixRecipe(mixer, LABELS, prob=0.5)
    before = (mixer.epoch, mixer.ot_epoch, dict(mixer.stats))
    copy_ = recipe.for_recalibration(2, 10)
    assert copy_.mixer is not mixer
    reference = copy.deepcopy(mixer)
    g, h = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    weights = sample_weights(LABELS, 0.0)
    for _ in range(8):
        x, y = gather(torch.arange(0, 100, 10))
        new = copy_.step(x, y, g, load=gather, embed=embed)
        if torch.rand((), generator=h).item() >= 0.5:  # trainer.bn_batches at a420530
            assert new is None
            continue
        reference.set_epoch(2, 10, generator=h)
        partner_idx = torch.multinomial(weights, len(y), replacement=True, generator=h)
        old = reference(x, y, *gather(partner_idx), generator=h, embed=embed)
        assert new is not None and torch.equal(new.images, old.images)
        assert copy_.mixer.epoch == 2
    assert torch.equal(g.get_state(), h.get_state())
    assert (mixer.epoch, mixer.ot_epoch, dict(mixer.stats)) == before


def test_from_config_builds_the_runs_mixer_with_fraction_and_its_recipe():
    cfg = build_config({"mix": {"name": "otmix", "params": {"omega": 0.5}, "prob": 0.25,
                                "fraction": 0.5, "skip_first": 1, "skip_last": 2,
                                "sampler_r": 1.0}})
    recipe = MixRecipe.from_config(cfg, LABELS, COUNTS, ot_probability=1.0)
    m = recipe.mixer
    assert isinstance(m, OTMix) and m.fraction == 0.5 and m.omega == 0.5
    assert m.ot_probability == 1.0
    assert (recipe.prob, recipe.skip_first, recipe.skip_last, recipe.sampler_r) == \
        (0.25, 1, 2, 1.0)
    assert torch.equal(recipe.weights, sample_weights(LABELS, 1.0))
    assert MixRecipe.from_config(build_config({}), LABELS, COUNTS).mixer is None


def test_bad_knobs_fail_in_one_line():
    with pytest.raises(OtltError, match="prob"):
        MixRecipe(CMO(), LABELS, prob=1.5)
    with pytest.raises(OtltError, match="skip_first"):
        MixRecipe(CMO(), LABELS, skip_first=-1)



def test_recalibration_copy_keeps_no_small_plan_and_draws_as_the_run_would(monkeypatch):
    import otlt.mixing.plan_samples as plan_samples

    solves = []
    real = plan_samples.sinkhorn
    monkeypatch.setattr(plan_samples, "sinkhorn",
                        lambda *a, **k: solves.append(1) or real(*a, **k))
    mixer = OTMix(class_counts=COUNTS, ot_probability=1.0, plan_epochs=[2], plan_size=4)
    mixer.set_epoch(2, 10, generator=torch.Generator().manual_seed(0))
    recal = MixRecipe(mixer, LABELS, prob=1.0).for_recalibration(2, 10)
    x, y = gather(torch.arange(0, 100, 10))
    new = recal.step(x, y, torch.Generator().manual_seed(3), load=gather, embed=embed)
    assert new is not None and recal.mixer.pop_artifacts() == {} and not solves
    assert mixer._plan_samples.due(2) == [2]  # the run's mixer still owes epoch 2 its plan
    # The copy that kept plans (a plain deep copy, before) solved one more and drew the same.
    old = MixRecipe(mixer, LABELS, prob=1.0).for_recalibration(2, 10)
    old.mixer._plan_samples = copy.deepcopy(mixer._plan_samples)
    kept = old.step(x, y, torch.Generator().manual_seed(3), load=gather, embed=embed)
    assert solves and list(old.mixer.pop_artifacts()) == ["plans/epoch_0002.json"]
    assert torch.equal(kept.images, new.images) and torch.equal(kept.lam, new.lam)

"""The names of the mixing pair's old vocabularies still work for a release, each with a
DeprecationWarning that names its replacement, and give exactly what the new name gives."""

from __future__ import annotations

import pytest
import torch

from otlt.mixing import CMO, MixRecipe
from otlt.transport import sinkhorn


def _mixed():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 8, 8, generator=g), torch.arange(6) % 3
    xp, yp = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([5, 4, 3, 5, 4, 3])
    return CMO()(x, y, xp, yp, generator=g)


def test_mixed_batch_and_plan_old_names_warn_and_alias_the_new_ones():
    mixed = _mixed()
    with pytest.warns(DeprecationWarning, match="targets_a is deprecated in otlt; use"):
        assert mixed.targets_a is mixed.base_labels
    with pytest.warns(DeprecationWarning, match="use MixedBatch.partner_labels"):
        assert mixed.targets_b is mixed.partner_labels
    with pytest.warns(DeprecationWarning, match="use MixPlan.partner_index"):
        assert mixed.plan.partner is mixed.plan.partner_index
    # The partner labels are the partner batch's: 3..5, never a base label (0..2).
    assert set(mixed.partner_labels.tolist()) <= {3, 4, 5}
    assert set(mixed.base_labels.tolist()) <= {0, 1, 2}


def test_ot_result_plan_is_the_coupling():
    res = sinkhorn(torch.rand(4, 5, generator=torch.Generator().manual_seed(1)), eps=0.1)
    with pytest.warns(DeprecationWarning, match="use OTResult.coupling"):
        assert res.plan is res.coupling


def test_recipe_foreground_names_warn_and_draw_the_same_indices():
    recipe = MixRecipe(CMO(), torch.tensor([0] * 8 + [1] * 2), sampler_r=1.0)
    new = recipe.draw_partners(50, torch.Generator().manual_seed(3))
    with pytest.warns(DeprecationWarning, match="use MixRecipe.draw_partners"):
        old = recipe.foreground(50, torch.Generator().manual_seed(3))
    assert torch.equal(old, new)
    with pytest.warns(DeprecationWarning, match="use MixRecipe.needs_partner_batch"):
        assert recipe.needs_foreground is True


def test_gpu_augment_imports_as_batch_augment():
    from otlt.data import augment
    with pytest.warns(DeprecationWarning, match="use otlt.data.augment.BatchAugment"):
        from otlt.data.augment import GPUAugment
    assert GPUAugment is augment.BatchAugment
    with pytest.raises(AttributeError, match="no attribute 'NoSuchAugment'"):
        augment.NoSuchAugment  # noqa: B018


def test_otmix_choose_backgrounds_is_choose_bases_and_the_warning_points_at_the_caller():
    from otlt.mixing import OTMix
    otmix = OTMix(num_classes=3, selection="assignment")
    cost = torch.rand(4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    with pytest.warns(DeprecationWarning, match="use OTMix.choose_bases") as record:
        old, _ = otmix.choose_backgrounds(cost, y, y, torch.Generator())
    assert record[0].filename == __file__  # stacklevel: the caller's line, not otlt's
    assert torch.equal(old, otmix.choose_bases(cost, y, y, torch.Generator())[0])


def test_lightning_callback_takes_the_old_transform_keyword_but_not_both():
    pytest.importorskip("lightning")
    from otlt.errors import OtltError
    from otlt.integrations.lightning import OTMixCallback

    def flip(images, generator):
        return images.flip(-1)

    images, labels = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.warns(DeprecationWarning, match="use partner_transform="):
        callback = OTMixCallback(images, labels, 3, foreground_transform=flip)
    assert callback.transform is flip
    assert OTMixCallback(images, labels, 3, partner_transform=flip).transform is flip
    with pytest.warns(DeprecationWarning), pytest.raises(OtltError, match="not both"):
        OTMixCallback(images, labels, 3, partner_transform=flip, foreground_transform=flip)

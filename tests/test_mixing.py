"""Tests for the batch mixers: CutMix boxes, pixel provenance, labels, determinism, devices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from otlt.errors import OtltError
from otlt.mixing import (
    CMO,
    CutMix,
    MixPlan,
    Mixup,
    NoMix,
    Remix,
    apply_plan,
    box_lam,
    create_mixer,
    list_mixers,
    mixup_images,
    sample_cutmix_box,
    sample_lam,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))]
COUNTS = [300, 100, 30, 10]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def row_constant_batch(values: list[int], size: int = 16, dtype=torch.float32,
                       device: str = "cpu") -> torch.Tensor:
    """Return a ``(B, 3, size, size)`` batch whose row ``i`` is the constant ``values[i]``."""
    v = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1)
    return v.expand(-1, 3, size, size).to(dtype=dtype, device=device).contiguous()


def all_mixers() -> list:
    return [NoMix(), Mixup(alpha=1.0), CutMix(alpha=4.0), CMO(alpha=1.0),
            Remix(COUNTS, mode="mixup"), Remix(COUNTS, mode="cutmix")]


def call(mixer, x, y, x_partner, y_partner, seed: int = 0):
    if mixer.needs_partner_batch:
        return mixer(x, y, x_partner, y_partner, generator=gen(seed))
    return mixer(x, y, generator=gen(seed))


# ----------------------------------------------------------------------------- boxes


def test_box_has_requested_size_away_from_the_border() -> None:
    g = gen(1)
    h, w = 32, 48
    inside = 0
    for _ in range(300):
        lam = sample_lam(1.0, g)
        y0, y1, x0, x1 = sample_cutmix_box(h, w, lam, g)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        cut = math.sqrt(1 - lam)
        if 0 < y0 and y1 < h and 0 < x0 and x1 < w:  # not clipped
            inside += 1
            assert (y1 - y0, x1 - x0) == (int(h * cut), int(w * cut))
            # Flooring loses less than one row and one column of the requested area.
            area = (y1 - y0) * (x1 - x0) / (h * w)
            assert 0 <= (1 - lam) - area <= 1 / h + 1 / w
    assert inside > 20


def test_box_area_matches_expectation_over_uniform_centres() -> None:
    h, w, lam, n = 32, 32, 0.6, 3000
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))

    def mean_clipped_length(size: int, cut: int) -> float:
        return float(np.mean([min(c - cut // 2 + cut, size) - max(c - cut // 2, 0)
                              for c in range(size)]))

    expected = mean_clipped_length(h, cut_h) * mean_clipped_length(w, cut_w) / (h * w)
    g = gen(2)
    areas = np.array([1 - box_lam(sample_cutmix_box(h, w, lam, g), h, w) for _ in range(n)])
    assert abs(areas.mean() - expected) < 4 * areas.std() / math.sqrt(n)
    assert areas.max() <= 1 - lam + 1e-12  # clipping and flooring only ever shrink the box


def test_box_centre_is_uniform_over_the_grid() -> None:
    # lam = 0.75 gives a 16 x 24 box on 32 x 48; y0 = max(cy - 8, 0), x0 = max(cx - 12, 0).
    h, w, n = 32, 48, 4800
    g = gen(5)
    boxes = np.array([sample_cutmix_box(h, w, 0.75, g) for _ in range(n)])
    for starts, size, half in ((boxes[:, 0], h, 8), (boxes[:, 2], w, 12)):
        observed = np.bincount(starts, minlength=size - half)
        expected = np.full(size - half, n / size)
        expected[0] = n * (half + 1) / size  # every centre left of the half-width clips to 0
        assert chisquare(observed, expected).pvalue > 1e-4


def test_box_lam_is_one_minus_area_fraction() -> None:
    assert box_lam((2, 6, 4, 12), 16, 16) == 1 - 4 * 8 / 256
    assert box_lam((3, 3, 0, 16), 16, 16) == 1.0
    assert box_lam((0, 16, 0, 16), 16, 16) == 0.0


def test_sample_lam_moments() -> None:
    g = gen(3)
    for alpha in (1.0, 4.0):
        draws = np.array([sample_lam(alpha, g) for _ in range(3000)])
        var = 1 / (4 * (2 * alpha + 1))  # Var Beta(a, a)
        assert abs(draws.mean() - 0.5) < 4 * math.sqrt(var / 3000)
        assert abs(draws.var() - var) < 0.2 * var
        assert draws.min() >= 0 and draws.max() <= 1


# ----------------------------------------------------------------------------- pixels


def test_mixup_images_float_and_uint8() -> None:
    a = torch.full((1, 3, 2, 2), 10.0)
    b = torch.full((1, 3, 2, 2), 20.0)
    torch.testing.assert_close(mixup_images(a, b, 0.3), torch.full_like(a, 17.0))
    out = mixup_images(a.to(torch.uint8), b.to(torch.uint8), 0.3)
    assert out.dtype == torch.uint8 and torch.equal(out, torch.full_like(out, 17))


@pytest.mark.parametrize("mixer", [CutMix(alpha=1.0), CMO(alpha=1.0)], ids=["cutmix", "cmo"])
def test_cutmix_pixels_come_from_partner_inside_box_only(mixer) -> None:
    bsz = 6
    x = row_constant_batch([100 + i for i in range(bsz)])
    x_partner = row_constant_batch([200 + i for i in range(bsz + 2)])  # foreground may be larger
    y = torch.arange(bsz)
    y_partner = torch.arange(bsz + 2) % 4
    for seed in range(5):
        out = call(mixer, x, y, x_partner, y_partner, seed)
        plan = out.plan
        assert plan.box is not None
        y0, y1, x0, x1 = plan.box
        source = x_partner if mixer.needs_partner_batch else x
        src_labels = y_partner if mixer.needs_partner_batch else y
        inside = torch.zeros(16, 16, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        for i in range(bsz):
            b, p = int(plan.base_index[i]), int(plan.partner_index[i])
            assert torch.all(out.images[i][:, inside] == source[p, 0, 0, 0])
            assert torch.all(out.images[i][:, ~inside] == x[b, 0, 0, 0])
        assert torch.equal(out.base_labels, y[plan.base_index])
        assert torch.equal(out.partner_labels, src_labels[plan.partner_index])
        assert plan.lam == box_lam(plan.box, 16, 16)
        torch.testing.assert_close(out.lam, torch.full((bsz,), plan.lam))
        assert len(set(plan.partner_index.tolist())) == bsz  # partners drawn without replacement


def test_mixup_pixels_are_the_convex_combination() -> None:
    x = torch.rand(5, 3, 4, 4, dtype=torch.float64)
    y = torch.arange(5)
    out = Mixup(alpha=1.0)(x, y, generator=gen(4))
    p, lam = out.plan.partner_index, out.plan.lam
    assert out.plan.box is None
    torch.testing.assert_close(out.images, lam * x + (1 - lam) * x[p])
    assert torch.equal(out.partner_labels, y[p])


def test_fraction_mixes_that_many_rows_and_keeps_the_rest_clean() -> None:
    x = row_constant_batch([100 + i for i in range(8)])
    y = torch.arange(8)
    out = CutMix(alpha=1.0, fraction=0.25)(x, y, generator=gen(5))
    mixed = out.plan.mixed
    assert int(mixed.sum()) == 2
    assert torch.equal(out.images[~mixed], x[~mixed])
    assert torch.all(out.lam[~mixed] == 1.0) and torch.all(out.lam[mixed] == out.plan.lam)
    subsets = {tuple(CutMix(fraction=0.25).plan(x, y, generator=gen(s)).mixed.tolist())
               for s in range(10)}
    assert len(subsets) > 1  # the mixed rows are a random subset, not always the first ones


def test_a_mixer_mixes_every_batch_it_is_given() -> None:
    """The per-batch coin is the recipe's (MixRecipe, mix.prob): a mixer has none."""
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    g = gen(6)
    assert all(CutMix(alpha=1.0).plan(x, y, generator=g).num_mixed == 4 for _ in range(50))
    assert all(CMO().plan(x, y, x, y, generator=g).num_mixed == 4 for _ in range(50))


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("mixer", all_mixers(), ids=lambda m: f"{m.name}")
def test_soft_targets_sum_to_one(mixer) -> None:
    x, x_partner = torch.rand(8, 3, 8, 8), torch.rand(8, 3, 8, 8)
    y, y_partner = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), torch.tensor([3, 3, 2, 2, 1, 1, 0, 0])
    out = call(mixer, x, y, x_partner, y_partner, seed=7)
    soft = out.soft_targets(4)
    assert soft.shape == (8, 4) and soft.dtype == torch.float32
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    assert torch.all(soft >= 0)
    differ = out.base_labels != out.partner_labels
    torch.testing.assert_close(soft[differ, out.base_labels[differ]], out.lam[differ])


def remix_on(lam: float, base: list[int], partner: list[int], mixed=None) -> torch.Tensor:
    """Apply Remix to a hand-built Mixup plan; labels are the row indices' classes."""
    y = torch.arange(len(COUNTS))
    n = len(base)
    mixed = torch.ones(n, dtype=torch.bool) if mixed is None else torch.tensor(mixed)
    plan = MixPlan(lam, None, torch.tensor(base), torch.tensor(partner), mixed)
    return Remix(COUNTS, kappa=3.0, tau=0.5).apply(plan, torch.rand(4, 3, 2, 2), y).lam


def test_remix_label_rule_on_hand_built_counts() -> None:
    # COUNTS = [300, 100, 30, 10]; pairs (a, b) and n_a / n_b:
    base = [0, 1, 0, 1, 2, 3, 1]
    partner = [1, 2, 3, 0, 1, 0, 1]
    # ratios:  3 (= kappa), 3.33, 30, 1/3 (= 1/kappa), 0.3, 1/30, 1
    low = remix_on(0.3, base, partner)  # lam < tau: majority base hands its label away
    torch.testing.assert_close(low, torch.tensor([0.0, 0.0, 0.0, 0.3, 0.3, 0.3, 0.3]))
    high = remix_on(0.7, base, partner)  # 1 - lam < tau: minority base keeps all its label
    torch.testing.assert_close(high, torch.tensor([0.7, 0.7, 0.7, 1.0, 1.0, 1.0, 0.7]))
    # At lam == tau neither strict inequality holds.
    torch.testing.assert_close(remix_on(0.5, base, partner), torch.full((7,), 0.5))
    # Unmixed rows keep weight 1 whatever the pair.
    torch.testing.assert_close(remix_on(0.3, [0, 0], [1, 1], [False, True]),
                               torch.tensor([1.0, 0.0]))


def test_remix_pixels_are_plain_mixup() -> None:
    x, y = torch.rand(6, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 0, 1, 2, 3, 3])
    remix = Remix(COUNTS, alpha=1.0)(x, y, generator=gen(9))
    mixup = Mixup(alpha=1.0)(x, y, generator=gen(9))
    assert remix.plan.to_dict() == mixup.plan.to_dict()
    torch.testing.assert_close(remix.images, mixup.images)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mixer", all_mixers()[1:], ids=lambda m: f"{m.name}")
def test_same_seed_same_mix_different_seed_different_mix(mixer) -> None:
    x, x_partner = torch.rand(8, 3, 16, 16), torch.rand(8, 3, 16, 16)
    y, y_partner = torch.arange(8) % 4, torch.arange(8) % 4
    a, b = call(mixer, x, y, x_partner, y_partner, 11), call(mixer, x, y, x_partner, y_partner, 11)
    c = call(mixer, x, y, x_partner, y_partner, 12)
    assert a.plan.to_dict() == b.plan.to_dict() and torch.equal(a.images, b.images)
    assert a.plan.to_dict() != c.plan.to_dict() and not torch.equal(a.images, c.images)


def test_plan_then_apply_equals_call_and_plan_is_loggable() -> None:
    x, y = torch.rand(8, 3, 16, 16), torch.arange(8)
    x_partner, y_partner = torch.rand(8, 3, 16, 16), torch.arange(8)
    mixer = CMO(alpha=1.0, fraction=0.5)
    plan = mixer.plan(x, y, x_partner, y_partner, generator=gen(13))
    once = mixer.apply(plan, x, y, x_partner, y_partner)
    twice = mixer.apply(plan, x, y, x_partner, y_partner)
    assert torch.equal(once.images, twice.images)
    assert torch.equal(mixer(x, y, x_partner, y_partner, generator=gen(13)).images, once.images)
    logged = json.loads(json.dumps(plan.to_dict()))
    assert logged["box"] == list(plan.box)
    assert logged["partner_index"] == plan.partner_index.tolist()


def test_apply_plan_supports_otmix_style_pairing() -> None:
    # OTMix: output row i is foreground i pasted onto the background j*(i).
    x_base, y_base = row_constant_batch([100, 101, 102]), torch.tensor([0, 1, 2])
    x_partner, y_partner = row_constant_batch([200, 201, 202]), torch.tensor([3, 3, 2])
    j_star = torch.tensor([2, 2, 0])
    box = (0, 8, 0, 8)
    plan = MixPlan(box_lam(box, 16, 16), box, j_star, torch.arange(3),
                   torch.ones(3, dtype=torch.bool))
    out = apply_plan(plan, x_base, y_base, x_partner, y_partner)
    assert torch.equal(out.base_labels, y_base[j_star])
    assert torch.equal(out.partner_labels, y_partner)
    assert out.images[0, 0, 0, 0] == 200 and out.images[0, 0, 15, 15] == 102
    assert out.images[2, 0, 0, 0] == 202 and out.images[2, 0, 15, 15] == 100
    assert out.lam[0] == 0.75


@pytest.mark.parametrize("mixer", all_mixers()[1:], ids=lambda m: f"{m.name}")
def test_refused_labels_and_partners_name_the_mixer(mixer) -> None:
    x, y = torch.rand(6, 3, 8, 8, generator=gen(3)), torch.tensor([0, 1, 2, 3, 0, 1])
    name = type(mixer).__name__
    with pytest.raises(OtltError, match=rf"^{name} base labels must be integer class indices"):
        call(mixer, x, y.float(), x, y)
    if mixer.needs_partner_batch:
        with pytest.raises(OtltError, match=rf"^{name}: partner images \(6, 3, 8, 8\) "
                                            r"torch.float64 must match"):
            call(mixer, x, y, x.double(), y)


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("mixer", all_mixers(), ids=lambda m: f"{m.name}")
def test_device_dtype_preserved_and_inputs_untouched(mixer, dtype, device) -> None:
    g = gen(14)
    x = (torch.rand(6, 3, 8, 8, generator=g) * 255).to(dtype=dtype, device=device)
    x_partner = (torch.rand(6, 3, 8, 8, generator=g) * 255).to(dtype=dtype, device=device)
    y = torch.tensor([0, 1, 2, 3, 0, 1], device=device)
    y_partner = torch.tensor([3, 3, 2, 2, 1, 1], device=device)
    before = [t.clone() for t in (x, y, x_partner, y_partner)]
    out = call(mixer, x, y, x_partner, y_partner, seed=15)
    for t, saved in zip((x, y, x_partner, y_partner), before, strict=True):
        assert torch.equal(t, saved)
    assert out.images.dtype == dtype and out.images.device == x.device
    assert out.images.shape == x.shape
    for t in (out.base_labels, out.partner_labels, out.lam):
        assert t.device == x.device and t.shape == (6,)
    assert out.lam.dtype == torch.float32 and out.base_labels.dtype == torch.long
    if not isinstance(mixer, NoMix):
        assert not torch.equal(out.images, x)  # something was actually mixed


# ----------------------------------------------------------------------------- errors, registry


def test_partner_batch_contract() -> None:
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    assert CMO.needs_partner_batch and not CutMix.needs_partner_batch
    with pytest.raises(ValueError, match="needs a partner batch"):
        CMO()(x, y, generator=gen())
    with pytest.raises(ValueError, match="unexpected partner batch"):
        CutMix()(x, y, x, y, generator=gen())
    with pytest.raises(ValueError, match="fewer than"):
        CMO()(x, y, x[:2], y[:2], generator=gen())
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        CutMix()(x, y, generator=None)


def test_context_is_ignored_by_random_pairing_mixers() -> None:
    x, y = torch.rand(4, 3, 8, 8), torch.arange(4)
    plain = CMO()(x, y, x, y, generator=gen(16))
    with_context = CMO()(x, y, x, y, generator=gen(16), model=torch.nn.Identity(), amp_dtype=None)
    assert plain.plan.to_dict() == with_context.plan.to_dict()


def test_registry() -> None:
    assert {"none", "mixup", "cutmix", "cmo", "remix"} <= set(list_mixers())
    mixer = create_mixer("cutmix", class_counts=COUNTS, alpha=4.0, fraction=0.5)
    assert mixer == CutMix(alpha=4.0, fraction=0.5) and mixer.name == "cutmix"
    remix = create_mixer("remix", class_counts=COUNTS, kappa=2.0)
    assert isinstance(remix, Remix) and remix.class_counts == tuple(COUNTS)
    assert create_mixer("cmo").needs_partner_batch


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("mixip", {}, "unknown mixer 'mixip'; expected one of cmo, cutmix"),
    ("cutmix", {"beta": 1.0}, "unknown option(s) beta for mixer 'cutmix'; expected alpha"),
    ("remix", {}, "needs class_counts"),
    ("mixup", {"alpha": 0.0}, "alpha must be > 0"),
    ("cmo", {"prob": 0.5}, "unknown option(s) prob for mixer 'cmo'"),
    ("otmix", {"prob": 0.5}, "unknown option(s) prob for mixer 'otmix'"),
    ("cutmix", {"fraction": 0.0}, "fraction must be in (0, 1]"),
    ("mixup", {"alpha": "big"}, "bad option for mixer 'mixup'"),
])
def test_registry_errors(name: str, kwargs: dict, message: str) -> None:
    counts = COUNTS if name != "remix" else None
    with pytest.raises(OtltError) as info:
        create_mixer(name, class_counts=counts, **kwargs)
    assert message in str(info.value)


def test_remix_rejects_bad_settings() -> None:
    for kwargs in ({"kappa": 0.5}, {"tau": 1.5}, {"mode": "fmix"}):
        with pytest.raises(OtltError):
            Remix(COUNTS, **kwargs)


def test_saliency_box_centres_on_the_salient_spot():
    from otlt.mixing import saliency_box, spectral_residual_saliency

    image = torch.zeros(3, 32, 32)
    image[:, 20:23, 5:8] = 1.0  # one small bright blob on a flat background
    saliency = spectral_residual_saliency(image)
    cy, cx = divmod(int(saliency.argmax()), 32)
    assert 18 <= cy <= 24 and 3 <= cx <= 9
    y0, y1, x0, x1 = saliency_box(image, lam=0.75)
    assert y1 - y0 == 16 and x0 == 0 and x1 == cx + 8  # clipped at the left border
    assert y0 <= 21 < y1 and x0 <= 6 < x1


def test_saliencymix_pastes_partner_box_and_corrects_lam():
    from otlt.mixing import create_mixer

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    y = torch.arange(6)
    out = create_mixer("saliencymix", alpha=1.0)(x, y, generator=torch.Generator().manual_seed(1))
    y0, y1, x0, x1 = out.plan.box
    assert torch.allclose(out.lam, torch.full((6,), 1 - (y1 - y0) * (x1 - x0) / 1024))
    p = out.plan.partner_index
    assert torch.equal(out.images[:, :, y0:y1, x0:x1], x[p][:, :, y0:y1, x0:x1])


def test_base_mixer_hooks_are_documented_no_ops():
    """The engine calls every hook on every mixer; a mixer that defines only ``plan`` works."""
    from otlt.mixing import Mixer
    mixer = Mixer()
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert mixer.set_epoch(3, 10, generator=gen) is False
    assert torch.equal(gen.get_state(), state)  # draws nothing
    assert mixer.end_epoch(torch.eye(3)) == {} and mixer.pop_artifacts() == {}
    assert mixer.state_dict() == {}
    mixer.load_state_dict({})
    mixer.update_confusion(torch.eye(3))
    assert not mixer.needs_confusion


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mixer", [CMO(), CutMix(), Mixup()], ids=["cmo", "cutmix", "mixup"])
def test_a_channels_last_batch_is_mixed_into_a_channels_last_batch(mixer, device):
    """The engine's augmentation gives channels-last batches and the step runs channels-last:
    a mixer that returned NCHW cost the step a copy of every mixed batch. Same values in
    either layout."""
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    x, x_partner = torch.randn(2, 8, 3, 16, 16, generator=g).to(device)
    y, y_partner = torch.randint(0, 4, (2, 8), generator=g).to(device)
    outs = []
    for layout in (torch.contiguous_format, cl):
        args = (x.contiguous(memory_format=layout), y, x_partner.contiguous(memory_format=layout),
                y_partner) if isinstance(mixer, CMO) else (x.contiguous(memory_format=layout), y)
        outs.append(mixer(*args, generator=torch.Generator().manual_seed(1)).images)
    assert outs[0].is_contiguous() and outs[1].is_contiguous(memory_format=cl)
    assert torch.equal(outs[0], outs[1])

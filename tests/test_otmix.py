"""OTmix: cost (eq. 7), pairing (eq. 8), mixing (eq. 9), schedule, state and resume."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

import otlt.mixing.otmix as otmix_module
from conftest import sets, tiny_overrides
from otlt.cli import main
from otlt.engine.checkpoint import load_checkpoint
from otlt.errors import OtltError
from otlt.mixing import OTMix, create_mixer, otmix_cost
from otlt.models import create_model
from otlt.transport import sinkhorn

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def test_cost_equals_formula_on_hand_built_case():
    z_partner = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_base = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    y_partner = torch.tensor([0, 1])
    y_base = torch.tensor([0, 1, 2])
    confusion = torch.tensor([[8.0, 1.0, 1.0], [2.0, 6.0, 2.0], [0.0, 5.0, 5.0]])
    # F^ rows: [0, .1, .1], [.2, 0, .2], [0, .5, 0]
    cos = torch.tensor([[1.0, 2 ** -0.5, 0.0], [0.0, 2 ** -0.5, -1.0]])
    fhat = torch.tensor([[0.0, 0.1, 0.1], [0.2, 0.0, 0.2]])
    omega = 0.3
    expected = omega * (1 - cos) + (1 - omega) * (1 - fhat)
    got = otmix_cost(z_partner, z_base, y_partner, y_base, confusion, omega=omega)
    assert torch.allclose(got, expected, atol=1e-6)
    kept = otmix_cost(z_partner, z_base, y_partner, y_base, confusion, omega=0.0,
                      keep_same_class=True)
    assert torch.allclose(kept[0, 0], torch.tensor(1 - 0.8)) and torch.allclose(
        kept[1, 1], torch.tensor(1 - 0.6))


def test_euclidean_and_limits_of_omega():
    g = torch.Generator().manual_seed(0)
    z_partner, z_base = torch.randn(5, 4, generator=g), torch.randn(6, 4, generator=g)
    y_partner = torch.randint(0, 3, (5,), generator=g)
    y_base = torch.randint(0, 3, (6,), generator=g)
    conf = torch.rand(3, 3, generator=g)
    feat_only = otmix_cost(z_partner, z_base, y_partner, y_base, conf, omega=1.0,
                           distance="euclidean")
    dist = torch.cdist(z_partner, z_base)
    assert torch.allclose(feat_only, dist / dist.max(), atol=1e-6)
    class_only = otmix_cost(z_partner, z_base, y_partner, y_base, conf, omega=0.0)
    assert torch.equal(class_only[y_partner[:, None] == y_base[None, :]],
                       torch.ones_like(class_only[y_partner[:, None] == y_base[None, :]]))


class FeatureModel(torch.nn.Module):
    """A model whose features are its flattened mean colour: enough for OTmix's planner."""

    def features(self, x):
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.features(x)


def make_batches(b=32, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y_base = torch.randint(0, k, (b,), generator=g)
    y_partner = torch.randint(0, k, (b,), generator=g)
    x_base = torch.randn(b, 3, 16, 16, generator=g)
    x_partner = torch.randn(b, 3, 16, 16, generator=g) + 10.0  # foregrounds are recognisable
    return x_base, y_base, x_partner, y_partner


def confusion_pointing_to(k=4):
    """A confusion where class c is mostly confused with class (c + 1) mod k."""
    conf = torch.eye(k) * 50 + 1
    for c in range(k):
        conf[c, (c + 1) % k] = 30
    return conf


@pytest.mark.parametrize("selection", ["argmax", "assignment"])
def test_partners_avoid_own_class_and_follow_confusion(selection):
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer = OTMix(num_classes=4, omega=0.05, selection=selection)
    mixer.update_confusion(confusion_pointing_to())
    g = torch.Generator().manual_seed(1)
    plan = mixer.plan(x_base, y_base, x_partner, y_partner, generator=g, model=FeatureModel())
    base_classes = y_base[plan.base_index]
    if selection == "assignment":  # one-to-one: the total optimum may accept a same-class pair
        assert sorted(plan.base_index.tolist()) == list(range(32))
    else:
        assert not torch.any(base_classes == y_partner), "a partner got a base of its own class"
    hits = (base_classes == (y_partner + 1) % 4).float().mean()
    assert hits > 0.5, f"only {hits:.2f} of partners come from the most confused class"


def test_mixed_images_paste_foreground_box_and_weights_match_area():
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer = OTMix(num_classes=4)
    mixer.update_confusion(confusion_pointing_to())
    out = mixer(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(3),
                model=FeatureModel())
    plan = out.plan
    y0, y1, x0, x1 = plan.box
    area = (y1 - y0) * (x1 - x0)
    assert area > 0
    assert torch.allclose(out.lam, torch.full((32,), 1 - area / 256.0))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(out.images[:, :, inside], x_partner[:, :, inside])
    assert torch.equal(out.images[:, :, ~inside], x_base[plan.base_index][:, :, ~inside])
    assert torch.equal(out.base_labels, y_base[plan.base_index])
    assert torch.equal(out.partner_labels, y_partner)


def test_random_epoch_is_cmo_and_inputs_untouched():
    x_base, y_base, x_partner, y_partner = make_batches()
    copies = [t.clone() for t in (x_base, y_base, x_partner, y_partner)]
    mixer = OTMix(num_classes=4)
    mixer.ot_epoch = False
    plan = mixer.plan(x_base, y_base, x_partner, y_partner,
                      generator=torch.Generator().manual_seed(0),
                      model=FeatureModel())
    cmo = create_mixer("cmo", alpha=4.0).plan(x_base, y_base, x_partner, y_partner,
                                              generator=torch.Generator().manual_seed(0))
    assert plan.box == cmo.box and torch.equal(plan.partner_index, cmo.partner_index)
    for before, after in zip(copies, (x_base, y_base, x_partner, y_partner), strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize("mu", [1.0, 2.0])
def test_ot_epoch_frequency_follows_power_schedule(mu):
    mixer = OTMix(num_classes=3, mu=mu)
    g = torch.Generator().manual_seed(0)
    total, trials = 10, 2000
    for epoch in (1, 4, 9):
        p = ((epoch + 1) / total) ** mu
        hits = sum(mixer.set_epoch(epoch, total, g) for _ in range(trials))
        sigma = (p * (1 - p) / trials) ** 0.5
        assert abs(hits / trials - p) <= 4 * sigma + 1e-9, (epoch, hits / trials, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("selection", ["argmax", "sample", "softmax", "confusion"])
def test_selections_run_on_device(device, selection):
    x_base, y_base, x_partner, y_partner = (t.to(device) for t in make_batches())
    mixer = OTMix(num_classes=4, selection=selection)
    mixer.update_confusion(confusion_pointing_to())
    out = mixer(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(0),
                model=FeatureModel().to(device))
    assert out.images.device.type == device and out.images.dtype == x_base.dtype
    stats = mixer.end_epoch(None)
    assert sum(map(sum, stats["mix_pairs"])) == 32 and stats["ot_batch_fraction"] == 1.0


def test_features_do_not_touch_batchnorm_statistics():
    model = create_model("resnet20", 4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x_base, y_base, x_partner, y_partner = make_batches(b=8)
    OTMix(num_classes=4).plan(x_base, y_base, x_partner, y_partner,
                              generator=torch.Generator().manual_seed(0),
                              model=model)
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_confusion_modes_and_state_round_trip():
    adaptive, fixed = OTMix(num_classes=3), OTMix(num_classes=3, confusion_mode="fixed")
    first, second = torch.eye(3) + 1, torch.eye(3) * 5 + 1
    for m in (adaptive, fixed):
        m.update_confusion(first)
        m.update_confusion(second)
    assert torch.equal(adaptive.confusion, second) and torch.equal(fixed.confusion, first)
    clone = OTMix(num_classes=3)
    clone.load_state_dict(adaptive.state_dict())
    assert torch.equal(clone.affinity(torch.device("cpu")), adaptive.affinity(torch.device("cpu")))


def test_state_holds_the_epoch_and_its_switch():
    """A plain loop that resumes mid-epoch without calling set_epoch must keep a random-pairing
    epoch random (a restored mixer used to start with ot_epoch=True)."""
    mixer = OTMix(num_classes=3, mu=50.0)  # P(OT) at epoch 5 of 10: (6/10)^50, so random
    assert mixer.set_epoch(5, 10, torch.Generator().manual_seed(0)) is False
    mixer.update_confusion(torch.eye(3) + 1)
    resumed = OTMix(num_classes=3, mu=50.0)
    resumed.load_state_dict(mixer.state_dict())
    assert resumed.ot_epoch is False and resumed.epoch == 5
    x_base, y_base, x_partner, y_partner = make_batches(k=3)
    args = (x_base, y_base, x_partner, y_partner)
    plans = [m.plan(*args, generator=torch.Generator().manual_seed(4), model=FeatureModel())
             for m in (mixer, resumed)]
    assert torch.equal(plans[0].base_index, plans[1].base_index)
    assert resumed.stats["ot_batches"] == 0


def test_a_confusion_of_another_size_is_refused():
    mixer = OTMix(num_classes=4)
    for bad in (torch.ones(10, 10), torch.ones(3, 3)):
        with pytest.raises(ValueError, match=r"4 classes needs a \(4, 4\) confusion matrix"):
            mixer.update_confusion(bad)
        with pytest.raises(ValueError, match=r"\(4, 4\) confusion matrix, got \(\d+, \d+\)"):
            mixer.load_state_dict({"confusion": bad})
    assert mixer.confusion is None


@pytest.mark.parametrize("change, needle", [
    (lambda y: y.to(torch.uint8), "integer class indices"),
    (lambda y: y.bool(), "integer class indices"),
    (lambda y: y.float(), "integer class indices"),
    (lambda y: y[:, None], r"base labels must be \(B,\), got \(32, 1\)"),  # not a range error
    (lambda y: y[0], r"base labels must be \(B,\), got \(\)"),
    (lambda y: y[:-1], "one label per image: 32 base images with 31 labels")],
    ids=["uint8", "bool", "float", "column", "scalar", "short"])
def test_labels_that_are_not_class_indices_are_refused_in_one_line(change, needle):
    x_base, y_base, x_partner, y_partner = make_batches()
    with pytest.raises(ValueError, match=needle):
        OTMix(num_classes=4)(x_base, change(y_base), x_partner, y_partner,
                             generator=torch.Generator(), model=FeatureModel())


@pytest.mark.parametrize("side, bad", [("partner", 4), ("partner", -1), ("base", -1),
                                        ("base", 4)])
@pytest.mark.parametrize("ot_probability", [1.0, 0.0])
def test_labels_outside_the_classes_are_refused_on_every_epoch(side, bad, ot_probability):
    """-1 would index the last class of the cost and land on a valid cell of the pair counts
    (partner * K + base): refused before either, on OT and random epochs alike."""
    x_base, y_base, x_partner, y_partner = make_batches()
    labels = {"base": y_base, "partner": y_partner}
    labels[side] = torch.where(labels[side] == 1, bad, labels[side])
    mixer = OTMix(num_classes=4, ot_probability=ot_probability)
    with pytest.raises(ValueError, match=rf"^OTMix {side} labels must be class indices in "
                                         rf"\[0, 4\), got {bad}$"):
        mixer(x_base, labels["base"], x_partner, labels["partner"],
              generator=torch.Generator(), model=FeatureModel())


def test_int32_labels_come_back_int64():
    x_base, y_base, x_partner, y_partner = make_batches()
    out = OTMix(num_classes=4)(x_base, y_base.int(), x_partner, y_partner.int(),
                               generator=torch.Generator(), model=FeatureModel())
    assert out.base_labels.dtype == out.partner_labels.dtype == torch.int64
    assert out.soft_targets(4).shape == (32, 4)


def test_a_partner_batch_on_another_device_is_refused_before_the_features():
    """``meta`` stands in for a GPU: a partner batch left on the CPU is one clear line, not
    an error from inside the feature pass."""
    x_base, y_base, x_partner, y_partner = make_batches()
    calls = []

    def embed(images):
        calls.append(images.device)
        return images.mean(dim=(2, 3))

    with pytest.raises(ValueError, match=r"one device, got x on meta, y on meta, "
                                         r"x_partner on cpu, y_partner on cpu"):
        OTMix(num_classes=4)(x_base.to("meta"), y_base.to("meta"), x_partner, y_partner,
                             generator=torch.Generator(), embed=embed)
    assert calls == []


def test_partner_images_unlike_the_bases_and_counts_of_another_length_are_one_line():
    """A float64 partner batch used to meet the float32 model inside the feature pass, a
    5-D batch inside conv2d, and class counts for 6 classes an OTMix of 4 silently."""
    x_base, y_base, x_partner, y_partner = make_batches()
    calls = []

    def embed(images):
        calls.append(images.dtype)
        return images.mean(dim=(2, 3))

    for xb, xp, needle in (
            (x_base, x_partner.double(), r"OTMix: partner images \(32, 3, 16, 16\) "
                                          r"torch.float64 must match the base images'"),
            (x_base, x_partner[:, :, :8], r"must match the base images' \(C, H, W\)"),
            (x_base[None], x_partner, r"OTMix takes a batch of images \(B, C, H, W\), got "
                                      r"\(1, 32, 3, 16, 16\)")):
        with pytest.raises(OtltError, match=needle):
            OTMix(num_classes=4)(xb, y_base, xp, y_partner, generator=torch.Generator(),
                                 embed=embed)
    assert calls == []
    with pytest.raises(OtltError, match="class_counts has 6 entries for num_classes=4"):
        OTMix(class_counts=[1, 2, 3, 4, 5, 6], num_classes=4)
    assert OTMix(class_counts=[5, 1]).num_classes == 2


def test_sample_plan_artifact_at_chosen_epoch():
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer = OTMix(num_classes=4, plan_epochs=[2], plan_size=5)
    mixer.set_epoch(2, 3, torch.Generator().manual_seed(0))
    mixer.ot_epoch = True
    mixer.plan(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(0),
               model=FeatureModel())
    artifacts = mixer.pop_artifacts()
    plan = artifacts["plans/epoch_0002.json"]
    rows = torch.tensor(plan["plan"]).sum(1)
    assert torch.allclose(rows, torch.full((5,), 0.2), atol=1e-4)
    assert len(plan["fore_labels"]) == 5 and mixer.pop_artifacts() == {}


def _ot_batch(mixer: OTMix, epoch: int, ot: bool) -> dict:
    """One batch of ``epoch`` with the epoch's switch forced to ``ot``; the artifacts."""
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer.set_epoch(epoch, 10, torch.Generator().manual_seed(epoch))
    mixer.ot_epoch = ot
    mixer.plan(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(0),
               model=FeatureModel())
    return mixer.pop_artifacts()


def test_a_plan_asked_for_a_random_pairing_epoch_comes_from_the_next_ot_epoch():
    """Epoch 3 draws random pairing (no plan there): epoch 4's first OT batch serves both 3
    and 4, once; epoch 6 is served by epoch 6 itself. The served epochs survive a resume."""
    mixer = OTMix(num_classes=4, plan_epochs=[3, 4, 6], plan_size=5)
    assert _ot_batch(mixer, 2, ot=True) == {}
    assert _ot_batch(mixer, 3, ot=False) == {}
    kept = _ot_batch(mixer, 4, ot=True)
    assert list(kept) == ["plans/epoch_0004.json"]
    assert kept["plans/epoch_0004.json"]["requested_epochs"] == [3, 4]
    assert _ot_batch(mixer, 4, ot=True) == {}  # once per requested epoch
    resumed = OTMix(num_classes=4, plan_epochs=[3, 4, 6], plan_size=5)
    resumed.load_state_dict(mixer.state_dict())
    assert _ot_batch(resumed, 5, ot=True) == {}
    assert list(_ot_batch(resumed, 6, ot=True)) == ["plans/epoch_0006.json"]


def test_a_state_from_before_served_epochs_counts_earlier_requests_as_served():
    """A ``last.pt`` written before ``plans_served`` existed: the epochs before the resume
    are not kept again (they were kept then, or never will be)."""
    mixer = OTMix(num_classes=4, plan_epochs=[3, 6], plan_size=5)
    mixer.load_state_dict({"confusion": None})
    assert _ot_batch(mixer, 5, ot=True) == {}
    assert list(_ot_batch(mixer, 6, ot=True)) == ["plans/epoch_0006.json"]


@pytest.mark.slow
def test_resume_into_ot_epoch_reproduces_uninterrupted_run(tiny_zip, tmp_path, capsys):
    config = tmp_path / "otmix.yaml"
    config.write_text("name: tiny\nmix: {name: otmix, skip_first: 1, skip_last: 0, prob: 1.0,"
                      " params: {ot_probability: 1.0, plan_epochs: [2]}}\n")
    base = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=3)
    assert main(["train", "--config", str(config), *sets(base + ["name=full"])]) == 0
    assert main(["train", "--config", str(config), "--stop-after", "2",
                 *sets(base + ["name=part"])]) == 0
    part = tmp_path / "runs" / "part"
    assert main(["train", "--resume", str(part)]) == 0
    capsys.readouterr()
    a = load_checkpoint(tmp_path / "runs" / "full" / "last.pt")
    b = load_checkpoint(part / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["mixer"]["confusion"], b["mixer"]["confusion"])
    records = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["ot_epoch"] is True and records[-1]["ot_batch_fraction"] == 1.0
    assert (tmp_path / "runs" / "full" / "plans" / "epoch_0002.json").is_file()


@pytest.mark.parametrize("blend", ["mixup", "saliencymix"])
def test_blends_for_balanced_data(blend):
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer = OTMix(num_classes=4, blend=blend)
    mixer.update_confusion(confusion_pointing_to())
    out = mixer(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(0),
                model=FeatureModel())
    base = x_base[out.plan.base_index]
    if blend == "mixup":
        assert out.plan.box is None
        assert torch.allclose(out.images, out.plan.lam * base + (1 - out.plan.lam) * x_partner,
                              atol=1e-5)
    else:
        y0, y1, x0, x1 = out.plan.box
        assert torch.equal(out.images[:, :, y0:y1, x0:x1], x_partner[:, :, y0:y1, x0:x1])


def test_unconverged_sinkhorn_is_counted_per_epoch_not_warned_per_batch(recwarn):
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer = OTMix(num_classes=4, max_iter=2, tol=1e-12)
    mixer.update_confusion(confusion_pointing_to())
    for seed in range(3):
        mixer(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(seed),
              model=FeatureModel())
    stats = mixer.end_epoch(None)
    assert stats["ot_converged_fraction"] == 0.0 and stats["ot_mean_iters"] == 2
    assert not [w for w in recwarn if "did not converge" in str(w.message)]


@pytest.mark.parametrize("mode", ["pooled_eval", "official"])
def test_feature_mode_official_moves_batchnorm_and_the_default_does_not(mode):
    from otlt.engine.batchnorm import batchnorm_state
    from otlt.models import create_model
    from otlt.models.features import feature_fn

    model = create_model("resnet20", 4, generator=torch.Generator().manual_seed(0))
    model.train()
    before = batchnorm_state(model)
    mixer = OTMix(class_counts=[8, 4, 2, 2], feature_mode=mode, ot_probability=1.0)
    g = torch.Generator().manual_seed(1)
    mixer.set_epoch(0, 10, generator=g)
    x, x_partner = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
    y, y_partner = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3]), torch.tensor([3, 2, 1, 0, 3, 2, 1, 0])
    mixer(x, y, x_partner, y_partner, generator=g, model=model)
    after = batchnorm_state(model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert model.training  # the caller's mode is restored either way
    if mode == "official":
        # two train-mode passes (backgrounds, then foregrounds) through every BN layer
        assert int(after["bn1.num_batches_tracked"]) == int(before["bn1.num_batches_tracked"]) + 2
        assert len(moved) == len(before)
        z = feature_fn(model, "official")(x)
        assert z.shape == (8, 64 * 8 * 8)  # Sequential(children[:-1]) output, flattened
    else:
        assert moved == []


def test_softmax_selection_is_in_effect_uniform_random_pairing():
    """Plan entries are at most 1/B (uniform marginals), so softmax(T[i, :]) is within
    e^{1/B} of uniform: at B = 128 and eps = 0.01 no row prefers any background by more
    than 0.8%."""
    from otlt.transport import sinkhorn
    gen = torch.Generator().manual_seed(0)
    b = 128
    cost = torch.rand(b, b, generator=gen)
    plan = sinkhorn(cost, eps=0.01, max_iter=5000, warn=False).coupling
    assert float(plan.max()) <= 1.0 / b + 1e-6
    rows = torch.softmax(plan, dim=1)
    ratio = float((rows.max(1).values / rows.min(1).values).max())
    assert 1.0 < ratio <= math.exp(1.0 / b) + 1e-6 and ratio < 1.008
    # while the plan itself concentrates: every row's largest entry is over 10 times the
    # uniform plan's 1/B^2
    assert float((plan.max(1).values * b * b).min()) > 10


def test_otmix_without_features_refuses_instead_of_pairing_at_random():
    """Issue 32 item 5: no model= / embed= used to turn OT epochs into CMO silently."""
    x_base, y_base, x_partner, y_partner = make_batches(b=8)
    mixer = OTMix(num_classes=4)
    for ot in (True, False):  # a random epoch refuses too: the run fails at its first batch
        mixer.ot_epoch = ot
        with pytest.raises(OtltError, match="^OTMix needs features for its OT epochs: pass "
                                             "model= or embed=, or use CMO for random pairing$"):
            mixer(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(0))
    never = OTMix(num_classes=4, ot_probability=0.0)  # no OT epoch ever: CMO without features
    plan = never.plan(x_base, y_base, x_partner, y_partner,
                      generator=torch.Generator().manual_seed(0))
    cmo = create_mixer("cmo", alpha=4.0).plan(x_base, y_base, x_partner, y_partner,
                                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(plan.partner_index, cmo.partner_index)
    assert never.end_epoch(None)["ot_epoch"] is False


@pytest.mark.parametrize("bad", [lambda x: x, lambda x: x.flatten(1)[:-1], lambda x: "z"])
def test_embed_of_the_wrong_shape_is_refused_in_one_line(bad):
    from otlt.errors import OtltError

    x_base, y_base, x_partner, y_partner = make_batches(b=4)
    with pytest.raises(OtltError, match=r"embed must map images \(N, C, H, W\) to features "
                                        r"\(N, D\); for 8 images it returned"):
        OTMix(num_classes=4)(x_base, y_base, x_partner, y_partner,
                             generator=torch.Generator().manual_seed(0),
                             embed=bad)


@pytest.mark.parametrize("check_every", [10, 1, 7])
def test_check_every_reaches_the_solver_and_the_epoch_statistics(check_every, monkeypatch):
    solved, solve = [], otmix_module.sinkhorn

    def spy(cost, **kw):
        result = solve(cost, **kw)
        solved.append((kw["check_every"], result.n_iter, result.converged))
        return result

    monkeypatch.setattr(otmix_module, "sinkhorn", spy)
    x_base, y_base, x_partner, y_partner = make_batches()
    mixer = OTMix(num_classes=4, check_every=check_every)
    mixer.update_confusion(confusion_pointing_to())
    for seed in range(3):
        mixer(x_base, y_base, x_partner, y_partner, generator=torch.Generator().manual_seed(seed),
              model=FeatureModel())
    stats = mixer.end_epoch(None)
    assert [k for k, _, _ in solved] == [check_every] * 3
    # Convergence is tested after the two opening iterations, then every check_every.
    assert all((n - 2) % check_every == 0 for _, n, _ in solved)
    assert stats["ot_mean_iters"] == sum(n for _, n, _ in solved) / 3
    assert stats["ot_converged_fraction"] == sum(c for _, _, c in solved) / 3 == 1.0


def test_default_check_every_is_the_solvers_default():
    default = inspect.signature(sinkhorn).parameters["check_every"].default
    assert OTMix(num_classes=4).check_every == default == 10  # committed runs stay identical


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_check_every_is_refused(bad):
    with pytest.raises(ValueError, match="check_every must be a positive integer"):
        OTMix(num_classes=4, check_every=bad)


def test_inputs_are_checked_once_per_call_and_by_a_direct_plan(monkeypatch):
    """``__call__`` checks the batch and the partner batch once (not again in ``plan``); a
    direct ``plan`` call checks them itself, integer images included (features need floats)."""
    import otlt.mixing.base as base_module
    from otlt.errors import OtltError

    checked = []
    real_check = base_module.check_model_inputs

    def counting(images, *args, **kwargs):
        checked.append(images.data_ptr())
        return real_check(images, *args, **kwargs)

    monkeypatch.setattr(base_module, "check_model_inputs", counting)
    monkeypatch.setattr(otmix_module, "check_model_inputs", counting, raising=False)
    torch.manual_seed(0)
    model = create_model("resnet20", 3)
    x, xp = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0])
    g = torch.Generator().manual_seed(0)
    otmix = OTMix(class_counts=[5, 3, 2], ot_probability=1.0)
    otmix.set_epoch(0, 1, generator=g)
    otmix(x, y, xp, y, generator=g, model=model)
    assert checked == [x.data_ptr(), xp.data_ptr()]
    checked.clear()
    create_mixer("cmo")(x, y, xp, y, generator=g)
    assert checked == [x.data_ptr(), xp.data_ptr()]
    checked.clear()
    otmix.plan(x, y, xp, y, generator=g, model=model)
    assert checked == [x.data_ptr(), xp.data_ptr()]
    ints = (xp * 50).clamp(0, 255).to(torch.uint8)  # (B, C, H, W), integer
    with pytest.raises(OtltError, match="OTMix takes model inputs, float"):
        otmix.plan(x, y, ints, y, generator=g, model=model)
    with pytest.raises(OtltError, match="OTMix takes model inputs, float"):
        otmix(x, y, ints, y, generator=g, model=model)


def test_a_subclass_plan_is_what_call_runs():
    """``__call__`` plans through the public ``plan``, so a user's override is honoured."""
    seen = []

    class Logged(OTMix):
        def plan(self, *args, **kwargs):
            seen.append(1)
            return super().plan(*args, **kwargs)

    x, xp = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0])
    mixer = Logged(class_counts=[5, 3, 2], ot_probability=0.0)
    mixer(x, y, xp, y, generator=torch.Generator().manual_seed(0))
    assert seen == [1]

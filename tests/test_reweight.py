"""OT re-weighting: cost, OT loss vs POT, gradients, learned weights, meta split, stage 2."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import ot
import pytest
import torch

from conftest import load_script, sets, tiny_overrides
from otlt.cli import main
from otlt.config import load_config, to_dict
from otlt.data.longtail import build_splits
from otlt.data.prepare import prepare_data
from otlt.engine.checkpoint import load_checkpoint
from otlt.errors import OtltError
from otlt.losses import class_balanced_weights
from otlt.reweight import OTReweighter, class_prototypes, ot_reweight_loss, reweight_cost


def _clusters(counts: list[int], dim: int, gen: torch.Generator,
              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Nonnegative features ``(N, dim)`` around one axis per class, like post-ReLU features."""
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    feats = 0.3 * torch.rand(len(labels), dim, generator=gen, dtype=dtype)
    feats[torch.arange(len(labels)), labels] += 1.0
    return feats, labels


# ---- cost and OT loss ----------------------------------------------------------------------


def test_cost_equals_hand_computed_case():
    meta = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    batch = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    meta_y, y = torch.tensor([0, 1]), torch.tensor([0, 0])
    c = 1 - 1 / math.sqrt(2)
    feature = torch.tensor([[0.0, c], [1.0, c]])
    label_mse = torch.tensor([[0.0, 0.0], [0.5, 0.5]])  # 2/K with K = 4
    kw = {"num_classes": 4}
    assert torch.allclose(reweight_cost(meta, meta_y, batch, y, feature_weight=1.0, **kw),
                          feature)
    assert torch.allclose(reweight_cost(meta, meta_y, batch, y, feature_weight=0.0, **kw),
                          label_mse)
    assert torch.allclose(reweight_cost(meta, meta_y, batch, y, **kw),
                          0.5 * feature + 0.5 * label_mse)
    binary = reweight_cost(meta, meta_y, batch, y, feature_weight=0.0,
                           label_distance="binary", **kw)
    assert torch.equal(binary, 2 * label_mse)


def test_prototypes_are_class_means_of_features_and_images():
    x = torch.arange(24.0).reshape(4, 2, 3)
    means, labels = class_prototypes(x, torch.tensor([1, 0, 1, 0]), 2)
    assert torch.equal(labels, torch.tensor([0, 1]))
    assert torch.equal(means[0], (x[1] + x[3]) / 2) and torch.equal(means[1], (x[0] + x[2]) / 2)
    with pytest.raises(OtltError, match="classes \\[2\\]"):
        class_prototypes(x, torch.tensor([1, 0, 1, 0]), 3)


@pytest.mark.parametrize("cost", ["label", "feature", "combined"])
@pytest.mark.parametrize("prototypes", [True, False])
def test_ot_loss_equals_pot_entropic_value(cost, prototypes):
    gen = torch.Generator().manual_seed(3)
    meta_z, meta_y = _clusters([3, 3, 3], 5, gen, torch.float64)
    z, y = _clusters([3, 2, 2], 5, gen, torch.float64)
    raw = torch.randn(7, generator=gen, dtype=torch.float64)
    rw = OTReweighter(y, 3, cost=cost, tol=1e-12, max_iter=20000)
    rw.set_meta(meta_z, meta_y, prototypes=prototypes)
    value = rw.ot_loss(z, y, raw)
    assert len(rw.meta_labels) == (3 if prototypes else 9)
    c = reweight_cost(rw.meta_features, rw.meta_labels, z, y, num_classes=3,
                      feature_weight=rw.feature_weight).numpy()
    a = np.full(c.shape[0], 1.0 / c.shape[0])
    ref = ot.solve(c, a, torch.softmax(raw, 0).numpy(), reg=0.1, max_iter=20000, tol=1e-13)
    assert value.item() == pytest.approx(float(ref.value), rel=1e-8, abs=1e-10)
    # The unregularised OT value is a lower bound that ε = 0.1 stays near on this scale.
    exact = ot.emd2(a, torch.softmax(raw, 0).numpy(), c)
    assert exact <= value.item() + 1e-9


@pytest.mark.parametrize("gradient", ["potentials", "unrolled"])
def test_gradient_in_raw_weights_matches_finite_differences(gradient):
    gen = torch.Generator().manual_seed(5)
    meta_z, meta_y = _clusters([2, 2, 2, 2], 6, gen, torch.float64)
    z, y = _clusters([4, 3, 2, 1], 6, gen, torch.float64)
    rw = OTReweighter(y, 4, tol=1e-13, max_iter=20000, gradient=gradient)
    rw.set_meta(meta_z, meta_y)
    raw = torch.randn(10, generator=gen, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(rw.ot_loss(z, y, raw), raw)
    h = 1e-5
    fd = torch.empty(10, dtype=torch.float64)
    for i in range(10):
        step = torch.zeros(10, dtype=torch.float64)
        step[i] = h
        fd[i] = (rw.ot_loss(z, y, raw.detach() + step)
                 - rw.ot_loss(z, y, raw.detach() - step)) / (2 * h)
    assert torch.allclose(grad, fd, atol=1e-8, rtol=1e-5), (grad, fd)
    assert grad.abs().max() > 1e-3  # a real signal, not a vanishing one
    assert abs(grad.sum().item()) < 1e-9  # softmax: shifting every raw weight changes nothing


def test_potential_and_unrolled_gradients_agree_in_float32():
    gen = torch.Generator().manual_seed(7)
    cost = torch.rand(10, 16, generator=gen)
    w = torch.randn(16, generator=gen, requires_grad=True)
    grads = [torch.autograd.grad(ot_reweight_loss(cost, torch.softmax(w, 0), eps=0.1,
                                                  gradient=g), w)[0]
             for g in ("potentials", "unrolled")]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(OtltError, match="gradient must be one of"):
        ot_reweight_loss(cost, torch.softmax(w, 0), eps=0.1, gradient="implicit")


# ---- the weight step -----------------------------------------------------------------------


def test_initial_weights_are_class_balanced_or_uniform():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    cb = OTReweighter(labels, 3).raw
    assert torch.allclose(cb, class_balanced_weights([3, 1, 2], 0.9999)[labels])
    assert torch.equal(OTReweighter(labels, 3, init="uniform").raw, torch.ones(6))


_SGD = {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}


def _sgd_reweighter(seed: int):
    """Clusters of 12/6/3 training and 2/2/2 meta examples, and a re-weighter on them that
    steps with momentum and weight decay (``_SGD``)."""
    gen = torch.Generator().manual_seed(seed)
    feats, labels = _clusters([12, 6, 3], 4, gen)
    meta_z, meta_y = _clusters([2, 2, 2], 4, gen)
    rw = OTReweighter(labels, 3, **_SGD)
    rw.set_meta(meta_z, meta_y)
    return rw, feats, labels, (meta_z, meta_y)


def test_step_is_sgd_on_the_batch_only_and_lowers_the_loss():
    rw, feats, labels, (meta_z, meta_y) = _sgd_reweighter(11)
    idx = torch.tensor([0, 5, 13, 18, 20])
    leaf = rw.raw[idx].clone().requires_grad_(True)
    reference = torch.optim.SGD([leaf], **_SGD)
    before = rw.raw.clone()
    for _ in range(3):  # the same batch three times: per-example momentum == torch's SGD
        loss_before = rw.ot_loss(feats[idx], labels[idx], rw.raw[idx]).item()
        weights = rw.step(feats[idx], labels[idx], idx)
        reference.zero_grad()
        rw.ot_loss(feats[idx], labels[idx], leaf).backward()
        reference.step()
        assert torch.allclose(rw.raw[idx], leaf.detach(), atol=1e-6)
        assert rw.last_loss.item() == pytest.approx(loss_before, rel=1e-5)
    others = torch.ones(len(labels), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(rw.raw[others], before[others])
    assert torch.allclose(weights, torch.softmax(rw.raw[idx], 0)) and weights.sum() == 1
    plain = OTReweighter(labels, 3, lr=0.05, weight_decay=0.0)
    plain.set_meta(meta_z, meta_y)
    start = plain.ot_loss(feats[idx], labels[idx], plain.raw[idx]).item()
    plain.step(feats[idx], labels[idx], idx)
    assert plain.ot_loss(feats[idx], labels[idx], plain.raw[idx]).item() < start


def test_a_repeated_index_is_one_example_stepped_by_torch_sgd_on_all_weights():
    """A sampler that draws with replacement puts an example in a batch twice. As w_B =
    raw[idx], the example's gradient is the sum of its rows and it takes one SGD step (with
    momentum and weight decay), exactly as torch's SGD on the whole raw vector; before, the
    last row's update overwrote the other's."""
    rw, feats, labels, _ = _sgd_reweighter(12)
    idx = torch.tensor([0, 5, 5, 13, 20, 20, 20])
    whole = rw.raw.clone().requires_grad_(True)
    reference = torch.optim.SGD([whole], **_SGD)
    others = torch.ones(len(labels), dtype=torch.bool)
    others[idx] = False
    for _ in range(3):
        rw.step(feats[idx], labels[idx], idx)
        reference.zero_grad()
        rw.ot_loss(feats[idx], labels[idx], whole[idx]).backward()
        whole.grad[others] = 0.0  # torch would decay every weight: the batch's only here
        with torch.no_grad():
            kept = whole[others].clone()
        reference.step()
        with torch.no_grad():
            whole[others] = kept
        assert torch.allclose(rw.raw, whole.detach(), atol=1e-6)


def test_reweighter_labels_outside_the_classes_are_refused():
    with pytest.raises(OtltError, match=r"labels must be in \[0, 3\) for num_classes=3, "
                                        r"got 0 to 3"):
        OTReweighter(torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(OtltError, match=r"training labels must be \(B,\), got \(2, 2\)"):
        OTReweighter(torch.zeros(2, 2, dtype=torch.long), 3)
    with pytest.raises(OtltError, match="training labels must be integer class indices"):
        OTReweighter(torch.tensor([0.0, 1.0, 2.0]), 3)
    assert OTReweighter([0, 1, 2, 1], 3).labels.tolist() == [0, 1, 2, 1]  # a list is fine


def test_meta_and_batch_labels_are_checked_before_they_meet_the_cost():
    """Labels a cost would compare as given (shifted past the classes, float) are refused
    in one line: wrong ones silently changed the weights before."""
    gen = torch.Generator().manual_seed(13)
    feats, labels = _clusters([6, 3, 3], 4, gen)
    meta_z, meta_y = _clusters([2, 2, 2], 4, gen)
    rw = OTReweighter(labels, 3)
    for bad, needle in ((meta_y + 1, r"meta labels must be class indices in \[0, 3\), got 3"),
                        (meta_y.float(), "meta labels must be integer class indices"),
                        (meta_y[:5], "one label per meta example: 6 features, 5 labels")):
        with pytest.raises(OtltError, match=needle):
            rw.set_meta(meta_z, bad)
    rw.set_meta(meta_z, meta_y.tolist())  # a list is fine
    idx = torch.tensor([0, 6, 9])
    before = rw.raw.clone()
    for bad, needle in ((labels[idx] + 10, r"batch labels must be class indices in \[0, 3\)"),
                        (labels[idx] - 5, r"batch labels must be class indices in \[0, 3\)"),
                        (labels[idx].float(), "batch labels must be integer class indices")):
        with pytest.raises(OtltError, match=needle):
            rw.step(feats[idx], bad, idx)
    with pytest.raises(OtltError, match="indices must be positions in the training set, 0 to 11"):
        rw.step(feats[idx], labels[idx], idx + 10)
    assert torch.equal(rw.raw, before)  # no step was taken
    rw.step(feats[idx], labels[idx].int(), idx)  # int32 labels are cast
    assert not torch.equal(rw.raw, before)


def test_a_batch_that_cannot_meet_the_meta_set_is_one_line():
    gen = torch.Generator().manual_seed(13)
    feats, labels = _clusters([6, 3, 3], 4, gen)
    meta_z, meta_y = _clusters([2, 2, 2], 4, gen)
    rw = OTReweighter(labels, 3)
    rw.set_meta(meta_z, meta_y)
    idx = torch.arange(4)
    for bad_feats, bad_labels, needle in (
            (feats[idx].view(4, 1, 2, 2), labels[idx], r"got \(4, 1, 2, 2\) and \(4,\)"),
            (feats[idx, :3], labels[idx], r"got \(4, 3\) and \(4,\)"),
            (feats[idx], labels[:3], r"got \(4, 4\) and \(3,\)")):
        with pytest.raises(OtltError, match=r"features \(B, D\) = \(4, 4\) .* " + needle):
            rw.step(bad_feats, bad_labels, idx)
    with pytest.raises(OtltError, match="takes tensors, got features Tensor and labels list"):
        rw.step(feats[idx], labels[idx].tolist(), idx)


def test_raw_mode_returns_raw_weights_and_state_round_trips():
    gen = torch.Generator().manual_seed(2)
    feats, labels = _clusters([5, 3], 3, gen)
    rw = OTReweighter(labels, 2, normalize=False, momentum=0.5)
    rw.set_meta(feats, labels)
    idx = torch.tensor([1, 6, 7])
    weights = rw.step(feats[idx], labels[idx], idx)
    assert torch.equal(weights, rw.raw[idx])
    other = OTReweighter(labels, 2, normalize=False, momentum=0.5)
    other.load_state_dict(rw.state_dict())
    assert torch.equal(other.raw, rw.raw)
    assert torch.equal(other.momentum_buffer, rw.momentum_buffer)
    assert other.momentum_buffer[idx].abs().sum() > 0
    with pytest.raises(RuntimeError, match="8 weights"):
        OTReweighter(labels[:4], 2).load_state_dict(rw.state_dict())
    with pytest.raises(OtltError, match="set_meta"):
        OTReweighter(labels, 2).step(feats[idx], labels[idx], idx)


def test_learned_class_means_rise_from_head_to_tail():
    gen = torch.Generator().manual_seed(0)
    counts = [160, 80, 40, 20, 10]
    feats, labels = _clusters(counts, 8, gen)
    meta_z, meta_y = _clusters([5] * 5, 8, gen)
    rw = OTReweighter(labels, 5, init="uniform", lr=20.0, weight_decay=0.0)
    rw.set_meta(meta_z, meta_y)
    start_mass = rw.class_stats()["weight_class_mass"]
    for _ in range(6):
        for idx in torch.randperm(len(labels), generator=gen).split(32):
            rw.step(feats[idx], labels[idx], idx)
    stats = rw.class_stats()
    means = stats["weight_class_mean"]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    mass = stats["weight_class_mass"]
    assert mass[-1] > 2 * start_mass[-1] and mass[0] < start_mass[0]
    assert max(mass) / min(mass) < 0.5 * max(start_mass) / min(start_mass)
    assert all(s > 0 for s in stats["weight_class_std"])  # per example, not per class


# ---- the meta split ------------------------------------------------------------------------


def test_meta_split_is_disjoint_from_every_other_split(tiny_zip, tmp_path):
    labels = np.repeat(np.arange(10), 60)
    idx = build_splits(labels, 10, imbalance_ratio=10, n_max=60, val_per_class=5,
                       meta_per_class=4, data_seed=1)
    assert np.bincount(labels[idx.meta], minlength=10).tolist() == [4] * 10
    assert not set(idx.meta) & set(idx.train) and not set(idx.meta) & set(idx.val)
    cfg = load_config(None, tiny_overrides(tiny_zip, tmp_path) + ["data.meta_per_class=3"])
    data = prepare_data(cfg.data, 10)

    def digests(split) -> set[str]:
        return {hashlib.sha1(image.tobytes()).hexdigest() for image in split.images}

    meta = digests(data.meta)
    assert len(meta) == 30 and data.split_counts()["meta"] == [3] * 10
    for other in (data.train, data.val, data.test):
        assert not meta & digests(other)


# ---- stage 2 end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1(tiny_zip, tmp_path_factory):
    """A finished 2-epoch stage-1 ERM run on the tiny data with a 3-per-class meta set."""
    root = tmp_path_factory.mktemp("reweight")
    base = tiny_overrides(tiny_zip, root / "runs", epochs=2) + [
        "data.meta_per_class=3", "optim.lr=0.02", "optim.milestones=[]", "optim.gammas=[]"]
    config = root / "stage1.yaml"
    config.write_text("name: stage1\n")
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTLT_CACHE", str(root / "cache"))
        assert main(["train", "--config", str(config), *sets(base + ["name=stage1"])]) == 0
    return {"base": base, "run": root / "runs" / "stage1", "root": root}


def _stage2(stage1, out_dir, name: str, extra: list[str]) -> list[str]:
    return sets(stage1["base"] + [
        f"name={name}", f"out_dir={out_dir}", f"reweight.stage1={stage1['run']}",
        "optim.lr=0.01", "optim.epochs=3", "optim.batch_size=16", "optim.nesterov=true",
        "optim.weight_decay=5e-4", "reweight.weight_lr=0.5", *extra])


@pytest.mark.parametrize("extra", [
    ["reweight.weight_momentum=0.5"],
    ["reweight.bn=train_meta"],
    pytest.param(["reweight.trainable=all", "reweight.meta=pixel_prototype",
                  "reweight.classifier_weights=raw", "reweight.init=uniform"],
                 marks=pytest.mark.slow),
], ids=["fc", "fc_train_meta", "all"])
def test_stage2_resumes_exactly_and_records_weights(stage1, extra, tmp_path, capsys):
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")
    assert main(["train", "--config", str(config), *_stage2(stage1, tmp_path, "full", extra)]) == 0
    assert main(["train", "--config", str(config), "--stop-after", "1",
                 *_stage2(stage1, tmp_path, "part", extra)]) == 0
    part = tmp_path / "part"
    assert main(["train", "--resume", str(part)]) == 0
    capsys.readouterr()
    full = tmp_path / "full"
    a = load_checkpoint(full / "last.pt")
    b = load_checkpoint(part / "last.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["reweighter"]["raw"], b["reweighter"]["raw"])
    ma, mb = a["reweighter"]["momentum_buffer"], b["reweighter"]["momentum_buffer"]
    assert (ma is None and mb is None) or torch.equal(ma, mb)
    assert json.loads((full / "eval.json").read_text())["confusion_matrix"] == \
        json.loads((part / "eval.json").read_text())["confusion_matrix"]

    records = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    full_records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    for key in ("weight_class_mean", "weight_class_std", "weight_class_mass", "ot_loss",
                "ot_grad_norm", "weight_step_change"):
        assert records[-1][key] == full_records[-1][key], key
    assert all(r["ot_grad_norm"] > 0 and 0 < r["weight_step_change"] <= 2 for r in records)
    assert len(records[-1]["weight_class_mean"]) == 10
    assert sum(records[-1]["weight_class_mass"]) == pytest.approx(1.0)
    weights = json.loads((part / "weights.json").read_text())
    assert weights["epoch"] == 2 and len(weights["raw"]) == sum(a["train_counts"])
    assert weights["raw"] == a["reweighter"]["raw"].tolist()

    first = load_checkpoint(stage1["run"] / "last.pt")["model"]
    frozen = [k for k in first if not k.startswith("fc.")]
    moved = [k for k in frozen if first[k].is_floating_point()
             and not torch.equal(first[k], a["model"][k])]
    assert not any(torch.equal(first[k], a["model"][k]) for k in ("fc.weight", "fc.bias"))
    if "reweight.trainable=all" in extra:
        assert moved  # the whole network trains
    elif "reweight.bn=train_meta" in extra:
        # the official BN behaviour: running statistics move, no backbone weight does
        assert moved and all(k.endswith(("running_mean", "running_var")) for k in moved)
    else:
        assert moved == []  # backbone and its BatchNorm statistics stay stage 1's


def test_stage2_user_errors(stage1, tmp_path, capsys):
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")

    def error(extra: list[str]) -> str:
        args = _stage2(stage1, tmp_path, "bad", extra)
        assert main(["train", "--config", str(config), *args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in error([f"reweight.stage1={tmp_path / 'nowhere.pt'}"])
    # The hint names the stage-1 preset the missing path belongs to, not a fixed one.
    missing = tmp_path / "cifar100_lt_r50_ot_reweight_stage1_short" / "last.pt"
    assert "otlt train --preset cifar100_lt_r50_ot_reweight_stage1_short;" in error(
        [f"reweight.stage1={missing}"])
    assert "data.meta_per_class is 0" in error(["data.meta_per_class=0"])
    assert "data.imbalance_ratio=10.0" in error(["data.imbalance_ratio=20"])
    assert "reweight.cost must be one of combined, label, feature" in error(
        ["reweight.cost=euclid"])
    state = load_checkpoint(stage1["run"] / "last.pt")
    state["epoch"] = 0
    torch.save(state, tmp_path / "half.pt")
    assert "stopped after epoch 1 of 2" in error([f"reweight.stage1={tmp_path / 'half.pt'}"])
    assert "steps its model eagerly: drop train.compile" in error(["train.compile=true"])
    assert "needs an in-memory dataset" in error(["data.dataset=imagenet_lt"])
    assert not (tmp_path / "bad").exists()  # nothing written on bad input


def test_stage2_that_died_in_its_first_epoch_restarts_from_stage1(stage1, tmp_path, capsys):
    """``otlt train --resume`` of a stage-2 directory without ``last.pt`` (what the run
    directory's own message suggests) starts afresh: from the stage-1 weights, not from a
    random backbone."""
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")
    args = _stage2(stage1, tmp_path, "died", [])
    assert main(["train", "--config", str(config), "--stop-after", "1", *args]) == 0
    run = tmp_path / "died"
    for name in ("last.pt", "metrics.jsonl", "weights.json", "best.safetensors"):
        (run / name).unlink(missing_ok=True)
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    first = load_checkpoint(stage1["run"] / "last.pt")["model"]
    last = load_checkpoint(run / "last.pt")["model"]
    assert all(torch.equal(first[k], last[k]) for k in first if not k.startswith("fc."))


def test_presets_pair_each_stage2_with_its_stage1():
    configs = Path(__file__).resolve().parent.parent / "configs"
    seconds = sorted(p for p in configs.glob("*_ot_reweight*.yaml") if "stage1" not in p.name)
    assert len(seconds) == 16  # CIFAR-LT-10/100 x phi 200/100/50/20 x full/short
    for path in seconds:
        second = load_config(path)
        first = load_config(configs / path.name.replace("_ot_reweight", "_ot_reweight_stage1"))
        assert second.reweight.stage1 == f"runs/{first.name}/last.pt"
        assert to_dict(second)["data"] == to_dict(first)["data"]
        assert second.model == first.model and first.data.meta_per_class == 10
        assert (second.optim.batch_size, second.optim.lr) == (16, 2e-5)
        if "short" not in path.name:
            assert (first.optim.epochs, second.optim.epochs) == (160, 90)
            assert second.paper["top1_error"] is not None
    phi100 = load_config(configs / "cifar10_lt_r100_ot_reweight.yaml")
    assert phi100.paper["top1_error"] == 18.13


def test_step_reports_gradient_norm_and_weight_change():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    rw = OTReweighter(labels, 3, lr=0.5)
    rw.set_meta(torch.randn(6, 4, generator=gen), torch.tensor([0, 0, 1, 1, 2, 2]))
    idx = torch.arange(6)
    before = torch.softmax(rw.raw[idx].clone(), 0)
    z = torch.randn(6, 4, generator=gen)
    raw = rw.raw[idx].clone()
    h, fd = 1e-3, torch.empty(6)
    for i in range(6):
        step = torch.zeros(6)
        step[i] = h
        fd[i] = (rw.ot_loss(z, labels, raw + step) - rw.ot_loss(z, labels, raw - step)) / (2 * h)
    after = rw.step(z, labels, idx)
    # the logged norm is the norm of the OT loss's gradient (central differences, float32)
    assert float(rw.last_grad_norm) == pytest.approx(float(fd.norm()), rel=1e-3)
    assert float(rw.last_grad_norm) > 1e-3
    torch.testing.assert_close(rw.last_change, (after - before).abs().sum())


def test_stage2_stops_on_a_non_finite_loss(stage1, tmp_path, capsys):
    """Stage 2 shares the engine's epoch loop, and so its loss guard: one line, exit 2."""
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")
    assert main(["train", "--config", str(config),
                 *_stage2(stage1, tmp_path, "diverges", ["optim.lr=1e38"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training loss became inf or NaN in epoch 1/3 at step" in err[0]
    assert not (tmp_path / "diverges" / "last.pt").exists()


def test_stage2_without_ot_step_keeps_the_initial_weights(stage1, tmp_path):
    """``reweight.ot_step: false`` (the ablation baseline): class-balanced weights stay put,
    the classifier still trains, and the OT entries of metrics.jsonl say nothing was measured."""
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")
    assert main(["train", "--config", str(config),
                 *_stage2(stage1, tmp_path, "no_ot", ["reweight.ot_step=false"])]) == 0
    run = tmp_path / "no_ot"
    state = load_checkpoint(run / "last.pt")
    labels = torch.tensor(json.loads((run / "weights.json").read_text())["labels"])
    initial = OTReweighter(labels, 10).raw
    assert torch.equal(state["reweighter"]["raw"], initial)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ot_loss"] is None and r["ot_grad_norm"] is None
               and r["weight_step_change"] is None and r["meta_loss"] > 0 for r in records)
    first = load_checkpoint(stage1["run"] / "last.pt")["model"]
    assert not torch.equal(first["fc.weight"], state["model"]["fc.weight"])
    # the ablation table reads it: nothing moved, nothing measured
    table = load_script("reweight_ablation_table")
    row = table.summary(run, run)
    assert row["changes"] == "the preset" and row["moved"] == 0.0
    assert row["grad_norm"] is None and row["ot_first"] is None
    assert row["test_last"] == json.loads((run / "eval.json").read_text())["top1_error"]
    assert "| no_ot | the preset |" in table.table([row])


def test_gradient_check_script_on_a_trained_stage1(stage1, tmp_path, capsys, monkeypatch):
    """scripts/reweight_gradient_check.py on the tiny stage-1 run: the run's gradient agrees
    with float64 finite differences, and the re-created official optimiser is plain SGD."""
    script = load_script("reweight_gradient_check", monkeypatch)
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")
    out = tmp_path / "check.json"
    flags = sets(stage1["base"] + ["optim.batch_size=16"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OTLT_CACHE", str(stage1["root"] / "cache"))
        mp.setattr("sys.argv", ["check", "--config", str(config), "--stage1", str(stage1["run"]),
                                "--batches", "2", "--out", str(out), *flags])
        assert script.main() == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert result["batches"] == 2 and result["batch_size"] == 16
    assert result["worst"]["fd_rel_error_potentials_float32"] < 1e-3
    assert result["worst"]["fd_rel_error_unrolled_float32"] < 1e-3
    assert result["worst"]["official_optimizer_max_abs_diff"] < 1e-6  # float32 rounding
    assert result["worst"]["bound_ratio_max"] <= 1 + 1e-6  # |dL/dw_i| <= nu_i (max g - min g)
    assert result["max_drift_over_run"] == pytest.approx(
        result["epochs"] * result["mean"]["step_abs_mean"])


def test_stage2_starts_from_a_committed_fp16_stage1_folder(stage1, tmp_path):
    """reweight.stage1 may name a results folder (config.yaml, splits.json, fp16
    last.safetensors) instead of a run with last.pt: stage 2 starts from those weights."""
    import shutil

    from otlt.engine.weights import load_weights, save_weights
    folder = tmp_path / "committed"
    folder.mkdir()
    for name in ("config.yaml", "splits.json"):
        shutil.copy(stage1["run"] / name, folder / name)
    state = load_checkpoint(stage1["run"] / "last.pt")
    save_weights(folder / "last.safetensors", state["model"], epoch=state["epoch"],
                 dtype=torch.float16)
    config = tmp_path / "stage2.yaml"
    config.write_text("name: stage2\n")
    flags = _stage2(stage1, tmp_path, "from_fp16", ["optim.epochs=1"])
    flags[flags.index(f"reweight.stage1={stage1['run']}")] = f"reweight.stage1={folder}"
    assert main(["train", "--config", str(config), "--stop-after", "1", *flags]) == 0
    assert (tmp_path / "from_fp16" / "eval.json").is_file()
    frozen = load_checkpoint(tmp_path / "from_fp16" / "last.pt")["model"]
    fp16 = load_weights(folder / "last.safetensors").model
    key = "layer1.0.conv1.weight"
    assert torch.equal(frozen[key], fp16[key])  # the backbone is the committed fp16 one
    (folder / "splits.json").unlink()
    flags[flags.index("name=from_fp16")] = "name=broken"
    assert main(["train", "--config", str(config), *flags]) == 2  # one-line error

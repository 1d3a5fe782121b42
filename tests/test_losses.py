"""Tests for otlt.losses: closed forms written out with plain ``math`` on tiny cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from otlt.errors import OtltError
from otlt.losses import (
    BalancedSoftmaxLoss,
    LDAMLoss,
    LongTailLoss,
    class_balanced_weights,
    create_loss,
    ldam_margins,
    list_losses,
    loss_defaults,
)

COUNTS = [100, 10, 1]
LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TARGET = [1, 2]
# Cosine-like logits in [-1, 1] for LDAM, whose scale s = 30 would saturate larger ones.
COSINES = [[0.2, -0.1, 0.5], [0.9, 0.3, -0.4]]
COS_TARGET = [2, 0]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="CUDA not available")),
]


def _tensors(logits=LOGITS, target=TARGET, device="cpu"):
    return (torch.tensor(logits, dtype=torch.float32, device=device),
            torch.tensor(target, dtype=torch.int64, device=device))


def _ce(row: list[float], y: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[y]


def _cb_weights(counts: list[int], beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [w * len(counts) / sum(raw) for w in raw]


def _close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.cpu(), torch.tensor(expected), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- class constants


def test_ldam_margins_follow_inverse_fourth_root() -> None:
    # m_k = 0.5 * (n_min / n_k)^(1/4): 0.5 / 100^0.25, 0.5 / 10^0.25, 0.5.
    _close(ldam_margins(COUNTS), [0.15811388, 0.28117066, 0.5], tol=1e-7)
    _close(ldam_margins([16, 1], max_margin=0.2), [0.1, 0.2], tol=1e-7)


def test_class_balanced_weights_exact_values() -> None:
    weights = class_balanced_weights(COUNTS, 0.9999)
    # (1 - b) / (1 - b^n) for n = 100, 10, 1 is 0.0100496, 0.1000450, 1; sum to K = 3.
    _close(weights, [0.02715872, 0.27036887, 2.70247240], tol=1e-6)
    _close(weights, _cb_weights(COUNTS, 0.9999), tol=1e-6)
    assert weights.sum().item() == pytest.approx(3.0, abs=1e-6)


def test_class_balanced_weights_limits() -> None:
    _close(class_balanced_weights(COUNTS, 0.0), [1.0, 1.0, 1.0])
    # beta -> 1: inverse frequency, normalised to sum to K.
    inv = [1 / 100, 1 / 10, 1.0]
    _close(class_balanced_weights(COUNTS, 1 - 1e-12), [3 * v / sum(inv) for v in inv], tol=1e-4)


# --------------------------------------------------------------------------- closed forms


def test_ce_closed_form() -> None:
    logits, target = _tensors()
    expected = [_ce(LOGITS[i], TARGET[i]) for i in range(2)]
    _close(create_loss("ce", COUNTS)(logits, target), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_ldam_closed_form(device: str) -> None:
    logits, target = _tensors(COSINES, COS_TARGET, device)
    margins = [0.5 * (1 / n) ** 0.25 for n in COUNTS]
    expected = []
    for row, y in zip(COSINES, COS_TARGET, strict=True):
        shifted = [30 * (v - (margins[y] if k == y else 0.0)) for k, v in enumerate(row)]
        expected.append(_ce(shifted, y))
    loss = create_loss("ldam", COUNTS).to(device)
    _close(loss(logits, target), expected, tol=1e-4)


def test_ldam_margin_only_touches_true_class() -> None:
    # The margin makes the loss larger; with max_margin=0 LDAM is CE on s * logits.
    logits, target = _tensors(COSINES, COS_TARGET)
    plain = F.cross_entropy(7.0 * logits, target, reduction="none")
    torch.testing.assert_close(create_loss("ldam", COUNTS, max_margin=0.0, s=7.0)(logits, target),
                               plain)
    assert (create_loss("ldam", COUNTS, s=7.0)(logits, target) > plain).all()


@pytest.mark.parametrize("device", DEVICES)
def test_drw_switches_weights_at_drw_epoch(device: str) -> None:
    logits, target = _tensors(device=device)
    ce = [_ce(LOGITS[i], TARGET[i]) for i in range(2)]
    w = _cb_weights(COUNTS, 0.9999)
    loss = create_loss("drw", COUNTS, drw_epoch=5).to(device)
    _close(loss(logits, target), ce)  # epoch 0 before any set_epoch
    loss.set_epoch(4)
    assert loss.class_weights() is None
    _close(loss(logits, target), ce)
    _close(loss.example_weights(target), [1.0, 1.0])
    loss.set_epoch(5)
    _close(loss.class_weights(), w, tol=1e-6)
    _close(loss(logits, target), [w[TARGET[i]] * ce[i] for i in range(2)])
    _close(loss.example_weights(target), [w[1], w[2]], tol=1e-6)
    loss.set_epoch(3)  # going back (e.g. a resumed run) switches them off again
    _close(loss(logits, target), ce)


def test_drw_weighted_mean_matches_torch_weighted_ce() -> None:
    logits, target = _tensors()
    loss = create_loss("drw", COUNTS, drw_epoch=0)
    per_example = loss(logits, target)
    reference = torch.nn.CrossEntropyLoss(weight=class_balanced_weights(COUNTS))(logits, target)
    torch.testing.assert_close(per_example.sum() / loss.example_weights(target).sum(), reference)


def test_ldam_drw_is_weighted_ldam_after_switch() -> None:
    logits, target = _tensors(COSINES, COS_TARGET)
    ldam = create_loss("ldam", COUNTS)(logits, target)
    loss = create_loss("ldam_drw", COUNTS, drw_epoch=2)
    loss.set_epoch(1)
    torch.testing.assert_close(loss(logits, target), ldam)
    loss.set_epoch(2)
    w = _cb_weights(COUNTS, 0.9999)
    _close(loss(logits, target), [w[2] * ldam[0].item(), w[0] * ldam[1].item()])


def test_balanced_softmax_is_ce_on_shifted_logits() -> None:
    logits, target = _tensors()
    total = sum(COUNTS)
    shifted = [[v + math.log(n / total) for v, n in zip(row, COUNTS, strict=True)]
               for row in LOGITS]
    expected = [_ce(shifted[i], TARGET[i]) for i in range(2)]
    for name in ("balanced_softmax", "balms"):
        loss = create_loss(name, COUNTS)
        assert isinstance(loss, BalancedSoftmaxLoss)
        _close(loss(logits, target), expected)


def test_logit_adjusted_closed_form() -> None:
    logits, target = _tensors()
    total = sum(COUNTS)
    shifted = [[v + 0.5 * math.log(n / total) for v, n in zip(row, COUNTS, strict=True)]
               for row in LOGITS]
    expected = [_ce(shifted[i], TARGET[i]) for i in range(2)]
    _close(create_loss("logit_adjusted", COUNTS, tau=0.5)(logits, target), expected)
    ce = create_loss("ce", COUNTS)(logits, target)
    torch.testing.assert_close(create_loss("logit_adjusted", COUNTS, tau=0.0)(logits, target), ce)


def test_focal_closed_form_and_gamma_zero_is_ce() -> None:
    logits, target = _tensors()
    ce = [_ce(LOGITS[i], TARGET[i]) for i in range(2)]
    _close(create_loss("focal", COUNTS, gamma=0.0)(logits, target), ce)
    expected = [(1 - math.exp(-c)) ** 2 * c for c in ce]
    _close(create_loss("focal", COUNTS, gamma=2.0)(logits, target), expected)
    assert loss_defaults("focal") == {"gamma": 1.0}


def test_focal_gradient_finite_for_confident_example() -> None:
    # p_y rounds to 1 in float32; (1 - p)^0.5 has an infinite slope there.
    logits = torch.tensor([[60.0, 0.0, 0.0]], requires_grad=True)
    create_loss("focal", COUNTS, gamma=0.5)(logits, torch.tensor([0])).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_cb_softmax_closed_form() -> None:
    logits, target = _tensors()
    w = _cb_weights(COUNTS, 0.999)
    expected = [w[TARGET[i]] * _ce(LOGITS[i], TARGET[i]) for i in range(2)]
    _close(create_loss("cb_softmax", COUNTS, beta=0.999)(logits, target), expected)


def _manual_cb_sigmoid(beta: float, gamma: float) -> list[float]:
    w = _cb_weights(COUNTS, beta)
    out = []
    for row, y in zip(LOGITS, TARGET, strict=True):
        total = 0.0
        for k, z in enumerate(row):
            p = 1 / (1 + math.exp(-z))
            p_t = p if k == y else 1 - p
            total += (1 - p_t) ** gamma * -math.log(p_t)
        out.append(w[y] * total)
    return out


def test_cb_sigmoid_matches_manual_bce() -> None:
    logits, target = _tensors()
    loss = create_loss("cb_sigmoid", COUNTS, beta=0.99)
    _close(loss(logits, target), _manual_cb_sigmoid(0.99, 0.0))
    w = class_balanced_weights(COUNTS, 0.99)[target][:, None].expand(-1, 3)
    bce = F.binary_cross_entropy_with_logits(logits, F.one_hot(target, 3).float(), weight=w,
                                             reduction="none").sum(dim=1)
    torch.testing.assert_close(loss(logits, target), bce)


def test_cb_focal_closed_form() -> None:
    logits, target = _tensors()
    _close(create_loss("cb_focal", COUNTS, gamma=2.0)(logits, target),
           _manual_cb_sigmoid(0.9999, 2.0))
    torch.testing.assert_close(create_loss("cb_focal", COUNTS, gamma=0.0)(logits, target),
                               create_loss("cb_sigmoid", COUNTS)(logits, target))


# --------------------------------------------------------------------------- mixed targets


def test_mixed_ldam_differs_from_soft_target_ce() -> None:
    # LDAM's margin belongs to each label, so the mix is not CE against soft labels.
    loss = create_loss("ldam", COUNTS)
    logits, base_labels = _tensors(COSINES, COS_TARGET)
    partner_labels = torch.tensor([0, 1])
    mixed = 0.5 * loss(logits, base_labels) + 0.5 * loss(logits, partner_labels)
    soft = 0.5 * F.one_hot(base_labels, 3) + 0.5 * F.one_hot(partner_labels, 3)
    assert not torch.allclose(mixed, F.cross_entropy(30 * logits, soft, reduction="none"))


# --------------------------------------------------------------------------- buffers, dtypes


@pytest.mark.parametrize("name", list_losses())
def test_class_constants_are_buffers_in_state_dict(name: str) -> None:
    loss = create_loss(name, COUNTS)
    state = loss.state_dict()
    assert state["class_counts"].tolist() == COUNTS
    expected_keys = {"class_counts"}
    expected_keys |= {"cb_weights"} if "beta" in loss_defaults(name) else set()
    expected_keys |= {"margins"} if name.startswith("ldam") else set()
    expected_keys |= {"log_prior"} if name in ("balanced_softmax", "logit_adjusted") else set()
    assert set(state) == expected_keys
    fresh = create_loss(name, [5, 5, 5])
    fresh.load_state_dict(state)
    for key, value in state.items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


@pytest.mark.parametrize("device", DEVICES)
def test_buffers_move_with_to(device: str) -> None:
    loss = create_loss("ldam_drw", COUNTS).to(device)
    assert {b.device.type for b in loss.buffers()} == {device}
    loss.set_epoch(160)
    logits, target = _tensors(COSINES, COS_TARGET, device)
    assert loss(logits, target).device.type == device


@pytest.mark.parametrize("name", list_losses())
def test_half_precision_logits_give_float32_loss(name: str) -> None:
    loss = create_loss(name, COUNTS)
    logits, target = _tensors(COSINES, COS_TARGET)
    reference = loss(logits, target)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        out = loss(low, target)
        assert out.dtype == torch.float32
        # Computed exactly as on the upcast input; only the input rounding differs.
        torch.testing.assert_close(out, loss(low.float(), target), rtol=0, atol=0)
        torch.testing.assert_close(out, reference, rtol=5e-2, atol=5e-2)


def test_autocast_bf16_logits_give_float32_loss() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        out = create_loss("ldam", COUNTS)(logits, torch.tensor([0, 2]))
    assert logits.dtype == torch.bfloat16
    assert out.dtype == torch.float32


def test_float64_logits_stay_float64_and_gradients_check() -> None:
    gen = torch.Generator().manual_seed(1)
    target = torch.tensor([0, 2, 1])
    for name in list_losses():
        loss = create_loss(name, COUNTS, **({"drw_epoch": 0} if "drw_epoch" in
                                            loss_defaults(name) else {}))
        logits = (0.5 * torch.randn(3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
        assert loss(logits, target).dtype == torch.float64
        assert torch.autograd.gradcheck(lambda z, f=loss: f(z, target), (logits,)), name


def test_shape_and_label_errors() -> None:
    loss = create_loss("ce", COUNTS)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        loss(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer labels"):
        loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------- registry


def test_list_losses_names() -> None:
    assert list_losses() == ["ce", "drw", "ldam", "ldam_drw", "balanced_softmax", "focal",
                             "cb_softmax", "cb_sigmoid", "cb_focal", "logit_adjusted"]
    assert all(isinstance(create_loss(n, COUNTS), LongTailLoss) for n in list_losses())


def test_registry_defaults() -> None:
    loss = create_loss("LDAM-DRW", COUNTS)
    assert isinstance(loss, LDAMLoss) and loss.name == "ldam_drw"
    assert (loss.s, loss.max_margin, loss.beta, loss.drw_epoch) == (30.0, 0.5, 0.9999, 160)
    assert loss_defaults("drw") == {"beta": 0.9999, "drw_epoch": 160}
    assert loss_defaults("balms") == {}


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(OtltError, match="unknown loss 'ldma'.*ldam_drw.*logit_adjusted"):
        create_loss("ldma", COUNTS)


def test_unknown_kwarg_lists_valid_keys() -> None:
    with pytest.raises(OtltError, match="gama.*valid: beta, gamma"):
        create_loss("cb_focal", COUNTS, gama=2.0)
    with pytest.raises(OtltError, match="gamma.*valid: none"):
        create_loss("ce", COUNTS, gamma=2.0)


@pytest.mark.parametrize(
    ("name", "counts", "kwargs", "message"),
    [
        ("drw", COUNTS, {"beta": 1.0}, "beta must be in"),
        ("cb_softmax", COUNTS, {"beta": -0.1}, "beta must be in"),
        ("focal", COUNTS, {"gamma": -1.0}, "gamma must be in"),
        ("ldam", COUNTS, {"s": 0.0}, "s must be in"),
        ("ldam", COUNTS, {"max_margin": float("nan")}, "max_margin must be in"),
        ("drw", COUNTS, {"drw_epoch": -1}, "drw_epoch must be a non-negative integer"),
        ("drw", COUNTS, {"drw_epoch": 1.5}, "drw_epoch must be a non-negative integer"),
        ("logit_adjusted", COUNTS, {"tau": "1"}, "tau must be a real number"),
        ("ce", [10, 0, 3], {}, r"positive integers, got \[10, 0, 3\]"),
        ("ce", [10, 2.5], {}, "positive integers"),
        ("ce", [], {}, "at least one class"),
    ],
)
def test_bad_values_raise(name: str, counts: list, kwargs: dict, message: str) -> None:
    with pytest.raises(OtltError, match=message):
        create_loss(name, counts, **kwargs)


def test_set_epoch_rejects_negative() -> None:
    with pytest.raises(OtltError, match="epoch"):
        create_loss("drw", COUNTS).set_epoch(-1)


def test_batch_loss_matches_weighted_cross_entropy_of_the_official_code():
    from otlt.losses import batch_loss

    counts = [100, 10, 1]
    loss = create_loss("drw", counts, drw_epoch=0)
    loss.set_epoch(0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=g)
    y_base = torch.tensor([0, 0, 0, 1, 2, 0])
    y_partner = torch.tensor([2, 1, 0, 2, 2, 1])
    ref = torch.nn.CrossEntropyLoss(weight=loss.class_weights())
    assert torch.allclose(batch_loss(loss, logits, y_base), ref(logits, y_base))
    lam = 0.3
    expected = lam * ref(logits, y_base) + (1 - lam) * ref(logits, y_partner)
    assert torch.allclose(batch_loss(loss, logits, y_base, y_partner, lam), expected)
    plain = create_loss("ce", counts)
    mixed = batch_loss(plain, logits, y_base, y_partner, torch.full((6,), lam))
    per_row = lam * plain(logits, y_base) + (1 - lam) * plain(logits, y_partner)
    assert torch.allclose(mixed, per_row.mean())

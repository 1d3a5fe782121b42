"""CPU ``train.sync_bn`` (:mod:`otlt.engine.syncbn`) under autocast: statistics in float32.

A one-rank gloo group in this process, with ``get_world_size`` reporting 2 so the layer takes
its synchronised path (an ``all_reduce`` over one rank is the identity). The two-rank
equality with :class:`torch.nn.BatchNorm2d` is in ``test_distributed.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from otlt.engine.syncbn import GlobalBatchNorm2d


@pytest.fixture
def synced(monkeypatch):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    try:
        yield
    finally:
        dist.destroy_process_group()


def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 batch mean, unbiased variance and x̂ of the (rounded) input."""
    x = x.double()
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    xhat = (x - mean.view(1, -1, 1, 1)) / x.var((0, 2, 3), unbiased=False).add(1e-5).sqrt() \
        .view(1, -1, 1, 1)
    return mean, var, xhat


def test_bf16_input_gives_float32_statistics(synced):
    """Sums accumulated in bf16 put up to 0.8% into the variance (7.7e-3 relative on this
    batch); in float32, 3e-7. y comes back in the input's dtype."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 8, 16, 16, generator=g) + 0.5).bfloat16().requires_grad_()
    bn = GlobalBatchNorm2d(8, momentum=1.0)
    y = bn(x)
    mean, var, xhat = reference(x.detach())
    assert ((bn.running_var.double() - var).abs() / var).max() < 1e-4
    assert (bn.running_mean.double() - mean).abs().max() < 1e-5
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), xhat, rtol=1e-2, atol=1e-2)  # y's bf16 rounding
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bn.weight.grad.dtype == torch.float32
    # Σ_x ∂(Σy)/∂x = 0 per channel: γ/σ · (1 − 1 − x̂·Σx̂/n) = 0; bf16 only rounds each entry
    assert x.grad.float().abs().max() < 1e-2


def test_fp16_input_with_large_values_gives_finite_statistics(synced):
    """Σx² of activations around 300 overflows float16 (the variance was NaN)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(64, 8, 16, 16, generator=g) * 100 + 300).half().requires_grad_()
    bn = GlobalBatchNorm2d(8, momentum=1.0)
    y = bn(x)
    mean, var, _ = reference(x.detach())
    assert torch.isfinite(bn.running_var).all() and torch.isfinite(bn.running_mean).all()
    assert ((bn.running_var.double() - var).abs() / var).max() < 1e-4
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    assert x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all()
    assert torch.isfinite(bn.weight.grad).all() and torch.isfinite(bn.bias.grad).all()


def test_gradients_under_bf16_autocast_match_float64(synced):
    """A conv + synced BN under CPU bf16 autocast: the BN parameter gradients agree with
    float64 BatchNorm on the same (bf16-rounded) conv output."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = GlobalBatchNorm2d(4)
    x = torch.randn(16, 3, 10, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = bn(h)
    h = h.detach()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y.float() * g).sum().backward()
    ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    out = ref(h.double())
    (out * g.bfloat16().double()).sum().backward()  # ∂L/∂y reaches the layer in bf16
    torch.testing.assert_close(bn.weight.grad.double(), ref.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bn.bias.grad.double(), ref.bias.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-6)

"""Precise BatchNorm: closed-form statistics, nothing else touched, ranks averaged; the
``train.sync_bn`` conversion."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import free_port
from otlt.engine.batchnorm import (
    batchnorm_layers,
    batchnorm_state,
    preserved_batchnorm,
    recalibrate_batchnorm,
)
from otlt.engine.syncbn import GlobalBatchNorm2d, convert_sync_batchnorm
from otlt.errors import OtltError


def small_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Dropout(0.5),
                         nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def batches(n: int, seed: int, size: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=g) * (k + 1) + k for k in range(n)]


def per_batch_stats(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over batches of the per-channel batch mean and unbiased batch variance."""
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    vars_ = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in xs])
    return means.mean(0), vars_.mean(0)


def test_statistics_are_the_exact_average_over_the_batches():
    net = small_net()
    net[0].running_mean.fill_(5.0)  # stale statistics must be forgotten, not averaged in
    xs = batches(4, seed=1)
    assert recalibrate_batchnorm(net, xs) == 4
    mean, var = per_batch_stats(xs)
    torch.testing.assert_close(net[0].running_mean, mean)
    torch.testing.assert_close(net[0].running_var, var)
    # The second layer sees conv(BN(x)) with BN in train mode and dropout in *eval* mode.
    with torch.no_grad():
        inner = [net[1](nn.functional.batch_norm(x, None, None, net[0].weight, net[0].bias,
                                                 training=True)) for x in xs]
    mean, var = per_batch_stats(inner)
    torch.testing.assert_close(net[3].running_mean, mean)
    torch.testing.assert_close(net[3].running_var, var)
    assert int(net[0].num_batches_tracked) == 4


class TwiceApplied(nn.Module):
    """A BatchNorm layer applied twice per forward (shared between two places)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(x)))


@pytest.mark.parametrize("make", [small_net, lambda: (torch.manual_seed(0), TwiceApplied())[1]],
                         ids=["once", "twice"])
def test_statistics_equal_pytorchs_cumulative_average_bit_for_bit(make):
    """The ``1/n`` factor is counted per layer on the host instead of read from
    ``num_batches_tracked`` (``momentum=None``, a device sync per layer and batch on a GPU):
    the same floats, also for a layer called twice per forward, so evaluation numbers of
    committed runs do not move. A sum divided by N would round differently."""
    xs = batches(7, seed=2)
    net, reference = make(), make()
    recalibrate_batchnorm(net, xs)
    reference.eval()
    for m in batchnorm_layers(reference):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in xs:
            reference(x)
    for key, value in batchnorm_state(reference).items():
        assert torch.equal(value, net.state_dict()[key]), key
    first = batchnorm_layers(net)[0]
    summed = torch.stack([x.mean((0, 2, 3)) for x in xs]).sum(0) / len(xs)
    assert not torch.equal(summed, first.running_mean)  # the test can tell the two apart
    assert first.momentum == 0.1 and not first._forward_pre_hooks  # hooks removed


def test_momentum_and_hooks_are_restored_when_a_batch_fails():
    net = small_net()

    def failing():
        yield from batches(2, seed=5)
        raise RuntimeError("a bad batch")

    with pytest.raises(RuntimeError, match="a bad batch"):
        recalibrate_batchnorm(net, failing())
    assert all(m.momentum == 0.1 and not m._forward_pre_hooks for m in batchnorm_layers(net))


def test_weights_mode_and_momentum_are_left_alone():
    net = small_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k
              and "num_batches" not in k}
    recalibrate_batchnorm(net, batches(2, seed=3))
    assert net.training and all(m.training for m in net.modules())
    assert net[0].momentum == 0.1 and net[3].momentum == 0.1
    for key, value in before.items():
        assert torch.equal(value, net.state_dict()[key]), key
    for p in net.parameters():
        assert p.grad is None


def test_no_batches_changes_nothing_and_preserved_restores():
    net = small_net()
    recalibrate_batchnorm(net, batches(2, seed=4))
    saved = batchnorm_state(net)
    assert recalibrate_batchnorm(net, []) == 0
    for key, value in saved.items():
        assert torch.equal(value, net.state_dict()[key]), key
    with preserved_batchnorm(net):
        net.train()
        net(batches(1, seed=5)[0] * 9)  # a train-mode forward moves the statistics ...
        assert not torch.equal(saved["0.running_mean"], net[0].running_mean)
    for key, value in saved.items():  # ... and leaving the block puts them back
        assert torch.equal(value, net.state_dict()[key]), key


def test_model_without_batchnorm_is_a_no_op():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    assert recalibrate_batchnorm(net, batches(2, seed=6)) == 0


def _rank_main(rank: int, world: int, port: int, out: str, stack: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net = small_net()
        recalibrate_batchnorm(net, batches(3, seed=10 + rank), stack=stack)
        torch.save(batchnorm_state(net), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("stack", [1, 3])
def test_statistics_are_averaged_over_ranks(tmp_path, stack):
    """Two real gloo processes, each on its own batches: both hold the mean of the ranks',
    batch by batch or stacked (``train.bn_stack``: to rounding)."""
    out = str(tmp_path / "bn")
    mp.spawn(_rank_main, args=(2, free_port(), out, stack), nprocs=2, join=True)
    states = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    expected = []
    for rank in range(2):
        net = small_net()
        recalibrate_batchnorm(net, batches(3, seed=10 + rank))
        expected.append(batchnorm_state(net))
    for key in ("0.running_mean", "0.running_var", "3.running_mean", "3.running_var"):
        mean = (expected[0][key] + expected[1][key]) / 2
        torch.testing.assert_close(states[0][key], mean)
        torch.testing.assert_close(states[1][key], mean)


# ---- train.sync_bn: what is converted, what is refused ---------------------------------

class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's: a BatchNorm2d subclass whose forward also applies an activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def trained_net() -> nn.Sequential:
    """small_net with moved running statistics, a frozen first BatchNorm and a counter."""
    net = small_net(seed=7)
    recalibrate_batchnorm(net, batches(2, seed=8))
    net[0].weight.requires_grad_(False)
    return net


@pytest.mark.parametrize("device_type", ["cuda", "cpu"])
def test_sync_bn_refuses_a_batchnorm_subclass_and_changes_nothing(device_type):
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormAct2d(3)))
    with pytest.raises(OtltError) as info:
        convert_sync_batchnorm(net, device_type)
    message = str(info.value)
    assert "\n" not in message
    assert "model.1.1 (BatchNormAct2d)" in message and "train.sync_bn=false" in message
    assert type(net[0]) is nn.BatchNorm2d  # checked before anything was converted


@pytest.mark.parametrize("device_type,kind", [("cuda", nn.SyncBatchNorm),
                                              ("cpu", GlobalBatchNorm2d)])
def test_sync_bn_converts_plain_batchnorm_keeping_parameters_and_buffers(device_type, kind):
    net = trained_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = [net[0].weight, net[0].bias, net[3].weight]
    net.eval()
    x = batches(1, seed=9)[0]
    expected = net(x)
    converted = convert_sync_batchnorm(net, device_type)
    assert [type(converted[i]) for i in (0, 3)] == [kind, kind]
    state = converted.state_dict()
    assert state.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(state[key], value), key
    assert [converted[0].weight, converted[0].bias, converted[3].weight] == params  # the same
    assert not converted[0].weight.requires_grad and converted[3].weight.requires_grad
    assert not converted.training and not converted[0].training
    torch.testing.assert_close(converted(x), expected)  # eval mode, one process: plain BN
    assert convert_sync_batchnorm(converted, device_type) is converted  # already synchronised
    assert type(converted[0]) is kind


def test_sync_bn_layers_the_device_cannot_synchronise_are_refused():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert type(convert_sync_batchnorm(net, "cuda")[1]) is nn.SyncBatchNorm
    for model, needle in ((nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "(BatchNorm1d)"),
                          (nn.Sequential(nn.BatchNorm2d(3, affine=False)), "affine=True"),
                          (nn.Sequential(nn.SyncBatchNorm(3)), "(SyncBatchNorm)")):
        with pytest.raises(OtltError, match="train.sync_bn cannot synchronise model.") as info:
            convert_sync_batchnorm(model, "cpu")
        assert needle in str(info.value)

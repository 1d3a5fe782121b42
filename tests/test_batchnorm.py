"""Precise BatchNorm: closed-form statistics, nothing else touched, ranks averaged."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from otlt.engine.batchnorm import (
    batchnorm_state,
    preserved_batchnorm,
    recalibrate_batchnorm,
)


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net = small_net()
        recalibrate_batchnorm(net, batches(3, seed=10 + rank))
        torch.save(batchnorm_state(net), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_are_averaged_over_ranks(tmp_path):
    """Two real gloo processes, each on its own batches: both hold the mean of the ranks'."""
    out = str(tmp_path / "bn")
    mp.spawn(_rank_main, args=(2, _free_port(), out), nprocs=2, join=True)
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

"""Stacked BatchNorm recalibration (``train.bn_stack``): several batches in one forward give
the batch-by-batch statistics up to rounding, and everything else stays as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from otlt.engine import batchnorm
from otlt.engine.batchnorm import (
    batchnorm_layers,
    batchnorm_state,
    recalibrate_batchnorm,
    statistics_gap,
)
from otlt.engine.stacked_bn import block_statistics
from otlt.errors import OtltError
from otlt.models import create_model
from test_batchnorm import BatchNormAct2d, TwiceApplied, batches, small_net
from test_step_sync import tiny_trainer


def twice_applied() -> nn.Module:
    torch.manual_seed(0)
    return TwiceApplied()


def with_stateless_layer() -> nn.Sequential:
    """A layer without running statistics or affine parameters normalises with batch
    statistics in any mode: stacked, it must still normalise block by block."""
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm2d(3, affine=False, track_running_stats=False),
                         nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))


def assert_states_close(a: nn.Module, b: nn.Module, **tol) -> None:
    state_b = b.state_dict()
    for key, value in batchnorm_state(a).items():
        if key.endswith("num_batches_tracked"):
            assert torch.equal(value, state_b[key]), key
        else:
            torch.testing.assert_close(value, state_b[key], **tol, msg=key)


@pytest.mark.parametrize("make", [small_net, twice_applied, with_stateless_layer],
                         ids=["once", "twice", "stateless"])
@pytest.mark.parametrize("stack", [2, 3, 7, 50])
def test_stacked_statistics_equal_the_batch_by_batch_ones(make, stack):
    """7 batches whose means and scales differ: stacks of 2 (3 forwards and a single),
    3, 7 (one forward) and more than there are batches."""
    xs = batches(7, seed=2)
    exact, stacked = make(), make()
    assert recalibrate_batchnorm(exact, xs) == 7
    assert recalibrate_batchnorm(stacked, xs, stack=stack) == 7
    assert_states_close(stacked, exact, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(m) for m in batchnorm_layers(stacked))  # the class's


@pytest.mark.parametrize("stack,forwards", [(1, 7), (2, 4), (3, 3), (7, 1), (50, 1)])
def test_stacking_runs_one_forward_per_stack(stack, forwards, monkeypatch):
    calls = []
    inner = batchnorm._forward
    monkeypatch.setattr(batchnorm, "_forward", lambda *a: (calls.append(1), inner(*a)))
    assert recalibrate_batchnorm(small_net(), batches(7, seed=2), stack=stack) == 7
    assert len(calls) == forwards


def test_joint_statistics_would_be_told_apart():
    """The batches differ enough that joint statistics over the whole stack (the bug block
    statistics prevent) are far from the average of the batches' own: the variance adds the
    spread between the batch means."""
    xs = batches(4, seed=2)
    exact, joint = small_net(), small_net()
    recalibrate_batchnorm(exact, xs)
    recalibrate_batchnorm(joint, [torch.cat(xs)])
    for layer in (0, 3):
        assert not torch.allclose(joint[layer].running_var, exact[layer].running_var,
                                  rtol=0.1), layer


def test_a_change_of_batch_shape_starts_a_new_stack():
    xs = batches(3, seed=4) + batches(2, seed=5, size=3)  # a smaller last batch or two
    exact, stacked = small_net(), small_net()
    recalibrate_batchnorm(exact, xs)
    recalibrate_batchnorm(stacked, xs, stack=8)
    assert_states_close(stacked, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))])
def test_resnet32_bf16_channels_last_and_its_predictions(device):
    """The engine's setting: ResNet-32 under bf16 autocast and channels-last, 6 batches of 16
    in stacks of 3. The statistics agree to bf16 rounding (the convolutions run at another
    batch size, the block statistics come from one kernel call over blocks laid out as
    channels), and the recalibrated models predict alike."""
    torch.manual_seed(0)
    exact = create_model("resnet32", 10).to(device, memory_format=torch.channels_last)
    stacked = create_model("resnet32", 10).to(device, memory_format=torch.channels_last)
    stacked.load_state_dict(exact.state_dict())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 3, 32, 32, generator=g).to(device) for _ in range(6)]
    kwargs = {"amp_dtype": torch.bfloat16, "channels_last": True}
    recalibrate_batchnorm(exact, xs, **kwargs)
    recalibrate_batchnorm(stacked, xs, stack=3, **kwargs)
    assert_states_close(stacked, exact, rtol=0.02, atol=0.02)
    gap = statistics_gap(batchnorm_state(stacked), batchnorm_state(exact))
    # README: 0.02% of a standard deviation in the means, 0.09% in the variances (the CPU);
    # two draws of such batches differ by 1.6% and 2.9%
    assert gap["mean"] < 0.002 and gap["var"] < 0.005, gap
    probe = torch.randn(64, 3, 32, 32, generator=g).to(device).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device, torch.bfloat16):
        a, b = exact.eval()(probe).float(), stacked.eval()(probe).float()
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_synchronised_or_subclassed_layers_go_batch_by_batch():
    """A BatchNorm subclass (timm's BatchNormAct2d kind) is not stacked: the result is the
    batch-by-batch path's to the bit."""
    def net() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), BatchNormAct2d(3))

    xs = batches(4, seed=6)
    exact, stacked = net(), net()
    recalibrate_batchnorm(exact, xs)
    recalibrate_batchnorm(stacked, xs, stack=4)
    for key, value in batchnorm_state(exact).items():
        assert torch.equal(value, stacked.state_dict()[key]), key
    with pytest.raises(OtltError, match="plain BatchNorm layers"):
        with block_statistics(batchnorm_layers(stacked)):
            pass


def test_a_failing_forward_restores_forward_momentum_and_mode():
    """A stack of two goes through, then a batch with 4 channels (a stack of its own: its
    shape differs) fails inside the network; a layer's own instance forward is put back."""
    net = small_net()
    net.train()
    marker = net[3].forward
    net[3].forward = marker  # an instance attribute of its own, as a patching library sets

    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(net, batches(2, seed=5) + [torch.randn(5, 4, 8, 8)], stack=4)
    assert "forward" not in vars(net[0]) and vars(net[3])["forward"] is marker
    assert all(m.momentum == 0.1 for m in batchnorm_layers(net))
    assert net.training


def test_a_block_with_one_value_per_channel_is_refused_as_torch_does():
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4))
    xs = [torch.randn(1, 4, 1, 1), torch.randn(1, 4, 1, 1)]
    with pytest.raises(ValueError):
        recalibrate_batchnorm(nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4)), xs[:1])
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        recalibrate_batchnorm(net, xs, stack=2)


def test_an_input_of_the_wrong_rank_is_refused_as_the_layer_does():
    net = nn.Sequential(nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="expected 4D input"):
        recalibrate_batchnorm(net, [torch.randn(4, 3, 5), torch.randn(4, 3, 5)], stack=2)


def test_stack_must_be_positive():
    with pytest.raises(OtltError, match="stack must be a positive integer"):
        recalibrate_batchnorm(small_net(), batches(1, seed=0), stack=0)


def test_a_runs_mixed_recalibration_stacked_agrees_with_batch_by_batch(tiny_zip, tmp_path,
                                                                       monkeypatch):
    """The engine's path: an OTmix run's ``train`` recalibration (mixed batches drawn from the
    run's recalibration generator) after one epoch, ``train.bn_stack`` 1 and 3: three
    forwards or one, the same batches, so the same statistics to float32 rounding, and the
    same count."""
    states, calls = [], []
    inner = batchnorm._forward
    monkeypatch.setattr(batchnorm, "_forward", lambda *a: (calls.append(1), inner(*a)))
    for stack in (1, 3):
        (tmp_path / str(stack)).mkdir()
        trainer = tiny_trainer("otmix", tiny_zip, tmp_path / str(stack), overrides=(
            "eval.bn_stats=train", "eval.bn_batches=3", f"train.bn_stack={stack}"))
        trainer.train_one_epoch(0)
        calls.clear()
        states.append(batchnorm_state(trainer.evaluation.model_for(0)))
        assert len(calls) == 3 // stack
    assert int(states[1]["bn1.num_batches_tracked"]) == 3
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-4, atol=1e-4, msg=key)

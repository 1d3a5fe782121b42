"""Tests for otlt.models: parameter counts, API, option-A shortcuts, cosine head, registry."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from otlt.errors import OtltError
from otlt.models import (
    CifarResNet,
    NormedLinear,
    OptionAShortcut,
    create_model,
    list_models,
    resnet32,
    resnet50,
)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("name", "exact", "millions", "digits"),
    [
        ("resnet20", 269_722, 0.27, 2),
        ("resnet32", 464_154, 0.46, 2),
        ("resnet44", 658_586, 0.66, 2),
        ("resnet56", 853_018, 0.85, 2),
        ("resnet110", 1_727_962, 1.7, 1),
    ],
)
def test_cifar_resnet_parameter_counts(name: str, exact: int, millions: float, digits: int):
    model = create_model(name, 10)
    count = _num_params(model)
    assert count == exact
    assert round(count / 1e6, digits) == millions
    # Option-A shortcuts are parameter-free: only the 64 -> K head depends on K.
    assert _num_params(create_model(name, 100)) - count == 90 * 65


def test_resnet50_parameter_counts_and_torchvision_names():
    model = resnet50(1000)
    assert _num_params(model) == 25_557_032
    assert _num_params(model) - _num_params(model.fc) == 23_508_032
    assert model.feature_dim == 2048
    keys = set(model.state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.running_var",
        "layer2.3.conv3.weight",
        "layer3.5.bn2.weight",
        "layer4.2.bn3.num_batches_tracked",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys
    assert "layer4.3.conv1.weight" not in keys  # [3, 4, 6, 3] blocks
    assert tuple(model.layer2[0].conv2.stride) == (2, 2)  # v1.5: stride on the 3x3 conv


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_cifar_features_and_forward(head: str):
    model = create_model("resnet20", 7, head, generator=torch.Generator().manual_seed(0)).eval()
    x = _images(3, 3, 32, 32)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert model.feature_dim == 64 and model.num_classes == 7
    assert feats.shape == (3, 64) and logits.shape == (3, 7)
    assert torch.equal(logits, model.fc(feats))
    assert (feats >= 0).all()  # taken after the final ReLU
    expected_head = NormedLinear if head == "cosine" else nn.Linear
    assert isinstance(model.fc, expected_head)


def test_features_are_global_average_of_last_stage():
    model = create_model("resnet20", 10).eval()
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        out = torch.relu(model.bn1(model.conv1(x)))
        maps = model.layer3(model.layer2(model.layer1(out)))
        assert maps.shape == (2, 64, 8, 8)
        torch.testing.assert_close(model.features(x), maps.mean(dim=(2, 3)))


def test_resnet50_features_and_forward_small_input():
    model = create_model("resnet50", 5, generator=torch.Generator().manual_seed(1)).eval()
    x = _images(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (2, 2048) and logits.shape == (2, 5)
    assert torch.equal(logits, model.fc(feats))
    assert model.num_classes == 5


def test_option_a_shortcut_is_zero_padded_subsample():
    x = _images(2, 16, 7, 7)
    out = OptionAShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0


def test_cifar_resnet_uses_option_a_on_downsampling_blocks():
    model = resnet32(10)
    assert isinstance(model.layer2[0].shortcut, OptionAShortcut)
    assert isinstance(model.layer3[0].shortcut, OptionAShortcut)
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 5


def test_normed_linear_is_cosine():
    head = NormedLinear(6, 4)
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(4))
    x = _images(5, 6) * 10
    out = head(x)
    manual = torch.empty(5, 4)
    for b in range(5):
        for k in range(4):
            manual[b, k] = torch.dot(x[b], head.weight[:, k]) / (
                x[b].norm() * head.weight[:, k].norm()
            )
    torch.testing.assert_close(out, manual)
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head(x * 0.01), out)  # scale-invariant in the features
    aligned = head(head.weight.t().detach())  # each class weight against itself
    torch.testing.assert_close(aligned.diagonal(), torch.ones(4))


def test_kaiming_normal_init_and_batchnorm():
    model = resnet32(10, generator=torch.Generator().manual_seed(0))
    w = model.layer3[4].conv2.weight  # fan-in 64 * 3 * 3
    assert w.mean().abs() < 0.005
    assert math.isclose(w.std().item(), math.sqrt(2 / 576), rel_tol=0.03)
    fc_std = model.fc.weight.std().item()
    assert math.isclose(fc_std, math.sqrt(2 / 64), rel_tol=0.15)
    assert torch.equal(model.bn1.weight, torch.ones(16))
    assert torch.equal(model.bn1.bias, torch.zeros(16))


def test_generator_makes_init_reproducible_and_independent_of_global_rng():
    with torch.random.fork_rng(devices=[]):  # leave the global RNG as other tests expect
        torch.manual_seed(1)
        a = create_model("resnet20", 10, "cosine", generator=torch.Generator().manual_seed(3))
        torch.manual_seed(2)
        b = create_model("resnet20", 10, "cosine", generator=torch.Generator().manual_seed(3))
    c = create_model("resnet20", 10, "cosine", generator=torch.Generator().manual_seed(4))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert not torch.equal(a.fc.weight, c.fc.weight)


def test_channels_last_and_bf16_autocast_on_cpu():
    model = resnet32(10, generator=torch.Generator().manual_seed(0)).eval()
    x = _images(4, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model_cl(x_cl), reference, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model_cl(x_cl)
            feats = model_cl.features(x_cl)
    assert logits.shape == (4, 10) and feats.shape == (4, 64)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()
    scale = reference.abs().max()
    assert (logits.float() - reference).abs().max() < 0.1 * scale


def test_model_pickles():
    model = create_model("resnet20", 10, generator=torch.Generator().manual_seed(0)).eval()
    clone = pickle.loads(pickle.dumps(model))
    x = _images(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))


def test_registry_lists_models_and_rejects_bad_input():
    assert list_models() == sorted(
        ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet50"]
    )
    assert isinstance(create_model("ResNet32", 10), CifarResNet)
    with pytest.raises(OtltError, match=r"'resnet18'.*resnet110.*resnet32"):
        create_model("resnet18", 10)
    with pytest.raises(OtltError, match=r"'arcface'.*linear, cosine"):
        create_model("resnet32", 10, head="arcface")
    for bad in (1, 0, -3, 2.0, "10", True):
        with pytest.raises(OtltError, match="num_classes"):
            create_model("resnet32", bad)  # type: ignore[arg-type]
    assert create_model("resnet20", 2).fc.out_features == 2


# ---- feature functions for any backbone (OTmix's cost) ---------------------------------

class _TimmLike(torch.nn.Module):
    """timm's interface: forward_features -> map, forward_head(pre_logits=True) -> (N, D)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = (torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                                         torch.nn.Linear(6, 4))

    def forward_features(self, x):
        return self.bn(self.conv(x))

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class _TorchvisionResNetLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)
        self.avgpool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.bn(self.conv(x))), 1))


class _TorchvisionMobileNetLike(torch.nn.Module):
    """A 4-D ``.features`` map and a ``.classifier`` (MobileNet/EfficientNet/VGG/DenseNet)."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 7, 3), torch.nn.BatchNorm2d(7))
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(7, 4))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("make,dim", [(_TimmLike, 6), (_TorchvisionResNetLike, 5),
                                      (_TorchvisionMobileNetLike, 7),
                                      (lambda: create_model("resnet20", 4), 64)])
def test_feature_fn_takes_penultimate_features_of_any_backbone(make, dim):
    from otlt.engine.batchnorm import batchnorm_state
    from otlt.models.features import feature_fn

    torch.manual_seed(0)
    model = make()
    model.train()
    before = batchnorm_state(model)
    x = torch.randn(5, 3, 12, 12)
    z = feature_fn(model)(x)
    assert z.shape == (5, dim) and z.dtype == torch.float32 and not z.requires_grad
    assert model.training  # mode restored
    assert all(torch.equal(v, batchnorm_state(model)[k]) for k, v in before.items())
    head = next(getattr(model, n) for n in ("fc", "classifier", "head") if hasattr(model, n))
    model.eval()
    logits = head(z) if not isinstance(model, _TimmLike) else model.head(z)
    torch.testing.assert_close(logits, model(x))  # they are what the head sees


def test_feature_fn_says_what_it_needs():
    from otlt.errors import OtltError
    from otlt.models.features import feature_fn

    with pytest.raises(OtltError, match="features\\(x\\) -> \\(N, D\\), timm's forward_features"):
        feature_fn(torch.nn.Sequential(torch.nn.Linear(3, 2)))


class _UnusedHead(torch.nn.Module):
    """An ``fc`` that forward never calls (the logits come from elsewhere)."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.out(x)


def test_feature_fn_says_when_the_head_is_never_called():
    from otlt.models.features import feature_fn

    with pytest.raises(OtltError, match=r"\.fc module was never called by forward.*embed="):
        feature_fn(_UnusedHead())(torch.randn(4, 3))


def test_otmix_takes_any_embed_callable():
    from otlt.mixing import OTMix

    mixer = OTMix(class_counts=[6, 2], ot_probability=1.0)
    g = torch.Generator().manual_seed(0)
    mixer.set_epoch(0, 4, generator=g)
    x, x_partner = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    calls = []

    def embed(images):
        calls.append(len(images))
        return images.flatten(1)

    mixer(x, torch.tensor([0, 0, 0, 1]), x_partner, torch.tensor([1, 1, 0, 1]), generator=g,
          embed=embed)
    assert calls == [8] and mixer.stats["ot_batches"] == 1


def test_a_registered_model_trains_with_otmix_through_the_cli(tiny_zip, tmp_path, capsys):
    import json

    from conftest import sets, tiny_overrides
    from otlt.cli import main
    from otlt.models import register_model

    @register_model("tiny_timm_like")
    def build(num_classes, head, generator=None):
        assert head == "linear"
        model = _TimmLike()
        model.head = torch.nn.Linear(6, num_classes)
        return model

    config = tmp_path / "c.yaml"
    config.write_text("name: t\nloss: {name: ce}\n")
    overrides = tiny_overrides(tiny_zip, tmp_path / "runs", epochs=2) + [
        "model.name=tiny_timm_like", "mix.name=otmix", "mix.skip_first=0", "mix.skip_last=0",
        "mix.prob=1.0", "mix.params={mu: 0.0}", "train.channels_last=false"]
    assert main(["train", "--config", str(config),
                 *sets(overrides)]) == 0
    capsys.readouterr()
    records = [json.loads(x) for x in
               (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ot_batch_fraction"] == 1.0 for r in records)  # OT pairing on its features


def test_unknown_and_timm_models_are_clear_errors(monkeypatch):
    import builtins

    from otlt.errors import OtltError

    with pytest.raises(OtltError, match="timm:<architecture>, or a name given to"):
        create_model("nonet", 3)
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("no timm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(OtltError, match=r"timm:resnet18 needs timm \(pip install timm\)"):
        create_model("timm:resnet18", 3)


def test_float64_models_take_float32_batches_on_every_entry_point():
    """train.float64: parameters in float64 and float32 inputs cast on the way in, for the
    forward and for the feature pass OTmix and recalibration use."""
    from otlt.models import create_model
    from otlt.models.precision import to_float64

    model = to_float64(create_model("resnet20", 10, generator=torch.Generator().manual_seed(0)))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = torch.rand(4, 3, 32, 32)
    assert model(x).dtype == torch.float64 and model.features(x).dtype == torch.float64
    model.eval()
    ref = model(x.double())
    torch.testing.assert_close(model(x), ref)


def test_float64_refuses_autocast():
    from otlt.config import load_config
    from otlt.errors import OtltError

    assert load_config(None, ["train.float64=true"]).train.float64
    with pytest.raises(OtltError, match="train.float64 runs without autocast"):
        load_config(None, ["train.float64=true", "train.amp=bf16"])


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA not available"))])
@pytest.mark.parametrize("mode", ["pooled_eval", "official"])
def test_graphed_feature_fn_agrees_with_the_eager_one(mode, device):
    """``graphs=True`` (``train.cuda_graphs``: the feature pass through ``torch.compile``'s
    reduce-overhead mode; CUDA graphs on a GPU, compiled kernels without graphs on the CPU)
    gives the eager features to compiled-kernel rounding, moves BatchNorm's running
    statistics as the eager pass does (``official``: train mode) or not at all, restores the
    mode, and returns a copy that a later call cannot overwrite (a replayed graph reuses its
    output memory: only on CUDA can this part fail)."""
    from otlt.engine.batchnorm import batchnorm_state
    from otlt.engine.step import counters_since, cudagraph_counters
    from otlt.models.features import feature_fn

    torch.manual_seed(0)
    eager_model = create_model("resnet20", 4).to(device)
    graphed_model = create_model("resnet20", 4).to(device)
    graphed_model.load_state_dict(eager_model.state_dict())
    eager, graphed = feature_fn(eager_model, mode), feature_fn(graphed_model, mode, graphs=True)
    x, other = torch.randn(6, 3, 16, 16, device=device), torch.randn(6, 3, 16, 16, device=device)
    eager_model.train()
    graphed_model.train()
    a, b = eager(x), graphed(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert graphed_model.training and b.dtype == torch.float32 and not b.requires_grad
    for key, value in batchnorm_state(eager_model).items():
        torch.testing.assert_close(batchnorm_state(graphed_model)[key], value, rtol=1e-4,
                                   atol=1e-4, msg=key)
    graphed(x)  # on CUDA: recorded at the second call, replayed from the third
    before = cudagraph_counters()
    b = graphed(x)
    kept = b.clone()
    graphed(other)
    assert torch.equal(b, kept)  # the first call's features are the caller's own
    if device == "cuda":  # replayed, not fallen back (official mode mutates BN buffers)
        assert counters_since(before)["cuda_graph_skips"] == 0

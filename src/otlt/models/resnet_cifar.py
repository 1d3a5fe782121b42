"""CIFAR ResNets 20/32/44/56/110 with option-A shortcuts (He et al. 2016, Sec. 4.2).

The network used by LDAM-DRW, OTmix and OT re-weighting on CIFAR-LT (the code of
Yerlan Idelbayev, as copied into LDAM-DRW ``models/resnet_cifar.py``): a 3x3 stem with 16
channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels (depth
``6n + 2``), global average pooling and one linear (or cosine) layer. ResNet-32 with a
10-way linear head has 464,154 parameters ("0.46M").

Option-A shortcut: when a block halves the resolution and doubles the channels, the
identity branch takes every second pixel and zero-pads the new channels, so shortcuts add
no parameters. All conv and linear weights use Kaiming-normal init (fan-in, gain sqrt(2)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from otlt.models.heads import NormedLinear, make_head


class OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad channels on both sides.

    Input ``(B, C_in, H, W)``, output ``(B, C_out, ceil(H/s), ceil(W/s))`` whose channels
    ``[p, p + C_in)`` hold ``x[:, :, ::s, ::s]`` with ``p = (C_out - C_in) // 2``, and zeros
    elsewhere (LDAM-DRW pads ``planes // 4`` on each side, the same thing when
    ``C_out = 2 C_in``). A module rather than a lambda so models pickle and compile.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option-A shortcut cannot shrink {in_channels} -> {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the subsampled, channel-padded input."""
        s = self.stride
        front = (self.out_channels - self.in_channels) // 2
        back = self.out_channels - self.in_channels - front
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, front, back))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu(bn2(conv2(...)) + sc(x))``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2``: ``forward(x) == fc(features(x))``.

    Attributes: ``feature_dim`` (64), ``num_classes``, ``fc`` (the final layer, an
    ``nn.Linear`` or :class:`NormedLinear`). Input ``(B, 3, H, W)`` (32x32 for CIFAR).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        head: str = "linear",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.feature_dim = 64
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, blocks, stride=1)
        self.layer2 = _make_stage(16, 32, blocks, stride=2)
        self.layer3 = _make_stage(32, 64, blocks, stride=2)
        self.fc = make_head(head, self.feature_dim, num_classes)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-normal conv/linear weights, BN ``(1, 0)``, all draws from ``generator``."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, generator=generator)
                # LDAM-DRW leaves the bias at PyTorch's default law, U(-1/sqrt(D), 1/sqrt(D)).
                bound = m.in_features**-0.5
                m.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, NormedLinear):
                m.reset_parameters(generator)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled penultimate features ``(B, 64)`` (after the last ReLU)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(B, K)``."""
        return self.fc(self.features(x))


def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_planes, planes, stride)]
    layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet20(
    num_classes: int = 10, head: str = "linear", generator: torch.Generator | None = None
) -> CifarResNet:
    """Build ResNet-20 (0.27M parameters with 10 classes)."""
    return CifarResNet(20, num_classes, head, generator)


def resnet32(
    num_classes: int = 10, head: str = "linear", generator: torch.Generator | None = None
) -> CifarResNet:
    """Build ResNet-32 (0.46M parameters with 10 classes), the CIFAR-LT backbone."""
    return CifarResNet(32, num_classes, head, generator)


def resnet44(
    num_classes: int = 10, head: str = "linear", generator: torch.Generator | None = None
) -> CifarResNet:
    """Build ResNet-44 (0.66M parameters with 10 classes)."""
    return CifarResNet(44, num_classes, head, generator)


def resnet56(
    num_classes: int = 10, head: str = "linear", generator: torch.Generator | None = None
) -> CifarResNet:
    """Build ResNet-56 (0.85M parameters with 10 classes)."""
    return CifarResNet(56, num_classes, head, generator)


def resnet110(
    num_classes: int = 10, head: str = "linear", generator: torch.Generator | None = None
) -> CifarResNet:
    """Build ResNet-110 (1.7M parameters with 10 classes)."""
    return CifarResNet(110, num_classes, head, generator)

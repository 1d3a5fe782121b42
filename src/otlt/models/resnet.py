"""ResNet-50 for 224-pixel images (ImageNet-LT, iNaturalist, Places-LT).

Written here so the package needs no torchvision, but with torchvision's module names
(``conv1, bn1, layer1..layer4, fc``; blocks ``conv1..conv3, bn1..bn3, downsample``) so its
``state_dict`` loads torchvision checkpoints unchanged. Bottleneck blocks ``[3, 4, 6, 3]``
with the stride on the 3x3 conv ("ResNet v1.5"), 25,557,032 parameters with 1,000
classes (23,508,032 without the head). Init as torchvision: Kaiming-normal (fan-out) convs,
BN ``(1, 0)``, PyTorch's default ``nn.Linear`` law for the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from otlt.models.heads import NormedLinear, make_head, reset_linear_default


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a projection shortcut when needed."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet: ``forward(x) == fc(features(x))``.

    Attributes: ``feature_dim`` (2048), ``num_classes``, ``fc`` (``nn.Linear`` or
    :class:`NormedLinear`). Input ``(B, 3, H, W)``, 224x224 in the papers; any size of at
    least 32 pixels works thanks to the global pooling.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        head: str = "linear",
        zero_init_residual: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = 512 * Bottleneck.expansion
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stages.append(_make_stage(inplanes, planes, blocks, stride=1 if i == 0 else 2))
            inplanes = planes * Bottleneck.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = make_head(head, self.feature_dim, num_classes)
        self.zero_init_residual = zero_init_residual
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw every parameter as torchvision does, all draws from ``generator``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out", nonlinearity="relu", generator=generator
                )
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                reset_linear_default(m, generator)
            elif isinstance(m, NormedLinear):
                m.reset_parameters(generator)
        if self.zero_init_residual:
            # Each block then starts as the identity (Goyal et al. 2017), as in torchvision.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the pooled penultimate features ``(B, 2048)`` (after the last ReLU)."""
        out = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits ``(B, K)``."""
        return self.fc(self.features(x))


def _make_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(inplanes, planes, stride)]
    layers += [Bottleneck(planes * Bottleneck.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def resnet50(
    num_classes: int = 1000,
    head: str = "linear",
    zero_init_residual: bool = False,
    generator: torch.Generator | None = None,
) -> ResNet:
    """Build ResNet-50 (25.6M parameters with 1,000 classes, 23.5M without the head)."""
    return ResNet((3, 4, 6, 3), num_classes, head, zero_init_residual, generator)

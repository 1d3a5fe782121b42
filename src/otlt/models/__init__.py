"""Models: CIFAR ResNets, ResNet-50, the cosine head, and a registry."""

from otlt.models.features import feature_fn
from otlt.models.heads import NormedLinear
from otlt.models.registry import HEADS, check_model, create_model, list_models, register_model
from otlt.models.resnet import Bottleneck, ResNet, resnet50
from otlt.models.resnet_cifar import (
    BasicBlock,
    CifarResNet,
    OptionAShortcut,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
)

__all__ = [
    "HEADS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "NormedLinear",
    "OptionAShortcut",
    "ResNet",
    "check_model",
    "create_model",
    "feature_fn",
    "list_models",
    "register_model",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet50",
]

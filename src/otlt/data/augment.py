"""Batched augmentation of uint8 images on the training device.

The CIFAR recipe (zero-pad 4, random 32x32 crop, horizontal flip, normalise) is done for a
whole batch with one gather: for sample ``b`` with crop offset ``(oy, ox)`` and flip ``f``,

    out[b, i, j] = padded[b, oy + i, ox + (W - 1 - j if f else j)]

so there is no per-image Python in the training step. Images are stored ``(N, H, W, 3)``
uint8; the output ``(B, 3, H, W)`` float is a permuted view, i.e. channels-last in memory.
"""

from __future__ import annotations

from typing import Any

import torch

from otlt.errors import warn_renamed

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def draw_crop_flip(batch: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Draw per-sample crop offsets in ``[0, 2 pad]`` and flips: three ``(B,)`` CPU tensors."""
    offsets = torch.randint(0, 2 * pad + 1, (2, batch), generator=generator)
    flips = torch.rand(batch, generator=generator) < 0.5
    return offsets[0], offsets[1], flips


def crop_flip(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor,
              pad: int) -> torch.Tensor:
    """Zero-pad, crop and flip a batch in one gather.

    Args:
        images: ``(B, H, W, C)`` any dtype.
        oy, ox: ``(B,)`` crop offsets into the padded image, in ``[0, 2 pad]``.
        flip: ``(B,)`` bool, mirror horizontally after cropping.
    Returns:
        ``(B, H, W, C)``, same dtype and device.
    """
    b, h, w, _ = images.shape
    device = images.device
    oy, ox, flip = oy.to(device), ox.to(device), flip.to(device)
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    rows = oy[:, None] + ar_h[None, :]
    cols = torch.where(flip[:, None], w - 1 - ar_w[None, :], ar_w[None, :]) + ox[:, None]
    batch_idx = torch.arange(b, device=device)[:, None, None]
    return padded[batch_idx, rows[:, :, None], cols[:, None, :]]


def normalize(images: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map ``(B, H, W, 3)`` uint8 to normalised ``(B, 3, H, W)`` floats (channels-last memory)."""
    mean_t = torch.tensor(mean, device=images.device, dtype=dtype) * 255
    inv_std = 1.0 / (torch.tensor(std, device=images.device, dtype=dtype) * 255)
    out = (images.to(dtype) - mean_t) * inv_std
    return out.permute(0, 3, 1, 2)


class BatchAugment:
    """Train-time CIFAR augmentation for uint8 batches on any device (its old name,
    ``GPUAugment``, still imports, with a ``DeprecationWarning``).

    ``__call__(images (B, H, W, 3) uint8, generator) -> (B, 3, H, W) float32``. Randomness
    comes from ``generator`` (CPU), so a run is reproducible on any device.
    """

    def __init__(self, pad: int = 4, flip: bool = True, mean=CIFAR_MEAN, std=CIFAR_STD):
        self.pad, self.flip, self.mean, self.std = pad, flip, mean, std

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        oy, ox, flips = draw_crop_flip(len(images), self.pad, generator)
        if not self.flip:
            flips = torch.zeros_like(flips)
        return normalize(crop_flip(images, oy, ox, flips, self.pad), self.mean, self.std)


def eval_transform(images: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    """Evaluation transform: normalise only."""
    return normalize(images, mean, std)


def __getattr__(name: str) -> Any:
    if name == "GPUAugment":  # it runs on any device; renamed
        warn_renamed("otlt.data.augment.GPUAugment", "otlt.data.augment.BatchAugment")
        return BatchAugment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

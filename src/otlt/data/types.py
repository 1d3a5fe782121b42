"""Plain containers shared by the data readers, the long-tailed splitter and the engine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ImageArrays:
    """A split of small images held in memory.

    Attributes:
        images: ``(N, H, W, 3)`` uint8, RGB.
        labels: ``(N,)`` int64 class indices in ``[0, len(classes))``.
        classes: class names, index ``k`` names label ``k``.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {self.images.shape} "
                             f"{self.images.dtype}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels {self.labels.shape} do not match {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: np.ndarray) -> ImageArrays:
        """Return the images at ``indices`` (a copy), keeping the class list."""
        return ImageArrays(self.images[indices], self.labels[indices], list(self.classes))

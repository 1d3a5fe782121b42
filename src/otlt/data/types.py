"""Plain containers shared by the data readers, the long-tailed splitter and the engine."""

from __future__ import annotations

import hashlib
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

    def digest(self) -> str:
        """sha256 (hex) of the images' bytes and the labels, in split order, with the shape.

        What a run directory records of each split (``splits.json``), so a resume notices
        other images behind the same images per class. Hashing the decoded pixels, not the
        files, keeps a dataset moved from a zip into a folder the same split; it reads every
        byte once."""
        h = hashlib.sha256(repr(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(self.labels.astype("<i8").tobytes())
        return h.hexdigest()

    def subset(self, indices: np.ndarray) -> ImageArrays:
        """Return the images at ``indices`` (a copy), keeping the class list."""
        return ImageArrays(self.images[indices], self.labels[indices], list(self.classes))

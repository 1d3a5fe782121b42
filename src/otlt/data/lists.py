"""List files of ``relative/path label`` lines under a root folder (ImageNet-LT, iNaturalist
2018), decoded lazily per item: :func:`read_list_file`, :class:`ListFileDataset`, and the
crop boxes it uses."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from otlt.data.io import READ_ERRORS, check_readable, to_rgb
from otlt.errors import OtltError


def read_list_file(list_file: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse ``relative/path label`` lines into paths and ``(N,)`` int64 labels.

    Blank lines are ignored; the label is the last whitespace-separated field, so paths may
    contain spaces. The file is UTF-8; a byte-order mark (as Windows editors write) is
    dropped, not read as part of the first path. A malformed line raises
    :class:`OtltError` naming the file and line.
    """
    list_file = Path(list_file).expanduser()
    check_readable(list_file)
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise OtltError(f"cannot read list file {list_file}: {exc}") from exc
    paths, labels = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(maxsplit=1)
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
            raise OtltError(f"{list_file}:{lineno}: expected 'relative/path label' with a "
                            f"non-negative integer label, got {line.strip()!r}")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    if not paths:
        raise OtltError(f"list file {list_file} has no 'relative/path label' lines")
    return paths, np.array(labels, dtype=np.int64)


class ListFileDataset(Dataset):
    """Images named by a list file under ``root``, decoded lazily per item.

    ``__getitem__(i)`` returns ``(uint8 tensor (3, S, S), label)`` with ``S = image_size``.

    - train: RandomResizedCrop (area scale in [0.08, 1], aspect ratio in [3/4, 4/3], the
      ImageNet-LT recipe) and a horizontal flip, drawn from a ``torch.Generator`` seeded from
      ``(seed, epoch, index)``: every item is reproducible and independent of the worker that
      loads it. Call :meth:`set_epoch` before each epoch (with ``persistent_workers=False``, so
      workers see the new epoch). Colour jitter and normalisation belong to the batched
      augmentation on the training device.
    - eval: resize the shorter side to ``round(S / 0.875)`` (256 for 224), centre crop ``S``.

    Picklable, so it works with ``DataLoader(num_workers > 0)``.
    """

    def __init__(self, root: str | Path, list_file: str | Path, image_size: int = 224,
                 train: bool = True, seed: int = 0) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise OtltError(f"image root {self.root} is not a directory")
        if image_size < 1:
            raise OtltError(f"image_size must be a positive integer, got {image_size}")
        self.paths, self.labels = read_list_file(list_file)
        first = self.root / self.paths[0]
        if not first.is_file():
            raise OtltError(f"{list_file} names {self.paths[0]!r}, but {first} does not "
                            f"exist; is --data the root the list file's paths are relative to?")
        if not train:  # found now, not after the training epochs before its first evaluation
            missing = [p for p in self.paths if not (self.root / p).is_file()]
            if missing:
                raise OtltError(f"{list_file}: {len(missing)} of {len(self.paths)} images do "
                                f"not exist under {self.root}, the first {missing[0]!r}")
        self.image_size = int(image_size)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        """Return ``max(label) + 1``."""
        return int(self.labels.max()) + 1

    def digest(self) -> str:
        """sha256 (hex) of the list's entries (paths and labels, in order), not of the images:
        what a run directory records of a streamed split (reading every image to hash it
        would cost an epoch of decoding on ImageNet-LT). The root is left out, so the data
        may move."""
        h = hashlib.sha256()
        for path, label in zip(self.paths, self.labels.tolist(), strict=True):
            h.update(f"{path}\t{label}\n".encode())
        return h.hexdigest()

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as img:
                img = to_rgb(img)
        except READ_ERRORS as exc:
            raise OtltError(f"cannot decode image {path}: {exc}") from exc
        if self.train:
            gen = torch.Generator().manual_seed(_item_seed(self.seed, self.epoch, index))
            box = random_resized_crop_box(img.width, img.height, gen)
            flip = bool(torch.rand((), generator=gen) < 0.5)
        else:
            box, flip = center_crop_box(img.width, img.height, self.image_size), False
        size = (self.image_size, self.image_size)
        out = np.array(img.resize(size, Image.Resampling.BILINEAR, box=box))
        if flip:
            out = out[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).contiguous(), \
            int(self.labels[index])


def _item_seed(seed: int, epoch: int, index: int) -> int:
    """Mix ``(seed, epoch, index)`` into a 63-bit generator seed."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def random_resized_crop_box(width: int, height: int, gen: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[float, float, float, float]:
    """Draw a crop box ``(x0, y0, x1, y1)`` as torchvision's RandomResizedCrop does."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0 = min(int(u[2] * (width - w + 1)), width - w)
            y0 = min(int(u[3] * (height - h + 1)), height - h)
            return (x0, y0, x0 + w, y0 + h)
    # Fallback (torchvision's): the largest centred crop with the aspect clamped to ``ratio``.
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    w, h = min(w, width), min(h, height)
    x0, y0 = (width - w) // 2, (height - h) // 2
    return (x0, y0, x0 + w, y0 + h)


def center_crop_box(width: int, height: int, size: int,
                    crop_fraction: float = 0.875) -> tuple[float, float, float, float]:
    """Return the box that resize-shorter-side-to-``size / crop_fraction`` + centre crop keeps.

    Resizing only the box (``Image.resize(box=...)``) gives the same pixels as resizing the
    whole image first, without resampling what is cropped away.
    """
    factor = round(size / crop_fraction) / min(width, height)
    half = size / factor / 2
    cx, cy = width / 2, height / 2
    return (cx - half, cy - half, cx + half, cy + half)

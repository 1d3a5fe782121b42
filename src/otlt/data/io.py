"""What every reader shares: image extensions, split names, the errors a malformed file
raises, and the readability check with its one-line error."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from otlt.errors import OtltError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


SPLITS = ("train", "test", "val")
_JUNK_NAMES = ("thumbs.db", "desktop.ini")


def is_junk(name: str) -> bool:
    """Tell hidden files, macOS resource forks (``__MACOSX/``) and Windows thumbnails apart
    from data; ``name`` is a relative posix path."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts) \
        or parts[-1].lower() in _JUNK_NAMES


def walk_files(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``(folder, sorted file names)`` of every folder under ``root``, in sorted order,
    following linked folders (a split or class folder may be a link). A folder reached twice
    (a link back to an ancestor would never end; two links to one folder would read its images
    twice) is a one-line :class:`OtltError` naming both paths."""
    seen: dict[tuple[int, int], str] = {}
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise OtltError(f"{folder} is {seen[key]} again (a linked folder that loops back "
                            "or repeats another); remove the link")
        seen[key] = folder
        dirnames.sort()
        yield folder, sorted(filenames)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB. 16-bit grayscale (Pillow's ``I;16*`` modes, and ``I`` with values
    above 255) is scaled to 8 bits first: Pillow's own ``convert`` clips it, so every value
    above 255 became white; an ``I`` image within 0-255 (a 32-bit TIFF of 8-bit values) is
    taken as it is.
    The pixels are read here, so the result outlives the file it came from."""
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        if img.mode != "I" or wide.max(initial=0) > 255:
            wide = wide >> 8
        return Image.fromarray(np.clip(wide, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise ValueError("32-bit float images are not supported (convert them to 8-bit)")
    return img.convert("RGB")


# Errors a malformed archive or image can raise from the standard library and PIL.
READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile,
                tarfile.TarError, zlib.error, pickle.UnpicklingError)


def check_readable(path: Path) -> None:
    """Raise :class:`OtltError` unless ``path`` exists and can be read."""
    if not path.exists():
        raise OtltError(f"data path {path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise OtltError(f"data path {path} is not readable (permission denied)")

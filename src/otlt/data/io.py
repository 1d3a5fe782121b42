"""What every reader shares: image extensions, split names, the errors a malformed file
raises, the readability check with its one-line error, RGB decoding (``to_rgb``, with the
16-bit rule of ``integer_bits``) and the folder walk (``walk_files``)."""

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
    following linked folders (a split or class folder may be a link, and two may link one
    folder). A link back to a folder that contains it, which would be walked until the path
    is too long, is a one-line :class:`OtltError` naming both paths (folders are told apart
    by device and inode; a file system that reports inode 0 is not checked)."""
    ancestors: dict[str, dict[tuple[int, int], str]] = {}
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except FileNotFoundError:  # removed while walking
            dirnames[:] = []
            continue
        above = ancestors.get(os.path.dirname(folder), {})
        key = (st.st_dev, st.st_ino)
        if st.st_ino and key in above:
            raise OtltError(f"{folder} links back to {above[key]}, a folder that contains it "
                            "(it would be walked for ever); remove the link")
        ancestors[folder] = {**above, key: folder} if st.st_ino else above
        dirnames.sort()
        yield folder, sorted(filenames)


def integer_bits(img: Image.Image) -> int | None:
    """Bits per sample of an integer-mode image as its source stores them: 16 for Pillow's
    ``I;16*`` modes, and for mode ``I`` read from a PNG or a PGM/PPM (formats of at most 16
    bits: Pillow opens 16-bit PGMs, and older Pillow 16-bit PNGs, as ``I``); a TIFF's
    BitsPerSample; None for another mode or when nothing says (an image made in memory, or
    read from another format)."""
    if img.mode.startswith("I;16"):
        return 16
    if img.mode != "I":
        return None
    if img.format in ("PNG", "PPM"):
        return 16
    if img.format == "TIFF":
        bits = img.tag_v2.get(258)  # BitsPerSample: one value per channel
        return int(bits[0] if isinstance(bits, tuple) else bits) if bits else None
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB. 16-bit grayscale is scaled to 8 bits (``>> 8``) first: Pillow's own
    ``convert`` clips it, so every value above 255 became white. Whether an image is 16-bit
    is decided by its format (:func:`integer_bits`), so a dark frame of a 16-bit dataset is
    scaled as its neighbours are; a mode-``I`` image whose format does not say (a 32-bit
    TIFF, another format, an image made in memory) is taken as 16-bit by its values (any
    above 255), else as 8-bit values.
    The pixels are read here, so the result outlives the file it came from."""
    img.load()
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img).astype(np.int64)
        bits = integer_bits(img)
        if bits not in (8, 16):
            bits = 16 if wide.max(initial=0) > 255 else 8
        return Image.fromarray(np.clip(wide >> (bits - 8), 0, 255).astype(np.uint8),
                               "L").convert("RGB")
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

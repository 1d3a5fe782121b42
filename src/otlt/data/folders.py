"""Image folders ``<split>/<class>/<file>.jpg|.jpeg|.png`` as a directory or a ``.zip`` read in
place (optionally under one top-level folder), decoded by a pool of processes:
:func:`read_image_folder`."""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import os
import signal
import unicodedata
import zipfile
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image

from otlt.data.io import (
    IMAGE_EXTENSIONS,
    READ_ERRORS,
    SPLITS,
    check_readable,
    is_junk,
    to_rgb,
    walk_files,
)
from otlt.data.types import ImageArrays
from otlt.errors import OtltError

logger = logging.getLogger(__name__)




class _FileTree:
    """Uniform read access to a directory or a zip archive (read in place)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except READ_ERRORS as exc:
                raise OtltError(f"cannot open {path} as a zip archive (truncated or not a "
                                f"zip?): {exc}") from exc

    def __enter__(self) -> _FileTree:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._zip is not None:
            self._zip.close()

    def files(self) -> list[str]:
        """Return every file as a relative posix path, skipping hidden and macOS junk."""
        if self._zip is not None:
            names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        else:
            names = []
            for folder, files in walk_files(self.path):  # linked splits followed
                rel = Path(folder).relative_to(self.path).as_posix()
                names += [f if rel == "." else f"{rel}/{f}" for f in files]
        return [n for n in names if not is_junk(n)]

    def read(self, name: str) -> bytes:
        """Return the bytes of file ``name``."""
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()


def _strip_prefix(files: list[str]) -> tuple[str, list[str]]:
    """Drop one top-level folder that wraps the split folders, as zips made of a folder have."""
    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    if len(tops) == 1 and not tops & set(SPLITS):
        prefix = tops.pop() + "/"
        return prefix, [f[len(prefix):] for f in files if f.startswith(prefix)]
    return "", files


def _layout(files: list[str], where: Path) -> dict[str, list[tuple[str, str]]]:
    """Group files into ``{split: [(class, relative name)]}``, sorted by class then name.

    Class names are Unicode NFC: macOS writes folder names decomposed (NFD: ``e`` + a
    combining accent) where other systems write them composed, so a zip made on a Mac, or a
    split copied from one, would otherwise hold two spellings of one class."""
    layout: dict[str, list[tuple[str, str]]] = {}
    for name in files:
        parts = name.split("/")
        if len(parts) < 3 or parts[0] not in SPLITS:
            continue  # e.g. a README next to the split folders
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            raise OtltError(f"{name!r} in {where} is not a supported image file: expected "
                            f"one of {', '.join(IMAGE_EXTENSIONS)}")
        layout.setdefault(parts[0], []).append((unicodedata.normalize("NFC", parts[1]), name))
    for split in ("train", "test"):
        if split not in layout:
            raise OtltError(f"{where} has no {split!r} images; expected the layout "
                            f"<split>/<class>/<file>{'|'.join(IMAGE_EXTENSIONS)} with splits "
                            f"train and test (found splits: {sorted(layout) or 'none'})")
    return {split: sorted(items) for split, items in layout.items()}


def _decode(blob: bytes, name: str, where: Path) -> np.ndarray:
    """Decode one image to ``(H, W, 3)`` uint8 RGB; a corrupt file names itself."""
    try:
        with Image.open(io.BytesIO(blob), formats=("JPEG", "PNG")) as img:
            img.load()
            return np.asarray(to_rgb(img))
    except READ_ERRORS as exc:
        raise OtltError(f"cannot decode image {name!r} in {where}: {exc}") from exc


def read_image_folder(path: str | Path, workers: int | None = None) -> dict[str, ImageArrays]:
    """Read ``<split>/<class>/<file>.jpg|.jpeg|.png`` from a directory or a ``.zip``.

    Splits ``train`` and ``test`` are required, ``val`` is read when present. Classes are the
    sorted class-folder names of ``train``; files are sorted by name so the order is
    deterministic. A zip is read in place and may wrap everything in one top-level folder.
    All images must share one size (use the list-file format otherwise). ``workers`` is the
    number of decoding processes (default: see :func:`_decode_workers`).
    """
    path = Path(path).expanduser()
    check_readable(path)
    with _FileTree(path) as tree, ExitStack() as stack:
        prefix, files = _strip_prefix(tree.files())
        layout = _layout(files, path)
        classes = sorted({cls for cls, _ in layout["train"]})
        index = {cls: k for k, cls in enumerate(classes)}
        _check_class_sets(layout, classes, path)
        n_workers = _decode_workers(sum(map(len, layout.values())), workers)
        pool = None if n_workers == 1 else stack.enter_context(ProcessPoolExecutor(
            n_workers, mp_context=mp.get_context("fork"), initializer=_init_decoder,
            initargs=(path,)))
        out, shape = {}, None
        for split, items in layout.items():
            names = [prefix + n for _, n in items]
            logger.info("decoding %d %s images from %s (%d processes)", len(names), split, path,
                        n_workers)
            if shape is None:  # fix the size first so every chunk checks against the same one
                shape = _decode_all(tree, names[:1], path, None)[1]
            images = _decode_all(tree, names, path, shape)[0] if pool is None else \
                _decode_parallel(pool, names, shape, n_workers)
            labels = np.array([index[cls] for cls, _ in items], dtype=np.int64)
            out[split] = ImageArrays(images, labels, list(classes))
    return {split: out[split] for split in SPLITS if split in out}


def _check_class_sets(layout: dict[str, list], classes: list[str], path: Path) -> None:
    """Every split's class folders are train's; the test split has every train class (a
    class without test images would have no accuracy to report)."""
    for split, items in layout.items():
        found = {cls for cls, _ in items}
        unknown = sorted(found - set(classes))
        if unknown:
            raise OtltError(f"{path}: {split} has class folders {unknown[:5]} that train "
                            f"lacks; expected a subset of the {len(classes)} train classes")
        missing = sorted(set(classes) - found)
        if split == "test" and missing:
            raise OtltError(f"{path}: test has no images of the train classes {missing[:5]}; "
                            "train and test must have the same class folders")


def _decode_workers(n_images: int, requested: int | None) -> int:
    """Choose the number of decoding processes: ``requested``, else one per CPU (<= 16).

    A pool costs ~25% more CPU in all (each worker parses the zip directory, results are
    pickled back), so it only pays with 4+ CPUs and 16k+ images. Daemonic processes (e.g.
    DataLoader workers) may not have children, and without ``fork`` a worker would re-import
    torch: both decode in-process.
    """
    if requested is not None:
        return max(1, int(requested))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if cpus is None or cpus < 4 or n_images < 16384 or mp.current_process().daemon or \
            "fork" not in mp.get_all_start_methods():
        return 1
    return min(cpus, 16, n_images // 4096)


# The folder or zip a decoding worker reads; opened once per worker, since parsing the
# directory of a 60k-member zip costs as much as decoding thousands of its images.
_WORKER_TREE: _FileTree | None = None


def _init_decoder(path: Path) -> None:
    global _WORKER_TREE
    _WORKER_TREE = _FileTree(path)
    # forked from a CLI that turns SIGTERM into an exception: a decoder ends silently on it,
    # and the parent reports the stop once
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_chunk(names: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """Decode ``names`` in a pool worker."""
    assert _WORKER_TREE is not None
    return _decode_all(_WORKER_TREE, names, _WORKER_TREE.path, shape)[0]


def _decode_parallel(pool: ProcessPoolExecutor, names: list[str], shape: tuple[int, ...],
                     workers: int) -> np.ndarray:
    """Decode contiguous chunks of ``names`` in the pool's forked processes, in order.

    Forked children only run PIL and numpy (no torch ops, no CUDA), which is fork-safe.
    """
    size = max(1, math.ceil(len(names) / (4 * workers)))
    chunks = [names[i:i + size] for i in range(0, len(names), size)]
    return np.concatenate(list(pool.map(_decode_chunk, chunks, [shape] * len(chunks))))


def _decode_all(tree: _FileTree, names: list[str], where: Path,
                shape: tuple[int, ...] | None) -> tuple[np.ndarray, tuple[int, ...]]:
    """Decode ``names`` into one ``(N, H, W, 3)`` array, requiring the size ``shape``.

    One image at a time: for 32x32 JPEGs PIL's per-call Python overhead dominates, and a
    thread pool measured slower than this loop (GIL contention); processes do help.
    """
    out = None
    for k, name in enumerate(names):
        try:
            blob = tree.read(name)
        except READ_ERRORS as exc:
            raise OtltError(f"cannot read {name!r} in {where}: {exc}") from exc
        img = _decode(blob, name, where)
        if shape is None:
            shape = img.shape
        if img.shape != shape:
            raise OtltError(
                f"image {name!r} in {where} is {img.shape[1]}x{img.shape[0]} but the first "
                f"image is {shape[1]}x{shape[0]}; an image folder needs one size for all "
                "images, use the list-file format (relative/path label) for variable sizes")
        if out is None:
            out = np.empty((len(names), *shape), dtype=np.uint8)
        out[k] = img
    if out is None:
        out = np.empty((0, *(shape or (1, 1, 3))), dtype=np.uint8)
    return out, shape or out.shape[1:]

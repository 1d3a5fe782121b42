"""Read the datasets the papers use, in the formats they are distributed in.

Three formats:

- **CIFAR python** (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read straight
  from the tarball, or their extracted folders ``cifar-10-batches-py/`` / ``cifar-100-python/``):
  :func:`read_cifar_python`.
- **Image folders** ``<split>/<class>/<file>.jpg|.jpeg|.png`` as a directory or a ``.zip`` read
  in place (optionally under one top-level folder): :func:`read_image_folder`.
- **List files** of ``relative/path label`` lines under a root folder (ImageNet-LT, iNaturalist
  2018), decoded lazily per item: :func:`read_list_file`, :class:`ListFileDataset`.

Small-image datasets are decoded once into :class:`~otlt.data.types.ImageArrays` and cached
(:func:`load_dataset`, :mod:`otlt.data.cache`); :func:`find_data` locates them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import multiprocessing as mp
import os
import pickle
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from otlt.data.cache import load_cached
from otlt.data.types import ImageArrays
from otlt.errors import OtltError

logger = logging.getLogger(__name__)

ENV_DATA = "OTLT_DATA"

#: File and folder names :func:`find_data` looks for, in order of preference.
KNOWN_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar10-jpeg.zip",
                "cifar10-jpeg", "cifar10"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", "cifar100-jpeg.zip",
                 "cifar100-jpeg", "cifar100"),
}

#: Class count implied by a dataset name, checked by :func:`load_dataset`.
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100}

ACCEPTED_FORMATS = (
    "CIFAR python tarball (cifar-10-python.tar.gz, cifar-100-python.tar.gz) or its extracted "
    "folder (cifar-10-batches-py/, cifar-100-python/); an image folder <split>/<class>/*.jpg|png "
    "as a directory or a .zip"
)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "test", "val")

_CIFAR10_MEMBERS = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                    "data_batch_5", "test_batch", "batches.meta")
_CIFAR100_MEMBERS = ("train", "test", "meta")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_JUNK_NAMES = {"thumbs.db", "desktop.ini"}
# Errors a malformed archive or image can raise from the standard library and PIL.
_READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile,
                tarfile.TarError, zlib.error, pickle.UnpicklingError)


# ----------------------------------------------------------------------------- CIFAR python


class _CifarUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches, allowing only the numpy globals an array needs.

    A pickle can run arbitrary code; CIFAR batches only ever need dicts, lists, bytes and
    numpy arrays, so any other global is refused.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol < 3
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core -> numpy._core
            return super().find_class(module, name)


def _unpickle(blob: bytes, where: str) -> dict:
    """Unpickle one CIFAR batch (bytes keys, as written by Python 2)."""
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except _READ_ERRORS as exc:
        raise OtltError(f"cannot read CIFAR batch {where}: {exc}") from exc
    if not isinstance(obj, dict):
        raise OtltError(f"CIFAR batch {where} holds a {type(obj).__name__}, expected a dict")
    return obj


def _cifar_variant(names: Iterable[str]) -> str | None:
    """Return ``"cifar10"``/``"cifar100"`` if ``names`` hold that layout's files, else None."""
    present = set(names)
    if set(_CIFAR10_MEMBERS) <= present:
        return "cifar10"
    if set(_CIFAR100_MEMBERS) <= present:
        return "cifar100"
    return None


def _cifar_folder(path: Path) -> Path | None:
    """Return the folder holding CIFAR batches: ``path`` itself or its CIFAR subfolder."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        if folder.is_dir() and _cifar_variant(p.name for p in folder.iterdir()):
            return folder
    return None


def read_cifar_python(path: str | Path) -> dict[str, ImageArrays]:
    """Read CIFAR-10/100 in the official python format into ``{"train", "test"}`` splits.

    ``path`` is ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (members are read
    from the tarball, nothing is extracted) or the extracted ``cifar-10-batches-py/`` /
    ``cifar-100-python/`` folder. Each batch is a pickled dict with ``b"data"`` ``(N, 3072)``
    uint8 in row-major ``(3, 32, 32)`` order and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"``
    (CIFAR-100); class names come from ``batches.meta`` / ``meta``. Images come out
    ``(N, 32, 32, 3)`` (HWC).
    """
    path = Path(path).expanduser()
    _check_readable(path)
    blobs = _cifar_blobs_from_tar(path) if path.is_file() else _cifar_blobs_from_folder(path)
    variant = _cifar_variant(blobs)
    if variant is None:
        raise OtltError(f"{path} is not a CIFAR python archive: expected {_CIFAR10_MEMBERS} "
                        f"(CIFAR-10) or {_CIFAR100_MEMBERS} (CIFAR-100), found {sorted(blobs)}")
    if variant == "cifar10":
        meta = _unpickle(blobs["batches.meta"], f"{path}:batches.meta")
        classes = _names(meta, b"label_names", f"{path}:batches.meta")
        train_parts, test_parts, label_key = _CIFAR10_MEMBERS[:5], ("test_batch",), b"labels"
    else:
        meta = _unpickle(blobs["meta"], f"{path}:meta")
        classes = _names(meta, b"fine_label_names", f"{path}:meta")
        train_parts, test_parts, label_key = ("train",), ("test",), b"fine_labels"
    return {
        split: _cifar_split([(f"{path}:{n}", _unpickle(blobs[n], f"{path}:{n}")) for n in parts],
                            label_key, classes)
        for split, parts in (("train", train_parts), ("test", test_parts))
    }


def _cifar_blobs_from_tar(path: Path) -> dict[str, bytes]:
    """Read the CIFAR members of a tarball in one sequential pass, keyed by base name."""
    wanted = set(_CIFAR10_MEMBERS) | set(_CIFAR100_MEMBERS)
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in wanted and name not in blobs:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        blobs[name] = handle.read()
    except _READ_ERRORS as exc:
        raise OtltError(f"cannot read {path} as a CIFAR tarball (truncated or not a "
                        f"tar.gz?): {exc}") from exc
    return blobs


def _cifar_blobs_from_folder(path: Path) -> dict[str, bytes]:
    """Read the CIFAR batch files of an extracted folder, keyed by file name."""
    folder = _cifar_folder(path)
    if folder is None:
        raise OtltError(f"{path} is not an extracted CIFAR folder: expected the files "
                        f"{_CIFAR10_MEMBERS} or {_CIFAR100_MEMBERS}")
    names = _CIFAR10_MEMBERS if _cifar_variant(p.name for p in folder.iterdir()) == "cifar10" \
        else _CIFAR100_MEMBERS
    blobs = {}
    for name in names:
        try:
            blobs[name] = (folder / name).read_bytes()
        except OSError as exc:
            raise OtltError(f"cannot read {folder / name}: {exc.strerror or exc}") from exc
    return blobs


def _names(meta: dict, key: bytes, where: str) -> list[str]:
    """Decode the class names stored under ``key`` of a CIFAR meta dict."""
    if key not in meta:
        raise OtltError(f"CIFAR meta file {where} has no {key!r} entry "
                        f"(found {sorted(meta, key=repr)})")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key]]


def _cifar_split(batches: list[tuple[str, dict]], label_key: bytes,
                 classes: list[str]) -> ImageArrays:
    """Concatenate CIFAR batches into one ``(N, 32, 32, 3)`` split, checking each batch."""
    images, labels = [], []
    for where, batch in batches:
        if b"data" not in batch or label_key not in batch:
            raise OtltError(f"CIFAR batch {where} lacks b'data' or {label_key!r} "
                            f"(found {sorted(batch, key=repr)})")
        data = np.asarray(batch[b"data"])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise OtltError(f"CIFAR batch {where} has data {data.shape} {data.dtype}, "
                            "expected (N, 3072) uint8")
        lab = np.asarray(batch[label_key], dtype=np.int64)
        if lab.shape != (len(data),):
            raise OtltError(f"CIFAR batch {where} has {lab.size} labels for {len(data)} images")
        if lab.size and (lab.min() < 0 or lab.max() >= len(classes)):
            raise OtltError(f"CIFAR batch {where} has labels in [{lab.min()}, {lab.max()}], "
                            f"expected [0, {len(classes) - 1}] for {len(classes)} classes")
        # Rows are channel-major (R plane, G plane, B plane); the library stores HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    return ImageArrays(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                       classes)


# ---------------------------------------------------------------------------- image folders


class _FileTree:
    """Uniform read access to a directory or a zip archive (read in place)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
            except _READ_ERRORS as exc:
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
            for folder, _, files in os.walk(self.path):
                rel = Path(folder).relative_to(self.path).as_posix()
                names += [f if rel == "." else f"{rel}/{f}" for f in files]
        return [n for n in names if not _is_junk(n)]

    def read(self, name: str) -> bytes:
        """Return the bytes of file ``name``."""
        if self._zip is not None:
            return self._zip.read(name)
        return (self.path / name).read_bytes()


def _is_junk(name: str) -> bool:
    """Tell hidden files, macOS resource forks and Windows thumbnails apart from data."""
    parts = name.split("/")
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts) \
        or parts[-1].lower() in _JUNK_NAMES


def _strip_prefix(files: list[str]) -> tuple[str, list[str]]:
    """Drop one top-level folder that wraps the split folders, as zips made of a folder have."""
    tops = {f.split("/", 1)[0] for f in files if "/" in f}
    if len(tops) == 1 and not tops & set(SPLITS):
        prefix = tops.pop() + "/"
        return prefix, [f[len(prefix):] for f in files if f.startswith(prefix)]
    return "", files


def _layout(files: list[str], where: Path) -> dict[str, list[tuple[str, str]]]:
    """Group files into ``{split: [(class, relative name)]}``, sorted by class then name."""
    layout: dict[str, list[tuple[str, str]]] = {}
    for name in files:
        parts = name.split("/")
        if len(parts) < 3 or parts[0] not in SPLITS:
            continue  # e.g. a README next to the split folders
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            raise OtltError(f"{name!r} in {where} is not a supported image file: expected "
                            f"one of {', '.join(IMAGE_EXTENSIONS)}")
        layout.setdefault(parts[0], []).append((parts[1], name))
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
            return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    except _READ_ERRORS as exc:
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
    _check_readable(path)
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
    thread pool measured ~2x slower than this loop (GIL contention); processes do help.
    """
    out = None
    for k, name in enumerate(names):
        try:
            blob = tree.read(name)
        except _READ_ERRORS as exc:
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


# ------------------------------------------------------------------------------- list files


def read_list_file(list_file: str | Path) -> tuple[list[str], np.ndarray]:
    """Parse ``relative/path label`` lines into paths and ``(N,)`` int64 labels.

    Blank lines are ignored; the label is the last whitespace-separated field, so paths may
    contain spaces. A malformed line raises :class:`OtltError` naming the file and line.
    """
    list_file = Path(list_file).expanduser()
    _check_readable(list_file)
    try:
        text = list_file.read_text()
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
        self.image_size = int(image_size)
        self.train = train
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        """Return ``max(label) + 1``."""
        return int(self.labels.max()) + 1

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.root / self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except _READ_ERRORS as exc:
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


# ------------------------------------------------------------------- locating and dispatching


def data_format(path: Path) -> str | None:
    """Return ``"cifar"`` / ``"image-folder"`` for a path of a known format, else None.

    Cheap: looks at names only (a ``.zip`` is assumed to be an image folder until read).
    """
    name = path.name.lower()
    if path.is_file():
        if name.endswith(_TAR_SUFFIXES):
            return "cifar"
        return "image-folder" if name.endswith(".zip") else None
    if not path.is_dir():
        return None
    try:
        children = list(path.iterdir())
        if _cifar_variant(p.name for p in children):
            return "cifar"
        subdirs = [p for p in children if p.is_dir() and not p.name.startswith(".")]
        if any(p.name == "train" for p in subdirs) or \
                (len(subdirs) == 1 and (subdirs[0] / "train").is_dir()):
            return "image-folder"
    except OSError:  # unreadable: not recognisable; the reader reports permission problems
        return None
    return None


def find_data(dataset: str, explicit: str | Path | None = None,
              search_dirs: Iterable[str | Path] | None = None) -> Path:
    """Locate the data of ``dataset``: ``explicit``, else ``$OTLT_DATA``, else a search.

    ``explicit`` and ``$OTLT_DATA`` may name the data itself (a file or folder of a known
    format) or a folder holding one of the known names (:data:`KNOWN_NAMES`). The search looks
    for the known names in ``search_dirs`` (default ``./data`` and ``../shared/data``,
    relative to the current directory). Datasets without known names need ``explicit``.
    """
    names = KNOWN_NAMES.get(dataset)
    if explicit is not None and str(explicit) != "":
        return _resolve_given(dataset, Path(explicit).expanduser(), names, "--data")
    env = os.environ.get(ENV_DATA)
    if env:
        return _resolve_given(dataset, Path(env).expanduser(), names, f"${ENV_DATA}")
    if names is None:
        raise OtltError(f"dataset {dataset!r} needs an explicit --data PATH; only "
                        f"{', '.join(KNOWN_NAMES)} are searched for automatically")
    dirs = [Path(d) for d in search_dirs] if search_dirs is not None else \
        [Path.cwd() / "data", Path.cwd().parent / "shared" / "data"]
    for folder in dirs:
        found = _known_child(folder, names)
        if found is not None:
            return found
    looked = "; ".join(f"{d.resolve()}/{{{','.join(names)}}}" for d in dirs)
    raise OtltError(f"no {dataset} data found: --data not given, ${ENV_DATA} not set, and "
                    f"none of the known names exist in a known format in: {looked}. Accepted "
                    "formats: "
                    f"{ACCEPTED_FORMATS}. Pass --data PATH or set ${ENV_DATA}"
                    + (f", or fetch it with: otlt data download {dataset}"
                       if dataset in ("cifar10", "cifar100") else "") + ".")


def _known_child(folder: Path, names: tuple[str, ...]) -> Path | None:
    """Return the first of ``names`` in ``folder`` that has a known format."""
    for name in names:
        candidate = folder / name
        if data_format(candidate) is not None:
            return candidate
    return None


def _resolve_given(dataset: str, path: Path, names: tuple[str, ...] | None,
                   origin: str) -> Path:
    """Resolve a user-given path: the data itself, or a folder holding a known name."""
    if not path.exists():
        raise OtltError(f"data path {path} (from {origin}) does not exist")
    if names is None or data_format(path) is not None:
        return path
    if path.is_dir():
        found = _known_child(path, names)
        if found is not None:
            return found
    raise OtltError(f"data path {path} (from {origin}) is not {dataset} data: expected "
                    f"{ACCEPTED_FORMATS}, or a folder holding one of {', '.join(names)}")


def _check_readable(path: Path) -> None:
    """Raise :class:`OtltError` unless ``path`` exists and can be read."""
    if not path.exists():
        raise OtltError(f"data path {path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise OtltError(f"data path {path} is not readable (permission denied)")


def _reader(path: Path) -> Callable[[Path], dict[str, ImageArrays]]:
    """Pick the reader for ``path`` from its format."""
    fmt = data_format(path)
    if fmt == "cifar":
        return read_cifar_python
    if fmt == "image-folder":
        return read_image_folder
    raise OtltError(f"data path {path} has an unknown format; expected {ACCEPTED_FORMATS}")


def load_dataset(dataset: str, path: str | Path, num_classes: int | None = None,
                 cache: bool = True, cache_dir: Path | None = None) -> dict[str, ImageArrays]:
    """Read the splits at ``path`` (through the cache) and check the class count.

    The expected class count is ``num_classes`` if given, else the one ``dataset`` implies
    (10 for cifar10, 100 for cifar100).
    """
    path = Path(path).expanduser()
    _check_readable(path)
    reader = _reader(path)
    splits = load_cached(path, lambda: reader(path), cache_dir) if cache else reader(path)
    found = splits["train"].num_classes
    expected = num_classes if num_classes is not None else DATASET_CLASSES.get(dataset)
    if expected is not None and found != expected:
        raise OtltError(f"dataset at {path} has {found} classes, the config expects {expected} "
                        f"(dataset {dataset!r})")
    return splits

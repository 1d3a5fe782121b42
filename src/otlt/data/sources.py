"""Read the datasets the papers use, in the formats they are distributed in: find the data
and dispatch to the reader of its format.

Three formats:

- **CIFAR python** (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read straight
  from the tarball, or their extracted folders ``cifar-10-batches-py/`` / ``cifar-100-python/``):
  :func:`otlt.data.cifar.read_cifar_python`.
- **Image folders** ``<split>/<class>/<file>.jpg|.jpeg|.png`` as a directory or a ``.zip`` read
  in place (optionally under one top-level folder): :func:`otlt.data.folders.read_image_folder`.
- **List files** of ``relative/path label`` lines under a root folder (ImageNet-LT, iNaturalist
  2018), decoded lazily per item: :mod:`otlt.data.lists` (used by :mod:`otlt.data.streams`).

The readers share :mod:`otlt.data.io` (extensions, split names, read errors).

Small-image datasets are decoded once into :class:`~otlt.data.types.ImageArrays` and cached
(:func:`load_dataset`, :mod:`otlt.data.cache`); :func:`find_data` locates them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from otlt.data.cache import load_cached
from otlt.data.cifar import folder_variant, read_cifar_python
from otlt.data.folders import read_image_folder
from otlt.data.io import check_readable, is_junk
from otlt.data.types import ImageArrays
from otlt.errors import OtltError

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


_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")


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
        if folder_variant(path):
            return "cifar"
        subdirs = [p for p in path.iterdir() if p.is_dir() and not is_junk(p.name)]
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
    raise OtltError(missing_data_message(dataset, dirs, names))


def missing_data_message(dataset: str, dirs: list[Path], names: tuple[str, ...]) -> str:
    """One short line: where it looked, for which names, and the three ways out."""
    def shown(folder: Path) -> str:
        relative = os.path.relpath(folder)
        return relative if len(relative) < len(str(folder)) else str(folder)

    fetch = f", or run: otlt data download {dataset}" if dataset in DATASET_CLASSES else ""
    return (f"no {dataset} data in {' or '.join(map(shown, dirs))} ({', '.join(names[:3])}, "
            f"...): pass --data PATH (a CIFAR python tarball, an image folder "
            f"<split>/<class>/ or its .zip), set ${ENV_DATA}{fetch}")


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
    check_readable(path)
    reader = _reader(path)
    splits = load_cached(path, lambda: reader(path), cache_dir) if cache else reader(path)
    found = splits["train"].num_classes
    expected = num_classes if num_classes is not None else DATASET_CLASSES.get(dataset)
    if expected is not None and found != expected:
        raise OtltError(f"dataset at {path} has {found} classes, the config expects {expected} "
                        f"(dataset {dataset!r})")
    return splits

"""CIFAR python (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, read straight from
the tarball, or their extracted folders ``cifar-10-batches-py/`` / ``cifar-100-python/``):
:func:`read_cifar_python`."""

from __future__ import annotations

import io
import pickle
import tarfile
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from otlt.data.io import READ_ERRORS, check_readable
from otlt.data.types import ImageArrays
from otlt.errors import OtltError

_CIFAR10_MEMBERS = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                    "data_batch_5", "test_batch", "batches.meta")


_CIFAR100_MEMBERS = ("train", "test", "meta")


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
    except READ_ERRORS as exc:
        raise OtltError(f"cannot read CIFAR batch {where}: {exc}") from exc
    if not isinstance(obj, dict):
        raise OtltError(f"CIFAR batch {where} holds a {type(obj).__name__}, expected a dict")
    return obj


def cifar_variant(names: Iterable[str]) -> str | None:
    """Return ``"cifar10"``/``"cifar100"`` if ``names`` hold that layout's files, else None."""
    present = set(names)
    if set(_CIFAR10_MEMBERS) <= present:
        return "cifar10"
    if set(_CIFAR100_MEMBERS) <= present:
        return "cifar100"
    return None


def folder_variant(folder: Path) -> str | None:
    """:func:`cifar_variant` of the files in ``folder`` (a folder named like a batch is not
    one)."""
    return cifar_variant(p.name for p in folder.iterdir() if p.is_file())


def _cifar_folder(path: Path) -> tuple[Path, str] | None:
    """The folder holding CIFAR batches, ``path`` itself or its CIFAR subfolder, and its
    variant."""
    for folder in (path, path / "cifar-10-batches-py", path / "cifar-100-python"):
        variant = folder_variant(folder) if folder.is_dir() else None
        if variant:
            return folder, variant
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
    check_readable(path)
    blobs = _cifar_blobs_from_tar(path) if path.is_file() else _cifar_blobs_from_folder(path)
    variant = cifar_variant(blobs)
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
    except READ_ERRORS as exc:
        raise OtltError(f"cannot read {path} as a CIFAR tarball (truncated or not a "
                        f"tar.gz?): {exc}") from exc
    return blobs


def _cifar_blobs_from_folder(path: Path) -> dict[str, bytes]:
    """Read the CIFAR batch files of an extracted folder, keyed by file name."""
    found = _cifar_folder(path)
    if found is None:
        raise OtltError(f"{path} is not an extracted CIFAR folder: expected the files "
                        f"{_CIFAR10_MEMBERS} or {_CIFAR100_MEMBERS}")
    folder, variant = found
    names = _CIFAR10_MEMBERS if variant == "cifar10" else _CIFAR100_MEMBERS
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

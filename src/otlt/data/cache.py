"""On-disk cache of decoded small-image datasets, keyed by the source file's identity.

Decoding 60,000 JPEGs or un-gzipping a CIFAR tarball takes seconds; reading the same arrays
back from an uncompressed ``.npz`` takes a fraction of one. The cache key covers the resolved
source path, its size, ``mtime_ns`` and ``ctime_ns`` (for a folder: every file's relative
name, size, ``mtime_ns`` and ``ctime_ns``) and :data:`FORMAT_VERSION`, so editing, replacing
or touching the source rebuilds the entry (so do ``chmod`` and ``cp -a``, which change
ctime). The cache is an optimisation only: an unreadable or corrupt entry is rebuilt and an
unwritable cache directory is skipped with a warning, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from otlt.atomic import write_atomic
from otlt.data.io import walk_files
from otlt.data.types import ImageArrays
from otlt.errors import OtltError

logger = logging.getLogger(__name__)

# Bump when the readers or the on-disk layout change so old entries are not reused
# (2: image-folder class names are NFC).
# 3: 16-bit grayscale scaled to 8 bits; 4: 16-bit decided by the file's format
# (otlt.data.io.to_rgb).
FORMAT_VERSION = 4

ENV_CACHE = "OTLT_CACHE"


def default_cache_dir() -> Path:
    """Return ``$OTLT_CACHE`` if set, else ``~/.cache/otlt``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "otlt"


def source_fingerprint(source: Path) -> str:
    """Hash the identity of ``source``: resolved path, each file's size, mtime and ctime
    (not the inode: FUSE and some SMB mounts renumber it at every mount), and the format
    version."""
    resolved = Path(source).expanduser().resolve()
    digest = hashlib.sha256(f"otlt-cache-v{FORMAT_VERSION}\0{resolved}\0".encode())
    try:
        if resolved.is_dir():
            for row in _listing(resolved):
                digest.update(("\0".join(map(str, row)) + "\n").encode())
        else:
            st = resolved.stat()
            digest.update(f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode())
    except OSError as exc:
        raise OtltError(f"cannot read data source {source}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _listing(folder: Path) -> list[tuple[str, int, int, int]]:
    """List ``(relative posix name, size, mtime_ns, ctime_ns)`` of every file under
    ``folder`` (following linked folders, as the reader does), sorted. ``ctime`` changes when
    a file is rewritten even if its size and mtime are restored."""
    rows = []
    for dirpath, filenames in walk_files(folder):
        for name in filenames:
            path = Path(dirpath, name)
            st = path.stat()
            rows.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns,
                         st.st_ctime_ns))
    rows.sort()
    return rows


def cache_path(source: Path, cache_dir: Path, key: str, tag: str = "") -> Path:
    """Return the entry for ``source``: ``<name>-<path hash>-<key hash>.npz`` in ``cache_dir``.

    The path hash lets a new entry replace stale ones of the same source without touching
    entries of another file that happens to share the name.
    """
    resolved = Path(source).expanduser().resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name) or "data"
    path_hash = hashlib.sha256(f"{resolved}\0{tag}".encode()).hexdigest()[:8]
    return Path(cache_dir) / f"{stem}-{path_hash}-{key[:16]}.npz"


def load_cached(source: Path, build: Callable[[], dict[str, ImageArrays]],
                cache_dir: Path | None = None, tag: str = "") -> dict[str, ImageArrays]:
    """Return ``build()``'s splits, from the cache when ``source`` is unchanged since it ran.

    Args:
        source: the file or folder the data is read from; its identity is the cache key.
        build: reads ``source``; called only on a miss.
        cache_dir: where entries live; default ``$OTLT_CACHE``, else ``~/.cache/otlt``.
        tag: distinguishes different readers of the same source (part of the key).
    """
    key = hashlib.sha256(f"{source_fingerprint(source)}\0{tag}".encode()).hexdigest()
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = cache_path(source, directory, key, tag)
    cached = _read_entry(entry, key)
    if cached is not None:
        logger.debug("cache hit %s", entry)
        return cached
    data = build()
    _write_entry(entry, key, data)
    return data


def _read_entry(entry: Path, key: str) -> dict[str, ImageArrays] | None:
    """Read ``entry`` if it exists and holds ``key``; any defect means a miss, never an error."""
    if not entry.is_file():
        return None
    try:
        with np.load(entry, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
                return None
            return {split: ImageArrays(npz[f"{split}__images"], npz[f"{split}__labels"],
                                       [str(c) for c in npz[f"{split}__classes"]])
                    for split in meta["splits"]}
    except Exception as exc:  # a broken cache is rebuilt, whatever broke it
        logger.warning("ignoring unreadable cache entry %s (%s); rebuilding", entry, exc)
        return None


def _write_entry(entry: Path, key: str, data: dict[str, ImageArrays]) -> None:
    """Write ``data`` to ``entry`` atomically (:func:`otlt.atomic.write_atomic`); a refused
    write is a warning: the run goes on without the cache."""
    arrays: dict[str, np.ndarray] = {
        "meta": np.array(json.dumps({"key": key, "version": FORMAT_VERSION,
                                     "splits": list(data)}))}
    for split, part in data.items():
        arrays[f"{split}__images"] = part.images
        arrays[f"{split}__labels"] = part.labels
        arrays[f"{split}__classes"] = np.array(part.classes, dtype=str)
    try:
        write_atomic(entry, lambda handle: np.savez(handle, **arrays), parents=True)
    except OtltError as exc:  # "cannot write PATH (reason)": a full disk, a read-only folder
        logger.warning("%s; continuing without the cache", exc)
        return
    _remove_stale(entry)


def _remove_stale(entry: Path) -> None:
    """Delete older entries of the same source (same name and path hash, other key)."""
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for old in entry.parent.glob(f"{_glob_escape(prefix)}*.npz"):
        if old != entry and len(old.name) == len(entry.name):
            try:
                old.unlink()
            except OSError:
                pass


def _glob_escape(text: str) -> str:
    """Escape glob metacharacters in ``text``."""
    return re.sub(r"([*?\[])", r"[\1]", text)

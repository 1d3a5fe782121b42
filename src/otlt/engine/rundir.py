"""A run directory that defends itself: one trainer at a time, one config.

- **One owner.** A training process holds an exclusive ``fcntl.flock`` lock on
  ``RUN/.lock`` (rank 0 only) from the moment it opens the directory until ``fit`` ends;
  the file names the holder's PID and host. A second trainer on the same directory refuses
  in one line naming them, instead of appending a second copy of every epoch to
  ``metrics.jsonl``. The operating system drops the lock when the process dies (kill -9,
  a lost node), so a stale lock never needs removing by hand. The lock is advisory and per
  open file description: a second ``open`` + ``flock`` conflicts even inside one process,
  which is why this process remembers the locks it holds and takes each directory once (a
  trainer that fails while it is built releases its lock at once:
  :func:`otlt.engine.factory.create_trainer`). Where ``fcntl`` does not
  exist (Windows), or the file system refuses locks (``ENOLCK`` on some NFS mounts), runs
  go unlocked, with a warning in the second case.
- **One config.** ``last.pt`` stores the config it was trained with; a ``config.yaml`` edited
  by hand afterwards would silently change the run (another learning rate, another data
  seed mid-run, an ``eval.json`` that contradicts itself). :func:`check_stored_config`
  compares the two on every load (resume, ``otlt eval``, ``otlt probe``) with the same
  comparison and allowed keys as a resume's ``--set``.
- **One dataset.** ``splits.json`` records every split's classes, images per class and a
  digest of its content (``digests``: the images' bytes and labels in split order; the
  list entries for streamed list files). A resume whose data gives other splits, even with
  the same images per class, is refused by :func:`check_splits`; files written before the
  digests existed are checked by their counts only.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from otlt.atomic import write_text_atomic
from otlt.config import RunConfig, build_config, config_changes, refuse_unsafe_changes
from otlt.engine.runtime import open_run_dir, run_dir_path
from otlt.errors import OtltError, writing

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs go unlocked
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_HELD: dict[str, int] = {}  # resolved run directory -> descriptor of this process's lock
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}  # flock's "held by another"


def _holder(path: Path) -> str:
    """``PID 123 on host h`` from a lock file (``an unknown process`` if it is unreadable)."""
    try:
        info = json.loads(path.read_text() or "{}")
        return f"PID {int(info['pid'])} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "an unknown process"


def lock_run_dir(run_dir: Path) -> None:
    """Take ``run_dir``'s exclusive lock for this process (a no-op if it holds it already);
    another process holding it is an :class:`OtltError` naming its PID and host."""
    key = str(Path(run_dir).resolve())
    if fcntl is None or key in _HELD:
        return
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a read-only run directory: say so before anything else fails
        raise OtltError(f"run directory {run_dir} is not writable ({exc.strerror or exc})"
                        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _BUSY:
            raise OtltError(f"run directory {run_dir} is in use by another otlt process "
                            f"({_holder(path)}); wait for it to end or stop it first (two "
                            "trainers in one directory would mix their epochs)") from None
        print(f"otlt: warning: cannot lock {path} ({exc.strerror or exc}); make sure no "
              "other trainer uses this run directory", file=sys.stderr, flush=True)
        return
    _HELD[key] = fd
    with writing(path):
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())


def release_run_dir(run_dir: Path) -> None:
    """Drop this process's lock on ``run_dir`` (nothing if it holds none)."""
    fd = _HELD.pop(str(Path(run_dir).resolve()), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # the holder's PID and host are stale from now on
    except OSError:
        pass
    os.close(fd)  # closing the last descriptor of the open file releases the flock


def first_missing(path: Path) -> Path | None:
    """The topmost of ``path`` and its parents that does not exist yet (None if ``path``
    exists): what making ``path`` would create."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def abandon_run_dir(run_dir: Path, created: Path | None) -> None:
    """Release this process's lock on ``run_dir`` after its trainer failed while it was
    built, and remove what building it made: if ``created`` (:func:`first_missing` before
    the build) is ``run_dir`` or a parent of it, this process held the lock and nothing but
    the lock file is in ``run_dir``, it goes, with the folders that became empty up to
    ``created``. An existing run, or anything another process made, is never touched."""
    held = fcntl is None or str(Path(run_dir).resolve()) in _HELD
    try:
        if not held or created not in (run_dir, *run_dir.parents) or any(
                entry.name != LOCK_NAME for entry in run_dir.iterdir()):
            return
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
        release_run_dir(run_dir)
        for folder in (run_dir, *run_dir.parents):
            folder.rmdir()  # refused when not empty: something else lives there
            if folder == created:
                break
    except OSError:
        pass
    finally:
        release_run_dir(run_dir)


@contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Release this process's lock on ``run_dir`` when the block ends, however it ends (a
    failed run leaves its directory free for the next trainer)."""
    try:
        yield
    finally:
        release_run_dir(run_dir)


def claim_run_dir(cfg: RunConfig, run_dir: Path | None, resume: bool) -> Path:
    """:func:`~otlt.engine.runtime.open_run_dir`, locked for training. An existing directory
    is locked before it is checked, so a running trainer is reported as running, not as a run
    that stopped in its first epoch."""
    wanted = run_dir_path(cfg, run_dir)
    try:
        if wanted.is_dir():
            lock_run_dir(wanted)
        opened = open_run_dir(cfg, run_dir, resume)
        lock_run_dir(opened)
    except BaseException:
        release_run_dir(wanted)
        raise
    return opened


def check_stored_config(stored: dict[str, Any] | None, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse ``cfg`` (the config a resume or an evaluation goes on with, from
    ``config.yaml``) when it differs from ``stored`` (the one ``last.pt`` was saved with)
    outside the keys a resume may change; every differing key is named."""
    if stored is None:  # no config stored: nothing to compare against
        return
    try:
        saved = build_config(stored)
    except OtltError as exc:
        raise OtltError(f"the config stored in {run_dir / 'last.pt'} is not valid for this "
                        f"version of otlt ({exc})") from None
    refuse_unsafe_changes(
        config_changes(saved, cfg),
        f"{run_dir / 'config.yaml'} differs from the config {run_dir / 'last.pt'} was saved "
        "with (was it edited?)",
        f"Undo the edit, or start a new run from it: otlt train --config "
        f"{run_dir / 'config.yaml'} --set name=<new>")


def write_splits(run_dir: Path, data: Any) -> None:
    """Record ``data``'s splits in ``run_dir/splits.json``: ``classes``, ``counts`` (images
    per class of every split) and ``digests`` (``data``: ``LongTailedData`` or
    ``StreamData``; both offer ``classes``, ``split_counts()`` and ``split_digests()``)."""
    path = Path(run_dir) / "splits.json"
    write_text_atomic(path, json.dumps({"classes": data.classes, "counts": data.split_counts(),
                                        "digests": data.split_digests()}, indent=1))


def check_splits(run_dir: Path, data: Any) -> None:
    """Refuse a resume whose ``data`` gives other splits than ``run_dir/splits.json``
    records: other classes or counts, or (where the file has ``digests``) other content."""
    path = Path(run_dir) / "splits.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    hint = "resume with the dataset the run started with (--data PATH)"
    now = json.loads(json.dumps({"classes": data.classes, "counts": data.split_counts()}))
    if {key: saved.get(key) for key in now} != now:
        raise OtltError(f"the data found now gives other splits than {path} records "
                        f"(classes or images per class differ); {hint}")
    if "digests" not in saved:  # written before digests existed: counts only
        return
    changed = [split for split, digest in data.split_digests().items()
               if saved["digests"].get(split) != digest]
    if changed:
        raise OtltError(f"the data found now gives other splits than {path} records (the "
                        "same images per class, but other images or order in "
                        f"{', '.join(changed)}; the digests hash decoded pixels, so a JPEG "
                        f"decoder that decodes differently counts as other images); {hint}")


def write_artifacts(run_dir: Path, artifacts: dict[str, Any]) -> None:
    """Write a method's JSON artifacts (``{relative name: object}``, e.g. OTmix's sample
    plans) into ``run_dir``; a refused write is one line (:func:`otlt.errors.writing`)."""
    for name, obj in artifacts.items():
        write_text_atomic(Path(run_dir) / name, json.dumps(obj), parents=True)

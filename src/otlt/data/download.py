"""``otlt data download``: fetch CIFAR-10/100 from their canonical address, verified.

The official python tarballs (the format :mod:`otlt.data.sources` reads) are downloaded to
``<root>/<file>.part`` with a progress bar; an interrupted download resumes from where it
stopped (an HTTP ``Range`` request): a connection that closes early is retried from the
bytes already in the ``.part`` file a few times with a short backoff, and a killed process
resumes on the next run. Early means fewer bytes than the response's ``Content-Length``, or,
from a server that sends none, a connection reset or cut mid-body (an error, not an end) or
fewer bytes than the official file's known size. Only a complete file is hashed, and it gets
its final name only once its MD5 is the published one. A mismatch removes the partial file and
says so; nothing half-written is ever left under the final name.
A write the machine refuses (a full disk, a read-only folder) is not a network error: it
stops the download at once with one line naming the file, without retries.
"""

from __future__ import annotations

import hashlib
import http.client
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from otlt.errors import OtltError, writing


@dataclass(frozen=True)
class Download:
    url: str
    md5: str
    size: int  # bytes of the official file: the end of a body sent without Content-Length

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


DOWNLOADS = {
    "cifar10": Download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a", 170_498_071),
    "cifar100": Download("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                         "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437),
}
CHUNK = 1 << 20
RETRIES = 4  # further tries after a connection that closed early
BACKOFF = 1.0  # seconds before the first retry, doubled after each


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_dataset(name: str, root: str | Path = "data", *, url: str | None = None,
                     md5: str | None = None, size: int | None = None, progress: bool = True,
                     timeout: float = 60.0, retries: int = RETRIES,
                     backoff: float = BACKOFF) -> Path:
    """Download dataset ``name`` into ``root`` and return the verified file's path.

    ``url`` replaces the canonical address (a mirror serving the same file); ``md5``
    replaces the published checksum (for files other than the official ones) and ``size``
    the official file's size in bytes (None with ``md5``: unknown). An existing, verified file
    is not downloaded again. A connection that closes early is resumed with a ``Range``
    request up to ``retries`` times, waiting ``backoff`` seconds (doubled each time).
    """
    if name not in DOWNLOADS:
        raise OtltError(f"no download for {name!r}; known: {', '.join(DOWNLOADS)} (ImageNet-LT "
                        "and iNaturalist need their own registration and download)")
    spec = DOWNLOADS[name]
    url = url or spec.url
    size = size if size is not None else (spec.size if md5 is None else None)
    md5 = md5 or spec.md5
    root = Path(root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OtltError(f"cannot create {root} ({exc.strerror or exc})") from None
    final = root / url.rsplit("/", 1)[-1]
    if final.is_file() and md5_of(final) == md5:
        return final
    part = final.with_name(final.name + ".part")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        have, total, cut = _fetch(url, part, progress, timeout)
        total = total if total is not None else size  # no Content-Length: the known size
        complete = have >= total if total is not None else not cut
        if complete:
            break
    else:
        of = f" of {total}" if total is not None else ""
        raise OtltError(f"download of {url} stopped short {retries + 1} times (at {have}{of} "
                        f"bytes, kept in {part}); run the same command again to resume")
    got = md5_of(part)
    if got != md5:
        part.unlink()
        raise OtltError(f"{url}: MD5 {got} of its {have} bytes is not the expected {md5}; the "
                        f"download was removed ({_mismatch_cause(have, size, total)})")
    with writing(final):
        part.replace(final)
    return final


def _mismatch_cause(have: int, size: int | None, total: int | None) -> str:
    """What a wrong MD5 of a body the server called complete (or gave no length for) means."""
    if size is not None and have != size:
        return (f"the server's file has {have} bytes, not the official {size}: a changed file "
                "or a wrong mirror")
    if total is None:  # neither a Content-Length nor a known size to tell a cut by
        return ("a changed or damaged file, a wrong mirror, or a connection closed early by a "
                "server that sent no length; run the same command again")
    return "a changed or damaged file, or a wrong mirror"


def _fetch(url: str, part: Path, progress: bool,
           timeout: float) -> tuple[int, int | None, bool]:
    """Append ``url``'s bytes to ``part`` from its current size on (restart if the server
    ignores the range); return ``(bytes in part, expected total or None if unknown, whether
    the connection broke mid-body)``.

    A connection that closes or fails mid-body returns a short count rather than raising:
    the caller retries from there. A reset or timeout is told from an end of body even
    without a ``Content-Length``; a quiet close is not. A write of ``part`` the machine
    refuses (a full disk, a read-only folder) raises a one-line :class:`OtltError` naming it
    at once."""
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to fetch: the part is complete
            return have, have, False
        raise OtltError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise OtltError(f"cannot download {url}: {reason} (no network? download it elsewhere "
                        f"and pass --data PATH)") from None
    with response:
        resumed = response.status == 206
        if not resumed:
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with writing(part), part.open("ab" if resumed else "wb") as handle, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5],
                disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
            while block := _read(response):
                handle.write(block)  # a refused write is no network error: never retried
                bar.update(len(block))
                have += len(block)
    return have, total, block is None


def _read(response) -> bytes | None:
    """The next chunk of ``response``'s body; ``b""`` at its end, None when the connection is
    reset or times out mid-body (a short read the caller retries)."""
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException):
        return None


__all__ = ["DOWNLOADS", "download_dataset", "md5_of"]

"""User-facing errors.

Anything a user can get wrong (a path, a config key, a value out of range) raises
:class:`OtltError` (a ``ValueError``); the CLI turns it into one line
``otlt: error: ...`` and exit code 2.
Programming errors stay ordinary exceptions with tracebacks. A write the machine refuses (a
full disk, a read-only folder, a quota) is the environment, not a bug: :func:`writing`
turns its ``OSError`` into an :class:`OtltError` that names the file and the reason.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class OtltError(ValueError):
    """A mistake in user input: the message names the bad value and what was expected.

    A :class:`ValueError`, so library callers can catch the usual type.
    """


def require(condition: bool, message: str) -> None:
    """Raise :class:`OtltError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise OtltError(message)


def is_finite_number(value: object) -> bool:
    """True for a finite real number: an ``int``, ``float`` or NumPy scalar, not a ``bool``
    (``True`` is an ``int`` to Python, never a number to otlt), not ``None``, ``nan`` or
    ``inf``. The test behind the readers of logged records (a JSON field may hold ``null``
    or a flag) and the checks of a value that must be a finite number; checks that name an
    infinite value out of range instead (``losses.base.check_real``, the config's) keep their
    own."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and \
        math.isfinite(value)


def is_integer(value: object) -> bool:
    """True for an integer: what Python takes as an index (an ``int``, a NumPy integer, a
    one-element integer tensor), but not a bool (``True`` is an ``int`` to Python, never a
    count or an index to otlt; a bool tensor indexes too) and not a float, even a whole one.
    The test behind every knob that must be a count, an epoch or an index."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")) == "torch.bool":
        return False
    try:
        operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return False
    return True


def require_choice(name: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    """Raise ``OtltError("<name> must be one of <allowed>, got <value>")`` unless ``value``
    is one of ``allowed`` (a table of valid values, e.g. ``otlt.config.BN_STATS``)."""
    require(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def reason(exc: BaseException, limit: int = 160) -> str:
    """``Type: message`` of ``exc`` on one line, at most about ``limit`` characters, cut at
    a word boundary (``...`` marks the cut): the part of a library's error worth quoting."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return f"{type(exc).__name__}: {text}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Run a write of ``path``; an ``OSError`` becomes ``OtltError("cannot write PATH
    (reason)")`` (the reason: errno's text, e.g. "No space left on device")."""
    try:
        yield
    except OSError as exc:
        raise OtltError(f"cannot write {path} ({exc.strerror or exc})") from None


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (``DeprecationWarning``) that ``old`` is now called ``new``: an old name keeps
    working for a release, pointing its caller (``stacklevel``) at the new one. The message
    says "deprecated in otlt", which the test suite turns into an error outside the tests
    that check the old names on purpose."""
    warnings.warn(f"{old} is deprecated in otlt; use {new}", DeprecationWarning,
                  stacklevel=stacklevel)

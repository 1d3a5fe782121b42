"""User-facing errors.

Anything a user can get wrong (a path, a config key, a value out of range) raises
:class:`OtltError` (a ``ValueError``); the CLI turns it into one line
``otlt: error: ...`` and exit code 2.
Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class OtltError(ValueError):
    """A mistake in user input: the message names the bad value and what was expected.

    A :class:`ValueError`, so library callers can catch the usual type.
    """


def require(condition: bool, message: str) -> None:
    """Raise :class:`OtltError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise OtltError(message)

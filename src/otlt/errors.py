"""User-facing errors.

Anything a user can get wrong (a path, a config key, a value out of range) raises
:class:`OtltError`; the CLI turns it into one line ``otlt: error: ...`` and exit code 2.
Programming errors stay ordinary exceptions with tracebacks.
"""

from __future__ import annotations


class OtltError(Exception):
    """A mistake in user input: the message names the bad value and what was expected."""


def require(condition: bool, message: str) -> None:
    """Raise :class:`OtltError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise OtltError(message)

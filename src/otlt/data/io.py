"""What every reader shares: image extensions, split names, the errors a malformed file
raises, and the readability check with its one-line error."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

from otlt.errors import OtltError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


SPLITS = ("train", "test", "val")


# Errors a malformed archive or image can raise from the standard library and PIL.
READ_ERRORS = (OSError, EOFError, ValueError, SyntaxError, zipfile.BadZipFile,
                tarfile.TarError, zlib.error, pickle.UnpicklingError)


def check_readable(path: Path) -> None:
    """Raise :class:`OtltError` unless ``path`` exists and can be read."""
    if not path.exists():
        raise OtltError(f"data path {path} does not exist")
    if not os.access(path, os.R_OK) or (path.is_dir() and not os.access(path, os.X_OK)):
        raise OtltError(f"data path {path} is not readable (permission denied)")

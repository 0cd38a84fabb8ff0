"""Writing output files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from qpass.errors import OutputError


def write_atomically(path: Path, data: bytes) -> Path:
    """Write bytes to `path` through a temporary file in the same folder, then rename."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {e.strerror} (check the folder's permissions)"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror}") from e
    return path

"""Crash-safe file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file next to `path`, flush it to disk, then rename it into place.

    A crash or a full disk at any moment leaves either the old file or the new one, never half of one.
    A failed write raises an `OSError` that names `path` (`naming`).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise naming(err, path) from err
        raise


def naming(err: OSError, path: Path) -> OSError:
    """`err` with `path` in its message (a failed `write` names no file), or `err` if it names one."""
    return err if err.filename is not None else OSError(err.errno, err.strerror, str(path))

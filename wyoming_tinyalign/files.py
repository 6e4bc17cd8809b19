"""Crash-safe file writes, and bundles built in a folder of their own (renamed into place once whole)."""

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


def building_folder(folder: Path, pid: int | str) -> Path:
    """Where process `pid` builds the bundle `folder` (`models.ensure_dev_model`; `"*"`: a glob of them)."""
    return folder.parent / f".{folder.name}.building-{pid}"


def live_builds(models: Path) -> list[tuple[Path, int]]:
    """The bundles being built under `models` by another server process still running (one with `wyoming`
    in its command line, read from /proc: a dead build's number may have gone to another process)."""
    live = []
    for path in sorted(models.glob(building_folder(models / "*", "*").name)):
        pid = path.name.rpartition("-")[2]
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes() if pid.isdigit() else b""
        except OSError:  # no such process (or no /proc)
            continue
        if b"wyoming" in command and int(pid) != os.getpid():
            live.append((path, int(pid)))
    return live


def stopped_builds(folder: Path) -> list[Path]:
    """The folders where a build of the bundle `folder` stopped part-way (no other server process builds
    there now); `folder` may be a glob (`models / "*"`: every bundle's)."""
    live = {path for path, _ in live_builds(folder.parent)}
    return sorted(path for path in folder.parent.glob(building_folder(folder, "*").name) if path not in live)

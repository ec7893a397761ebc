"""Writing files so that a crash or a power loss never leaves a half-written one under its real name.

Every file sglang_alchemist keeps (adapter checkpoints, ``versions.json``, the guard's answer
cache) goes through here: write to a temporary name in the same directory, ``fsync`` the file,
rename it over the final name, ``fsync`` the directory. A reader therefore sees the old
version or the new one, and once a function here returns, the new one survives a power loss -
which is what lets the journal mark feedback ``trained`` only after its version is durable.
A failure (``ENOSPC``, a read-only disk) raises ``OSError`` and leaves the old files untouched.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_directory(path: Path) -> None:
    descriptor = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomically(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        _write_synced(staging, data)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_directory_atomically(directory: Path, files: dict[str, bytes]) -> None:
    """Create ``directory`` with exactly ``files``, all or nothing (replacing an older one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        staging.mkdir()
        for name, data in files.items():
            _write_synced(staging / name, data)
        fsync_directory(staging)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_directory(directory.parent)

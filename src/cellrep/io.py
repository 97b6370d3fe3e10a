"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextmanager
def atomic_open(path: Path | str, overwrite: bool = True) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at ``path`` only once complete.

    Writes go to a temp file beside the target (the rename never crosses
    filesystems), which is fsynced, renamed over ``path``, and the directory
    fsynced so the rename itself survives a crash. On any error the temp file
    is removed and ``path`` is untouched. With ``overwrite=False`` an existing
    file is an error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(f"{path} exists and is not overwritten")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass


def atomic_write_bytes(path: Path | str, data: bytes, overwrite: bool = True) -> Path:
    with atomic_open(path, overwrite=overwrite) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: Path | str, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", overwrite)

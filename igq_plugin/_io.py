"""Atomic file writes: a user file is either its old content or the complete new one, never a torn write."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

__all__ = ["atomic_write", "check_output_path"]


def check_output_path(path: Union[str, os.PathLike], *, inputs: tuple = ()) -> Path:
    """``path`` as a Path, after checking it can be written before any work starts: its directory
    exists and is a directory, the path itself is not a directory, and it is none of ``inputs``."""
    path = Path(os.fspath(path))
    if path.is_dir():
        raise ValueError(f"output path {str(path)!r} is a directory: give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output directory {str(parent)!r} is not writable")
    for item in inputs:
        if item is not None and Path(os.fspath(item)).exists() and path.exists() and path.samefile(item):
            raise ValueError(f"output path {str(path)!r} is also an input: writing it would destroy that input")
    return path


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Call ``write(temp_path)`` to fill a temporary file in the same directory as ``path``, fsync it and
    rename it over ``path`` (``os.replace``: atomic on POSIX and Windows). On any failure ``path`` keeps its
    old content (or stays absent) and the temporary file is removed."""
    path = check_output_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (not supported on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

"""Atomic writes: a crash leaves either the old file/folder or the new one, never half of one.

Torch-free on purpose, so data and eval commands can use it without importing the model code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import SmallCoderError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_files(folder: Path) -> None:
    """fsync every file, and give each the usual umask permissions (some writers use 0600)."""
    mode = 0o666 & ~_umask()
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one rename.

    Refuses to replace a non-empty `target` unless `overwrite`; on error the target is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SmallCoderError(f"{target}: exists and is not a folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise SmallCoderError(f"{target}: folder exists and is not empty (refusing to overwrite it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _finish_files(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # put the previous version back
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file name beside `path` for any writer (a library that writes files by name); on
    success it is fsynced and renamed onto `path`, on any error removed, so `path` is never half
    written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | Path, write: Callable[[IO[str]], None]) -> None:
    """Write a text file through `write(f)` into a temp file beside `path`, fsync, then rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def cache_root() -> Path:
    """Where SmallCoder keeps what it can rebuild (compiled kernels, benchmark ground truth):
    $SMALLCODER_CACHE, else $XDG_CACHE_HOME/smallcoder, else ~/.cache/smallcoder."""
    if os.environ.get("SMALLCODER_CACHE"):
        return Path(os.environ["SMALLCODER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallcoder"

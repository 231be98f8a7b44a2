"""Atomic writes and run-folder locks: a crash leaves either the old file/folder or the new one,
never half of one, and one clear line (not a traceback) when the disk is full or a path is a file.

Replacing a folder swaps the new one in with one `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15), so
at every instant the target name holds the old or the new folder. Where the kernel or filesystem
refuses the exchange (other systems, NFS), the folder is replaced by two renames (target -> .NAME.old-PID,
.NAME.tmp-PID -> target); a crash between them leaves the target missing, and the next
`atomic_folder` on that target (or `recover_folder`) puts the old folder back. Leftovers of dead
processes are removed on that next use too.

Torch-free on purpose, so data and eval commands can use it without importing the model code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO

from .errors import SmallCoderError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errors that mean "this write cannot succeed here" (disk full, quota, read-only, I/O, no permission)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}
_WRAPPED_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors, tokenizers) say it


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


def write_error(e: BaseException) -> str | None:
    """The OS reason when `e` is a write the system refused (disk full, quota, read-only, I/O
    error, permission), raised as an OSError or wrapped by a library as "... (os error N)"; else None."""
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    m = _WRAPPED_OS_ERROR.search(str(e)) if isinstance(e, Exception) else None
    if m and int(m.group(1)) in _WRITE_ERRNOS:
        return os.strerror(int(m.group(1)))
    return None


def make_folder(path: str | Path) -> Path:
    """`mkdir -p`, with one clear line when part of the path is a file or cannot be created."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        raise SmallCoderError(f"{path}: cannot create the folder: {blocker or 'a part of the path'} is a file, "
                              "not a folder") from None
    except OSError as e:
        raise SmallCoderError(f"{path}: cannot create the folder ({e.strerror})") from None
    return path


def _finish_files(folder: Path) -> None:
    """fsync every file, and give each the usual umask permissions (some writers use 0600)."""
    mode = 0o666 & ~_umask()
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, mode)
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one step; False where the OS or the filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # our own: never touch a folder this process may still be writing
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_folder(target: str | Path) -> None:
    """Repair what a crashed `atomic_folder` left beside `target` (run by every `atomic_folder`).

    A crash between the fallback's two renames leaves the target missing and the old folder as
    `.NAME.old-PID`: it is put back. Then every `.NAME.tmp-PID` / `.NAME.old-PID` of a dead
    process is removed (unfinished new folders, or old ones already replaced).
    """
    target = Path(target)
    prefix = f".{target.name}."
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    leftovers: list[tuple[str, Path]] = []
    for name in sorted(names):
        kind, _, pid = name[len(prefix):].partition("-")
        if name.startswith(prefix) and kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            leftovers.append((kind, target.parent / name))
    if not leftovers:
        return
    if not os.path.lexists(target):
        for kind, path in leftovers:
            if kind == "old":
                with contextlib.suppress(OSError):  # another process may have restored it first
                    os.rename(path, target)
                    fsync_dir(target.parent)
                    log.warning("%s: restored the previous folder from %s (a replacement was interrupted)",
                                target, path.name)
                break
    for _, path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def _commit(tmp: Path, target: Path) -> Path | None:
    """Put the finished `tmp` under the target name; returns the replaced folder's new name, if any."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return None
    if _exchange(tmp, target):  # target is the new folder now, tmp the old one
        fsync_dir(target.parent)
        return tmp
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous version back
        raise
    fsync_dir(target.parent)
    return old


FORCE_HINT = "use --force to replace it"  # what a command says when it refuses a used --out


def refuse_used_folder(path: str | Path, *, overwrite: bool = False, ignore: Collection[str] = (),
                       hint: str = "use --force / overwrite=True to replace it") -> None:
    """The one "never write over what is there" rule: `path` must be absent or an empty folder
    (names in `ignore` aside) unless `overwrite`, and never a file. Commands call it before slow
    work so a refusal comes first; `atomic_folder` calls it again before it replaces anything."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise SmallCoderError(f"{path}: exists and is a file, not a folder")
    if overwrite:
        return
    held = sorted(p.name for p in path.iterdir() if p.name not in ignore)
    if held:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise SmallCoderError(f"{path}: exists and is not an empty folder (it holds {shown}); will not write "
                              f"over a folder that is not empty ({hint})")


@contextlib.contextmanager
def atomic_folder(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `target` in one step.

    Refuses to replace a non-empty `target` unless `overwrite`; on error the target is untouched,
    and a refused write (disk full, read-only, ...) is a SmallCoderError naming the target.
    """
    target = Path(target)
    recover_folder(target)
    refuse_used_folder(target, overwrite=overwrite)
    make_folder(target.parent)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _finish_files(tmp)
        replaced = _commit(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_error(e)
        if reason:
            raise SmallCoderError(f"{target}: could not write it ({reason}); nothing was changed there") from None
        if isinstance(e, SmallCoderError) and str(tmp) in str(e):  # a nested write: name the real target
            raise SmallCoderError(str(e).replace(str(tmp), str(target))) from None
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp file name beside `path` for any writer (a library that writes files by name); on
    success it is fsynced and renamed onto `path`, on any error removed, so `path` is never half
    written."""
    path = Path(path)
    make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise SmallCoderError(f"{path}: could not write it ({write_error(e) or e})") from None
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from other users
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        reason = write_error(e)
        if reason:
            raise SmallCoderError(f"{path}: could not write it ({reason}); nothing was changed there") from None
        raise


def atomic_write(path: str | Path, write: Callable[[IO[str]], None]) -> None:
    """Write a text file through `write(f)` into a temp file beside `path`, fsync, then rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        write(f)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive `flock` on FOLDER/.lock while the block runs (the folder is created).

    A second holder gets one line naming the first one's pid. The kernel drops the lock when its
    process ends, however it ends, so a crashed run never blocks the next one; the file itself
    may stay. `what` names the holder in that line ("training run").
    """
    import fcntl

    folder = make_folder(folder)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise SmallCoderError(f"{path}: cannot create the lock file ({write_error(e) or e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "a process that has not written its pid yet"
            raise SmallCoderError(f"{folder}: another {what} is using this folder ({holder} holds {path}); "
                                  "wait for it to finish, or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def cache_root() -> Path:
    """Where SmallCoder keeps what it can rebuild (the built-in corpus, compiled kernels, benchmark
    ground truth): $SMALLCODER_CACHE, else $SMALLCODER_HOME, else $XDG_CACHE_HOME/smallcoder, else
    ~/.cache/smallcoder. The one rule for every cache; SMALLCODER_HOME is the name the built-in
    corpus documented first, and the more specific SMALLCODER_CACHE wins when both are set."""
    for name in ("SMALLCODER_CACHE", "SMALLCODER_HOME"):
        if os.environ.get(name):
            return Path(os.environ[name])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallcoder"

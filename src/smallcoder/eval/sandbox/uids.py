"""One-off sample uids: claiming them, killing what is left of them, deleting what they left.

Why a fresh uid per sample rather than `nobody`: RLIMIT_NPROC counts every process of a uid on
the machine, so samples sharing `nobody` (in one batch, or other users' runs) would let one fork
bomb starve its neighbours, and they could signal each other. A uid nobody else holds gives each
sample its own process budget, and afterwards lets the harness find and kill whatever is left of
it and delete the files it left in world-writable folders (where private mounts are not
available; with them the sample never writes to the host at all).
"""

from __future__ import annotations

import os
import secrets
import signal
import stat
import threading
import time

# One-off sample uids come from 0x70000000-0x70FFFFFF: above systemd's container ranges
# (524288-1879048191), below its "foreign" range and 2**31, and held by no account.
UID_BASE, UID_SPAN = 0x70000000, 1 << 24
SWEEP_SECONDS = 5.0  # how long to keep killing a sample uid's leftovers

_lock = threading.Lock()
_in_use: set[int] = set()


def claim() -> int:
    """A uid no other sample of this process holds (and, from the range, no account)."""
    with _lock:
        while True:
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid not in _in_use:
                _in_use.add(uid)
                return uid


def release(uid: int) -> None:
    with _lock:
        _in_use.discard(uid)


def pids_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real, effective, saved or fs uid is `uid`."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    return [int(name) for name in entries if name.isdigit() and _has_uid(int(name), uid)]


def _has_uid(pid: int, uid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return False
    uids: list[str] = []
    state = ""
    for line in text.splitlines():
        if line.startswith("Uid:"):
            uids = line.split()[1:]
        elif line.startswith("State:"):
            state = line.split()[1] if len(line.split()) > 1 else ""
    return str(uid) in uids and state not in ("Z", "X")


def sweep(uid: int) -> bool:
    """SIGKILL every process of a sample uid until none is left; False if some survived."""
    deadline = time.monotonic() + SWEEP_SECONDS
    while True:
        pids = pids_of(uid)
        if not pids:
            return True
        for pid in pids:
            _kill_if_uid(pid, uid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def _kill_if_uid(pid: int, uid: int) -> None:
    """Kill `pid` only if it still is a process of `uid` (a pidfd closes the pid-reuse race)."""
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if _has_uid(pid, uid):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(pidfd)
    elif _has_uid(pid, uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def world_writable_folders() -> list[str]:
    """Folders any uid may write to, near the top of the tree (/tmp, /var/tmp, /dev/shm,
    /run/lock, ...): where a sample without private mounts can leave files behind."""
    found = []
    for top in ("/", "/var", "/run", "/dev", "/var/lib"):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and entry.path not in found:
                found.append(entry.path)
    return found


def remove_strays(uid: int, folders: list[str]) -> None:
    """Delete what a sample uid left in world-writable folders (its processes are gone)."""
    for folder in folders:
        _remove_owned(folder, uid, depth=2)


def _remove_owned(folder: str, uid: int, depth: int) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if st.st_uid == uid:
            if stat.S_ISDIR(st.st_mode):
                remove_tree(entry.path)
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        elif depth > 1 and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
            _remove_owned(entry.path, uid, depth - 1)


def remove_tree(path: str) -> None:
    """Delete a folder however deep, without recursion or long paths, never following a link.

    `shutil.rmtree` recurses (a sample's 3,000 nested folders raised RecursionError and took the
    whole evaluation down). Here every subfolder found is first renamed up into the top folder,
    so the tree flattens as it is emptied and only two folder descriptors are open at a time.
    Errors are ignored: this is clean-up, and what cannot be deleted is left.
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        top = os.open(path, flags)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    try:
        pending = [None]  # None: the top folder itself; names: folders moved up into it
        serial = 0
        while pending:
            name = pending[-1]
            try:
                fd = top if name is None else os.open(name, flags, dir_fd=top)
            except OSError:
                pending.pop()
                continue
            moved = False
            try:
                _writable(fd)
                with os.scandir(fd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                for entry, is_dir in entries:
                    if is_dir:
                        serial += 1
                        new = f".smallcoder-rm-{serial}"
                        try:
                            os.rename(entry, new, src_dir_fd=fd, dst_dir_fd=top)
                            pending.append(new)
                            moved = True
                        except OSError:
                            pass
                    else:
                        try:
                            os.unlink(entry, dir_fd=fd)
                        except OSError:
                            pass
            except OSError:
                pass
            finally:
                if fd != top:
                    os.close(fd)
            if not moved:  # emptied (or stuck): remove it and go on with the others
                pending.pop()
                if name is not None:
                    try:
                        os.rmdir(name, dir_fd=top)
                    except OSError:
                        pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _writable(fd: int) -> None:
    """A folder the sample made unwritable (chmod 0) is made writable again before emptying."""
    try:
        mode = os.fstat(fd).st_mode
        if mode & 0o700 != 0o700:
            os.fchmod(fd, mode | 0o700)
    except OSError:
        pass

"""The sandbox launcher: run as `python -I -S launcher.py CONFIG_JSON`, stdlib only.

Under `unshare --pid --mount ...` it is PID 1 of fresh namespaces: the sample cannot signal it,
orphans are reparented to it, and when it exits the kernel kills everything left in there. It

1. watches a lifeline pipe whose other end only the harness holds: when the harness dies for any
   reason (SIGKILL included) the pipe reads end-of-file and the launcher exits, taking the
   sample with it;
2. with `mount` in the config, builds the sample's file system view and pivots into it: a
   read-only tmpfs root holding read-only binds of /usr (and /bin, /lib ... as on the host) and
   of the interpreter's installation, with its site-packages masked; a handful of /dev nodes;
   the namespace's own /proc; and size-bounded private tmpfs at /tmp, /dev/shm and the work
   folder (into which it copies the run's files). Nothing else of the host is visible: no other
   world-writable folder, no host unix socket, no benchmark data, no harness code;
3. forks the sample: rlimits, its own uid (or, left as uid 0, no capabilities), no_new_privs,
   parent-death signal, the run's pipes at fixed descriptor numbers, stdin on /dev/null;
4. reaps everything and reports the sample's exit status and CPU time on the status pipe.
"""

import ctypes
import json
import os
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECUREBITS, PR_CAP_AMBIENT = 1, 38, 28, 47
SECURE_NOROOT = 0x2F  # NOROOT, NO_SETUID_FIXUP and KEEP_CAPS_LOCKED, each locked
# statvfs flags -> mount flags a read-only remount must keep (a user namespace may not clear them)
_KEPT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
               (getattr(os, "ST_NOATIME", 1024), MS_NOATIME),
               (getattr(os, "ST_NODIRATIME", 2048), MS_NODIRATIME),
               (getattr(os, "ST_RELATIME", 4096), MS_RELATIME))
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203,
               "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218, "armv6l": 218, "loongarch64": 41}
DEVICES = ("null", "zero", "full", "random", "urandom")

libc = ctypes.CDLL(None, use_errno=True)


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source, target, fstype, flags, data=None):
    _check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                      ctypes.c_ulong(flags), data and data.encode()), f"mount {target}")


def _bind_readonly(source, target):
    """Bind `source` at `target`, read-only, keeping the flags the source mount has."""
    _mount(source, target, None, MS_BIND | MS_REC)
    kept = MS_NOSUID | MS_NODEV
    flags = os.statvfs(source).f_flag
    for st, ms in _KEPT_FLAGS:
        if flags & st:
            kept |= ms
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def _makedirs(path, mode=0o755):
    os.makedirs(path, mode=mode, exist_ok=True)


def _tmpfs(target, size, mode, uid):
    _makedirs(target)
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={size},mode={mode:o},uid={uid},gid={uid}")


def build_root(spec, owner):
    """Assemble the sample's view under spec["root"] and pivot into it (see the module doc)."""
    root = spec["root"]
    files = {}
    for name, host_path in spec["files"].items():  # read now: the host is gone after the pivot
        with open(host_path, "rb") as f:
            files[name] = f.read()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1048576,mode=755")
    for link, target in spec["symlinks"]:
        _makedirs(os.path.dirname(root + link))
        os.symlink(target, root + link)
    for path in spec["binds"]:
        _makedirs(root + path)
        _bind_readonly(path, root + path)
    for path in spec["hide"]:  # e.g. site-packages: third-party code and data stay out of reach
        if os.path.isdir(root + path):
            _mount("tmpfs", root + path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4096,mode=755")
    _makedirs(root + "/etc")
    for path in spec["etc"]:
        if os.path.islink(path):
            os.symlink(os.readlink(path), root + path)
        elif os.path.isfile(path):
            open(root + path, "wb").close()
            _bind_readonly(path, root + path)
    _makedirs(root + "/dev")
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            open(root + "/dev/" + name, "wb").close()
            _mount("/dev/" + name, root + "/dev/" + name, None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, root + "/dev/" + name)
    _makedirs(root + "/proc")
    _mount("/proc", root + "/proc", None, MS_BIND | MS_REC)  # unshare --mount-proc's: this namespace's
    size = spec["tmp_bytes"]
    _tmpfs(root + "/tmp", size, 0o1777, 0)
    _tmpfs(root + "/dev/shm", size, 0o1777, 0)
    work = root + spec["work"]
    _tmpfs(work, size, 0o700, owner)
    for name, data in files.items():
        path = os.path.join(work, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, owner, owner)
        os.chmod(path, 0o600)
    number = _PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(0, f"pivot_root: unknown system call number on {os.uname().machine}")
    os.chdir(root)
    _check(libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detaching the host's root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _drop_root_powers():
    """A sample left as uid 0 (no spare uid, or a user namespace): no capabilities after exec."""
    # best effort: where the kernel refuses, the probe's CapEff reading says so in the report
    libc.prctl(PR_SET_SECUREBITS, SECURE_NOROOT, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL


def _start_sample(config, err_w):
    """In the forked child: limits, descriptors, identity, then exec. Never returns."""
    import fcntl
    import resource

    launcher = os.getppid()
    _check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != launcher:  # the launcher died before the line above took effect
        os._exit(1)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
        signal.signal(sig, signal.SIG_DFL)
    # renumber the run's pipes: first out of the way (above any target), then onto the targets
    moved = {int(target): fcntl.fcntl(int(source), fcntl.F_DUPFD_CLOEXEC, 256)
             for target, source in config["fds"].items()}
    for target, fd in moved.items():
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
    for name, (soft, hard) in config["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = config["uid"]
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif os.geteuid() == 0:
        _drop_root_powers()
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    os.chdir(config["cwd"])
    os.umask(0o077)
    os.execve(config["argv"][0], config["argv"], config["env"])


def _kill_sample(uid):
    """Outside a PID namespace: as the sample's uid kill all its processes, then our group."""
    if uid is not None and os.fork() == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # every process of this uid but this one
        finally:
            os._exit(0)
    os.killpg(0, signal.SIGKILL)  # the sample's group is ours: this ends the launcher too


def _wait(pid, lifeline, uid):
    """Reap children until the sample's own status comes; end everything if the harness dies."""
    import select

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    while True:
        while True:
            try:
                wpid, wstatus, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return 0, None
            if wpid == 0:
                break
            if wpid == pid:
                return wstatus, usage
        ready, _, _ = select.select([lifeline, wake_r], [], [])
        if lifeline in ready and not os.read(lifeline, 64):
            if os.getpid() != 1:
                _kill_sample(uid)
            os._exit(70)  # as PID 1 of the namespace, exiting kills everything in it
        if wake_r in ready:
            os.read(wake_r, 4096)


def main(config_json):
    config = json.loads(config_json)
    status_fd, lifeline = config["status_fd"], config["lifeline_fd"]
    for fd in (status_fd, lifeline, *config["fds"].values()):
        os.set_inheritable(int(fd), False)  # the sample gets only the pipes it is given, renumbered
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the wait loop (set before the fork)
    owner = config["uid"] if config["uid"] is not None else os.geteuid()
    try:
        if config.get("mount"):
            build_root(config["mount"], owner)
    except OSError as exc:
        os.write(status_fd, json.dumps({"setup_error": f"private mounts: {exc}"}).encode())
        return 1
    import fcntl

    err_r, err_w = os.pipe()  # close-on-exec: empty at EOF means the exec worked
    err_w, low = fcntl.fcntl(err_w, fcntl.F_DUPFD_CLOEXEC, 512), err_w  # clear of the targets
    os.close(low)
    try:
        pid = os.fork()
    except OSError as exc:
        os.write(status_fd, json.dumps({"setup_error": f"fork: {exc}"}).encode())
        return 1
    if pid == 0:
        try:
            os.close(err_r)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _start_sample(config, err_w)
        except BaseException as exc:  # noqa: BLE001 - reported to the harness, then exit
            try:
                os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:1000])
            finally:
                os._exit(127)
    os.close(err_w)
    setup_error = b""
    while chunk := os.read(err_r, 4096):
        setup_error += chunk
    os.close(err_r)
    wstatus, usage = _wait(pid, lifeline, config["uid"])
    report = {"setup_error": setup_error.decode("utf-8", "replace"),
              "exitcode": os.waitstatus_to_exitcode(wstatus) if usage is not None else None,
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3) if usage else None,
              "maxrss_kb": usage.ru_maxrss if usage else None}
    os.write(status_fd, json.dumps(report).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

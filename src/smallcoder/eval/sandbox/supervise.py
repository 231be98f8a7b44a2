"""Supervising one run: start the sandboxed process(es), watch them, kill them, say what happened.

A plain run is one sandboxed program; "passed" needs exit status 0 and a random token that the
harness appends as the program's last statement (so `os._exit(0)` before the end fails). That
only proves the program reached its end, which the program itself can always fake: it is for
running programs, not for grading them.

A checked run grades: the sample's code runs in one sandbox behind the worker, the benchmark's
test code in a second sandbox (the checker, another uid), and the two talk through pipes only.
The verdict comes from the checker on a pipe the sample never holds (see checker.py).

Each sandboxed process is `unshare ... python -I -S launcher.py CONFIG` (launcher.py) with stdin
on /dev/null, a scrubbed environment, its own session, rlimits, and a lifeline pipe that ends it
when the harness dies. The harness reads stdout/stderr incrementally (capped), enforces the
wall-clock limit (for samples that sleep: CPU time is bounded by RLIMIT_CPU, which a busy
machine does not eat into), and afterwards kills the namespace and every process of the uid.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SmallCoderError
from . import uids

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
TAIL_BYTES = 4096          # how much of stderr (and, for the probe, stdout) is kept
DRAIN_SECONDS = 0.5        # after a process's exit, how long to wait for its pipes to close
_HERE = Path(__file__).resolve().parent
_FOOTER = ("\n\n# appended by the smallcoder sandbox: reaching this line is the only way to pass\n"
           "__import__('sys').stdout.flush()\n__import__('os').write(1, b'\\n{token}\\n')\n")
_LOADER = ("import sys\ng = {{'__name__': '{name}', '__builtins__': __builtins__}}\n"
           "exec(compile(sys.argv[1], 'codec.py', 'exec'), g)\n"
           "exec(compile(sys.argv[2], '{file}', 'exec'), g)\n")


@dataclass
class ExecResult:
    """What became of one program; `status` is one of STATUSES."""

    status: str        # "passed" | "failed" | "timeout" | "killed" (resource limit / signal) | "error"
    detail: str        # short reason: last line of stderr, signal name, limit hit, failed test ...
    duration: float    # seconds, wall clock
    stdout_bytes: int  # how much it printed (output is capped, not stored whole)
    returncode: int | None = None  # the sample's exit code, -N for signal N, None when unknown
    stderr_tail: str = ""          # the last few KB of stderr, for reading failures
    cpu_seconds: float | None = None  # the sample's CPU time (user + system)
    collected: object = None          # a checked run's `Check.collect` value (plain data), if asked

    @property
    def passed(self) -> bool:
        return self.status == "passed"


STATUSES = ("passed", "failed", "timeout", "killed", "error")


@dataclass(frozen=True)
class Limits:
    """Per-sample limits; the defaults suit HumanEval/MBPP test programs.

    CPU time decides whether busy code ran too long (a loaded machine does not change it); the
    wall-clock `timeout` is far above it and only ends samples that sleep or block."""

    timeout: float = 60.0          # wall clock, seconds
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30    # RLIMIT_AS
    max_processes: int = 32        # only effective for a non-root uid
    max_file_bytes: int = 10 << 20
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20
    disk_bytes: int = 64 << 20     # each private tmpfs: the work folder, /tmp, /dev/shm
    max_value_bytes: int = 64 << 20  # the largest value a sample's function may return

    def __post_init__(self) -> None:
        minimum = {"timeout": 0.01, "cpu_seconds": 1, "memory_bytes": 64 << 20, "max_processes": 1,
                   "max_file_bytes": 0, "max_open_files": 16, "max_output_bytes": 1024,
                   "disk_bytes": 1 << 20, "max_value_bytes": 1024}
        for name, low in minimum.items():
            value = getattr(self, name)
            kind = float if name == "timeout" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise SmallCoderError(f"sandbox Limits.{name}: expected {kind.__name__}, got {value!r}")
            if value < low:
                raise SmallCoderError(f"sandbox Limits.{name} must be at least {low}, got {value!r}")


@dataclass(frozen=True)
class Check:
    """How a checked run grades a sample (the benchmark's test code, run outside the sample).

    `setup` runs first in the checker (a HumanEval prompt: its imports and helpers); `test` is the
    benchmark's test code; `functions` are the names it calls that the sample defines (bound to
    proxies); `sample_setup` runs in the sample after its code (MBPP's test_setup_code) and
    `refs` are the names it makes that the test passes back to the sample; `values` are plain
    values bound before the test (EvalPlus inputs); `collect` names a value to return."""

    test: str
    functions: tuple[str, ...]
    setup: str = ""
    sample_setup: str = ""
    refs: tuple[str, ...] = ()
    values: dict = field(default_factory=dict)
    collect: str | None = None


@dataclass(frozen=True)
class Setup:
    """How processes are launched here, decided once by probing (probe.py)."""

    interpreter: str
    unshare: tuple[str, ...]   # the namespace prefix, () when unavailable
    switch_uid: bool           # root: run each process under its own unprivileged uid
    mounts: dict | None        # the private root's contents (probe.mount_spec), None: no private mounts
    report: dict
    strays: tuple[str, ...] = ()  # world-writable folders to clean when there are no private mounts


def rlimits(limits: Limits, own_uid: bool) -> dict[str, list[int]]:
    nproc = limits.max_processes
    if not own_uid and os.geteuid() != 0:
        # the count covers all of this user's processes (outside a user namespace), so the
        # budget is added on top of what the user runs already
        nproc += len(uids.pids_of(os.getuid()))
    return {
        "RLIMIT_AS": [limits.memory_bytes] * 2,
        "RLIMIT_CPU": [limits.cpu_seconds, limits.cpu_seconds + 1],
        "RLIMIT_NPROC": [nproc] * 2,
        "RLIMIT_FSIZE": [limits.max_file_bytes] * 2,
        "RLIMIT_NOFILE": [limits.max_open_files] * 2,
        "RLIMIT_CORE": [0, 0],
    }


def checker_limits(limits: Limits, job_bytes: int = 0) -> Limits:
    """The checker runs trusted code but decodes what the sample sent: bounded, generously
    (its work folder holds the job, whose expected outputs can be large)."""
    return Limits(timeout=limits.timeout, cpu_seconds=max(60, 2 * limits.cpu_seconds),
                  memory_bytes=max(2 << 30, 4 * limits.max_value_bytes, limits.memory_bytes, 8 * job_bytes),
                  max_processes=16, max_file_bytes=max(10 << 20, job_bytes), max_open_files=64,
                  max_output_bytes=1 << 20, disk_bytes=max(16 << 20, job_bytes + (1 << 20)),
                  max_value_bytes=limits.max_value_bytes)


class _Output:
    """Counts and tails a process's output without storing it whole; spots the pass token."""

    def __init__(self, token: bytes | None, keep_stdout: bool) -> None:
        self.token = b"\n" + token + b"\n" if token else None
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
            if self.token:
                window = self._window + chunk
                self.token_seen = self.token_seen or self.token in window
                self._window = window[-len(self.token):]
            if self.keep_stdout:
                self.stdout_tail = (self.stdout_tail + chunk)[-(16 * TAIL_BYTES):]
        else:
            self.stderr_bytes += len(chunk)
            self.stderr_tail = (self.stderr_tail + chunk)[-TAIL_BYTES:]

    @property
    def total(self) -> int:
        return self.stdout_bytes + self.stderr_bytes


class _Proc:
    """One sandboxed process: its launcher, pipes, output, work folder and uid."""

    def __init__(self, name: str, setup: Setup, limits: Limits, files: dict[str, bytes],
                 argv: list[str], fds: dict[int, int], token: bytes | None, keep_stdout: bool) -> None:
        self.name, self.setup, self.limits = name, setup, limits
        self.out = _Output(token, keep_stdout)
        self.proc: subprocess.Popen | None = None
        self.status_raw = b""
        self.exited_at: float | None = None
        self.pidfd: int | None = None
        self.fds: list[int] = []
        self.lifeline: int | None = None
        self.workdir: str | None = None
        self.uid = uids.claim() if setup.switch_uid else None
        try:
            self._start(files, argv, fds)
        except BaseException:
            self.close()
            raise

    def _start(self, files: dict[str, bytes], argv: list[str], fds: dict[int, int]) -> None:
        setup, limits = self.setup, self.limits
        self.workdir = tempfile.mkdtemp(prefix="smallcoder-sandbox-", dir=_workroot(setup))
        mounted = setup.mounts is not None
        for fname, data in files.items():
            with open(os.path.join(self.workdir, fname), "wb") as f:
                f.write(data)
        if mounted:
            os.mkdir(os.path.join(self.workdir, ".root"))
        elif self.uid is not None:
            os.chown(self.workdir, self.uid, self.uid)
            for fname in files:
                os.chown(os.path.join(self.workdir, fname), self.uid, self.uid)
        status_r, status_w = os.pipe()
        life_r, life_w = os.pipe()
        self.fds += [status_r, status_w, life_r]
        self.status_r, self.lifeline = status_r, life_w
        config = {
            "argv": argv, "cwd": self.workdir,
            "env": {"PATH": SAFE_PATH, "HOME": self.workdir, "TMPDIR": self.workdir, "LANG": "C.UTF-8"},
            "uid": self.uid, "rlimits": rlimits(limits, self.uid is not None),
            "status_fd": status_w, "lifeline_fd": life_r, "fds": {str(t): s for t, s in fds.items()},
            "mount": None if not mounted else {
                **setup.mounts, "root": os.path.join(self.workdir, ".root"), "work": self.workdir,
                "tmp_bytes": limits.disk_bytes,
                "files": {fname: os.path.join(self.workdir, fname) for fname in files}},
        }
        launcher = [*setup.unshare, sys.executable, "-I", "-S", str(_HERE / "launcher.py"), json.dumps(config)]
        self.proc = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, pass_fds=(status_w, life_r, *fds.values()),
                                     start_new_session=True, env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"})
        for fd in (status_w, life_r):
            os.close(fd)
            self.fds.remove(fd)
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(self.proc.pid)
            except OSError:
                self.pidfd = None

    def has_exited(self) -> bool:
        """Whether the launcher has exited, without reaping it (its pid must stay a valid pgid)."""
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    def kill(self) -> None:
        """SIGKILL the launcher's process group (namespace included) and every process of the uid."""
        if self.proc is not None and self.proc.returncode is None:  # its pid still names our group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.uid is not None:
            uids.sweep(self.uid)

    def close(self) -> None:
        """Kill whatever is left, collect the launcher, delete the work folder; idempotent."""
        if self.proc is not None:
            if self.proc.returncode is None:
                self.kill()
                self.proc.wait()
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        if self.lifeline is not None:
            os.close(self.lifeline)
            self.lifeline = None
        if self.workdir is not None:
            uids.remove_tree(self.workdir)
            self.workdir = None
        if self.uid is not None:
            if self.setup.mounts is None:
                uids.remove_strays(self.uid, list(self.setup.strays))
            uids.release(self.uid)
            self.uid = None

    def status(self) -> dict | None:
        try:
            status = json.loads(self.status_raw.decode()) if self.status_raw else None
        except ValueError:
            return None
        return status if isinstance(status, dict) else None


def execute(setup: Setup, code: str, limits: Limits, check: Check | None = None,
            keep_stdout: bool = False) -> tuple[ExecResult, bytes]:
    """Run `code` once (checked when `check` is given); returns the result and, for the probe,
    the tail of stdout."""
    start = time.monotonic()
    procs: list[_Proc] = []
    pipes: list[int] = []
    try:
        if check is None:
            token = secrets.token_hex(16).encode()
            program = (code + _FOOTER.format(token=token.decode())).encode("utf-8", "surrogatepass")
            argv = [setup.interpreter, "-I", "sample.py"]
            procs.append(_Proc("sample", setup, limits, {"sample.py": program}, argv, {}, token, keep_stdout))
            verdict_r = None
        else:
            call_r, call_w = os.pipe()
            reply_r, reply_w = os.pipe()
            verdict_r, verdict_w = os.pipe()
            pipes += [call_r, call_w, reply_r, reply_w, verdict_r, verdict_w]
            files = {"sample.py": code.encode("utf-8", "surrogatepass"),
                     "test_setup.py": check.sample_setup.encode("utf-8", "surrogatepass")}
            argv = [setup.interpreter, "-I", "-c", _LOADER.format(name="smallcoder_worker", file="worker.py"),
                    _source("codec.py"), _source("worker.py"), "3", "4", "sample.py", "test_setup.py"]
            procs.append(_Proc("sample", setup, limits, files, argv, {3: call_r, 4: reply_w}, None, False))
            job = _job(check, limits)
            argv = [setup.interpreter, "-I", "-c", _LOADER.format(name="smallcoder_checker", file="checker.py"),
                    _source("codec.py"), _source("checker.py"), "3", "4", "5", "job.json"]
            procs.append(_Proc("checker", setup, checker_limits(limits, len(job)), {"job.json": job}, argv,
                               {3: call_w, 4: reply_r, 5: verdict_w}, None, False))
            for fd in (call_r, call_w, reply_r, reply_w, verdict_w):  # the sandboxes hold them now
                os.close(fd)
                pipes.remove(fd)
        reason, verdict_raw = _watch(procs, verdict_r, limits, start)
        duration = time.monotonic() - start
        for p in procs:
            p.kill()
        if check is None:
            return _classify_plain(reason, procs[0], limits, duration), procs[0].out.stdout_tail
        return _classify_checked(reason, procs[0], procs[1], verdict_raw, limits, duration), b""
    except OSError as exc:
        return ExecResult("error", f"sandbox harness: {exc}", time.monotonic() - start, 0), b""
    finally:
        for p in procs:
            p.close()
        for fd in pipes:
            os.close(fd)


def _source(name: str) -> str:
    return (_HERE / name).read_text(encoding="utf-8")


_jobs: dict[tuple[int, int], tuple[Check, bytes]] = {}  # the last few, kept with their Check alive
_jobs_lock = threading.Lock()


def _job(check: Check, limits: Limits) -> bytes:
    """The checker's job file; encoded once per Check object (a task's samples share one, and
    HumanEval+'s expected outputs can be a hundred megabytes)."""
    from .codec import dumps_message, encode

    key = (id(check), limits.max_value_bytes)
    with _jobs_lock:
        hit = _jobs.get(key)
    if hit is not None and hit[0] is check:
        return hit[1]
    job = dumps_message({"setup": check.setup, "test": check.test, "functions": list(check.functions),
                         "refs": list(check.refs), "collect": check.collect,
                         "values": {k: encode(v) for k, v in check.values.items()},
                         "max_reply_bytes": limits.max_value_bytes})
    with _jobs_lock:
        if len(_jobs) >= 8:
            _jobs.pop(next(iter(_jobs)))
        _jobs[key] = (check, job)
    return job


def _watch(procs: list[_Proc], verdict_r: int | None, limits: Limits, start: float
           ) -> tuple[str | None, bytes]:
    """Pump output until every launcher exited (or a limit hit); returns (reason, verdict bytes).

    reason: None, "timeout", "output" (the sample printed too much) or "checker_output"."""
    sel = selectors.DefaultSelector()
    verdict = bytearray()  # appended to in place: a verdict may carry many megabytes
    for p in procs:
        for which, fd in (("stdout", p.proc.stdout.fileno()), ("stderr", p.proc.stderr.fileno()),
                          ("status", p.status_r)):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, (p, which))
        if p.pidfd is not None:
            sel.register(p.pidfd, selectors.EVENT_READ, (p, "exit"))
    if verdict_r is not None:
        os.set_blocking(verdict_r, False)
        sel.register(verdict_r, selectors.EVENT_READ, (None, "verdict"))
    deadline = start + limits.timeout
    reason: str | None = None
    checker = procs[1] if len(procs) > 1 else None
    try:
        while True:
            now = time.monotonic()
            running = [p for p in procs if p.exited_at is None]
            if running and now >= deadline:
                reason = "timeout"
                break
            last_exit = max((p.exited_at for p in procs if p.exited_at is not None), default=None)
            if not running and (len(sel.get_map()) == 0 or now >= last_exit + DRAIN_SECONDS):
                break
            wait = (deadline if running else last_exit + DRAIN_SECONDS) - now
            if any(p.pidfd is None for p in running):
                wait = min(wait, 0.02)
            for key, _ in sel.select(max(wait, 0.0)):
                p, which = key.data
                if which == "exit":
                    sel.unregister(key.fd)
                    _exited(p, procs)
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                elif which == "verdict":
                    verdict += chunk
                    if len(verdict) > 2 * limits.max_value_bytes + (1 << 20):
                        reason = "checker_output"
                        break
                elif which == "status":
                    p.status_raw += chunk
                else:
                    p.out.add(which, chunk)
            for p in running:
                if p.pidfd is None and p.exited_at is None and p.has_exited():
                    _exited(p, procs)
            if procs[0].out.total > limits.max_output_bytes:
                reason = "output"
                break
            if checker is not None and checker.out.total > checker.limits.max_output_bytes:
                reason = "checker_output"
                break
    finally:
        sel.close()
    return reason, bytes(verdict)


def _exited(p: _Proc, procs: list[_Proc]) -> None:
    """A launcher exited: its leftovers (a daemon holding the pipes) die now; when the checker
    is done, so is the sample."""
    p.exited_at = time.monotonic()
    p.kill()
    if p.name == "checker":
        for other in procs:
            if other is not p and other.exited_at is None:
                other.kill()


def _result(status: str, detail: str, duration: float, p: _Proc, code: int | None = None) -> ExecResult:
    printed = p.out.stdout_bytes - (len(p.out.token) if p.out.token and p.out.token_seen else 0)
    st = p.status() or {}
    return ExecResult(status, detail, round(duration, 4), printed, code,
                      p.out.stderr_tail.decode("utf-8", "replace"), st.get("cpu_seconds"))


def _last_line(p: _Proc) -> str:
    stderr = p.out.stderr_tail.decode("utf-8", "replace")
    return next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")[:300]


def _exit_status(p: _Proc, limits: Limits, duration: float) -> tuple[ExecResult | None, int | None]:
    """(an error/killed/failed result from the process's own end, or None; its exit code)."""
    status = p.status()
    last = _last_line(p)
    if status is None:
        return _result("error", f"sandbox launcher ended without a report: {last or 'no message'}", duration, p), None
    if status.get("setup_error"):
        return _result("error", f"sandbox launcher could not start the {p.name}: {status['setup_error']}",
                       duration, p), None
    code = status.get("exitcode")
    if not isinstance(code, int):
        return _result("error", f"sandbox launcher report has no exit code: {status!r}", duration, p), None
    if code < 0:
        return _result("killed", _signal_detail(-code, status, limits), duration, p, code), code
    if code == 0:
        return None, 0
    limit = _limit_hit(last, limits)
    if limit:
        return _result("killed", f"{limit}: {last}", duration, p, code), code
    return _result("failed", last or f"exit status {code}", duration, p, code), code


def _classify_plain(reason: str | None, p: _Proc, limits: Limits, duration: float) -> ExecResult:
    if reason == "timeout":
        return _result("timeout", f"wall-clock timeout after {limits.timeout:g} s", duration, p)
    if reason == "output":
        return _result("killed", f"output limit: more than {limits.max_output_bytes} bytes", duration, p)
    ended, _ = _exit_status(p, limits, duration)
    if ended is not None:
        return ended
    if p.out.token_seen:
        return _result("passed", "", duration, p, 0)
    return _result("failed", "exited with status 0 before the end of the program", duration, p, 0)


def _classify_checked(reason: str | None, sample: _Proc, checker: _Proc, verdict_raw: bytes,
                      limits: Limits, duration: float) -> ExecResult:
    """The checker's verdict decides; where the sample broke the protocol, its own end says why."""
    from .codec import CodecError, loads_message

    if reason == "timeout":
        return _result("timeout", f"wall-clock timeout after {limits.timeout:g} s", duration, sample)
    if reason == "output":
        return _result("killed", f"output limit: more than {limits.max_output_bytes} bytes", duration, sample)
    if reason == "checker_output":
        return _result("error", "the test code printed more than the checker's output limit", duration, sample)
    verdict = None
    if len(verdict_raw) >= 8 and int.from_bytes(verdict_raw[:8], "big") == len(verdict_raw) - 8:
        try:
            verdict = loads_message(verdict_raw[8:])
        except CodecError:
            verdict = None
    if verdict is None:
        ended, _ = _exit_status(checker, checker.limits, duration)
        why = ended.detail if ended is not None else _last_line(checker) or "no message"
        return _result("error", f"the checker ended without a verdict: {why}", duration, sample)
    kind, detail = verdict.get("verdict"), str(verdict.get("detail", ""))[:500]
    sample_code = (sample.status() or {}).get("exitcode")
    if kind == "passed":
        result = _result("passed", "", duration, sample, sample_code)
        if "collected" in verdict:
            from .codec import decode

            try:
                result.collected = decode(verdict["collected"])
            except (CodecError, RecursionError) as exc:
                return _result("error", f"the checker's collected value is unreadable: {exc}", duration, sample)
        return result
    if kind == "failed":
        return _result("failed", detail, duration, sample, sample_code)
    if kind == "error":
        return _result("error", f"the checker could not run the tests: {detail}", duration, sample)
    # a fault: the sample ended (its own end says why) or broke the protocol (the checker says how)
    if verdict.get("gone") is True:
        ended, code = _exit_status(sample, limits, duration)
        if ended is not None:
            return ended
        return _result("failed", "exited with status 0 before its functions were tested", duration, sample, code)
    return _result("failed", detail, duration, sample, sample_code)


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
    if "[Errno 28]" in last_line:  # ENOSPC: its private tmpfs is full
        return f"disk limit ({limits.disk_bytes >> 20} MiB per private folder)"
    return ""


def _workroot(setup: Setup) -> str:
    """Where work folders go: the temp dir, unless a sample uid could not reach into it."""
    root = tempfile.gettempdir()
    if setup.switch_uid and setup.mounts is None and not _reachable_by_others(root):
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

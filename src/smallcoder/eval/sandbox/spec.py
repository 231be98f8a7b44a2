"""What a sandboxed run is given and what it gives back: limits, checks, results, the set-up.

Kept apart from the supervising code so that callers (the benchmarks, the probe) name these
without the process machinery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ...errors import SmallCoderError
from . import uids


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

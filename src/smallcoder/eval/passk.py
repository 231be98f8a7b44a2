"""Unbiased pass@k, and the step from executed samples to scored code tasks.

pass@k for one task with n samples of which c pass is 1 - C(n-c, k) / C(n, k) (Chen et al. 2021),
computed as 1 - prod(1 - k / arange(n-c+1, n+1)) so large n never overflows a binomial. The task
score is the mean over tasks; its standard error is the sample standard deviation of the per-task
values divided by sqrt(number of tasks) (for pass@1 with n = 1: sqrt(p(1-p)/(T-1))).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import SmallCoderError
from .results import Score, TaskResult


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (c of them correct) passes."""
    if k < 1:
        raise SmallCoderError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise SmallCoderError(f"pass@k needs at least k samples per task: k={k} > n={n} "
                              f"(generate n >= {k} samples, e.g. --n-samples {k})")
    if not 0 <= c <= n:
        raise SmallCoderError(f"pass@k: correct count c={c} must lie between 0 and n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> Score:
    """pass@k averaged over tasks from (n, c) per task, with its count and standard error."""
    if not counts:
        raise SmallCoderError("pass@k over zero tasks: nothing was scored")
    values = np.array([pass_at_k(n, c, k) for n, c in counts], dtype=np.float64)
    stderr = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return Score(value=float(values.mean()), correct=float(values.sum()), total=len(values), stderr=stderr)


def proportion(correct: int, total: int) -> Score:
    """A plain accuracy with the standard error of a mean of 0/1 values (ddof=1, as lm-eval)."""
    if total <= 0:
        raise SmallCoderError("an accuracy over zero items: nothing was scored")
    p = correct / total
    stderr = math.sqrt(p * (1 - p) / (total - 1)) if total > 1 else None
    return Score(value=p, correct=correct, total=total, stderr=stderr)


def parse_ks(text: str | Sequence[int]) -> list[int]:
    """`"1,10"` -> [1, 10]; refuses anything that is not a positive integer."""
    items = text.split(",") if isinstance(text, str) else list(text)
    ks: list[int] = []
    for item in items:
        try:
            k = int(str(item).strip())
        except ValueError:
            raise SmallCoderError(f"--k: {item!r} is not an integer (use e.g. --k 1,10)") from None
        if k < 1:
            raise SmallCoderError(f"--k: k must be >= 1, got {k}")
        if k not in ks:
            ks.append(k)
    if not ks:
        raise SmallCoderError("--k: give at least one k, e.g. --k 1")
    return sorted(ks)


def check_ks(ks: Sequence[int], n: int) -> None:
    """Refuse before any generation when some k exceeds the samples per task."""
    bad = [k for k in ks if k > n]
    if bad:
        raise SmallCoderError(f"pass@k needs k <= n: k={max(bad)} > n={n} samples per task "
                              f"(raise --n-samples to {max(bad)} or drop k={','.join(map(str, bad))})")


def score_code_samples(task: str, task_ids: Sequence[Any], records: Sequence[dict[str, Any]],
                       runs: Sequence[tuple[str, Any]], ks: Sequence[int], settings: dict[str, Any],
                       limits: Any = None, workers: int | None = None, progress: bool = False,
                       notes: Sequence[str] = ()) -> TaskResult:
    """Grade one (code, check) run per sample in the sandbox and score pass@k per task.

    `records[i]` is the sample record for `runs[i]` (it must hold `task_id`); the result of
    the run is added to it. Every task in `task_ids` must have at least max(ks) samples.
    `limits` is one `sandbox.Limits` for all runs or one per run.
    """

    if len(records) != len(runs):
        raise ValueError("one record per run")
    check_samples_per_task(task, task_ids, records, ks)
    results = run_graded(runs, limits, workers, progress)
    per_task: dict[Any, list[bool]] = {tid: [] for tid in task_ids}
    for record, res in zip(records, results):
        record.update(result_fields(res))
        per_task[record["task_id"]].append(res.status == "passed")
    counts = [(len(v), sum(v)) for v in per_task.values()]
    metrics = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    return code_task_result(task, metrics, records, settings, notes, workers)


def check_samples_per_task(task: str, task_ids: Sequence[Any], records: Sequence[dict[str, Any]],
                           ks: Sequence[int]) -> None:
    """Refuse, before running anything, samples of unknown tasks or fewer than max(ks) for a task."""
    n_per_task = dict.fromkeys(task_ids, 0)
    for r in records:
        if r["task_id"] not in n_per_task:
            raise SmallCoderError(f"{task}: sample for unknown task_id {r['task_id']!r}")
        n_per_task[r["task_id"]] += 1
    short = [(tid, n) for tid, n in n_per_task.items() if n < max(ks)]
    if short:
        tid, n = short[0]
        raise SmallCoderError(f"{task}: pass@{max(ks)} needs k <= n, but task {tid!r} has n={n} sample(s) "
                              f"({len(short)} task(s) short of k={max(ks)})")


def default_workers() -> int:
    """A graded sample mostly waits on process start-up and teardown: two at a time per core."""
    return 2 * (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def run_graded(runs: Sequence[tuple[str, Any]], limits: Any, workers: int | None, progress: bool) -> list[Any]:
    """The sandbox's results for (code, check) runs, in order."""
    from . import sandbox

    kwargs: dict[str, Any] = {"workers": workers or default_workers(), "progress": progress,
                              "checks": [check for _, check in runs]}
    if limits is not None:
        kwargs["limits"] = limits
    return sandbox.run_many([code for code, _ in runs], **kwargs)


def result_fields(res: Any) -> dict[str, Any]:
    """What a sample record keeps of its graded run."""
    return {"status": res.status, "detail": res.detail, "exec_time": round(float(res.duration), 4),
            "cpu_time": res.cpu_seconds}


def code_task_result(task: str, metrics: dict[str, Score], records: Sequence[dict[str, Any]],
                     settings: dict[str, Any], notes: Sequence[str], workers: int | None) -> TaskResult:
    """The TaskResult of a code task: statuses, the sandbox's protections and the extraction rule
    in the settings, and a note for every protection that is not in effect here."""
    from . import sandbox
    from .extract import RULE_TEXT

    statuses: dict[str, int] = {}
    for r in records:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    settings = {**settings, "tasks": len({r["task_id"] for r in records}), "samples": len(records),
                "statuses": statuses, "sandbox_workers": workers or default_workers()}
    protections = sandbox.protections()
    settings["sandbox"] = protections
    all_notes = list(notes)
    rule = settings.get("code_extraction")
    if rule in RULE_TEXT:
        all_notes.append(f"code extraction: {RULE_TEXT[rule]}")
    missing = [name for name, on in protections.items() if on is False and name != "harness_root"]
    if missing:
        all_notes.append(f"sandbox protections not active on this machine: {', '.join(missing)}")
    return TaskResult(task=task, metrics=metrics, settings=settings, samples=list(records), notes=all_notes)

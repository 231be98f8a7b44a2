"""HumanEval+ (EvalPlus, Liu et al. 2023): HumanEval's 164 tasks judged on many more inputs.

A sample is judged as EvalPlus judges it: differential testing against the canonical solution.
The canonical solution runs once on every `base_input` and `plus_input` (in the sandbox, as a
graded run whose test records the outputs and their CPU times; cached under the cache folder,
keyed by the data file's hash and the interpreter), then each sample's outputs on the same inputs
are compared with them in the trusted checker (plus_compare.py: exact match, `atol`, EvalPlus's
float rule and its find_zero oracle), first on the base inputs, then, if those pass, on the plus
inputs. pass@k counts samples that pass both (EvalPlus's "HumanEval+"); `base pass@k` counts the
base inputs alone (EvalPlus's "HumanEval (base tests)"). Time limits are CPU seconds per input:
max(4, 4 x the canonical time), EvalPlus's constants; the whole run at most 60 s (+1), as there.

Prompts and code assembly are HumanEval's (humaneval.py): the instruct format extracts the code,
`--format base` and `--samples` take prompt + completion as is (or a whole `solution`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from .humaneval import file_records, run_humaneval
from .results import TaskResult
from .sandbox import Check, Limits

if TYPE_CHECKING:
    from ..inference import Engine

MIN_TIME_LIMIT = 4.0          # EvalPlus DEFAULT_MIN_TIME_LIMIT (seconds per input)
TIME_LIMIT_FACTOR = 4.0       # EvalPlus DEFAULT_GT_TIME_LIMIT_FACTOR
RUN_CAP_SECONDS = 60.0        # EvalPlus EVALPLUS_TIMEOUT_PER_TASK
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input", "atol")
_COMPARE = (Path(__file__).with_name("plus_compare.py")).read_text(encoding="utf-8")
_TRUTH_TEST = ("outputs, times = [], []\nfor inp in inputs:\n    outputs.append({f}(*inp))\n"
               "    times.append({f}.last_cpu)\ntruth = [outputs, times]\n")


def check_problems(problems: Sequence[dict[str, Any]], source: str = "HumanEval+") -> None:
    for i, p in enumerate(problems):
        missing = [k for k in FIELDS if k not in p]
        if missing:
            raise SmallCoderError(f"{source} record {i} ({p.get('task_id', '?')}): field(s) {', '.join(missing)} "
                                  "missing (HumanEvalPlus.jsonl.gz from evalplus/humanevalplus_release is needed)")
        if not isinstance(p["base_input"], list) or not isinstance(p["plus_input"], list):
            raise SmallCoderError(f"{source} record {i} ({p['task_id']}): base_input and plus_input must be lists")


def ground_truth(problems: Sequence[dict[str, Any]], workers: int | None = None,
                 progress: bool = False) -> dict[str, dict[str, list]]:
    """The canonical solution's outputs and CPU seconds per input: {task_id: {"base", "base_cpu",
    "plus", "plus_cpu"}}, computed in the sandbox once per task and cached (keyed by the task's
    content and the interpreter, so an edited task or another Python recomputes)."""
    check_problems(problems)
    folder = _cache_folder()
    truth: dict[str, dict[str, list]] = {}
    missing = []
    for p in problems:
        cached = _read_cached(folder / _cache_name(p))
        if cached is None:
            missing.append(p)
        else:
            truth[p["task_id"]] = cached
    if missing:
        truth.update(_compute_truth(missing, folder, workers, progress))
    return truth


def _cache_folder() -> Path:
    from ..fsutil import cache_root

    return cache_root() / "evalplus" / f"py{platform.python_version()}"


def _cache_name(problem: dict[str, Any]) -> str:
    text = json.dumps([problem[k] for k in FIELDS], sort_keys=True).encode("utf-8", "surrogatepass")
    return f"{problem['task_id'].replace('/', '_')}-{hashlib.sha256(text).hexdigest()[:16]}.json.gz"


def _read_cached(path: Path) -> dict[str, list] | None:
    from .sandbox.codec import CodecError, decode

    if not path.is_file():
        return None
    try:
        entry = json.loads(gzip.decompress(path.read_bytes()))
        return {k: decode(entry[k]) for k in ("base", "base_cpu", "plus", "plus_cpu")}
    except (OSError, EOFError, ValueError, KeyError, TypeError, CodecError):
        return None  # a damaged cache entry is recomputed


def _compute_truth(problems: Sequence[dict[str, Any]], folder: Path, workers: int | None,
                   progress: bool) -> dict[str, dict[str, list]]:
    from ..fsutil import atomic_path
    from .passk import run_graded
    from .sandbox.codec import encode

    runs = [(p["prompt"] + p["canonical_solution"],
             Check(test=_TRUTH_TEST.format(f=p["entry_point"]), functions=(p["entry_point"],),
                   values={"inputs": p["base_input"] + p["plus_input"]}, collect="truth")) for p in problems]
    limits = Limits(timeout=600.0, cpu_seconds=300, memory_bytes=4 << 30, max_value_bytes=256 << 20)
    truth = {}
    for p, res in zip(problems, run_graded(runs, limits, workers, progress)):
        if res.status != "passed" or not isinstance(res.collected, list):
            raise SmallCoderError(f"HumanEval+ {p['task_id']}: the canonical solution failed on its own inputs "
                                  f"({res.status}: {res.detail})")
        outputs, times = res.collected
        n = len(p["base_input"])
        entry = {"base": outputs[:n], "base_cpu": times[:n], "plus": outputs[n:], "plus_cpu": times[n:]}
        truth[p["task_id"]] = entry
        text = json.dumps({k: encode(v) for k, v in entry.items()}, ensure_ascii=True, allow_nan=False)
        try:
            with atomic_path(folder / _cache_name(p)) as tmp:
                tmp.write_bytes(gzip.compress(text.encode("ascii"), compresslevel=1))
        except OSError:
            pass  # no cache folder: computed again next time
    return truth


def plus_check(problem: dict[str, Any], truth: dict[str, list], part: str) -> tuple[Check, Limits]:
    """The differential test of one part ("base" or "plus") of a task, and its limits."""
    inputs = problem[f"{part}_input"]
    cpu = [max(MIN_TIME_LIMIT, TIME_LIMIT_FACTOR * t) for t in truth[f"{part}_cpu"]]
    entry = problem["entry_point"]
    test = (_COMPARE + f"\n\nevaluate({entry}, inputs, expected, cpu_limits, atol, {entry!r})\n")
    check = Check(test=test, functions=(entry,), values={"inputs": inputs, "expected": truth[part],
                                                          "cpu_limits": cpu, "atol": float(problem["atol"])})
    run_cpu = math.ceil(min(RUN_CAP_SECONDS, sum(cpu))) + 1
    return check, Limits(cpu_seconds=run_cpu, timeout=max(60.0, 3.0 * run_cpu))


def score_plus(problems: Sequence[dict[str, Any]], records: list[dict[str, Any]], codes: Sequence[str],
               ks: Sequence[int], settings: dict[str, Any], *, limits: Any = None, workers: int | None = None,
               progress: bool = False, notes: Sequence[str] = ()) -> TaskResult:
    """Grade samples on the base inputs, those that pass on the plus inputs too; pass@k of both."""
    from .passk import check_samples_per_task, code_task_result, mean_pass_at_k, result_fields, run_graded

    task_ids = list(dict.fromkeys(r["task_id"] for r in records))
    check_samples_per_task("humaneval_plus", task_ids, records, ks)
    by_id = {p["task_id"]: p for p in problems}
    truth = ground_truth([by_id[t] for t in task_ids], workers=workers, progress=progress)

    checks: dict[tuple[Any, str], tuple[Check, Limits]] = {}

    def graded(indices: list[int], part: str) -> list[Any]:
        runs, lims = [], []
        for i in indices:
            tid = records[i]["task_id"]
            if (tid, part) not in checks:  # one Check per task and part: its job is encoded once
                checks[tid, part] = plus_check(by_id[tid], truth[tid], part)
            check, lim = checks[tid, part]
            if limits is not None:  # --timeout: the wall clock given, the CPU budget EvalPlus's
                lim = replace(lim, timeout=max(limits.timeout, lim.timeout))
            runs.append((codes[i], check))
            lims.append(lim)
        return run_graded(runs, lims, workers, progress) if runs else []

    base = graded(list(range(len(records))), "base")
    passed_base = [i for i, res in enumerate(base) if res.status == "passed"]
    plus = dict(zip(passed_base, graded(passed_base, "plus")))
    base_ok: dict[Any, list[bool]] = {t: [] for t in task_ids}
    both_ok: dict[Any, list[bool]] = {t: [] for t in task_ids}
    for i, record in enumerate(records):
        final = plus.get(i, base[i])
        record.update(result_fields(final))
        record["base_status"] = base[i].status
        record["plus_status"] = plus[i].status if i in plus else None
        if i in plus and plus[i].status != "passed":
            record["detail"] = f"plus tests: {plus[i].detail}"
        base_ok[record["task_id"]].append(base[i].status == "passed")
        both_ok[record["task_id"]].append(final.status == "passed" and i in plus)
    metrics = {}
    for k in ks:
        metrics[f"pass@{k}"] = mean_pass_at_k([(len(v), sum(v)) for v in both_ok.values()], k)
    for k in ks:
        metrics[f"base_pass@{k}"] = mean_pass_at_k([(len(v), sum(v)) for v in base_ok.values()], k)
    settings = {**settings, "time_limits": f"CPU per input max({MIN_TIME_LIMIT:g}, {TIME_LIMIT_FACTOR:g} x "
                                           f"canonical), at most {RUN_CAP_SECONDS:g} s per run (EvalPlus's)"}
    return code_task_result("humaneval_plus", metrics, records, settings, notes, workers)


def run_humaneval_plus(engine: Engine, problems: Sequence[dict[str, Any]], **kw: Any) -> TaskResult:
    """Generate with HumanEval's prompts (instruct or base format), then grade as EvalPlus."""
    check_problems(problems)
    ready = [{**p, "test": ""} for p in problems]
    return run_humaneval(engine, ready, task="humaneval_plus",
                         score=lambda probs, records, codes, ks, settings, **k: score_plus(
                             problems, records, codes, ks, settings, **k), **kw)


def score_humaneval_plus(problems: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *,
                         ks: Sequence[int] = (1,), fmt: str = "base", limits: Any = None,
                         workers: int | None = None, progress: bool = True, source: str = "samples",
                         extraction: str | None = None) -> TaskResult:
    """Score a samples file (`completion` after the prompt, or a whole `solution`) as EvalPlus."""
    check_problems(problems)
    ready = [{**p, "test": ""} for p in problems]
    _, records, codes, settings = file_records(ready, samples, fmt=fmt, source=source, extraction=extraction,
                                               ks=ks, label="HumanEval+")
    return score_plus(problems, records, codes, ks, settings, limits=limits, workers=workers, progress=progress)

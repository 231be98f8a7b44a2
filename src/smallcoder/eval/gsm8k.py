"""GSM8k (test, 1,319 items), 0-shot: `Question: {q}\\nAnswer:`, stopped at `Question:` or EOS.

Two exact-match scores, as lm-evaluation-harness reports them:
- strict: the number after `#### ` in the completion (the dataset's own answer format);
- flexible: the last number anywhere in the completion.
Both sides are normalized before comparing: commas, `$` and a trailing `.` are removed, and
numbers compare by value (`18.00` equals `18`). Decoding is greedy (temperature 0), as
lm-eval's gsm8k; the card's temperature 0.2 is for its code benchmarks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from .results import TaskResult

if TYPE_CHECKING:
    from ..inference import Engine

STOP = ("Question:",)
_STRICT = re.compile(r"#### *(-?[$0-9.,]*[0-9])")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?|-?\$?\.[0-9]+")


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def normalize_number(text: str) -> str:
    """Canonical text of a number: no `,`/`$`/trailing `.`, and by value when it parses (18.00 -> 18)."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(s)
    except InvalidOperation:
        return s
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_strict(completion: str) -> str | None:
    """The number after the first `#### `, normalized; None if there is none."""
    m = _STRICT.search(completion)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    """The last number in the completion, normalized; None if there is none."""
    found = _NUMBER.findall(completion)
    return normalize_number(found[-1]) if found else None


def gold_answer(answer: str) -> str:
    """The gold number of a GSM8k answer (the text after `#### `)."""
    if "####" not in answer:
        raise SmallCoderError(f"gsm8k answer has no '#### ' line: {answer[-80:]!r}")
    return normalize_number(answer.split("####")[-1])


def run_gsm8k(engine: Engine, items: Sequence[dict[str, Any]], *, max_new_tokens: int = 512,
              batch_size: int = 8, seed: int = 0, progress: bool = True) -> TaskResult:
    """Greedy answers for every question; strict and flexible exact match with counts."""
    from .generation import generate_samples
    from .passk import proportion

    for i, it in enumerate(items):
        if not isinstance(it.get("question"), str) or not isinstance(it.get("answer"), str):
            raise SmallCoderError(f"gsm8k item {i}: needs text fields 'question' and 'answer'")
    golds = [gold_answer(it["answer"]) for it in items]
    prompts = [gsm8k_prompt(it["question"]) for it in items]
    completions, stats = generate_samples(engine, prompts, n_samples=1, temperature=0.0,
                                          max_new_tokens=max_new_tokens, seed=seed, stop=STOP,
                                          batch_size=batch_size, progress=progress, desc="gsm8k: generate")
    secs = stats.pop("sample_seconds")
    samples, strict_ok, flex_ok = [], 0, 0
    for i, (prompt, gold, comps) in enumerate(zip(prompts, golds, completions)):
        c = comps[0]
        strict, flexible = extract_strict(c.text), extract_flexible(c.text)
        strict_ok += strict == gold
        flex_ok += flexible == gold
        samples.append({"task_id": i, "prompt": prompt, "completion": c.text, "gold": gold,
                        "strict": strict, "flexible": flexible, "strict_correct": strict == gold,
                        "flexible_correct": flexible == gold, "finish_reason": c.finish_reason,
                        "completion_tokens": len(c.token_ids), "gen_time": round(secs[i][0], 4)})
    n = len(items)
    metrics = {"exact_match_strict": proportion(strict_ok, n), "exact_match_flexible": proportion(flex_ok, n)}
    settings = {"shots": 0, "n": 1, "temperature": 0.0, "max_new_tokens": max_new_tokens,
                "batch_size": batch_size, "stop": list(STOP), **stats}
    notes = [f"{stats['truncated_prompts']} prompt(s) longer than the context kept only their end"] \
        if stats.get("truncated_prompts") else []
    return TaskResult(task="gsm8k", metrics=metrics, settings=settings, samples=samples, notes=notes)

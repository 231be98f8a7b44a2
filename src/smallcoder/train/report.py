"""What a run learnt: the same measurements on the model before its first step and on the final
checkpoint, written to OUT/learning.json and printed by `smallcoder train`.

Measured each time:
- the loss on each stage's held-out data (eval_batches x micro_batch records of every stage, so
  the last model is also scored on what the first stages taught: forgetting shows);
- on held-out SFT prompts of each kind (code requests, math, prose questions; the kind is read off
  the reference answer, so a user's own SFT data is sorted the same way), greedy answers of at
  most 256 new tokens (half the context where that is less), stopped as `smallcoder chat` stops them: the share that end with EOS, that
  are non-empty, and (code) whose code parses as Python and defines or returns something, or
  (math) that end with a `#### N` final answer;
- greedy answers to two fixed prompts, the model card's own Fibonacci request and a math question.
A checkpoint that answers code requests with whitespace while "100% end with EOS" shows here as
what it is.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..fsutil import atomic_write_text
from .evaluation import held_out_records, mean_loss

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer
    from .specs import RunSpec
    from .stagedata import StageData

REPORT_FILE = "learning.json"
KINDS = ("code", "math", "prose")
PROMPTS_PER_KIND = 8
MAX_NEW_TOKENS = 256
SAMPLE_PROMPTS = (
    "Write a Python function to compute Fibonacci numbers.",  # the model card's usage example
    "Mia has 4 bags with 6 apples in each bag. She eats 5 apples. How many apples does she have left?",
)
PYTHON_FENCES = ("", "python", "py", "python3")  # a fence's info string that says Python (or nothing)
_FINAL = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")


def _python_block(text: str) -> str | None:
    """The first fenced block whose fence says Python or nothing (to its closing fence, or to the
    end of a text that stops inside it); None when there is none. Other fences (```bash) are skipped
    whole."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("```"):
            info = line[3:].strip().lower()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
            if info in PYTHON_FENCES:
                return "\n".join(lines[i + 1:end])
            i = end
        i += 1
    return None


def answer_kind(reference: str) -> str:
    """'code' when the reference answer holds a Python (or unlabelled) code fence, 'math' when it
    ends with `#### N`, else 'prose'."""
    if _python_block(reference) is not None:
        return "code"
    return "math" if _FINAL.search(reference.strip()) else "prose"


def code_of(answer: str) -> str:
    """The code of an answer: its first Python block (to the closing fence, or to the end when the
    answer stops inside it), else the whole answer."""
    block = _python_block(answer)
    return answer if block is None else block


def defines_something(code: str) -> bool:
    """True when `code` compiles as a Python module (compiled, never run: a `return` outside a
    function is refused) and defines a function or class, binds a lambda, or returns a value."""
    try:
        tree = ast.parse(code)
        compile(tree, "<answer>", "exec")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Return)):
            return True
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            return True
    return False


def judge(kind: str, answer: str, ended_with_eos: bool) -> dict[str, bool]:
    """The report's checks on one answer (as shown: leading whitespace stripped)."""
    text = answer.strip()
    out = {"eos": ended_with_eos, "non_empty": bool(text)}
    if kind == "code":
        out["parses_and_defines"] = bool(text) and defines_something(code_of(text))
    elif kind == "math":
        out["final_answer"] = bool(_FINAL.search(text))
    return out


def answer_budget(context: int) -> int:
    """New tokens per answer: MAX_NEW_TOKENS, or half the context of a model with less."""
    return min(MAX_NEW_TOKENS, context // 2)


def held_out_prompts(stages: Sequence[StageData], tokenizer: Tokenizer, context: int
                     ) -> list[tuple[str, str, str]]:
    """(kind, prompt, reference) for up to PROMPTS_PER_KIND held-out conversations of each kind,
    from the SFT stages (the last first), whose prompt leaves room for the answer in `context`."""
    room = context - answer_budget(context)
    from ..prompts import format_chat

    picked: dict[str, list[tuple[str, str, str]]] = {k: [] for k in KINDS}
    for data in reversed([d for d in stages if d.spec.sft]):
        for conv in (c for s in data.sources for c in s.heldout):
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            kind = answer_kind(conv[last]["content"])
            prompt = format_chat(conv[:last], add_generation_prompt=True)
            if len(picked[kind]) < PROMPTS_PER_KIND and len(tokenizer.encode(prompt)) <= room:
                picked[kind].append((kind, prompt, conv[last]["content"]))
    return [p for k in KINDS for p in picked[k]]


def _answers(model: torch.nn.Module, tokenizer: Tokenizer, prompts: list[str], budget: int) -> list[Any]:
    from ..inference import Engine, SamplingParams
    from ..prompts import chat_stops

    if not prompts:
        return []
    params = SamplingParams(max_new_tokens=budget, temperature=0.0, stop=chat_stops(), truncate=True)
    return Engine(model, tokenizer).generate(prompts, params)


@torch.no_grad()
def measure(model: torch.nn.Module, tokenizer: Tokenizer, stages: Sequence[StageData], run: RunSpec,
            device: torch.device) -> dict[str, Any]:
    """One side of the report (see the module docstring) for a plain (unwrapped) model on `device`."""
    from ..prompts import answer_text, format_chat

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leaves the run's RNG as it was
        loss = {}
        for d in stages:
            records = held_out_records(d, run.eval_batches * d.spec.micro_batch)
            if records:
                loss[d.spec.name] = mean_loss(model, model, records, d.spec.micro_batch, d.spec.seq_len,
                                              tokenizer.eos_id, device)
        context = model.config.max_position_embeddings
        prompts = held_out_prompts(stages, tokenizer, context) if any(d.spec.sft for d in stages) else []
        samples = [format_chat(p, add_generation_prompt=True) for p in SAMPLE_PROMPTS] if prompts else []
        budget = answer_budget(context)
        done = _answers(model, tokenizer, [p for _, p, _ in prompts] + samples, budget)
        model.train()
    kinds: dict[str, Any] = {}
    answers = []
    for (kind, prompt, ref), c in zip(prompts, done):
        text = answer_text(c.text)
        checks = judge(kind, text, isinstance(c.stop_reason, int))
        answers.append({"kind": kind, "prompt": prompt, "answer": text, "reference": ref, **checks})
        row = kinds.setdefault(kind, {"prompts": 0})
        row["prompts"] += 1
        for name, ok in checks.items():
            row[name] = row.get(name, 0) + int(ok)
    for row in kinds.values():
        for name in [n for n in row if n != "prompts"]:
            row[name] = row[name] / row["prompts"]
    shown = [{"prompt": p, "answer": answer_text(c.text)} for p, c in zip(SAMPLE_PROMPTS, done[len(prompts):])]
    eos = sum(a["eos"] for a in answers) / len(answers) if answers else None
    return {"loss": loss, "kinds": kinds, "eos_share": eos, "samples": shown, "answers": answers,
            "max_new_tokens": budget if prompts else None}


def read_report(out: Path) -> dict[str, Any]:
    """OUT/learning.json, or {} where there is none (or it cannot be read: it is rewritten at the end)."""
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def write_report(out: Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write OUT/learning.json ({"before": ..., "after": ...}) atomically; returns `report`."""
    atomic_write_text(out / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    return report


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _short(text: str, width: int = 110) -> str:
    one = " ".join(text.split()) or "(empty)"
    return one if len(one) <= width else one[:width - 3] + "..."


def format_report(report: dict[str, Any]) -> str:
    """The report as the lines `smallcoder train` prints: before -> after for each measurement."""
    before, after = report.get("before") or {}, report.get("after") or {}
    lines = ["what training changed (held-out data; before -> after):"]
    names = list(dict.fromkeys([*before.get("loss", {}), *after.get("loss", {})]))
    labels = [f"loss on {n} data" for n in names]
    width = max([len(x) for x in labels] + [0])
    for n, label in zip(names, labels):
        b, a = before.get("loss", {}).get(n), after.get("loss", {}).get(n)
        lines.append(f"  {label:{width}s}  {'-' if b is None else f'{b:.3f}'} -> {'-' if a is None else f'{a:.3f}'}")
    kinds = [k for k in KINDS if k in after.get("kinds", {}) or k in before.get("kinds", {})]
    if kinds:
        cols = (("eos", "ends with EOS"), ("non_empty", "non-empty"), ("parses_and_defines", "code parses, defines"),
                ("final_answer", "ends '#### N'"))
        rows = [[f"held-out answers (greedy, <= {after.get('max_new_tokens') or MAX_NEW_TOKENS} tokens)", "n"]
                + [title for _, title in cols]]
        for k in kinds:
            b, a = before.get("kinds", {}).get(k, {}), after.get("kinds", {}).get(k, {})
            rows.append([f"  {k}", str(a.get("prompts", b.get("prompts", 0)))]
                        + [f"{_share(b.get(c))} -> {_share(a.get(c))}" if c in a or c in b else "-" for c, _ in cols])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    for i, s in enumerate(after.get("samples", [])):
        lines.append(f"  sample {i + 1}: User: {s['prompt']}")
        if i < len(before.get("samples", [])):
            lines.append(f"    before: {_short(before['samples'][i]['answer'])}")
        lines.append(f"    after:  {_short(s['answer'])}")
    return "\n".join(lines)


def log_side(side: str, result: dict[str, Any]) -> None:
    """One stderr line with what a side measured."""
    shares = ", ".join(f"{k} {_share(r.get('non_empty'))} non-empty" for k, r in result["kinds"].items())
    print(f"learning report ({side} training): loss on {len(result['loss'])} stage(s)' held-out data"
          + (f"; {len(result['answers'])} held-out prompts answered ({shares})" if result["answers"] else ""),
          file=sys.stderr, flush=True)

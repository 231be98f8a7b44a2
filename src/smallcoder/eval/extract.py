"""Code out of an instruction-tuned answer: the answer mixes prose and code fences.

Rule (the card's manual evaluation, DESIGN "Evaluation protocols"): the first fenced block whose
language is Python or unnamed (an unclosed fence, as when generation hit max_new_tokens, runs to the
end); with no such fence, the longest run of whole lines that parses as Python. Text that parses
as a whole is returned unchanged, so raw code (base-style completions) passes through.
"""

from __future__ import annotations

import ast
import re
import textwrap
import warnings

# ``` or ~~~ fence, optional language tag, then the block up to the matching fence or the end.
_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+.#-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)",
                    re.MULTILINE | re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
# How a completion becomes the code that runs, as reports name it: "raw" (the completion as is,
# as lm-eval and the original HumanEval/MBPP harnesses run it) or "extract" (`extract_code`).
EXTRACTION_RULES = ("raw", "extract")
RULE_TEXT = {"raw": "raw: the completion runs as generated (lm-eval's and the original harnesses' rule)",
             "extract": "extract: the first Python/unnamed fenced block of the answer, else its longest "
                        "part that parses"}


def parses(code: str) -> bool:
    """Whether `code` is valid Python syntax (warnings such as invalid escapes are ignored)."""
    return _error_line(code) == 0


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """All fenced blocks as (language tag in lower case, body), in order."""
    return [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(text)]


def longest_parsing_run(text: str) -> str:
    """The longest (in characters) run of consecutive lines that parses and holds code.

    A run must contain at least one line that is more than a bare word, so a lone "Sure" or "Done"
    (valid expressions) is not taken for code. For each first line, runs are tried longest first;
    a syntax error before a run's last line means no longer run from there can parse (the text up
    to the error is already invalid), so the search jumps back to the error's line. A run that
    cannot beat the best one is never parsed.
    """
    return _longest_run(text)[0]


def _longest_run(text: str) -> tuple[str, int]:
    """(the run, possibly dedented; its length as written) for `longest_parsing_run`."""
    lines = text.split("\n")
    best, best_len = "", 0  # lengths compare the runs as written, before any dedent
    for start in range(len(lines)):
        if not lines[start].strip():
            continue
        if sum(len(s) + 1 for s in lines[start:]) - 1 <= best_len:
            break
        end = len(lines)
        while end > start:
            chunk = "\n".join(lines[start:end]).rstrip()
            if len(chunk) <= best_len:
                break
            candidate, error_line = _parsing_form(chunk)
            if candidate is not None:
                if _looks_like_code(candidate):
                    best, best_len = candidate, len(chunk)
                    break
                end -= 1
            elif error_line is not None and error_line < chunk.count("\n") + 1:
                end = start + error_line
            else:
                end -= 1
    return best, best_len


def _error_line(code: str) -> int | None:
    """0 when `code` parses, else the 1-based line of its syntax error (None if unknown)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except IndentationError:
        return None  # a shorter run may parse once dedented: no jump
    except SyntaxError as e:
        return e.lineno if e.lineno and e.lineno > 0 else None
    except (ValueError, MemoryError, RecursionError):
        return None
    return 0


def _parsing_form(chunk: str) -> tuple[str | None, int | None]:
    """(`chunk`, or its dedented form for an indented excerpt, if it parses; else None, error line).

    The error line is the later of the two forms' errors, so no run that could parse is skipped.
    """
    raw = _error_line(chunk)
    if raw == 0:
        return chunk, None
    dedented = textwrap.dedent(chunk)
    if dedented == chunk:
        return None, raw
    dent = _error_line(dedented)
    if dent == 0:
        return dedented, None
    return None, None if raw is None or dent is None else max(raw, dent)


def _looks_like_code(chunk: str) -> bool:
    """Rejects runs that parse only by accident: nothing but single bare words."""
    for line in chunk.split("\n"):
        s = line.strip()
        if s and not re.fullmatch(r"[A-Za-z_]\w*[.!]?", s):
            return True
    return False


def extract_code(answer: str) -> str:
    """The code to run from a model's answer: first Python/unnamed fence, else longest parsing run."""
    if not answer.strip():
        return ""
    for lang, body in fenced_blocks(answer):
        if lang in _PYTHON_TAGS and body.strip():  # an empty fence is skipped
            return body.rstrip() + "\n"
    if parses(answer) and _looks_like_code(answer):
        return answer
    run = longest_parsing_run(answer)
    return run.rstrip() + "\n" if run else ""


def defines(code: str, name: str) -> bool:
    """Whether `code` defines a top-level function or class called `name` (textual if unparsable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name
               for node in tree.body)

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


def parses(code: str) -> bool:
    """Whether `code` is valid Python syntax (warnings such as invalid escapes are ignored)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """All fenced blocks as (language tag in lower case, body), in order."""
    return [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(text)]


def longest_parsing_run(text: str) -> str:
    """The longest (in characters) run of consecutive lines that parses and holds code.

    A run must contain at least one line that is more than a bare word, so a lone "Sure" or "Done"
    (valid expressions) is not taken for code. Quadratic in lines in the worst case, but a run that
    cannot beat the best one is never parsed.
    """
    lines = text.split("\n")
    best, best_len = "", 0  # lengths compare the runs as written, before any dedent
    for start in range(len(lines)):
        if not lines[start].strip():
            continue
        if sum(len(s) + 1 for s in lines[start:]) - 1 <= best_len:
            break
        for end in range(len(lines), start, -1):
            chunk = "\n".join(lines[start:end]).rstrip()
            if len(chunk) <= best_len:
                break
            candidate = _parsing_form(chunk)
            if candidate is not None and _looks_like_code(candidate):
                best, best_len = candidate, len(chunk)
                break
    return best


def _parsing_form(chunk: str) -> str | None:
    """`chunk` if it parses, else its dedented form if that parses (an indented excerpt), else None."""
    if parses(chunk):
        return chunk
    dedented = textwrap.dedent(chunk)
    return dedented if dedented != chunk and parses(dedented) else None


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

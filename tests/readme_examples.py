"""The README's examples as data: which blocks run, their commands, and how output is compared.

A block runs if its first line starts with `$ ` (a shell session) or its fence says `python`; the
line `<!-- not run: REASON -->` just before a fence keeps that block out (a Hub model, a GPU). A
command is a `$ ` line with its continuation lines (a trailing backslash, or a quote still open);
its expected output is the lines up to the next `$ `.

Output is held to the README on every machine CI may use, so what depends on the machine or the
moment is masked on both sides before lines are compared: durations (`1 min 4 s`, `0.09 s`,
`134 ms`), numbers, hex digests, and the model's own text (a generation, the `text` and `content`
fields of the server's JSON, a chat answer), since a trained model's tokens follow the CPU's float
rounding. A README line `...` stands for any number of lines, `...` inside a line for any text.
What stays compared: every word the tools print, the files and folders they name, the order of
lines and the exit status (2 where the README shows `smallcoder: error:`, else 0). The figures
themselves come from a recorded run (`SMALLCODER_README_RECORD=FILE`, see test_readme_examples.py).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")


@dataclass
class Command:
    text: str                     # as the README gives it, continuation lines joined with newlines
    expected: list[str]           # the README's output lines
    line: int                     # where it starts in README.md (1-based), for messages

    @property
    def program(self) -> str:
        """The smallcoder subcommand (`train`, `serve`, ...), or the first word for other programs."""
        words = shlex.split(self.text.replace("\\\n", " "), comments=False)
        words = [w for w in words if w != "|"]
        for i, w in enumerate(words):
            if w == "smallcoder" and i + 1 < len(words):
                return words[i + 1]
        return words[0] if words else ""

    @property
    def expected_status(self) -> int:
        return 2 if any(line.startswith("smallcoder: error:") for line in self.expected) else 0


@dataclass
class Block:
    kind: str                     # "shell" or "python"
    line: int
    commands: list[Command] = field(default_factory=list)
    source: str = ""              # a python block's code


def _complete(text: str) -> bool:
    if text.endswith("\\"):
        return False
    try:
        shlex.split(text)
    except ValueError:            # a quote still open: the command goes on on the next line
        return False
    return True


def parse_shell(body: list[str], first_line: int) -> list[Command]:
    commands: list[Command] = []
    i = 0
    while i < len(body):
        if not body[i].startswith("$ "):
            raise ValueError(f"README.md:{first_line + i}: output before the first `$ ` command")
        start, text = i, body[i][2:]
        while not _complete(text) and i + 1 < len(body):
            i += 1
            text += "\n" + body[i]
        i += 1
        out = []
        while i < len(body) and not body[i].startswith("$ "):
            out.append(body[i])
            i += 1
        commands.append(Command(text, out, first_line + start))
    return commands


def blocks(readme: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The blocks that run, in order, and (line, reason) for each `not run` one."""
    lines = readme.splitlines()
    found: list[Block] = []
    skipped: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        ticks = len(lines[i]) - len(lines[i].lstrip("`"))  # a longer fence holds ``` in its output
        info, start = lines[i][ticks:].strip(), i + 1
        end = start
        while end < len(lines) and not (lines[end].startswith("`" * ticks) and not lines[end].strip("`")):
            end += 1
        body = lines[start:end]
        prev = lines[i - 1] if i else ""
        marker = NOT_RUN.match(prev)
        runs = info == "python" or (body and body[0].startswith("$ "))
        if runs and marker:
            skipped.append((i + 1, marker.group(1)))
        elif runs and info == "python":
            found.append(Block("python", i + 1, source="\n".join(body) + "\n"))
        elif runs:
            found.append(Block("shell", i + 1, parse_shell(body, start + 1)))
        i = end + 1
    return found, skipped


# --- masking -----------------------------------------------------------------------------------

_DURATION = re.compile(r"\b(?:\d+ h )?(?:\d+ min )?\d+(?:\.\d+)? (?:s|ms)\b|\b\d+ h \d+ min\b|\b\d+ min\b")
_HEX = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{8,}\b")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?")
MODEL_TEXT_KEYS = {"text", "content", "id"}      # what a model wrote, and the ids drawn at random
MODEL_TEXT_PROGRAMS = {"generate"}               # whose standard output is the model's text


def mask(line: str) -> str:
    line = _HEX.sub("<hex>", line)
    line = _DURATION.sub("<time>", line)
    return _NUMBER.sub("<n>", line)


def _mask_json(value):
    if isinstance(value, dict):
        return {k: "<model text>" if k in MODEL_TEXT_KEYS and isinstance(v, str) and v else _mask_json(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_json(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "<n>"
    return value


def normalize(line: str, program: str) -> str:
    """One output line with what may differ between machines masked."""
    body, prefix = line, ""
    if body.startswith("data: "):
        prefix, body = "data: ", body[6:]
    if body.startswith(("{", "[")):
        try:
            return prefix + json.dumps(_mask_json(json.loads(body)))
        except ValueError:
            pass
    if program == "chat" and line.startswith("Assistant: "):
        return "Assistant: <model text>"
    if program in MODEL_TEXT_PROGRAMS and not line.startswith(("[", "smallcoder: error:", "wrote ")):
        return "<model text>"
    return mask(line)


def _line_pattern(expected: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in expected.split("...")), re.DOTALL)


def _one_line_answers(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_answer = False
    for line in lines:
        if line.startswith("Assistant: "):
            in_answer = True
            out.append(line)
        elif in_answer and not line.startswith("["):
            out[-1] += "\n" + line
        else:
            in_answer = False
            out.append(line)
    return out


def mismatch(expected: list[str], actual: list[str], program: str) -> str | None:
    """None when `actual` is what the README shows, else a description of the first difference."""
    if program == "ls":  # a terminal shows names in columns, a pipe one per line
        return None if sorted(" ".join(expected).split()) == sorted(" ".join(actual).split()) else \
            f"README lists {' '.join(expected)!r}, got {' '.join(actual)!r}"
    if program == "chat":  # an answer runs from `Assistant: ` to the summary line, over any lines
        expected, actual = _one_line_answers(expected), _one_line_answers(actual)
    exp = [normalize(x, program) for x in expected]
    act = [normalize(x, program) for x in actual]
    if program in MODEL_TEXT_PROGRAMS:          # a completion may run over several lines
        exp = [x for i, x in enumerate(exp) if not (x == "<model text>" and i and exp[i - 1] == x)]
        act = [x for i, x in enumerate(act) if not (x == "<model text>" and i and act[i - 1] == x)]

    def match(i: int, j: int) -> bool:  # exp[i:] against act[j:], `...` lines backtracking
        while i < len(exp):
            if exp[i].strip() == "...":
                return any(match(i + 1, k) for k in range(j, len(act) + 1))
            if j >= len(act) or not _line_pattern(exp[i]).fullmatch(act[j]):
                return False
            i, j = i + 1, j + 1
        return j == len(act)

    if match(0, 0):
        return None
    for i, (e, a) in enumerate(zip(exp, act)):
        if e.strip() == "...":
            break
        if not _line_pattern(e).fullmatch(a):
            return f"line {i + 1}: README {expected[i]!r}\n         got    {actual[i]!r}"
    return f"README shows {len(expected)} line(s), the command printed {len(actual)}"


def update_readme(readme_path: str, record_path: str) -> int:
    """Put each recorded output in place of the README's where it differs (a hand-shortened one, with
    `...`, only where it no longer matches); returns how many."""
    from pathlib import Path

    lines = Path(readme_path).read_text(encoding="utf-8").split("\n")
    found, _ = blocks("\n".join(lines))
    by_line = {c.line: c for b in found if b.kind == "shell" for c in b.commands}
    changed = 0
    records = [json.loads(x) for x in Path(record_path).read_text(encoding="utf-8").splitlines()]
    for rec in sorted(records, key=lambda r: -r["line"]):  # bottom up: earlier line numbers stay valid
        c = by_line.get(rec["line"])
        output = [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:8000", x) for x in rec["output"]]
        if c is None or output == c.expected:
            continue
        elided = any("..." in x for x in c.expected)   # hand-shortened: replaced only when it fails
        if elided and mismatch(c.expected, output, c.program) is None:
            continue
        start = c.line - 1 + c.text.count("\n") + 1      # the first output line (0-based)
        lines[start:start + len(c.expected)] = output
        changed += 1
    Path(readme_path).write_text("\n".join(lines), encoding="utf-8")
    return changed


if __name__ == "__main__":
    import sys

    readme = __file__.rsplit("/tests/", 1)[0] + "/README.md"
    print(f"{update_readme(readme, sys.argv[1])} example output(s) replaced in {readme}")

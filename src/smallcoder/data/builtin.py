"""The built-in corpus: training data every Python installation already holds, so the whole
pipeline (pack, train, evaluate) runs with no network and no downloads.

Four parts, each a JSONL file, deterministic for a given seed and Python version:
  prose  the language reference topics (`pydoc_data.topics`) and the docstrings of the standard
         library's modules, classes and functions (read with `ast`; nothing is imported);
  code   the standard library's own `.py` sources, in sorted path order (tests, idlelib,
         site-packages and generated codec tables left out);
  math   generated GSM8k-style word problems with worked step-by-step answers ending `#### N`;
  sft    conversations in the card's chat format: a request written from a self-contained stdlib
         function's signature and docstring, answered with its source in a ```python fence; and
         math questions answered with their worked solutions.
`manifest.json` records per part the documents, characters, bytes, SHA-256 and license.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import hashlib
import json
import os
import platform
import random
import re
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SmallCoderError

PARTS = ("prose", "code", "math", "sft")
MANIFEST = "manifest.json"
FORMAT = "smallcoder-builtin-corpus"
FORMAT_VERSION = 1
DEFAULT_MATH_PROBLEMS = 20_000
SFT_MATH_FRACTION = 4          # sft holds math_problems // 4 math conversations
MAX_SFT_FUNCTION_LINES = 60
MIN_DOCSTRING_CHARS = 20
# Folders of the standard library that are not library code (tests, the IDE, installed packages).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                           "__pycache__", "lib-dynload", "pydoc_data"})
PYTHON_VERSION = platform.python_version()
STDLIB_LICENSE = f"PSF-2.0 (derived from the Python {PYTHON_VERSION} standard library)"
MATH_LICENSE = "generated, Apache-2.0 like the project"


# ---------------------------------------------------------------------------------------------
# The standard library, read as text


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's library sources, sorted by path relative to `root`."""
    root = root or stdlib_dir()
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith((".", "config-"))]
        rel = Path(folder).relative_to(root)
        found += [(rel / n).as_posix() for n in names if n.endswith(".py")]
    return [root / rel for rel in sorted(found) if (root / rel).is_file()]


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or rel.stem


def _is_codec_table(text: str) -> bool:
    """encodings/cp1252.py and friends: generated 256-entry tables, noise for a language model."""
    return "decoding_table" in text and "charmap_build" in text


def _encodable(text: str) -> bool:
    """Docstrings may spell lone surrogates with escapes; such text cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# prose


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def _doc(node: ast.AST) -> str | None:
    doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
    if doc and len(doc.strip()) >= MIN_DOCSTRING_CHARS and _encodable(doc):
        return doc.strip()
    return None


def prose_from_module(module: str, tree: ast.Module) -> str | None:
    """The module's docstrings (module, public classes, functions and methods) as one document."""
    sections = []
    doc = _doc(tree)
    if doc:
        sections.append(f"# The `{module}` module\n\n{doc}")
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            doc = _doc(node)
            if doc:
                sections.append(f"## `{module}.{_signature(node)}`\n\n{doc}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            doc = _doc(node)
            if doc:
                sections.append(f"## class `{module}.{node.name}`\n\n{doc}")
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    doc = _doc(item)
                    if doc:
                        sections.append(f"### `{node.name}.{_signature(item)}`\n\n{doc}")
    if not sections:
        return None
    if not sections[0].startswith("# "):
        sections.insert(0, f"# The `{module}` module")
    return "\n\n".join(sections) + "\n"


def prose_from_topics() -> list[str]:
    """The language reference topics that `help()` shows (keywords, statements, operators)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() + "\n" for k in sorted(topics) if topics[k].strip() and _encodable(topics[k])]


# ---------------------------------------------------------------------------------------------
# sft from functions

BUILTIN_NAMES = frozenset(dir(builtins))
# Imperative verbs that open docstring summaries ("Return ...") and can become "that returns ...".
IMPERATIVES = frozenset((
    "add", "apply", "build", "calculate", "call", "check", "clear", "close", "combine", "compare", "compute",
    "concatenate", "convert", "copy", "count", "create", "decode", "delete", "determine", "encode", "escape",
    "evaluate", "expand", "extract", "fetch", "fill", "find", "format", "generate", "get", "guess", "handle",
    "insert", "join", "load", "make", "map", "match", "merge", "move", "normalize", "open", "parse", "pick",
    "print", "produce", "put", "quote", "raise", "read", "remove", "rename", "replace", "resolve", "return",
    "reverse", "run", "scan", "search", "select", "send", "set", "shorten", "sort", "split", "strip", "test",
    "translate", "truncate", "turn", "unpack", "unquote", "unwrap", "update", "validate", "walk", "wrap",
    "write", "yield",
))
REQUEST_TEMPLATES = (
    "Write a Python function `{sig}`. It should do the following:\n\n{doc}",
    "Implement `{sig}` in Python.\n\n{doc}",
    "I need a Python function `{sig}`. Here is what it must do:\n\n{doc}",
)
ANSWER_INTROS = ("Here is an implementation:", "Here is the function:", "Sure. This does it:",
                 "Here is one way to write it:")


def _third_person(word: str) -> str:
    w = word.lower()
    if w in ("do", "go"):
        return w + "es"
    if w.endswith(("s", "sh", "ch", "x", "z")):
        return w + "es"
    if w.endswith("y") and w[-2:-1] not in "aeiou":
        return w[:-1] + "ies"
    return w + "s"


def _that_clause(summary: str) -> str | None:
    """'Return the ...' -> 'returns the ...' (None when the summary does not open with a verb)."""
    first, _, rest = summary.partition(" ")
    if first.lower() not in IMPERATIVES or not first[:1].isupper() or not rest:
        return None
    clause = f"{_third_person(first)} {rest}"
    return clause if clause.endswith((".", "!", "?")) else clause + "."


def _import_lines(tree: ast.Module) -> dict[str, str]:
    """Names bound by the module's unconditional top-level imports -> the import statement."""
    lines: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                lines[bound] = f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            for alias in node.names:
                if alias.name != "*":
                    bound = alias.asname or alias.name
                    lines[bound] = (f"from {node.module} import {alias.name}"
                                    + (f" as {alias.asname}" if alias.asname else ""))
    return lines


def _free_names(func: ast.FunctionDef) -> set[str] | None:
    """Names the function reads but does not bind; None if it uses global/nonlocal."""
    loads, bound = set(), set()
    for node in ast.walk(func):
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            return None
        if isinstance(node, ast.Name):
            (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not func:
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
    return loads - bound - BUILTIN_NAMES


def _has_real_body(func: ast.FunctionDef) -> bool:
    body = func.body[1:] if ast.get_docstring(func) is not None else func.body
    for stmt in body:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return True
    return False


_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$")


def _lines(source: str) -> list[str]:
    """Source lines split as the parser splits them (\\f and friends are not line breaks)."""
    return _LINE.findall(source)


def _segment(lines: list[str], node: ast.stmt) -> str | None:
    """ast.get_source_segment without re-splitting the file on every call (that made builds quadratic)."""
    if node.end_lineno is None or node.end_col_offset is None:
        return None
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset:].decode()
    tail = lines[last].encode()[:node.end_col_offset].decode()
    return head + "".join(lines[first + 1:last]) + tail


def _constants(lines: list[str], tree: ast.Module) -> dict[str, str]:
    """Top-level `NAME = <literal>` assignments (short ones) -> their source text."""
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.end_lineno is not None and node.end_lineno - node.lineno < 10):
            try:
                ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            text = _segment(lines, node)
            if text:
                out[node.targets[0].id] = text
    return out


def _is_plain_class(node: ast.ClassDef, imports: dict[str, str]) -> bool:
    """`class FooError(ValueError): "doc"` -- a class with no body whose bases need nothing else."""
    body_ok = all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                  for s in node.body)
    bases_ok = all(isinstance(b, ast.Name) and (b.id in BUILTIN_NAMES or b.id in imports) for b in node.bases)
    return body_ok and bases_ok and not node.decorator_list and not node.keywords


def _dependencies(func: ast.FunctionDef, defs: dict[str, ast.stmt], imports: dict[str, str],
                  consts: dict[str, str]) -> tuple[set[str], set[str], list[ast.stmt]] | None:
    """The imports, constants and helper functions (one level deep) `func` needs; None if it needs more."""
    need_imports, need_consts, helpers = set(), set(), []
    free = _free_names(func)
    if free is None:
        return None
    for name in sorted(free):
        if name in imports:
            need_imports.add(name)
        elif name in consts:
            need_consts.add(name)
        elif isinstance(defs.get(name), ast.ClassDef):
            cls = defs[name]
            assert isinstance(cls, ast.ClassDef)
            need_imports |= {b.id for b in cls.bases if isinstance(b, ast.Name) and b.id in imports}
            helpers.append(cls)
        elif name in defs and defs[name] is not func:
            inner = _free_names(defs[name])  # type: ignore[arg-type]
            if inner is None or any(n not in imports and n not in consts for n in inner):
                return None
            need_imports |= {n for n in inner if n in imports}
            need_consts |= {n for n in inner if n in consts}
            helpers.append(defs[name])
        else:
            return None
    return need_imports, need_consts, sorted(helpers, key=lambda n: n.lineno)


def _verbs_to_third_person(text: str) -> str:
    """'... and qualify it' -> '... and qualifies it' for verbs joined to the first one."""
    words = text.split(" ")
    for i in range(1, len(words)):
        if words[i - 1] in ("and", "or") and words[i] in IMPERATIVES:
            words[i] = _third_person(words[i])
    return " ".join(words)


def sft_functions(module: str, source: str, tree: ast.Module, rng: random.Random) -> list[dict[str, Any]]:
    """Request -> code conversations from the module's short, documented functions.

    A function qualifies when it is public, undecorated, at most MAX_SFT_FUNCTION_LINES long, has
    a docstring whose summary is a sentence, and needs nothing beyond builtins, the module's
    imports, short literal constants and (self-contained) helper functions; the answer carries
    those too, so it runs on its own.
    """
    imports = _import_lines(tree)
    lines = _lines(source)
    consts = _constants(lines, tree)
    defs: dict[str, ast.stmt] = {n.name: n for n in tree.body
                                 if isinstance(n, ast.FunctionDef) and not n.decorator_list}
    defs.update({n.name: n for n in tree.body if isinstance(n, ast.ClassDef) and _is_plain_class(n, imports)})
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        if node.name in ("main", "test") or node.end_lineno is None:
            continue
        if node.end_lineno - node.lineno + 1 > MAX_SFT_FUNCTION_LINES or not _has_real_body(node):
            continue
        doc = _doc(node)
        if not doc:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if (len(summary) < 30 or len(summary.split()) < 5 or not summary[0].isalpha()
                or summary.lower().startswith(("deprecated", "internal", "helper", "obsolete", "undocumented",
                                               "xxx", "for internal use"))):
            continue
        deps = _dependencies(node, defs, imports, consts)
        if deps is None:
            continue  # it needs module state or deeper helpers: not answerable on its own
        need_imports, need_consts, helpers = deps
        pieces = [_segment(lines, n) for n in (*helpers, node)]
        if any(not p for p in pieces) or sum(p.count("\n") + 1 for p in pieces) > 2 * MAX_SFT_FUNCTION_LINES:
            continue
        blocks = []
        if need_imports:
            blocks.append("\n".join(sorted(imports[n] for n in need_imports)))
        if need_consts:
            blocks.append("\n".join(consts[n] for n in sorted(need_consts)))
        code = "\n\n\n".join(blocks + pieces)  # type: ignore[arg-type]
        if not _encodable(code):
            continue
        try:
            ast.parse(code)
        except SyntaxError:  # a segment cut wrongly would teach broken code: leave it out
            continue
        sig = _signature(node)
        rest = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
        clause = _that_clause(summary)
        if clause and rng.random() < 0.5:
            request = f"Write a Python function `{sig}` that {_verbs_to_third_person(clause)}"
            request += f"\n\n{rest}" if rest else ""
        else:
            request = rng.choice(REQUEST_TEMPLATES).format(sig=sig, doc=doc)
        answer = f"{rng.choice(ANSWER_INTROS)}\n\n```python\n{code}\n```"
        out.append({"messages": [{"role": "user", "content": request},
                                 {"role": "assistant", "content": answer}]})
    return out


# ---------------------------------------------------------------------------------------------
# math: GSM8k-style problems whose every step is an equation "a op b = c" that the tests recompute

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara")
ITEMS = ("notebooks", "pens", "apples", "stickers", "candles", "mugs", "books", "plants", "puzzles", "scarves")
PRODUCTS = ("jacket", "bicycle", "lamp", "backpack", "guitar", "printer", "tent", "watch")
GOODS = ("bottles", "bolts", "cups", "boxes", "labels", "bricks")
_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                                               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def arith(expr: str) -> int:
    """Evaluate + - * / over non-negative integers (no eval); the result must be a whole number."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not simple arithmetic: {expr!r}")

    value = ev(ast.parse(expr, mode="eval").body)
    if value != int(value) or value < 0:
        raise ValueError(f"{expr} = {value} is not a whole non-negative number")
    return int(value)


def _eq(expr: str) -> str:
    return f"{expr} = {arith(expr)}"


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    n, (i1, i2) = r.choice(NAMES), r.sample(ITEMS, 2)
    a, p, b, q = r.randint(2, 9), r.randint(2, 15), r.randint(2, 9), r.randint(1, 12)
    total = a * p + b * q
    bill = next(x for x in (20, 50, 100, 200, 500) if x >= total)
    question = (f"{n} buys {a} {i1} that cost ${p} each and {b} {i2} that cost ${q} each. "
                f"{n} pays with a ${bill} bill. How much change does {n} get, in dollars?")
    steps = [f"The {i1} cost {_eq(f'{a} * {p}')} dollars.", f"The {i2} cost {_eq(f'{b} * {q}')} dollars.",
             f"Together they cost {_eq(f'{a * p} + {b * q}')} dollars.",
             f"The change is {_eq(f'{bill} - {total}')} dollars."]
    return question, steps, bill - total


def _speed(r: random.Random) -> tuple[str, list[str], int]:
    s1, h1, s2, h2 = r.randint(3, 24) * 5, r.randint(1, 5), r.randint(3, 24) * 5, r.randint(1, 5)
    question = (f"A train travels at {s1} km per hour for {h1} hours and then at {s2} km per hour for "
                f"{h2} hours. How many kilometers does it travel in total?")
    steps = [f"In the first part it travels {_eq(f'{s1} * {h1}')} km.",
             f"In the second part it travels {_eq(f'{s2} * {h2}')} km.",
             f"In total it travels {_eq(f'{s1 * h1} + {s2 * h2}')} km."]
    return question, steps, s1 * h1 + s2 * h2


def _work_rate(r: random.Random) -> tuple[str, list[str], int]:
    m, h, goods = r.randint(2, 12), r.randint(2, 8), r.choice(GOODS)
    question = f"A machine makes {m} {goods} per minute. How many {goods} does it make in {h} hours?"
    steps = [f"{h} hours is {_eq(f'{h} * 60')} minutes.", f"It makes {_eq(f'{m} * {h * 60}')} {goods}."]
    return question, steps, m * h * 60


def _ages(r: random.Random) -> tuple[str, list[str], int]:
    n1, n2 = r.sample(NAMES, 2)
    if r.random() < 0.5:
        x, d, y = r.randint(5, 40), r.randint(2, 10), r.randint(2, 15)
        question = (f"{n1} is {x} years old. {n2} is {d} years older than {n1}. "
                    f"What will be the sum of their ages in {y} years?")
        steps = [f"{n2} is {_eq(f'{x} + {d}')} years old now.",
                 f"In {y} years {n1} will be {_eq(f'{x} + {y}')} and {n2} will be {_eq(f'{x + d} + {y}')}.",
                 f"The sum of their ages will be {_eq(f'{x + y} + {x + d + y}')}."]
        return question, steps, 2 * x + d + 2 * y
    x, k = r.randint(4, 15), r.randint(2, 4)
    question = f"{n1} is {x} years old. {n1}'s aunt is {k} times as old. How many years older than {n1} is the aunt?"
    steps = [f"The aunt is {_eq(f'{x} * {k}')} years old.", f"She is {_eq(f'{x * k} - {x}')} years older."]
    return question, steps, x * k - x


def _fractions(r: random.Random) -> tuple[str, list[str], int]:
    q, s, k = r.randint(2, 5), r.randint(2, 4), r.randint(2, 10)
    total = q * s * k
    sold1 = total // q
    left1 = total - sold1
    sold2 = left1 // s
    question = (f"A baker makes {total} cookies. The baker sells 1/{q} of them in the morning and 1/{s} of "
                f"the remaining cookies in the afternoon. How many cookies are left at the end of the day?")
    steps = [f"In the morning the baker sells {_eq(f'{total} / {q}')} cookies.",
             f"That leaves {_eq(f'{total} - {sold1}')} cookies.",
             f"In the afternoon the baker sells {_eq(f'{left1} / {s}')} cookies.",
             f"So {_eq(f'{left1} - {sold2}')} cookies are left."]
    return question, steps, left1 - sold2


def _percent(r: random.Random) -> tuple[str, list[str], int]:
    pct = r.choice((5, 10, 15, 20, 25, 30, 40, 50))
    if r.random() < 0.5:
        price, item = r.randint(2, 40) * 20, r.choice(PRODUCTS)
        off = price * pct // 100
        question = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
        steps = [f"The discount is {_eq(f'{price} * {pct} / 100')} dollars.",
                 f"The sale price is {_eq(f'{price} - {off}')} dollars."]
        return question, steps, price - off
    pop = r.randint(10, 90) * 100
    grow = pop * pct // 100
    question = (f"A town has {pop} people. Its population grows by {pct}% this year. "
                f"How many people live there at the end of the year?")
    steps = [f"The population grows by {_eq(f'{pop} * {pct} / 100')} people.",
             f"At the end of the year {_eq(f'{pop} + {grow}')} people live there."]
    return question, steps, pop + grow


def _earnings(r: random.Random) -> tuple[str, list[str], int]:
    n, w, h, d = r.choice(NAMES), r.randint(8, 30), r.randint(2, 9), r.randint(3, 7)
    lunch = r.randint(3, min(25, w * h - 1))
    question = (f"{n} earns ${w} per hour and works {h} hours a day for {d} days. Each workday {n} spends "
                f"${lunch} on lunch. How much money does {n} have left after the {d} days?")
    steps = [f"Each day {n} earns {_eq(f'{w} * {h}')} dollars.",
             f"In {d} days that is {_eq(f'{w * h} * {d}')} dollars.",
             f"Lunch costs {_eq(f'{lunch} * {d}')} dollars in total.",
             f"{n} has {_eq(f'{w * h * d} - {lunch * d}')} dollars left."]
    return question, steps, w * h * d - lunch * d


def _arithmetic(r: random.Random) -> tuple[str, list[str], int]:
    a, b, c = r.randint(2, 99), r.randint(2, 99), r.randint(2, 99)
    form = r.randrange(3)
    if form == 0:
        steps = [f"First multiply: {_eq(f'{a} * {b}')}.", f"Then add: {_eq(f'{a * b} + {c}')}."]
        return f"What is {a} * {b} + {c}?", steps, a * b + c
    if form == 1:
        steps = [f"First the parentheses: {_eq(f'{a} + {b}')}.", f"Then multiply: {_eq(f'{a + b} * {c}')}."]
        return f"What is ({a} + {b}) * {c}?", steps, (a + b) * c
    c = r.randint(1, a)
    steps = [f"First divide: {_eq(f'{a * b} / {b}')}.", f"Then subtract: {_eq(f'{a} - {c}')}."]
    return f"What is {a * b} / {b} - {c}?", steps, a - c


MATH_TEMPLATES = (_shopping, _speed, _work_rate, _ages, _fractions, _percent, _earnings, _arithmetic)


def math_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer ending '#### N', N) from a randomly chosen template."""
    question, steps, answer = rng.choice(MATH_TEMPLATES)(rng)
    last = int(steps[-1].rsplit("= ", 1)[1].split()[0].rstrip("."))
    if last != answer:  # every template states its answer twice: as a formula and as the last step
        raise AssertionError(f"math template disagrees with itself: {question!r} {steps} {answer}")
    return question, "\n".join(steps) + f"\n#### {answer}", answer


def math_documents(seed: int, count: int, stream: str = "math") -> list[tuple[str, str]]:
    """`count` (question, answer) pairs; `stream` separates the pretraining and SFT sequences."""
    rng = random.Random(f"smallcoder-builtin:{stream}:{seed}")
    return [math_problem(rng)[:2] for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# building


def _scan_stdlib(seed: int, progress: bool,
                 max_files: int | None = None) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """One pass over the standard library: (code documents, prose documents, function conversations)."""
    from tqdm import tqdm

    root = stdlib_dir()
    files = stdlib_files(root)[:max_files]
    if not files:
        raise SmallCoderError(f"{root}: no standard library sources found (is this a full Python install?)")
    rng = random.Random(f"smallcoder-builtin:sft:{seed}")
    code, prose, convs = [], prose_from_topics(), []
    seen_code: set[str] = set()
    for path in tqdm(files, desc="stdlib", unit="file", file=sys.stderr, disable=None if progress else True):
        rel = path.relative_to(root)
        try:
            source = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not source.strip() or _is_codec_table(source):
            continue
        code.append(source)
        try:
            tree = ast.parse(source, filename=str(rel))
        except SyntaxError:
            continue
        module = _module_name(rel)
        doc = prose_from_module(module, tree)
        if doc:
            prose.append(doc)
        for conv in sft_functions(module, source, tree, rng):
            key = conv["messages"][1]["content"].split("```python\n", 1)[1]
            if key not in seen_code:
                seen_code.add(key)
                convs.append(conv)
    return code, prose, convs


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write records one JSON object a line; return the part's documents/characters/bytes/sha256."""
    digest, size, chars = hashlib.sha256(), 0, 0
    with open(path, "wb") as fh:
        for rec in records:
            data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            digest.update(data)
            size += len(data)
            fh.write(data)
            chars += len(rec["text"]) if "text" in rec else sum(len(m["content"]) for m in rec["messages"])
    return {"file": path.name, "documents": len(records), "characters": chars, "bytes": size,
            "sha256": digest.hexdigest()}


def build_builtin(out_dir: str | Path, seed: int = 0, overwrite: bool = False,
                  math_problems: int = DEFAULT_MATH_PROBLEMS, progress: bool = True,
                  max_stdlib_files: int | None = None) -> dict[str, Any]:
    """Build the corpus into `out_dir` (written beside it, then renamed); returns the manifest.

    Refuses a non-empty `out_dir` unless `overwrite`. The same seed on the same Python gives
    byte-identical files. `max_stdlib_files` keeps only the first N standard-library files (in
    sorted order): a small corpus for quick trials and tests.
    """
    from ..fsutil import atomic_folder

    if isinstance(math_problems, bool) or not isinstance(math_problems, int) or math_problems < 1:
        raise SmallCoderError(f"math_problems must be a positive integer, got {math_problems!r}")
    if max_stdlib_files is not None and (isinstance(max_stdlib_files, bool) or not isinstance(max_stdlib_files, int)
                                         or max_stdlib_files < 1):
        raise SmallCoderError(f"max_stdlib_files must be a positive integer, got {max_stdlib_files!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SmallCoderError(f"seed must be an integer, got {seed!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise SmallCoderError(f"{out}: exists and is not an empty folder (use --force / overwrite=True to replace it)")
    t0 = time.perf_counter()
    code, prose, func_convs = _scan_stdlib(seed, progress, max_stdlib_files)
    math = math_documents(seed, math_problems, "math")
    sft_math = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in math_documents(seed, max(1, math_problems // SFT_MATH_FRACTION), "sft-math")]
    sft = func_convs + sft_math
    random.Random(f"smallcoder-builtin:sft-order:{seed}").shuffle(sft)
    records = {
        "prose": [{"text": t} for t in prose],
        "code": [{"text": t} for t in code],
        "math": [{"text": f"Question: {q}\nAnswer: {a}"} for q, a in math],
        "sft": sft,
    }
    descriptions = {
        "prose": "language reference topics (pydoc_data) and standard-library docstrings",
        "code": "standard-library .py sources (no tests, idlelib or codec tables)",
        "math": "generated word problems with worked answers ending '#### N'",
        "sft": (f"{len(func_convs)} function requests answered with stdlib source, "
                f"{len(sft_math)} math questions answered step by step"),
    }
    licenses = {"prose": STDLIB_LICENSE, "code": STDLIB_LICENSE, "math": MATH_LICENSE,
                "sft": f"{STDLIB_LICENSE}; math conversations {MATH_LICENSE}"}
    manifest: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "seed": seed,
                                "math_problems": math_problems, "max_stdlib_files": max_stdlib_files,
                                "python": PYTHON_VERSION,
                                "implementation": platform.python_implementation(), "parts": {}}
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        for part in PARTS:
            entry = _write_jsonl(tmp / f"{part}.jsonl", records[part])
            entry.update(license=licenses[part], description=descriptions[part])
            manifest["parts"][part] = entry
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest["build_seconds"] = round(time.perf_counter() - t0, 2)  # reported, not stored: files stay identical
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest, checked against the files (present, sizes equal) so a damaged corpus is caught."""
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmallCoderError(f"{path}: missing; {folder} is not a built-in corpus folder "
                              f"(build one with `smallcoder data builtin --out {folder}`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallCoderError(f"{path}: not valid JSON ({e})") from None
    found = manifest.get("format") if isinstance(manifest, dict) else manifest
    if found != FORMAT:
        raise SmallCoderError(f"{path}: field 'format' is {found!r:.60}, expected {FORMAT!r}")
    parts = manifest.get("parts")
    if not isinstance(parts, dict) or sorted(parts) != sorted(PARTS):
        raise SmallCoderError(f"{path}: field 'parts' must list {', '.join(PARTS)}, got {parts!r:.80}")
    for part, entry in parts.items():
        file = folder / f"{part}.jsonl"
        if not file.is_file():
            raise SmallCoderError(f"{file}: missing (listed in {path}); rebuild with --force")
        if file.stat().st_size != entry.get("bytes"):
            raise SmallCoderError(f"{file}: {file.stat().st_size} bytes, but {path} field "
                                  f"parts.{part}.bytes says {entry.get('bytes')}; rebuild with --force")
    return manifest


def default_builtin_dir(seed: int = 0, math_problems: int = DEFAULT_MATH_PROBLEMS,
                        max_stdlib_files: int | None = None) -> Path:
    """$SMALLCODER_HOME/builtin-py{X.Y.Z}-seed{S}, else under $XDG_CACHE_HOME (or ~/.cache)/smallcoder."""
    home = os.environ.get("SMALLCODER_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smallcoder"
    suffix = "" if math_problems == DEFAULT_MATH_PROBLEMS else f"-math{math_problems}"
    suffix += f"-files{max_stdlib_files}" if max_stdlib_files else ""
    return base / f"builtin-py{PYTHON_VERSION}-seed{seed}{suffix}"


def ensure_builtin(path: str | Path | None = None, seed: int = 0,
                   math_problems: int = DEFAULT_MATH_PROBLEMS) -> Path:
    """The corpus folder, built first if it does not exist yet (the default folder is per seed)."""
    folder = Path(path) if path else default_builtin_dir(seed, math_problems)
    if (folder / MANIFEST).exists():
        read_manifest(folder)
        return folder
    if folder.exists() and folder.is_dir() and any(folder.iterdir()):
        raise SmallCoderError(f"{folder}: folder exists without {MANIFEST}, so it is not a built-in corpus")
    print(f"building the built-in corpus in {folder} (first use, seed {seed})", file=sys.stderr)
    try:
        build_builtin(folder, seed=seed, math_problems=math_problems)
    except SmallCoderError:
        if (folder / MANIFEST).exists():  # another process finished the same build first
            read_manifest(folder)
            return folder
        raise
    return folder


def format_manifest(manifest: dict[str, Any]) -> str:
    """The manifest as a table for the terminal."""
    rows = [("part", "documents", "characters", "bytes", "sha256", "license")]
    for part in PARTS:
        e = manifest["parts"][part]
        rows.append((part, f"{e['documents']:,}", f"{e['characters']:,}", f"{e['bytes']:,}",
                     e["sha256"][:12], e["license"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:4], widths[1:4])]
        lines.append("  ".join(cells + [r[4].ljust(widths[4]), r[5]]).rstrip())
    return "\n".join(lines)


def cmd_builtin(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else default_builtin_dir(args.seed, args.math_problems, args.max_stdlib_files)
    manifest = build_builtin(out, seed=args.seed, overwrite=args.force, math_problems=args.math_problems,
                             max_stdlib_files=args.max_stdlib_files)
    print(f"wrote {out} (Python {manifest['python']}, seed {manifest['seed']}, "
          f"{manifest['math_problems']:,} math problems) in {manifest['build_seconds']:.1f} s")
    print(format_manifest(manifest))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("builtin", help="build the built-in corpus from this Python's standard library "
                                              "(no network)")
    p.add_argument("--out", default=None, help="folder to create (default: "
                                               "$SMALLCODER_HOME or ~/.cache/smallcoder/builtin-pyX.Y.Z-seedS)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated math and the SFT requests")
    p.add_argument("--math-problems", type=int, default=DEFAULT_MATH_PROBLEMS,
                   help=f"generated math problems (default {DEFAULT_MATH_PROBLEMS:,}; sft gets a quarter as many)")
    p.add_argument("--max-stdlib-files", type=int, default=None, metavar="N",
                   help="use only the first N standard-library files (a small corpus for quick trials)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_builtin)


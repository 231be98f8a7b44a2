"""The built-in corpus, part 2: SFT conversations extracted from standard-library functions.

Two kinds. A short, documented, self-contained function becomes a request (written from its
signature and docstring) answered with its source, carrying the imports, constants and helpers it
needs so the answer runs on its own; source segments are cut from the file's own lines, so the
code is the library's, byte for byte. And any documented public function or class becomes a
question about what it does, answered in prose from its docstring's first paragraph.
"""

from __future__ import annotations

import ast
import builtins
import random
import re
from typing import Any

from .stdlib import docstring, encodable, signature

MAX_SFT_FUNCTION_LINES = 60
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
QUESTION_TEMPLATES = (
    "What does `{qual}` do in Python?",
    "Explain what the Python function `{qual}` does.",
    "In Python's `{module}` module, what is `{name}` for?",
)
CLASS_QUESTION_TEMPLATES = ("What is the `{qual}` class in Python?", QUESTION_TEMPLATES[2])
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


_SKIPPED_SUMMARIES = ("deprecated", "internal", "helper", "obsolete", "undocumented", "xxx", "for internal use")


def _summary(doc: str) -> str:
    return " ".join(doc.split("\n\n")[0].split())


def _candidate_doc(node: ast.stmt) -> str | None:
    """The docstring of a public, undecorated, short function with a real body whose summary is a
    sentence; None for anything else."""
    if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
        return None
    if node.name in ("main", "test") or node.end_lineno is None:
        return None
    if node.end_lineno - node.lineno + 1 > MAX_SFT_FUNCTION_LINES or not _has_real_body(node):
        return None
    doc = docstring(node)
    if not doc:
        return None
    summary = _summary(doc)
    if (len(summary) < 30 or len(summary.split()) < 5 or not summary[0].isalpha()
            or summary.lower().startswith(_SKIPPED_SUMMARIES)):
        return None
    return doc


def _answer_code(node: ast.FunctionDef, lines: list[str], defs: dict[str, ast.stmt], imports: dict[str, str],
                 consts: dict[str, str]) -> str | None:
    """The function with the imports, constants and helpers it needs, as code that parses; None
    when it needs module state or deeper helpers (not answerable on its own) or is too long."""
    deps = _dependencies(node, defs, imports, consts)
    if deps is None:
        return None
    need_imports, need_consts, helpers = deps
    pieces = [_segment(lines, n) for n in (*helpers, node)]
    if any(not p for p in pieces) or sum(p.count("\n") + 1 for p in pieces) > 2 * MAX_SFT_FUNCTION_LINES:
        return None
    blocks = []
    if need_imports:
        blocks.append("\n".join(sorted(imports[n] for n in need_imports)))
    if need_consts:
        blocks.append("\n".join(consts[n] for n in sorted(need_consts)))
    code = "\n\n\n".join(blocks + pieces)  # type: ignore[arg-type]
    if not encodable(code):
        return None
    try:
        ast.parse(code)
    except SyntaxError:  # a segment cut wrongly would teach broken code: leave it out
        return None
    return code


def _conversation(node: ast.FunctionDef, doc: str, code: str, rng: random.Random) -> dict[str, Any]:
    """A request written from the signature and docstring, answered with `code`."""
    sig = signature(node)
    rest = doc.split("\n\n", 1)[1] if "\n\n" in doc else ""
    clause = _that_clause(_summary(doc))
    if clause and rng.random() < 0.5:
        request = f"Write a Python function `{sig}` that {_verbs_to_third_person(clause)}"
        request += f"\n\n{rest}" if rest else ""
    else:
        request = rng.choice(REQUEST_TEMPLATES).format(sig=sig, doc=doc)
    answer = f"{rng.choice(ANSWER_INTROS)}\n\n```python\n{code}\n```"
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]}


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
        doc = _candidate_doc(node)
        if doc is None:
            continue
        assert isinstance(node, ast.FunctionDef)
        code = _answer_code(node, lines, defs, imports, consts)
        if code is not None:
            out.append(_conversation(node, doc, code, rng))
    return out


def _explanation(module: str, node: ast.FunctionDef | ast.ClassDef, doc: str, rng: random.Random) -> dict[str, Any]:
    """'What does `module.name` do?' answered with the docstring's first paragraph, as a sentence
    about the named function (`module.f(args)` returns ...) where the summary opens with a verb."""
    qual = f"{module}.{node.name}"
    summary = _summary(doc)
    clause = _that_clause(summary) if isinstance(node, ast.FunctionDef) else None
    if clause:
        answer = f"`{module}.{signature(node)}` {_verbs_to_third_person(clause)}"  # type: ignore[arg-type]
    else:
        answer = f"`{qual}`: {summary}"
    templates = QUESTION_TEMPLATES if isinstance(node, ast.FunctionDef) else CLASS_QUESTION_TEMPLATES
    question = rng.choice(templates).format(qual=qual, module=module, name=node.name)
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def sft_explanations(module: str, tree: ast.Module, rng: random.Random) -> list[dict[str, Any]]:
    """Question -> prose conversations from the module's public top-level functions and classes
    whose docstring summary is a sentence of 5+ words (at most 600 characters)."""
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        doc = docstring(node)
        if not doc:
            continue
        summary = _summary(doc)
        if (len(summary) < 30 or len(summary) > 600 or len(summary.split()) < 5 or not summary[0].isalpha()
                or summary.lower().startswith(_SKIPPED_SUMMARIES)):
            continue
        out.append(_explanation(module, node, doc, rng))
    return out

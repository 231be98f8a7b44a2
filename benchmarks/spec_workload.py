"""The speculative table's workloads (from HumanEval) and the pinning that makes acceptance real.

Why pinning: the benchmark's 303M model has random weights, so its own greedy continuation is
noise, and whether a draft is accepted would say nothing about code. `pin_model` makes the
model's greedy continuation the workload's real answer while every forward still runs the whole
303M computation: after each forward (`forward` and `forward_rows`, plain and speculative paths,
the C++ kernel or PyTorch) a large bias is added to the logit of the answer's next token at every
position returned. Acceptance then measures how well a draft source predicts real code edits.
`PinLogits` (transformers) and `llama_pin` (llama-cpp-python) pin the baselines the same way.

Workloads (`Item`s): `editing_items` (a HumanEval function, prompt + canonical solution, shown
and asked for with its local variables and arguments renamed: the answer restates most of the
prompt with changes; `rename_locals` is a real scope-checked rename) and `completion_items` (the
HumanEval prompt, answered with its canonical solution: nothing to copy).
"""

from __future__ import annotations

import ast
import builtins
import io
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PIN_BIAS = 1000.0  # random-weight logits are O(1): this decides greedy, and stays finite in fp32/bf16


class PinError(RuntimeError):
    """The pinned output went wrong (a row bound to the wrong item, text not the answer): the table
    would measure something else, so the benchmark stops."""


# ---- the rename ------------------------------------------------------------------------------

SHORT_NAMES = {"i": "index", "j": "inner", "k": "key", "n": "count", "m": "size", "x": "value",
               "y": "other", "s": "text", "c": "char", "l": "items", "a": "first", "b": "second",
               "d": "table", "e": "element", "w": "word", "p": "part", "q": "rest", "t": "total",
               "r": "remainder", "z": "third", "h": "height", "v": "entry", "f": "func", "g": "group",
               "lst": "values", "arr": "array", "num": "number", "res": "result", "ret": "output",
               "idx": "position", "tmp": "scratch", "val": "item", "elem": "member", "ch": "letter"}

_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _new_name(name: str, is_arg: bool) -> str:
    """Short names get a descriptive one, snake_case becomes camelCase, any other name a suffix
    for its role (every local changes, as an editor's rename request would ask)."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    parts = [p for p in name.split("_") if p]
    if len(parts) > 1:
        return parts[0] + "".join(p[:1].upper() + p[1:] for p in parts[1:])
    return f"{name}_{'arg' if is_arg else 'var'}"


def _args(node: ast.AST) -> list[ast.arg]:
    a = node.args
    return [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs,
            *([a.kwarg] if a.kwarg else [])]


def rename_locals(source: str) -> tuple[str, dict[str, str]]:
    """`source` with every function's arguments and local variables renamed; (new source, mapping).

    A name is renamed only where that is safe program-wide: bound in a function (an argument, an
    assignment, a loop or `with` target) and, wherever it is read, bound in that function or one
    enclosing it; never a module-level or class-level name, an import, a `global`/`nonlocal`, a
    keyword argument's name at a call, or a name inside an f-string. The positions come from `ast`
    and each one is checked against `tokenize` to be that NAME token; the result is parsed back
    and must equal the input's tree with the names mapped."""
    tree = ast.parse(source)
    parent: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parent[child] = node

    def scope(node: ast.AST) -> ast.AST | None:
        """The innermost function (or lambda) around node; None at module or class level."""
        while node in parent:
            node = parent[node]
            if isinstance(node, _SCOPES):
                return node
            if isinstance(node, ast.ClassDef):
                return None
        return None

    def scopes_of(node: ast.AST) -> list[ast.AST]:
        out, s = [], scope(node)
        while s is not None:
            out.append(s)
            s = scope(s)
        return out

    bound: dict[ast.AST, set[str]] = {}
    args: set[str] = set()
    unsafe: set[str] = set(dir(builtins)) | {"self", "cls"}
    for node in ast.walk(tree):
        if isinstance(node, _SCOPES):
            names = {a.arg for a in _args(node)}
            args |= names
            bound.setdefault(node, set()).update(names)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            s = scope(node)
            if s is None:
                unsafe.add(node.id)
            else:
                bound.setdefault(s, set()).add(node.id)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            unsafe.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            unsafe.update(node.names)
        elif isinstance(node, ast.alias):
            unsafe.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.keyword) and node.arg:
            unsafe.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            unsafe.add(node.name)  # bound without a Name node: left alone
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            unsafe.add(node.name)
        elif isinstance(node, ast.JoinedStr):
            unsafe.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
    candidates = set().union(*bound.values()) - unsafe if bound else set()
    sites: list[tuple[int, int, str]] = []  # (line, utf-8 column, name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in candidates:
            if not any(node.id in bound.get(s, ()) for s in scopes_of(node)):
                candidates.discard(node.id)  # read where no enclosing function binds it: a global
        elif isinstance(node, ast.arg) and node.arg in candidates:
            sites.append((node.lineno, node.col_offset, node.arg))
    sites += [(n.lineno, n.col_offset, n.id) for n in ast.walk(tree) if isinstance(n, ast.Name)
              and n.id in candidates]
    sites = [s for s in sites if s[2] in candidates]
    taken = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | args | unsafe
    taken |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    mapping: dict[str, str] = {}
    for name in sorted(candidates):
        new, k = _new_name(name, name in args), 2
        while new in taken or new in mapping.values():
            new, k = f"{_new_name(name, name in args)}{k}", k + 1
        mapping[name] = new

    lines = io.StringIO(source).readlines()  # as tokenize and ast count lines
    as_bytes = [line.encode() for line in lines]
    names_at = {(t.start[0], len(lines[t.start[0] - 1][:t.start[1]].encode())): t.string
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME}
    for line, col, name in sorted(set(sites), reverse=True):  # right to left: columns stay valid
        if names_at.get((line, col)) != name:
            raise ValueError(f"rename: line {line} column {col} is not the name {name!r} to tokenize")
        b = as_bytes[line - 1]
        as_bytes[line - 1] = b[:col] + mapping[name].encode() + b[col + len(name.encode()):]
    out = b"".join(as_bytes).decode()
    _check_rename(tree, ast.parse(out), mapping)
    return out, mapping


def _check_rename(old: ast.AST, new: ast.AST, mapping: dict[str, str]) -> None:
    class Map(ast.NodeTransformer):
        def visit_Name(self, node):
            node.id = mapping.get(node.id, node.id)
            return node

        def visit_arg(self, node):
            node.arg = mapping.get(node.arg, node.arg)
            self.generic_visit(node)
            return node

    if ast.dump(Map().visit(old)) != ast.dump(new):
        raise ValueError("rename: the renamed program's tree is not the original's with the names mapped")


# ---- the workloads -----------------------------------------------------------------------------

@dataclass
class Item:
    """One request: the prompt and the answer the pinned target must produce, text and ids."""

    task_id: str
    prompt: str
    answer: str
    prompt_ids: list[int]
    answer_ids: list[int]


EDIT_PROMPT = ("# Original:\n{code}\n"
               "# The same code with its local variables and function arguments renamed "
               "(short names spelled out, snake_case as camelCase, other names with an _arg or _var suffix):\n")


def editing_items(problems: Sequence[dict], tokenizer, n: int, context: int) -> list[Item]:
    """Up to n code-editing items (HumanEval order) whose prompt + answer + EOS fit `context`."""
    out = []
    for p in problems:
        code = (p["prompt"] + p["canonical_solution"]).strip("\n") + "\n"
        try:
            renamed, mapping = rename_locals(code)
        except (SyntaxError, ValueError):
            continue
        if not mapping:
            continue
        item = _item(p["task_id"], EDIT_PROMPT.format(code=code), renamed, tokenizer)
        if len(item.prompt_ids) + len(item.answer_ids) + 1 < context:
            out.append(item)
        if len(out) == n:
            break
    return out


def completion_items(problems: Sequence[dict], tokenizer, n: int, context: int) -> list[Item]:
    """Up to n items: the HumanEval prompt, answered with its canonical solution."""
    out = []
    for p in problems:
        item = _item(p["task_id"], p["prompt"], p["canonical_solution"], tokenizer)
        if len(item.prompt_ids) + len(item.answer_ids) + 1 < context:
            out.append(item)
        if len(out) == n:
            break
    return out


def _item(task_id: str, prompt: str, answer: str, tokenizer) -> Item:
    answer_ids = tokenizer.encode(answer)
    if tokenizer.decode(answer_ids) != answer:
        raise PinError(f"{task_id}: the tokenizer does not round-trip the answer")
    return Item(task_id, prompt, answer, tokenizer.encode(prompt), answer_ids)


# ---- pinning our engine ------------------------------------------------------------------------

class Pins:
    """Which workload item each KV-cache row holds, and the token pinned after each position.

    A row is bound when its prefill starts (a span of more than one token at position 0): to the
    first item not yet started whose prompt begins with those tokens, so any admission order or
    grouping of prefill chunks the engine chooses binds alike; every later prefill chunk must be
    that item's prompt, else PinError (a run needs a fresh Engine with prefix_cache=False: a
    reused prefix never starts at 0). After the answer, EOS is pinned."""

    def __init__(self, items: Sequence[Item], eos_id: int) -> None:
        self.items, self.eos_id = list(items), eos_id
        self.pending = list(range(len(self.items)))  # items not started, in order
        self.rows: dict[int, Item] = {}

    def chunk(self, row: int, start: int, tokens: list[int]) -> None:
        """A prefill chunk of `row` at `start`: bind a new prompt, check the chunk is its text."""
        if start == 0:
            j = next((j for j in self.pending if self.items[j].prompt_ids[:len(tokens)] == tokens), None)
            if j is None:
                raise PinError(f"cache row {row}: a prompt that begins like no pinned item not yet started "
                               f"({len(self.pending)} left of {len(self.items)})")
            self.pending.remove(j)
            self.rows[row] = self.items[j]
        item = self.rows.get(row)
        if item is None or item.prompt_ids[start:start + len(tokens)] != tokens:
            raise PinError(f"cache row {row}: prefill at {start} is not the prompt of the item bound to it "
                           f"({item.task_id if item else 'none'}); use a fresh Engine with prefix_cache=False")

    def span(self, row: int, start: int, tokens: list[int]) -> None:
        """Tokens a forward writes into `row` from `start`: a prefill chunk (`chunk`) where more than
        one token starts at 0 or inside the bound prompt; else a decode step or a draft verification."""
        item = self.rows.get(row)
        if len(tokens) > 1 and (start == 0 or item is not None and start < len(item.prompt_ids)):
            self.chunk(row, start, tokens)

    def target(self, row: int, position: int) -> int | None:
        """The token pinned after `position` of `row` (None inside the prompt or an unbound row)."""
        item = self.rows.get(row)
        if item is None:
            return None
        i = position + 1 - len(item.prompt_ids)
        if i < 0:
            return None
        return item.answer_ids[i] if i < len(item.answer_ids) else self.eos_id

    def bias(self, logits: torch.Tensor, where: list[tuple[int, int, int, int]]) -> torch.Tensor:
        """Add PIN_BIAS in place at logits[b, t, pinned token] for each (b, t, row, position)."""
        bs, ts, toks = [], [], []
        for b, t, row, pos in where:
            tok = self.target(row, pos)
            if tok is not None:
                bs.append(b)
                ts.append(t)
                toks.append(tok)
        if bs:
            logits[bs, ts, toks] += PIN_BIAS
        return logits


class _Pinned:
    """Mixed in before the model's class by `pin_model`: the full forward, then the bias."""

    pins: Pins | None = None
    _pin_inside = 0  # >0 while forward_rows runs (it may call forward: bias once)

    def forward(self, input_ids, cache=None, last_only=False, labels=None, *, starts=None, **kw):
        pins = self.pins
        if pins is None or cache is None or self._pin_inside:
            return super().forward(input_ids, cache, last_only, labels, starts=starts, **kw)
        B, T = input_ids.shape
        first = (cache.lengths.clone() if starts is None else torch.as_tensor(starts, dtype=torch.long)).tolist()
        row0 = cache.lengths.storage_offset()  # cache.rows(a, b) is a view: its first row is row a
        if B == 1:
            pins.span(row0, first[0], input_ids[0].tolist())
        logits = super().forward(input_ids, cache, last_only, labels, starts=starts, **kw)
        steps = range(T - logits.shape[1], T)  # last_only: the final position alone
        return pins.bias(logits, [(b, j, row0 + b, first[b] + t) for b in range(B) for j, t in enumerate(steps)])

    def forward_rows(self, tokens, cache, rows, positions, logit_rows, **kw):
        pins = self.pins
        rl, pl = [int(r) for r in rows], [int(p) for p in positions]
        row0 = cache.lengths.storage_offset()
        if pins is not None:  # each cache row's tokens are one contiguous span (forward_rows' contract)
            ids, at = torch.as_tensor(tokens).tolist(), 0
            for end in [n for n in range(1, len(rl)) if rl[n] != rl[n - 1]] + [len(rl)]:
                pins.span(row0 + rl[at], pl[at], ids[at:end])
                at = end
        self._pin_inside += 1
        try:
            logits = super().forward_rows(tokens, cache, rows, positions, logit_rows, **kw)
        finally:
            self._pin_inside -= 1
        if pins is None:
            return logits
        where = [(j, 0, row0 + rl[i], pl[i]) for j, i in enumerate(int(i) for i in logit_rows)]
        return pins.bias(logits[:, None], where)[:, 0]


_PINNED_CLASSES: dict[type, type] = {}


def pin_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model` (a SmallCoder, float or int8) pinnable in place: its class becomes a subclass
    whose forwards add the bias of `model.pins` (set a `Pins` before each run; None: plain)."""
    cls = type(model)
    if not issubclass(cls, _Pinned):
        if cls not in _PINNED_CLASSES:
            _PINNED_CLASSES[cls] = type(f"Pinned{cls.__name__}", (_Pinned, cls), {})
        model.__class__ = _PINNED_CLASSES[cls]
    model.pins = None
    return model


def check_completion(item: Item, token_ids: Sequence[int], text: str, who: str) -> None:
    """Fail loudly unless a run produced exactly the pinned answer."""
    if list(token_ids) != item.answer_ids or text != item.answer:
        got = next((i for i, (a, b) in enumerate(zip(token_ids, item.answer_ids)) if a != b),
                   min(len(token_ids), len(item.answer_ids)))
        raise PinError(f"{who}: {item.task_id}: the output is not the pinned answer (first difference at token "
                       f"{got} of {len(item.answer_ids)}; {len(token_ids)} produced)")


# ---- pinning the baselines ---------------------------------------------------------------------

class PinLogits:
    """A transformers LogitsProcessor pinning each row to its answer, from the sequence so far:
    `input_ids` (B, L) holds the (equal-length, or left-padded to `prompt_len`) prompt and what
    followed, so row b's next answer token is answers[b][L - prompt_len] (then EOS)."""

    def __init__(self, prompt_len: int, answers: Sequence[Sequence[int]], eos_id: int) -> None:
        self.prompt_len, self.answers, self.eos_id = prompt_len, answers, eos_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        i = input_ids.shape[1] - self.prompt_len
        toks = [a[i] if i < len(a) else self.eos_id for a in self.answers]
        scores[range(len(toks)), toks] += PIN_BIAS
        return scores


def llama_pin(answer: Sequence[int], eos_id: int):
    """A llama-cpp-python logits_processor pinning one answer. It counts its calls instead of
    reading the sequence: llama-cpp-python 0.3 passes the tokens evaluated so far, which under
    speculation include unverified drafts, but it samples (and calls this) once per emitted token,
    in order, so call k pins answer[k] (then EOS). One per generate call."""
    calls = 0

    def process(input_ids, scores):
        nonlocal calls
        scores[answer[calls] if calls < len(answer) else eos_id] += PIN_BIAS
        calls += 1
        return scores
    return process

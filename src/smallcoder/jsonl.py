"""Reading JSON Lines: one object per line, with one-line errors naming the file, line and field.

Neutral ground: the training data (`smallcoder.data`) and the evaluation (`smallcoder.eval`)
both read JSONL, and neither may import the other, so the reader lives here.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SmallCoderError

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL(.gz) file; errors name file and line."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}: line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SmallCoderError(f"{where}: invalid UTF-8 at byte offset {offset + e.start} "
                                      f"(byte {raw[e.start:e.start + 1]!r})") from None
            offset += len(raw)
            if lineno == 1:
                line = line.lstrip("\ufeff")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SmallCoderError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise SmallCoderError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if _SURROGATE_ESCAPE.search(line):  # cheap pre-filter: only lines with a \uD800-\uDFFF escape
                check_surrogates(record, where, "")
            yield lineno, record


def check_surrogates(value: Any, where: str, path: str = "") -> None:
    """Refuse a lone UTF-16 surrogate (a `\\ud800` escape without its pair): no UTF-8 text holds one,
    so the tokenizer, the decontaminator's writer and every file written later would fail on it."""
    if isinstance(value, str):
        m = _SURROGATE.search(value)
        if m:
            raise SmallCoderError(f"{where}: field {path or '(top level)'!r} holds a lone UTF-16 surrogate "
                                  f"\\u{ord(m.group()):04x} at character {m.start()} (a JSON escape without its "
                                  "pair, not valid Unicode text); fix or drop that record")
    elif isinstance(value, dict):
        for k, v in value.items():
            check_surrogates(k, where, path)
            check_surrogates(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_surrogates(v, where, f"{path}[{i}]")

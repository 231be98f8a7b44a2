"""The built-in corpus, part 1: the standard library read as text, and its prose.

`stdlib_files` lists the library's own `.py` sources (tests, idlelib, installed packages and
caches left out) in sorted path order; `prose_from_module` turns one module's docstrings into a
document and `prose_from_topics` gives the language reference topics that `help()` shows.
Nothing is imported: every source is read with `ast`.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

MIN_DOCSTRING_CHARS = 20
# Folders of the standard library that are not library code (tests, the IDE, installed packages).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "site-packages", "dist-packages",
                           "__pycache__", "lib-dynload", "pydoc_data"})


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


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or rel.stem


def is_codec_table(text: str) -> bool:
    """encodings/cp1252.py and friends: generated 256-entry tables, noise for a language model."""
    return "decoding_table" in text and "charmap_build" in text


def encodable(text: str) -> bool:
    """Docstrings may spell lone surrogates with escapes; such text cannot be written as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    return f"{node.name}({ast.unparse(node.args)})"


def docstring(node: ast.AST) -> str | None:
    doc = ast.get_docstring(node, clean=True)  # type: ignore[arg-type]
    if doc and len(doc.strip()) >= MIN_DOCSTRING_CHARS and encodable(doc):
        return doc.strip()
    return None


def _public(node: ast.stmt, kinds: tuple[type, ...]) -> bool:
    return isinstance(node, kinds) and not node.name.startswith("_")  # type: ignore[attr-defined]


def _class_sections(module: str, node: ast.ClassDef) -> list[str]:
    """The class's docstring and its public methods' docstrings, as sections."""
    sections = []
    doc = docstring(node)
    if doc:
        sections.append(f"## class `{module}.{node.name}`\n\n{doc}")
    for item in node.body:
        if _public(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = docstring(item)
            if doc:
                sections.append(f"### `{node.name}.{signature(item)}`\n\n{doc}")  # type: ignore[arg-type]
    return sections


def prose_from_module(module: str, tree: ast.Module) -> str | None:
    """The module's docstrings (module, public classes, functions and methods) as one document."""
    sections = []
    doc = docstring(tree)
    if doc:
        sections.append(f"# The `{module}` module\n\n{doc}")
    for node in tree.body:
        if _public(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = docstring(node)
            if doc:
                sections.append(f"## `{module}.{signature(node)}`\n\n{doc}")  # type: ignore[arg-type]
        elif _public(node, (ast.ClassDef,)):
            sections += _class_sections(module, node)  # type: ignore[arg-type]
    if not sections:
        return None
    if not sections[0].startswith("# "):
        sections.insert(0, f"# The `{module}` module")
    return "\n\n".join(sections) + "\n"


def prose_from_topics() -> list[str]:
    """The language reference topics that `help()` shows (keywords, statements, operators)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() + "\n" for k in sorted(topics) if topics[k].strip() and encodable(topics[k])]


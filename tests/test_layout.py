"""Dependencies run one way, checked on the source (lazy imports inside functions included):
library code never imports a command module, and `data` and `eval` do not import each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "smallcoder"
CLI_FILES = ("cli.py", "__main__.py")


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every smallcoder module `path` imports, relative imports resolved; `from X import y` also
    counts X.y, since y may be a module."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names |= {source} | {f"{source}.{a.name}" for a in node.names}
    return {n for n in names if n == "smallcoder" or n.startswith("smallcoder.")}


def _is_command_module(name: str) -> bool:
    return name.rpartition(".")[2] in ("cli", "__main__")


def test_the_import_scan_sees_lazy_and_relative_imports():
    assert "smallcoder.eval.data" in imported(PACKAGE / "data" / "cli.py")  # inside cmd_decontam
    assert "smallcoder.data.builtin" in imported(PACKAGE / "data" / "readers.py")  # inside records()
    assert "smallcoder.jsonl.read_jsonl" in imported(PACKAGE / "data" / "readers.py")  # module level


def test_library_modules_never_import_a_command_module():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in CLI_FILES:
            continue
        bad = sorted(n for n in imported(path) if _is_command_module(n))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    assert found == {}


def test_data_and_eval_do_not_import_each_other():
    """Both read JSONL through smallcoder.jsonl; decontamination is handed the benchmark items.
    data/cli.py, the command layer, is the one place that loads them through eval.data."""
    found = {}
    for package, other in (("data", "smallcoder.eval"), ("eval", "smallcoder.data")):
        for path in sorted((PACKAGE / package).rglob("*.py")):
            if path.relative_to(PACKAGE).as_posix() == "data/cli.py":
                continue
            bad = sorted(n for n in imported(path) if n == other or n.startswith(other + "."))
            if bad:
                found[str(path.relative_to(PACKAGE))] = bad
    assert found == {}


def test_importing_data_loads_no_eval_module_and_back():
    data = "smallcoder.data.decontam, smallcoder.data.sources, smallcoder.data.pack, smallcoder.data.builtin"
    for first, other in ((data, "smallcoder.eval"), ("smallcoder.eval.data, smallcoder.eval.report", "smallcoder.data")):
        code = f"import sys, {first}\nprint([m for m in sys.modules if m.startswith({other!r})])\n"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_ruff_is_clean_with_the_configured_rules():
    """`ruff check src tests benchmarks` passes with pyproject.toml's settings (the test extra pins ruff)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs the pinned one)")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "src", "tests", "benchmarks"],
                          cwd=SRC.parent, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_every_module_reads_in_one_sitting():
    """One concern per module: none past 500 lines (the aim is 400; the house issue found eight past 500)."""
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 500} == {}

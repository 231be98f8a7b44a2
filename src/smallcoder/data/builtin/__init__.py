"""The built-in corpus: training data every Python installation already holds, so the whole
pipeline (pack, train, evaluate) runs with no network and no downloads.

Four parts, each a JSONL file, deterministic for a given seed and Python version:
  prose  the language reference topics (`pydoc_data.topics`) and the docstrings of the standard
         library's modules, classes and functions (read with `ast`; nothing is imported);
  code   the standard library's own `.py` sources, in sorted path order (tests, idlelib,
         site-packages and generated codec tables left out);
  math   generated GSM8k-style word problems with worked step-by-step answers ending `#### N`;
  sft    conversations in the card's chat format: a request written from a self-contained stdlib
         function's signature and docstring, answered with its source in a ```python fence;
         generated requests for small functions (sum a list, test for a prime), answered with
         checked code; a question about what a stdlib function or class does, answered from its
         docstring; and math questions answered with their worked solutions.
`manifest.json` records per part the documents, characters, bytes, SHA-256 and license.

Modules, one concern each: `stdlib` (the library read as text, and its prose), `functions` (SFT
from functions), `codegen` (the small-function generator), `mathgen` (the math
generator), `corpus` (building, checking and finding the folder). This package exports their public API.
"""

from __future__ import annotations

from .codegen import TASKS, code_conversations
from .corpus import (
    DEFAULT_MATH_PROBLEMS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MATH_LICENSE,
    PARTS,
    PYTHON_VERSION,
    STDLIB_LICENSE,
    build_builtin,
    default_builtin_dir,
    ensure_builtin,
    read_manifest,
)
from .functions import MAX_SFT_FUNCTION_LINES, sft_explanations, sft_functions
from .mathgen import MATH_TEMPLATES, arith, math_documents, math_problem
from .stdlib import EXCLUDED_DIRS, prose_from_module, prose_from_topics, stdlib_dir, stdlib_files

__all__ = [
    "DEFAULT_MATH_PROBLEMS",
    "EXCLUDED_DIRS",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MATH_LICENSE",
    "MATH_TEMPLATES",
    "MAX_SFT_FUNCTION_LINES",
    "PARTS",
    "PYTHON_VERSION",
    "STDLIB_LICENSE",
    "TASKS",
    "arith",
    "build_builtin",
    "check_tasks",
    "code_conversations",
    "default_builtin_dir",
    "ensure_builtin",
    "math_documents",
    "math_problem",
    "prose_from_module",
    "prose_from_topics",
    "read_manifest",
    "sft_explanations",
    "sft_functions",
    "stdlib_dir",
    "stdlib_files",
]

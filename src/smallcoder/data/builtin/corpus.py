"""The built-in corpus, part 4: assembling the parts into a folder, and finding or building it.

`build_builtin` writes prose.jsonl, code.jsonl, math.jsonl, sft.jsonl and manifest.json (per part:
documents, characters, bytes, SHA-256 and license) into a temporary sibling and renames it into
place; `ensure_builtin` returns a built folder (checked against its manifest), building it first
if needed, under the cache root (`smallcoder.fsutil.cache_root`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from ...checks import integer
from ...errors import SmallCoderError
from ...fsutil import atomic_folder, cache_root, refuse_used_folder
from .codegen import code_conversations
from .functions import sft_explanations, sft_functions
from .mathgen import math_documents
from .stdlib import is_codec_table, module_name, prose_from_module, prose_from_topics, stdlib_dir, stdlib_files

PARTS = ("prose", "code", "math", "sft")
MANIFEST = "manifest.json"
FORMAT = "smallcoder-builtin-corpus"
FORMAT_VERSION = 3             # 3: sft adds generated code requests and prose questions (1: functions, 5,000 math)
GENERATED_CODE_PER_FUNCTION = 2  # generated code requests per stdlib function request
DEFAULT_MATH_PROBLEMS = 20_000
PYTHON_VERSION = platform.python_version()
STDLIB_LICENSE = f"PSF-2.0 (derived from the Python {PYTHON_VERSION} standard library)"
MATH_LICENSE = "generated, Apache-2.0 like the project"


def _scan_stdlib(seed: int, progress: bool, max_files: int | None = None
                 ) -> tuple[list[str], list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """One pass over the standard library: (code documents, prose documents, function
    conversations, explanation conversations)."""
    from tqdm import tqdm

    root = stdlib_dir()
    files = stdlib_files(root)[:max_files]
    if not files:
        raise SmallCoderError(f"{root}: no standard library sources found (is this a full Python install?)")
    rng = random.Random(f"smallcoder-builtin:sft:{seed}")
    code, prose, convs, explained = [], prose_from_topics(), [], []
    seen_code: set[str] = set()
    for path in tqdm(files, desc="stdlib", unit="file", file=sys.stderr, disable=None if progress else True):
        rel = path.relative_to(root)
        try:
            source = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not source.strip() or is_codec_table(source):
            continue
        code.append(source)
        try:
            tree = ast.parse(source, filename=str(rel))
        except SyntaxError:
            continue
        module = module_name(rel)
        doc = prose_from_module(module, tree)
        if doc:
            prose.append(doc)
        for conv in sft_functions(module, source, tree, rng):
            key = conv["messages"][1]["content"].split("```python\n", 1)[1]
            if key not in seen_code:
                seen_code.add(key)
                convs.append(conv)
        explained += sft_explanations(module, tree, rng)
    return code, prose, convs, explained


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
    integer(math_problems, "math_problems")
    if max_stdlib_files is not None:
        integer(max_stdlib_files, "max_stdlib_files")
    integer(seed, "seed", minimum=None)
    out = Path(out_dir)
    refuse_used_folder(out, overwrite=overwrite)  # before the scan, so a refusal comes first
    t0 = time.perf_counter()
    code, prose, func_convs, explained = _scan_stdlib(seed, progress, max_stdlib_files)
    math = math_documents(seed, math_problems, "math")
    # n of each kind besides 2n generated code requests (n = the stdlib function requests), so an
    # SFT stage teaches each kind, and its held-out prompts test each of them
    n = max(1, len(func_convs))
    explained = random.Random(f"smallcoder-builtin:sft-prose:{seed}").sample(explained, min(n, len(explained)))
    sft_math = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in math_documents(seed, n, "sft-math")]
    generated = code_conversations(seed, GENERATED_CODE_PER_FUNCTION * n)
    sft = func_convs + generated + explained + sft_math
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
        "sft": (f"{len(func_convs)} function requests answered with stdlib source, {len(generated)} generated "
                f"requests for small functions answered with code, {len(explained)} "
                f"questions about stdlib functions answered from their docstrings, "
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
    if manifest.get("version") != FORMAT_VERSION:
        raise SmallCoderError(f"{path}: field 'version' is {manifest.get('version')!r:.20}, this SmallCoder builds "
                              f"version {FORMAT_VERSION}; rebuild it with `smallcoder data builtin --out {folder} --force`")
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
    """CACHE/builtin-v{FORMAT_VERSION}-py{X.Y.Z}-seed{S}[-mathN][-filesN], CACHE being `fsutil.cache_root()`
    ($SMALLCODER_CACHE, else $SMALLCODER_HOME, else ~/.cache/smallcoder)."""
    base = cache_root()
    suffix = "" if math_problems == DEFAULT_MATH_PROBLEMS else f"-math{math_problems}"
    suffix += f"-files{max_stdlib_files}" if max_stdlib_files else ""
    return base / f"builtin-v{FORMAT_VERSION}-py{PYTHON_VERSION}-seed{seed}{suffix}"


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


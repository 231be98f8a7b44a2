"""Reading one source's records or texts, kind by kind, in a deterministic order.

`records(spec, fields, ...)` yields (location, record) pairs from a field-based source (jsonl,
parquet, hub, builtin) and `file_texts(spec)` the documents of a text or files source; the
location ("FILE: line 3", "FILE: row 7", "hub dataset ... row 9") is what every error names.
`smallcoder.data.sources` turns these into the documents and conversations callers use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from ..jsonl import read_jsonl

if TYPE_CHECKING:
    from .sources import SourceSpec

log = logging.getLogger(__name__)

BINARY_SNIFF_BYTES = 8192
SKIPPED_DIRS = ("__pycache__", "node_modules")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".ndjson")


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def get_field(record: dict[str, Any], field: str, where: str) -> Any:
    """record[field]; a dotted name ("question.stem") walks nested objects when no key has the dot."""
    if field in record:
        return record[field]
    value: Any = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            fields = ", ".join(map(str, record)) or "none"
            raise SmallCoderError(f"{where}: field {field!r} is missing (fields: {fields})")
        value = value[part]
    return value


def _local_files(spec: SourceSpec, suffixes: tuple[str, ...]) -> list[Path]:
    path = Path(str(spec.path))
    if not path.exists():
        raise SmallCoderError(f"{path}: no such file or folder (source {spec.display_label})")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and p.name.lower().endswith(suffixes) and not _hidden(p.relative_to(path)))
    if not files:
        raise SmallCoderError(f"{path}: folder holds no {' / '.join('*' + s for s in suffixes)} files "
                              f"(source {spec.display_label})")
    return files


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part in SKIPPED_DIRS for part in rel.parts)


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, record in read_jsonl(path):
        yield f"{path}: line {lineno}", record


def _parquet_records(path: Path, columns: list[str], batch_rows: int) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SmallCoderError(f"{path}: reading Parquet needs pyarrow: pip install 'smallcoder[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, ...
        raise SmallCoderError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise SmallCoderError(f"{path}: field {missing[0]!r} is missing (fields: {', '.join(names)})")
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", record


def _hub_records(spec: SourceSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise SmallCoderError(f"source {spec.display_label}: reading Hub datasets needs the datasets library: "
                              f"pip install 'smallcoder[data]'") from None
    from datasets.exceptions import DatasetNotFoundError

    ident = spec.name + (f" (config {spec.config})" if spec.config else "")
    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, data_dir=spec.data_dir,
                                   streaming=True)
    except ConnectionError as e:
        raise SmallCoderError(f"hub dataset {ident}: the Hugging Face Hub could not be reached ({e}); "
                              f"check the network, or unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE") from None
    except DatasetNotFoundError as e:
        raise SmallCoderError(f"hub dataset {ident}: not found or not accessible ({e}); gated datasets need "
                              f"their terms accepted on huggingface.co and `hf auth login`") from None
    except (ValueError, FileNotFoundError) as e:  # unknown config / split / data_dir
        raise SmallCoderError(f"hub dataset {ident}, split {spec.split!r}: {e}") from None
    for row, record in enumerate(ds, 1):
        yield f"hub dataset {ident} split {spec.split}: row {row}", record


def records(spec: SourceSpec, fields: list[str], parquet_batch_rows: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, record) pairs from a field-based source, in a deterministic order; Parquet is
    read `parquet_batch_rows` rows at a time (never the whole file)."""
    if spec.kind == "jsonl":
        for path in _local_files(spec, JSONL_SUFFIXES):
            yield from _jsonl_records(path)
    elif spec.kind == "parquet":
        columns = sorted({f.split(".")[0] if "." in f else f for f in fields})
        for path in _local_files(spec, (".parquet",)):
            yield from _parquet_records(path, columns, parquet_batch_rows)
    elif spec.kind == "hub":
        yield from _hub_records(spec)
    elif spec.kind == "builtin":
        from .builtin import ensure_builtin

        folder = ensure_builtin(spec.path)
        yield from _jsonl_records(folder / f"{spec.name}.jsonl")
    else:
        raise SmallCoderError(f"source {spec.display_label}: a {spec.kind} source has no fields "
                              f"(conversations need jsonl, parquet, hub or builtin)")


def fingerprint(spec: SourceSpec) -> Any:
    """What identifies the source's content beside its spec, for caches keyed on it: a built-in
    part's SHA-256 (from its manifest), each local jsonl/parquet/text file's size and mtime; None
    for the Hub (its revision is in the spec) and for a `files` folder (not walked twice)."""
    if spec.kind == "builtin":
        from .builtin import ensure_builtin, read_manifest

        return read_manifest(ensure_builtin(spec.path))["parts"][spec.name]["sha256"]
    if spec.kind in ("jsonl", "parquet", "text"):
        suffixes = {"jsonl": JSONL_SUFFIXES, "parquet": (".parquet",), "text": None}[spec.kind]
        files = _local_files(spec, suffixes) if suffixes else [Path(spec.path)]  # type: ignore[arg-type]
        return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return None


def _decode_text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SmallCoderError(f"{path}: invalid UTF-8 at byte offset {e.start} (line {line})") from None


def file_texts(spec: SourceSpec) -> Iterator[str]:
    path = Path(str(spec.path))
    if not path.exists():
        raise SmallCoderError(f"{path}: no such file or folder (source {spec.display_label})")
    if spec.kind == "text":
        if path.is_dir():
            raise SmallCoderError(f"{path}: is a folder; a text source is one file (use kind files for a folder)")
        yield _decode_text(path.read_bytes(), path)
        return
    if path.is_file():
        yield _decode_text(path.read_bytes(), path)
        return
    skipped = 0
    for f in sorted(p for p in path.glob(spec.glob) if p.is_file() and not _hidden(p.relative_to(path))):
        data = f.read_bytes()
        if b"\0" in data[:BINARY_SNIFF_BYTES]:
            skipped += 1
            continue
        try:
            yield data.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d binary or non-UTF-8 file(s)", path, skipped)

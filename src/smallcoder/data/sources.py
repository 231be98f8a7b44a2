"""Where training documents come from: local files, Hugging Face Hub datasets, the built-in corpus.

A `SourceSpec` names one source; `iter_texts` yields its pretraining documents and
`iter_conversations` its SFT conversations, both in a deterministic order, so a packed corpus
can be rebuilt byte for byte. Every reader checks what it reads and raises `SmallCoderError`
naming the file, line or row, field and value, because a bad row found after hours of packing
is expensive.

Document boundaries, per kind:
  jsonl    one JSON object per line (blank lines skipped); `.jsonl.gz` is read transparently;
           a folder means every `*.jsonl` / `*.jsonl.gz` below it, in sorted path order.
  parquet  one row per document, read in row batches (never the whole file); a folder means
           every `*.parquet` below it, sorted.
  text     the whole file is one document (a `.txt` file, a single source file, ...).
  files    every file under a folder that matches `glob`, one document per file, sorted by
           path; hidden files/folders, `__pycache__`, binary and non-UTF-8 files are skipped.
  hub      `datasets.load_dataset(name, config, split=..., data_dir=..., streaming=True)`.
  builtin  a part of the built-in corpus (see `smallcoder.data.builtin`), built on first use.
Documents that are empty or only whitespace are skipped in every kind.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import checks
from ..errors import SmallCoderError
from .readers import describe, file_texts, get_field, records

KINDS = ("jsonl", "parquet", "text", "files", "hub", "builtin")
LOCAL_KINDS = ("jsonl", "parquet", "text", "files")
BUILTIN_PARTS = ("prose", "code", "math", "sft")
ROLES = ("system", "user", "assistant")
# ShareGPT-style records ({"from": "human", "value": ...}) are common on the Hub; map them.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant"}
PARQUET_BATCH_ROWS = 1024  # rows per Parquet read (handed to the readers at each read)



@dataclass(frozen=True)
class SourceSpec:
    """One source of documents (pretraining) or conversations (SFT)."""

    kind: str                      # "jsonl" | "parquet" | "text" | "files" | "hub" | "builtin"
    path: str | None = None        # local file or folder; builtin: corpus folder (None = default)
    name: str | None = None        # hub: dataset id (or a local folder load_dataset understands); builtin: part
    config: str | None = None      # hub: dataset config
    split: str = "train"           # hub split
    field: str = "text"            # field holding a document's text (jsonl, parquet, hub); "a.b" = nested
    messages_field: str | None = None   # SFT: field holding a list of {"role","content"} messages
    prompt_field: str | None = None     # SFT: single-turn request field ...
    response_field: str | None = None   # ... and answer field
    glob: str = "**/*"             # files: which files under the folder (e.g. "**/*.py")
    limit: int | None = None       # at most this many documents
    label: str | None = None       # name shown in indexes/reports (default derived from path/name)
    data_dir: str | None = None    # hub: a sub-folder of the dataset repo (StarCoderData's languages)

    def __post_init__(self) -> None:
        self._check_kind()
        if bool(self.prompt_field) != bool(self.response_field):
            raise SmallCoderError("prompt_field and response_field go together: set both or neither")
        if self.messages_field and self.prompt_field:
            raise SmallCoderError("set either messages_field or prompt_field/response_field, not both")
        for key in ("split", "field", "glob"):
            checks.text(getattr(self, key), key)
        if self.limit is not None:
            checks.integer(self.limit, "limit")

    def _check_kind(self) -> None:
        """What each kind needs: a path, a dataset id, a built-in part (whose sft is conversations)."""
        if self.kind not in KINDS:
            raise SmallCoderError(f"unknown source kind {self.kind!r} (use {', '.join(KINDS)})")
        if self.kind in LOCAL_KINDS and not self.path:
            raise SmallCoderError(f"a {self.kind} source needs a path")
        if self.kind == "hub" and not self.name:
            raise SmallCoderError("a hub source needs name (the dataset id, e.g. HuggingFaceFW/fineweb-edu)")
        if self.kind == "builtin":
            if self.name not in BUILTIN_PARTS:
                raise SmallCoderError(f"unknown built-in part {self.name!r} (use {', '.join(BUILTIN_PARTS)})")
            if self.name == "sft" and not (self.messages_field or self.prompt_field):
                object.__setattr__(self, "messages_field", "messages")

    @property
    def is_sft(self) -> bool:
        """True when the source holds conversations (read it with `iter_conversations`)."""
        return bool(self.messages_field or self.prompt_field)

    @property
    def display_label(self) -> str:
        """`label`, else a short name derived from the path or dataset id."""
        if self.label:
            return self.label
        if self.kind == "builtin":
            return f"builtin:{self.name}"
        if self.kind == "hub":
            parts = [str(self.name)] + ([self.config] if self.config else [])
            text = ":".join(parts) + (f"/{self.data_dir}" if self.data_dir else "")
            return text + (f"@{self.split}" if self.split != "train" else "")
        return str(self.path)


def _card(label: str, name: str, *, config: str | None = None, split: str = "train", field: str = "text",
          **sft: str) -> SourceSpec:
    return SourceSpec(kind="hub", name=name, config=config, split=split, field=field, label=label, **sft)


# The model card's corpora (its "Training Curriculum" table). Ids, configs, splits and fields were
# looked up in the datasets' own cards/READMEs (through mirrors and public code that loads them);
# nothing here could be fetched from the Hub itself. Confidence is noted per entry.
CARD_CORPORA: dict[str, SourceSpec] = {
    # Stage 1. Sure: dataset card lists configs sample-10BT/100BT/350BT; column `text`. ODC-By.
    "fineweb-edu": _card("fineweb-edu", "HuggingFaceFW/fineweb-edu", config="sample-10BT"),
    # Stage 2 (40%). Sure: card says load_dataset("bigcode/starcoderdata", data_dir="python"),
    # column `content`. Gated: accept the terms on the Hub and log in first.
    "starcoderdata": dataclasses.replace(_card("starcoderdata", "bigcode/starcoderdata", field="content"),
                                         data_dir="python"),
    # Stage 2 (60%). Config sure (README `configs`: Synthetic-Code, Nemotron-Code-Metadata); the
    # `text` column is what public loaders of this collection read (not seen in the card). Gated.
    "nemotron-synthetic-code": _card("nemotron-synthetic-code", "nvidia/Nemotron-Pretraining-Code-v1",
                                     config="Synthetic-Code"),
    # Stage 3. Configs sure (README: "3", "4plus", "4plus_MIND"); column `text` from public
    # loaders. Gated.
    "nemotron-cc-math": _card("nemotron-cc-math", "nvidia/Nemotron-CC-Math-v1", config="4plus"),
    # Stage 3. Fairly sure: per-language configs ("en" = data/enwiki), column `text`. CC BY-SA 4.0.
    "finewiki": _card("finewiki", "HuggingFaceFW/finewiki", config="en"),
    # Stage 3. Sure: README dataset_info has text/url/date/metadata, one split "train". ODC-By.
    "openwebmath": _card("openwebmath", "open-web-math/open-web-math"),
    # Stage 4.1. Sure about the layout (README dataset_info: `messages` list of role/content, splits
    # chat/code/math/stem/tool_calling); that the card's "Nemotron SFT" is this dataset's code split
    # is our reading of the card. CC BY 4.0.
    "nemotron-sft": _card("nemotron-sft", "nvidia/Nemotron-Post-Training-Dataset-v1", split="code",
                          messages_field="messages"),
    # Stage 4.1. Sure: columns `input` (request) and `output` (answer), split train. CC BY 4.0.
    "opencodeinstruct": _card("opencodeinstruct", "nvidia/OpenCodeInstruct",
                              prompt_field="input", response_field="output"),
    # Stage 4.1. Sure: columns problem/generated_solution/expected_answer/problem_source; splits
    # train (14M), train_1M, train_2M, train_5M. CC BY 4.0.
    "openmathinstruct-2": _card("openmathinstruct-2", "nvidia/OpenMathInstruct-2",
                                prompt_field="problem", response_field="generated_solution"),
}

_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SourceSpec))


def _check_fields(fields: dict[str, Any], where: str) -> None:
    unknown = sorted(set(fields) - set(_FIELD_NAMES))
    if unknown:
        raise SmallCoderError(f"{where}: unknown source field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(_FIELD_NAMES)})")


def _with_fields(spec: SourceSpec, fields: dict[str, Any], where: str) -> SourceSpec:
    _check_fields(fields, where)
    if not fields:
        return spec
    try:
        return dataclasses.replace(spec, **fields)
    except SmallCoderError as e:
        raise SmallCoderError(f"{where}: {e}") from None


def parse_source(text: str, **fields: Any) -> SourceSpec:
    """Parse the CLI form of a source; keyword `fields` override the parsed ones.

    Forms: "data/x.jsonl" (also .jsonl.gz, .json), "data/x.parquet", "notes.txt" (any single file
    is a text document), "src_dir/" (a folder => files), "hub:ORG/NAME[:CONFIG][@SPLIT]",
    "card:fineweb-edu" (a CARD_CORPORA key), "builtin:code", or "KIND:PATH" with KIND one of
    jsonl, parquet, text, files (e.g. "jsonl:shards/" for a folder of jsonl files).
    """
    if not isinstance(text, str) or not text.strip():
        raise SmallCoderError(f"empty source {text!r}")
    text = text.strip()
    where = f"source {text!r}"
    prefix, sep, rest = text.partition(":")
    if sep and prefix == "card":
        if rest not in CARD_CORPORA:
            raise SmallCoderError(f"{where}: unknown card corpus {rest!r} (known: {', '.join(CARD_CORPORA)})")
        return _with_fields(CARD_CORPORA[rest], fields, where)
    if sep and prefix == "hub":
        return _make(_hub_fields(rest, where), fields, where)
    if sep and prefix == "builtin":
        return _make({"kind": "builtin", "name": rest}, fields, where)
    if sep and prefix in LOCAL_KINDS and rest:
        return _make({"kind": prefix, "path": rest}, fields, where)
    return _make({"kind": _path_kind(text, where), "path": text}, fields, where)


def _hub_fields(rest: str, where: str) -> dict[str, Any]:
    """ORG/NAME[:CONFIG][@SPLIT] -> the hub source's fields."""
    ident, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "")
    name, _, config = ident.partition(":")
    if not name or (at and not split):
        raise SmallCoderError(f"{where}: expected hub:ORG/NAME[:CONFIG][@SPLIT]")
    return {"kind": "hub", "name": name, "config": config or None, **({"split": split} if split else {})}


def _path_kind(text: str, where: str) -> str:
    """The kind of a plain path, told from its name, else from what is there."""
    path, lower = Path(text), text.lower()
    if lower.endswith((".jsonl", ".jsonl.gz", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if text.endswith(("/", os.sep)) or path.is_dir():
        return "files"
    if path.is_file() or lower.endswith((".txt", ".md", ".text")):
        return "text"
    raise SmallCoderError(f"{where}: no such file or folder, and the kind cannot be told from the name "
                          f"(use a .jsonl/.parquet/.txt path, a folder, hub:ORG/NAME, card:NAME, "
                          f"builtin:PART or KIND:PATH)")


def _make(base: dict[str, Any], fields: dict[str, Any], where: str) -> SourceSpec:
    _check_fields(fields, where)
    try:
        return SourceSpec(**{**base, **fields})
    except SmallCoderError as e:
        raise SmallCoderError(f"{where}: {e}") from None


def source_from_dict(d: dict[str, Any], where: str, *, base_dir: str | Path | None = None) -> SourceSpec:
    """Build a source from a TOML table (e.g. a recipe's `[[stage.sources]]`).

    Keys are SourceSpec's fields, plus `source` (a `parse_source` string that the other keys then
    override). Relative local paths resolve against `base_dir` (the recipe's folder) when given.
    Unknown keys and wrongly typed values raise SmallCoderError naming `where`, the key and value.
    """
    if not isinstance(d, dict):
        raise SmallCoderError(f"{where}: a source must be a table, got {type(d).__name__}")
    _check_table(d, where)
    fields = {k: v for k, v in d.items() if k != "source"}
    if fields.get("path") and base_dir is not None and not Path(fields["path"]).is_absolute():
        fields["path"] = str(Path(base_dir) / fields["path"])
    if "source" in d:
        if "kind" in d:
            raise SmallCoderError(f"{where}: give either source = \"...\" or kind = \"...\", not both")
        try:
            return parse_source(rebase_source(d["source"], base_dir), **fields)
        except SmallCoderError as e:
            raise SmallCoderError(f"{where}: {e}") from None
    if "kind" not in d:
        raise SmallCoderError(f"{where}: a source needs kind (one of {', '.join(KINDS)}) or source = \"...\"")
    return _make({}, fields, where)


def _check_table(d: dict[str, Any], where: str) -> None:
    """Every key is a SourceSpec field (or `source`); limit is a count, everything else a string."""
    known = set(_FIELD_NAMES) | {"source"}
    for key, value in d.items():
        if key not in known:
            raise SmallCoderError(f"{where}: unknown key {key!r} (known: source, {', '.join(_FIELD_NAMES)})")
        if key == "limit":
            checks.integer(value, f"{where}: limit")
        elif not isinstance(value, str):
            raise SmallCoderError(f"{where}: {key} must be a string, got {type(value).__name__} {value!r}")


def rebase_source(text: str, base_dir: str | Path | None) -> str:
    """Resolve the local path in a parse_source string against base_dir (hub/card/builtin untouched)."""
    if base_dir is None:
        return text
    prefix, sep, rest = text.partition(":")
    if sep and prefix in ("hub", "card", "builtin"):
        return text
    head, path = (prefix + ":", rest) if sep and prefix in LOCAL_KINDS else ("", text)
    if not path or Path(path).is_absolute():
        return text
    return head + str(Path(base_dir) / path) + ("/" if path.endswith("/") else "")


# ---------------------------------------------------------------------------------------------
# Documents and conversations


def iter_texts(spec: SourceSpec) -> Iterator[str]:
    """Pretraining documents of `spec`, in a deterministic order (at most `spec.limit`)."""
    if spec.is_sft:
        raise SmallCoderError(f"source {spec.display_label} holds conversations (SFT); "
                              f"read it with iter_conversations")
    count = 0
    if spec.kind in ("text", "files"):
        texts: Iterator[str] = file_texts(spec)
    else:
        texts = _field_texts(spec)
    for text in texts:
        if not text.strip():
            continue
        yield text
        count += 1
        if spec.limit is not None and count >= spec.limit:
            return
    if count == 0:
        raise SmallCoderError(f"source {spec.display_label}: no documents (the source is empty"
                              + (f" or no file matches glob {spec.glob!r})" if spec.kind == "files" else ")"))


def _field_texts(spec: SourceSpec) -> Iterator[str]:
    for where, record in records(spec, [spec.field], PARQUET_BATCH_ROWS):
        value = get_field(record, spec.field, where)
        if not isinstance(value, str):
            raise SmallCoderError(f"{where}: field {spec.field!r} must be a string, got {describe(value)}")
        yield value


def _conversation(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """Validate a messages list; keep role and content only, drop empty system turns."""
    if not isinstance(value, list) or not value:
        raise SmallCoderError(f"{where}: field {field!r} must be a non-empty list of messages, "
                              f"got {describe(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise SmallCoderError(f"{where}: {field}[{i}] must be an object with role and content, "
                                  f"got {describe(m)}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise SmallCoderError(f"{where}: {field}[{i}]: bad role {role!r} (use system, user or assistant)")
        if not isinstance(content, str):
            raise SmallCoderError(f"{where}: {field}[{i}]: content must be a string, got {describe(content)}")
        if role == "system" and not content.strip():
            continue
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise SmallCoderError(f"{where}: {field} has no assistant message (nothing to train on)")
    if not any(m["role"] == "user" for m in out):
        raise SmallCoderError(f"{where}: {field} has no user message")
    return out


def iter_conversations(spec: SourceSpec) -> Iterator[list[dict[str, str]]]:
    """SFT conversations of `spec` as lists of {"role", "content"} messages, deterministic order.

    From `messages_field` (a list of messages; ShareGPT from/value records are accepted), or from
    `prompt_field` + `response_field` as [user, assistant]. Records whose prompt or response is
    empty are skipped.
    """
    if not spec.is_sft:
        raise SmallCoderError(f"source {spec.display_label} has no conversations: set messages_field, "
                              f"or prompt_field and response_field")
    count = 0
    fields = [spec.messages_field] if spec.messages_field else [spec.prompt_field, spec.response_field]
    for where, record in records(spec, [f for f in fields if f], PARQUET_BATCH_ROWS):
        if spec.messages_field:
            messages = _conversation(get_field(record, spec.messages_field, where), where, spec.messages_field)
        else:
            pair = []
            for key in (spec.prompt_field, spec.response_field):
                value = get_field(record, str(key), where)
                if not isinstance(value, str):
                    raise SmallCoderError(f"{where}: field {key!r} must be a string, got {describe(value)}")
                pair.append(value)
            if not pair[0].strip() or not pair[1].strip():
                continue
            messages = [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        yield messages
        count += 1
        if spec.limit is not None and count >= spec.limit:
            return
    if count == 0:
        raise SmallCoderError(f"source {spec.display_label}: no conversations (the source is empty)")

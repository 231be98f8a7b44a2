"""Data sources: every kind reads its documents in order, SFT conversations, and every bad input
gets a SmallCoderError that names the file, line/row, field and value."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smallcoder import SmallCoderError
from smallcoder.data import sources
from smallcoder.data.sources import (
    CARD_CORPORA,
    SourceSpec,
    iter_conversations,
    iter_texts,
    parse_source,
    source_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
DOCS = ["def add(a, b):\n    return a + b\n", "The quick brown fox.", "naïve café ☕ — unicode survives"]


def write_jsonl(path: Path, records: list, raw_lines: list[bytes] | None = None) -> Path:
    data = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
    path.write_bytes(data + b"".join(raw_lines or []))
    return path


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=700)
    return path


# ---------------------------------------------------------------------------------------------
# every kind round-trips its documents


def test_jsonl_roundtrip_skips_blank_lines_and_keeps_order(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)], [b"\n", b"  \n"])
    assert list(iter_texts(parse_source(str(path)))) == DOCS


def test_jsonl_gz_and_folder_of_shards_in_sorted_order(tmp_path):
    shards = tmp_path / "shards"
    (shards / "sub").mkdir(parents=True)
    write_jsonl(shards / "b.jsonl", [{"text": "second"}])
    with gzip.open(shards / "a.jsonl.gz", "wb") as fh:
        fh.write(b'{"text": "first"}\n')
    write_jsonl(shards / "sub" / "c.jsonl", [{"text": "third"}])
    write_jsonl(shards / ".hidden.jsonl", [{"text": "never"}])
    (shards / "notes.txt").write_text("not jsonl")
    assert list(iter_texts(parse_source(f"jsonl:{shards}"))) == ["first", "second", "third"]


def test_jsonl_nested_field_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", [{"question": {"stem": f"q{i}"}} for i in range(5)])
    spec = parse_source(str(path), field="question.stem", limit=2)
    assert list(iter_texts(spec)) == ["q0", "q1"]


def test_parquet_roundtrip_across_row_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 64)  # several batches from a small file
    texts = [f"document {i}" for i in range(1500)]
    path = write_parquet(tmp_path / "d.parquet", {"content": texts, "n": list(range(1500))})
    spec = parse_source(str(path), field="content")
    assert spec.kind == "parquet"
    assert list(iter_texts(spec)) == texts
    assert list(iter_texts(parse_source(str(path), field="content", limit=3))) == texts[:3]


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("para one\n\npara two\n", encoding="utf-8")
    assert list(iter_texts(parse_source(str(path)))) == ["para one\n\npara two\n"]


def test_files_folder_sorted_skipping_hidden_pycache_and_binary(tmp_path):
    root = tmp_path / "src"
    for rel, data in {"b.py": b"print('b')\n", "a.py": b"print('a')\n", "pkg/c.py": b"x = 1\n",
                      "pkg/__pycache__/c.py": b"cached\n", ".git/x.py": b"hidden\n", "img.py": b"\x89PNG\0\0data",
                      "latin1.py": "caf\xe9".encode("latin-1"), "empty.py": b"   \n", "readme.md": b"# hi\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    spec = parse_source(f"{root}/", glob="**/*.py")
    assert spec.kind == "files"
    assert list(iter_texts(spec)) == ["print('a')\n", "print('b')\n", "x = 1\n"]
    assert list(iter_texts(parse_source(str(root))))[-1] == "# hi\n"  # default glob takes every file


def test_hub_code_path_on_a_local_dataset_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"body": d} for d in DOCS])
    spec = parse_source(f"hub:{folder}", field="body")
    assert (spec.kind, spec.name, spec.split) == ("hub", str(folder), "train")
    assert list(iter_texts(spec)) == DOCS
    with pytest.raises(SmallCoderError, match=r"split 'validation'"):
        list(iter_texts(parse_source(f"hub:{folder}@validation", field="body")))


def test_hub_unknown_id_offline_names_the_id_and_the_hub(tmp_path):
    pytest.importorskip("datasets")
    code = ("from smallcoder.data.sources import iter_texts, parse_source\n"
            "from smallcoder import SmallCoderError\n"
            "try:\n    list(iter_texts(parse_source('hub:no-such-org/no-such-dataset:cfg')))\n"
            "except SmallCoderError as e:\n    print('ERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert "ERROR hub dataset no-such-org/no-such-dataset (config cfg)" in out.stdout
    assert "Hub could not be reached" in out.stdout


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SmallCoderError, match=r"pip install 'smallcoder\[data\]'"):
        list(iter_texts(parse_source("hub:HuggingFaceFW/fineweb-edu")))


# ---------------------------------------------------------------------------------------------
# SFT


def test_sft_from_messages_drops_extra_keys_and_empty_system(tmp_path):
    conv = [{"role": "system", "content": ""}, {"role": "user", "content": "hi", "tool_calls": []},
            {"role": "assistant", "content": "hello"}]
    sharegpt = [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": conv}, {"messages": sharegpt}])
    spec = parse_source(str(path), messages_field="messages")
    assert spec.is_sft
    assert list(iter_conversations(spec)) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]


def test_sft_from_prompt_and_response_fields_in_parquet(tmp_path):
    path = write_parquet(tmp_path / "sft.parquet", {"input": ["Add 2 and 3.", "", "Say hi."],
                                                    "output": ["5", "skipped: empty prompt", "hi"]})
    spec = parse_source(str(path), prompt_field="input", response_field="output")
    assert list(iter_conversations(spec)) == [
        [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]]


def test_texts_and_conversations_refuse_the_wrong_kind_of_source(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "messages": []}])
    with pytest.raises(SmallCoderError, match="iter_conversations"):
        list(iter_texts(parse_source(str(path), messages_field="messages")))
    with pytest.raises(SmallCoderError, match="messages_field"):
        list(iter_conversations(parse_source(str(path))))


# ---------------------------------------------------------------------------------------------
# bad input


def test_missing_field_lists_the_fields_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"content": "x", "id": 7}])
    with pytest.raises(SmallCoderError, match=r"d\.jsonl: line 2: field 'text' is missing \(fields: content, id\)"):
        list(iter_texts(parse_source(str(path))))


def test_parquet_missing_column_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"content": ["a"], "lang": ["py"]})
    with pytest.raises(SmallCoderError, match=r"d\.parquet: field 'text' is missing \(fields: content, lang\)"):
        list(iter_texts(parse_source(str(path))))


@pytest.mark.parametrize("value, shown", [(42, "int 42"), (None, "NoneType None"), (["a"], "list")])
def test_field_that_is_not_a_string(tmp_path, value, shown):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": value}])
    with pytest.raises(SmallCoderError, match=rf"line 2: field 'text' must be a string, got {shown}"):
        list(iter_texts(parse_source(str(path))))


def test_parquet_non_string_value_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", {"text": ["a", None]})
    with pytest.raises(SmallCoderError, match=r"d\.parquet: row 2: field 'text' must be a string, got NoneType"):
        list(iter_texts(parse_source(str(path))))


def test_invalid_utf8_in_jsonl_names_line_and_byte_offset(tmp_path):
    good = b'{"text": "ok"}\n'
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b'{"text": "bad \xff byte"}\n')
    with pytest.raises(SmallCoderError, match=rf"d\.jsonl: line 2: invalid UTF-8 at byte offset {len(good) + 14}"):
        list(iter_texts(parse_source(str(path))))


def test_invalid_utf8_in_text_file_names_byte_offset_and_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"line one\nline \xc3 two\n")
    with pytest.raises(SmallCoderError, match=r"notes\.txt: invalid UTF-8 at byte offset 14 \(line 2\)"):
        list(iter_texts(parse_source(str(path))))


@pytest.mark.parametrize("line, message", [(b'{"text": "unterminated\n', r"line 1: invalid JSON"),
                                           (b'["a", "list"]\n', r"line 1: expected a JSON object, got list")])
def test_invalid_json_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(line)
    with pytest.raises(SmallCoderError, match=message):
        list(iter_texts(parse_source(str(path))))


def test_empty_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(SmallCoderError, match=r"no documents"):
        list(iter_texts(parse_source(str(tmp_path / "empty.jsonl"))))
    (tmp_path / "only_blank.jsonl").write_text('{"text": "   "}\n')
    with pytest.raises(SmallCoderError, match=r"no documents"):
        list(iter_texts(parse_source(str(tmp_path / "only_blank.jsonl"))))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    with pytest.raises(SmallCoderError, match=r"no file matches glob '\*\*/\*\.py'"):
        list(iter_texts(parse_source(str(tmp_path / "src"), glob="**/*.py")))
    (tmp_path / "jsonl_dir").mkdir()
    with pytest.raises(SmallCoderError, match=r"jsonl_dir: folder holds no"):
        list(iter_texts(parse_source(f"jsonl:{tmp_path / 'jsonl_dir'}")))


def test_unreadable_parquet_and_text_source_on_a_folder(tmp_path):
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SmallCoderError, match=r"fake\.parquet: not a readable Parquet file"):
        list(iter_texts(parse_source(str(tmp_path / "fake.parquet"))))
    with pytest.raises(SmallCoderError, match=r"is a folder; a text source is one file"):
        list(iter_texts(SourceSpec(kind="text", path=str(tmp_path))))


def test_missing_path(tmp_path):
    with pytest.raises(SmallCoderError, match=r"nope\.jsonl: no such file or folder"):
        list(iter_texts(parse_source(str(tmp_path / "nope.jsonl"))))
    with pytest.raises(SmallCoderError, match=r"missing\.txt: no such file or folder"):
        list(iter_texts(SourceSpec(kind="text", path=str(tmp_path / "missing.txt"))))


def test_unknown_kind_and_unknown_card_corpus():
    with pytest.raises(SmallCoderError,
                       match=r"unknown source kind 'csv' \(use jsonl, parquet, text, files, hub, builtin\)"):
        SourceSpec(kind="csv", path="x.csv")
    with pytest.raises(SmallCoderError, match=r"unknown card corpus 'fineweb' \(known: fineweb-edu, starcoderdata"):
        parse_source("card:fineweb")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}], r"messages\[1\]: bad role 'robot'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
     r"messages\[1\]: content must be a string"),
    ([{"role": "user", "content": "hi"}], r"has no assistant message"),
    ("User: hi", r"field 'messages' must be a non-empty list of messages, got str"),
    ([], r"must be a non-empty list"),
])
def test_bad_messages(tmp_path, messages, message):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": messages}])
    with pytest.raises(SmallCoderError, match=rf"sft\.jsonl: line 1: .*{message}"):
        list(iter_conversations(parse_source(str(path), messages_field="messages")))


def test_spec_validation():
    with pytest.raises(SmallCoderError, match="needs a path"):
        SourceSpec(kind="jsonl")
    with pytest.raises(SmallCoderError, match="needs name"):
        SourceSpec(kind="hub")
    with pytest.raises(SmallCoderError, match="go together"):
        SourceSpec(kind="jsonl", path="x.jsonl", prompt_field="q")
    with pytest.raises(SmallCoderError, match="not both"):
        SourceSpec(kind="jsonl", path="x.jsonl", messages_field="m", prompt_field="q", response_field="a")
    with pytest.raises(SmallCoderError, match="limit must be a positive integer, got 0"):
        SourceSpec(kind="jsonl", path="x.jsonl", limit=0)
    with pytest.raises(SmallCoderError, match="unknown built-in part 'poetry'"):
        parse_source("builtin:poetry")


# ---------------------------------------------------------------------------------------------
# parse_source and source_from_dict


def test_parse_source_forms(tmp_path):
    folder = tmp_path / "code"
    folder.mkdir()
    cases = {
        "data/x.jsonl": ("jsonl", "data/x.jsonl"), "data/x.jsonl.gz": ("jsonl", "data/x.jsonl.gz"),
        "data/x.parquet": ("parquet", "data/x.parquet"), "notes.txt": ("text", "notes.txt"),
        "src_dir/": ("files", "src_dir/"), str(folder): ("files", str(folder)),
        "parquet:shards/": ("parquet", "shards/"),
    }
    for text, (kind, path) in cases.items():
        spec = parse_source(text)
        assert (spec.kind, spec.path) == (kind, path), text
    hub = parse_source("hub:HuggingFaceFW/fineweb-edu:sample-10BT@train")
    assert (hub.kind, hub.name, hub.config, hub.split) == ("hub", "HuggingFaceFW/fineweb-edu", "sample-10BT", "train")
    hub = parse_source("hub:open-web-math/open-web-math@validation")
    assert (hub.name, hub.config, hub.split) == ("open-web-math/open-web-math", None, "validation")
    assert hub.display_label == "open-web-math/open-web-math@validation"
    assert parse_source("card:openwebmath") == CARD_CORPORA["openwebmath"]
    assert parse_source("card:opencodeinstruct", limit=10).limit == 10
    code = parse_source("builtin:code")
    assert (code.kind, code.name, code.path, code.is_sft) == ("builtin", "code", None, False)
    sft = parse_source("builtin:sft", path="/tmp/corpus")
    assert (sft.is_sft, sft.messages_field, sft.path) == (True, "messages", "/tmp/corpus")
    assert parse_source("src/", glob="**/*.py", label="mycode").glob == "**/*.py"
    assert parse_source("x.jsonl", field="content").field == "content"


def test_parse_source_errors():
    with pytest.raises(SmallCoderError, match=r"unknown source field\(s\) colour"):
        parse_source("x.jsonl", colour="red")
    with pytest.raises(SmallCoderError, match="kind cannot be told"):
        parse_source("no/such/thing")
    with pytest.raises(SmallCoderError, match="expected hub:ORG/NAME"):
        parse_source("hub:org/name@")


def test_source_from_dict(tmp_path):
    spec = source_from_dict({"kind": "hub", "name": "bigcode/starcoderdata", "data_dir": "python",
                             "field": "content", "limit": 5}, "recipe.toml stage2.sources[1]")
    assert (spec.name, spec.data_dir, spec.field, spec.limit) == ("bigcode/starcoderdata", "python", "content", 5)
    spec = source_from_dict({"source": "card:fineweb-edu", "limit": 3}, "w")
    assert (spec.name, spec.config, spec.limit) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", 3)
    spec = source_from_dict({"source": "data/x.jsonl"}, "w", base_dir=tmp_path)
    assert spec.path == str(tmp_path / "data/x.jsonl")
    spec = source_from_dict({"kind": "files", "path": "src", "glob": "**/*.py"}, "w", base_dir=tmp_path)
    assert spec.path == str(tmp_path / "src")


@pytest.mark.parametrize("table, message", [
    ({"kind": "jsonl", "path": "x.jsonl", "weight": 0.5}, r"recipe\.toml \[s\]: unknown key 'weight'"),
    ({"kind": "jsonl", "path": 3}, r"recipe\.toml \[s\]: path must be a string, got int 3"),
    ({"kind": "jsonl", "path": "x.jsonl", "limit": "10"},
     r"recipe\.toml \[s\]: limit must be a positive integer, got '10'"),
    ({"kind": "jsonl", "path": "x.jsonl", "limit": True}, r"limit must be a positive integer, got True"),
    ({"kind": "tsv", "path": "x.tsv"}, r"recipe\.toml \[s\]: unknown source kind 'tsv'"),
    ({"path": "x.jsonl"}, r"recipe\.toml \[s\]: a source needs kind"),
    ({"source": "card:nope"}, r"recipe\.toml \[s\]: .*unknown card corpus 'nope'"),
    (["not", "a", "table"], r"recipe\.toml \[s\]: a source must be a table, got list"),
])
def test_source_from_dict_errors_name_where_key_and_value(table, message):
    with pytest.raises(SmallCoderError, match=message):
        source_from_dict(table, "recipe.toml [s]")


# ---------------------------------------------------------------------------------------------
# the card's corpora


def test_card_corpora_table():
    assert list(CARD_CORPORA) == ["fineweb-edu", "starcoderdata", "nemotron-synthetic-code", "nemotron-cc-math",
                                  "finewiki", "openwebmath", "nemotron-sft", "opencodeinstruct",
                                  "openmathinstruct-2"]
    for key, spec in CARD_CORPORA.items():
        assert spec.kind == "hub" and spec.label == key and spec.display_label == key
        assert spec.name and spec.name.count("/") == 1, key
        assert spec.field or spec.messages_field
    expected = {"fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),
                "starcoderdata": ("bigcode/starcoderdata", None, "content"),
                "openwebmath": ("open-web-math/open-web-math", None, "text")}
    for key, (name, config, field) in expected.items():
        assert (CARD_CORPORA[key].name, CARD_CORPORA[key].config, CARD_CORPORA[key].field) == (name, config, field)
    assert CARD_CORPORA["starcoderdata"].data_dir == "python"
    sft = {k for k, s in CARD_CORPORA.items() if s.is_sft}
    assert sft == {"nemotron-sft", "opencodeinstruct", "openmathinstruct-2"}
    assert (CARD_CORPORA["opencodeinstruct"].prompt_field, CARD_CORPORA["opencodeinstruct"].response_field) == (
        "input", "output")
    assert (CARD_CORPORA["openmathinstruct-2"].prompt_field, CARD_CORPORA["openmathinstruct-2"].response_field) == (
        "problem", "generated_solution")
    assert CARD_CORPORA["nemotron-sft"].messages_field == "messages"


# ---- lone surrogates ------------------------------------------------------------------------------


def _surrogate_corpus(tmp_path: Path) -> Path:
    """Line 3 holds `\\ud800` as a JSON escape (valid JSON, not valid Unicode text); line 2 a proper pair."""
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "def f():\\n    return 1\\n"}\n'
                     b'{"text": "an emoji \\ud83d\\ude00 as an escaped pair is fine"}\n'
                     b'{"text": "broken \\ud800 here", "meta": {"x": 1}}\n')
    return path


def test_lone_surrogate_is_named_by_the_reader(tmp_path):
    path = _surrogate_corpus(tmp_path)
    with pytest.raises(SmallCoderError, match=rf"{path}: line 3: field 'text' holds a lone UTF-16 surrogate \\ud800"):
        list(iter_texts(parse_source(str(path))))
    ok = tmp_path / "ok.jsonl"
    ok.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]) + b'{"text": "a literal \\\\ud800"}\n')
    assert [t[:8] for t in iter_texts(parse_source(str(ok)))] == ["def f():", "an emoji", "a litera"]
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\\udc00"}]}\n')
    with pytest.raises(SmallCoderError, match=r"line 1: field 'messages\[1\]\.content' holds a lone UTF-16 surrogate"):
        list(iter_conversations(parse_source(str(chat), messages_field="messages")))


@pytest.mark.parametrize("command", ["data pack", "data pack --sft", "tokenizer train", "data decontam"])
def test_lone_surrogate_is_one_line_for_every_command(tmp_path, capsys, small_tokenizer, command, request):
    from smallcoder.cli import main

    corpus = _surrogate_corpus(tmp_path)
    tok = tmp_path / "tok"
    tok.mkdir()
    small_tokenizer.save(tok)
    out = tmp_path / "out"
    args = {"data pack": ["data", "pack", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out),
                          "--seq-len", "4"],
            "tokenizer train": ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out", str(out)],
            "data decontam": ["data", "decontam", "--input", str(corpus), "--out", str(out)]}
    if command == "data pack --sft":
        corpus.write_bytes(b'{"messages": [{"role": "user", "content": "hi \\ud800"}, '
                           b'{"role": "assistant", "content": "ok"}]}\n')
        argv = [*args["data pack"], "--sft"]
    else:
        argv = args[command]
    if command == "data decontam":
        argv += ["--data-dir", str(request.getfixturevalue("shared_data"))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("reading", "packing"))]
    assert len(lines) == 1 and lines[0].startswith(f"smallcoder: error: {corpus}: line "), err
    assert "lone UTF-16 surrogate" in lines[0]
    assert not out.exists()

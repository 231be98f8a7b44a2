"""Scores you can reproduce: HumanEval+ graded as EvalPlus grades it, the code-extraction rule
explicit in every report, and reports that survive any completion (issue #12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smallcoder.cli import main
from smallcoder.eval.report import write_report
from smallcoder.eval.results import Score, TaskResult


def _by_id(problems, *ids):
    return [p for p in problems if p["task_id"] in ids]


def _memorized(problem) -> str:
    """A 'solution' that answers the base inputs from a table (the canonical outputs) and
    nothing else: HumanEval's own tests can miss such overfitting, EvalPlus's extra inputs must not."""
    namespace: dict = {}
    exec(problem["prompt"] + problem["canonical_solution"], namespace)  # noqa: S102 - the benchmark's code
    table = {repr(args): namespace[problem["entry_point"]](*args) for args in problem["base_input"]}
    return (f"    return {table!r}.get(repr(list(locals().values())), None)\n")


def test_humaneval_plus_catches_what_base_tests_miss(plus_problems):
    from smallcoder.eval.humanevalplus import score_humaneval_plus

    probs = _by_id(plus_problems, "HumanEval/0", "HumanEval/2", "HumanEval/13", "HumanEval/32")
    samples = [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in probs]
    samples += [{"task_id": p["task_id"], "completion": _memorized(p)} for p in probs[:3]]
    # floats within atol pass (HumanEval/2 has atol 1e-6), outside fail
    samples += [{"task_id": "HumanEval/2", "completion": "    return number % 1.0 + 1e-9\n"},
                {"task_id": "HumanEval/2", "completion": "    return number % 1.0 + 1e-3\n"}]
    # find_zero: any root is right, judged by |poly(xs, x)| <= atol (EvalPlus's oracle), e.g. bisection's
    samples.append({"task_id": "HumanEval/32", "completion": (
        "    lo, hi = -1.0, 1.0\n    while poly(xs, lo) * poly(xs, hi) > 0:\n        lo, hi = lo * 2, hi * 2\n"
        "    for _ in range(200):\n        mid = (lo + hi) / 2\n"
        "        if poly(xs, lo) * poly(xs, mid) <= 0:\n            hi = mid\n        else:\n            lo = mid\n"
        "    return lo\n")})
    r = score_humaneval_plus(plus_problems, samples, ks=[1], progress=False)
    status = [(s["task_id"], s["base_status"], s["plus_status"], s["status"]) for s in r.samples]
    assert [x[3] for x in status[:4]] == ["passed"] * 4, r.samples[:4]
    for task_id, base, plus, final in status[4:7]:  # memorized: base passes, plus catches it
        assert (base, plus, final) == ("passed", "failed", "failed"), status[4:7]
    assert status[7][3] == "passed" and status[8][1] == "failed", status[7:9]
    assert status[9][1] == "passed", r.samples[9]  # a different root than the canonical's, judged by the oracle
    assert r.metrics["pass@1"].total == 4 and r.metrics["base_pass@1"].value > r.metrics["pass@1"].value
    assert "plus tests: AssertionError: input" in r.samples[4]["detail"]


@pytest.mark.slow  # 164 tasks x base and plus inputs; the canonical outputs are cached after the first run
def test_humaneval_plus_canonical_scores_164_of_164(plus_problems):
    from smallcoder.eval.humanevalplus import score_humaneval_plus

    r = score_humaneval_plus(plus_problems, [{"task_id": p["task_id"], "completion": p["canonical_solution"]}
                                             for p in plus_problems], progress=False)
    bad = [(s["task_id"], s["detail"]) for s in r.samples if s["status"] != "passed"]
    assert r.metrics["pass@1"].count == "164/164" and r.metrics["base_pass@1"].count == "164/164", bad


def test_humaneval_plus_from_the_command_line_with_solutions(capsys, tmp_path, plus_problems, shared_data):
    probs = _by_id(plus_problems, "HumanEval/0", "HumanEval/4")
    rows = [{"task_id": probs[0]["task_id"], "solution": probs[0]["prompt"] + probs[0]["canonical_solution"]},
            {"task_id": probs[1]["task_id"], "completion": "    return 0.0\n"}]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["eval", "--tasks", "humaneval_plus", "--samples", str(path), "--data-dir", str(shared_data),
               "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| Code | HumanEval+ (0-shot) | pass@1 | 50.00 ± 50.00 % (1/2;" in out
    assert "| Code | HumanEval+ (0-shot) | pass@1 (base tests) |" in out
    md = (tmp_path / "o" / "results.md").read_text()
    assert "code extraction: raw" in md


def test_humaneval_plus_end_to_end_with_a_model(capsys, tmp_path, micro_checkpoint, shared_data):
    rc = main(["eval", "--model", str(micro_checkpoint), "--tasks", "humaneval_plus", "--limit", "2",
               "--max-new-tokens", "4", "--data-dir", str(shared_data), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp_path / "results.json").read_text())
    entry = report["tasks"]["humaneval_plus"]
    assert entry["metrics"]["pass@1"]["total"] == 2 and entry["settings"]["code_extraction"] == "extract"
    assert {s["base_status"] for s in entry["samples"]} <= {"passed", "failed", "timeout", "killed"}


# ---------------------------------------------------------------- the extraction rule

def _mbpp_samples(records, tmp_path: Path) -> Path:
    ref = {r["task_id"]: r["code"] for r in records}
    rows = [{"task_id": 11, "completion": ref[11]},                                   # raw reference: passes
            {"task_id": 12, "completion": ref[12] + "\n)))"},                          # trailing junk
            {"task_id": 13, "completion": "Here is the code:\n" + ref[13] + "\nHope it helps."},  # prose
            {"task_id": 14, "completion": "```python\n" + ref[14] + "\n```"}]          # a fence
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mbpp_samples_are_raw_as_lm_eval_unless_asked(capsys, tmp_path, mbpp_records, shared_data):
    path = _mbpp_samples(mbpp_records, tmp_path)
    rc = main(["eval", "--tasks", "mbpp", "--samples", str(path), "--data-dir", str(shared_data),
               "--out", str(tmp_path / "raw")])
    assert rc == 0
    raw = json.loads((tmp_path / "raw" / "results.json").read_text())["tasks"]["mbpp"]
    assert [s["status"] for s in raw["samples"]] == ["passed", "failed", "failed", "failed"]
    assert raw["settings"]["code_extraction"] == "raw"
    assert any("code extraction: raw" in n for n in raw["notes"])
    rc = main(["eval", "--tasks", "mbpp", "--samples", str(path), "--data-dir", str(shared_data),
               "--code-extraction", "extract", "--out", str(tmp_path / "ext")])
    assert rc == 0
    ext = json.loads((tmp_path / "ext" / "results.json").read_text())["tasks"]["mbpp"]
    assert [s["status"] for s in ext["samples"]] == ["passed", "passed", "passed", "passed"]
    assert "code extraction: extract" in (tmp_path / "ext" / "results.md").read_text()
    capsys.readouterr()


def test_humaneval_default_rules_per_format(capsys, tmp_path, micro_checkpoint, shared_data):
    for fmt, rule in (("instruct", "extract"), ("base", "raw")):
        rc = main(["eval", "--model", str(micro_checkpoint), "--tasks", "humaneval", "--limit", "1",
                   "--max-new-tokens", "2", "--format", fmt, "--data-dir", str(shared_data),
                   "--out", str(tmp_path / fmt)])
        assert rc == 0
        entry = json.loads((tmp_path / fmt / "results.json").read_text())["tasks"]["humaneval"]
        assert entry["settings"]["code_extraction"] == rule
    capsys.readouterr()


# ---------------------------------------------------------------- reports survive any completion

def test_a_lone_surrogate_in_a_completion_is_written_and_read_back(tmp_path):
    sample = {"task_id": "HumanEval/0", "completion": "x = '\ud800'\n", "code": "\udcff", "status": "failed"}
    result = TaskResult("humaneval", {"pass@1": Score(0.0, 0, 1, None)}, {"n": 1}, [sample],
                        notes=["odd \ud800 note"])
    written = write_report(tmp_path, [result], {"model": "m\ud800"}, {"sandbox": True})
    line = (tmp_path / "samples_humaneval.jsonl").read_bytes().decode("utf-8")  # strict UTF-8
    assert json.loads(line) == sample
    report = json.loads(written["results"].read_bytes().decode("utf-8"))
    assert report["tasks"]["humaneval"]["samples"][0]["completion"] == sample["completion"]
    assert report["settings"]["model"] == "m\ud800"
    written["table"].read_bytes().decode("utf-8")


def test_timeout_flag_is_cpu_seconds(capsys, tmp_path, shared_data):
    """--timeout bounds CPU time (what a busy machine does not change); sleeping is bounded by a
    wall clock far above it."""
    from smallcoder.eval.cli import _limits

    class Args:
        timeout = 2.5

    lim = _limits(Args())
    assert lim.cpu_seconds == 3 and lim.timeout == 60.0
    Args.timeout = 30
    assert _limits(Args()).timeout == 180.0

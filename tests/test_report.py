"""The learning report (train/report.py): what counts as an answer of each kind, and the report a
run writes before and after training."""

from __future__ import annotations

import json

import pytest

from smallcoder.train.report import (
    KINDS,
    answer_kind,
    code_of,
    defines_something,
    format_report,
    judge,
    read_report,
    write_report,
)


@pytest.mark.parametrize("reference, kind", [
    ("Here it is:\n\n```python\ndef f():\n    return 1\n```", "code"),
    ("In total 3 + 4 = 7.\n#### 7", "math"),
    ("So the answer is 1,250.\n#### 1,250", "math"),
    ("`textwrap.dedent(text)` removes common leading whitespace.", "prose"),
    ("The year 2024 was #### not a number", "prose"),
    ("Run it:\n\n```bash\npython x.py\n```\nthen read the output.", "prose"),   # not Python
    ("Shell first:\n```bash\nls\n```\nthen:\n```py\nprint(1)\n```", "code"),
])
def test_answer_kind_is_read_off_the_reference(reference, kind):
    assert answer_kind(reference) == kind


@pytest.mark.parametrize("answer, ok", [
    ("Here:\n\n```python\ndef f(x):\n    return x\n```", True),
    ("```python\ndef f(x):\n    return x\n```\nThis returns x.", True),           # prose after the fence
    ("```py\nclass A:\n    pass\n```", True),
    ("```python\nsquare = lambda x: x * x\n```", True),
    ("```python\ndef f(x):\n    return x\n", True),                            # stopped inside the fence: parses
    ("```python\ndef f(x):\n    return os.\n```", False),                       # a syntax error
    ("```python\nx = 1\nprint(x)\n```", False),                               # parses, defines nothing
    ("```bash\necho hi\n```\n```python\ndef f():\n    return 1\n```", True),   # the Python block counts
    ("  ```python\n  def f(x):\n      return x\n  ```", False),                  # indented: a syntax error
    ("def f(x):\n    return x + 1", True),                                    # no fence: the whole answer
    ("Sure. Here is the function: it returns x.", False),
    ("```python\nreturn x + 1\n```", False),                                  # parses, but not as a module
    ("   \n\n  ", False),                                                     # whitespace is not an answer
    ("", False),
])
def test_code_answers_parse_and_define_something(answer, ok):
    checks = judge("code", answer, ended_with_eos=True)
    assert checks["parses_and_defines"] is ok
    assert checks["non_empty"] is bool(answer.strip()) and checks["eos"] is True


def test_code_of_takes_the_first_fence_and_defines_needs_a_definition():
    assert code_of("a\n```python\nx = 1\n```\n```python\ny = 2\n```") == "x = 1"
    assert code_of("no fence") == "no fence"
    assert not defines_something("def (:")
    assert defines_something("async def f():\n    await g()")


def test_math_and_prose_checks():
    assert judge("math", "3 * 4 = 12.\n#### 12", False) == {"eos": False, "non_empty": True, "final_answer": True}
    assert judge("math", "3 * 4 = 12.", True)["final_answer"] is False
    assert judge("prose", "\n", True) == {"eos": True, "non_empty": False}


def test_report_file_round_trip_and_the_printed_table(tmp_path):
    assert read_report(tmp_path) == {}
    (tmp_path / "learning.json").write_text("{not json")
    assert read_report(tmp_path) == {}  # unreadable: treated as absent (the end rewrites it)
    side = {"loss": {"code": 8.3, "sft": 8.4}, "eos_share": 0.0, "answers": [],
            "kinds": {"code": {"prompts": 8, "eos": 0.0, "non_empty": 1.0, "parses_and_defines": 0.0},
                      "math": {"prompts": 8, "eos": 0.0, "non_empty": 1.0, "final_answer": 0.0}},
            "samples": [{"prompt": "Write a Python function to compute Fibonacci numbers.", "answer": "zzz"}]}
    after = {**side, "loss": {"code": 6.1, "sft": 3.4},
             "kinds": {"code": {"prompts": 8, "eos": 1.0, "non_empty": 1.0, "parses_and_defines": 0.625},
                       "math": {"prompts": 8, "eos": 0.875, "non_empty": 1.0, "final_answer": 0.75}},
             "samples": [{"prompt": side["samples"][0]["prompt"], "answer": "def fib(n):\n    return n"}]}
    write_report(tmp_path, {"before": side, "after": after})
    assert json.loads((tmp_path / "learning.json").read_text())["after"]["loss"]["sft"] == 3.4
    text = format_report(read_report(tmp_path))
    assert "loss on code data  8.300 -> 6.100" in text and "loss on sft data   8.400 -> 3.400" in text
    assert "0% -> 62%" in text and "0% -> 75%" in text and "0% -> 100%" in text
    assert "before: zzz" in text and "after:  def fib(n): return n" in text
    assert list(KINDS) == ["code", "math", "prose"]

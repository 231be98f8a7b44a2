"""The built-in corpus, part 5: generated requests for small Python functions, answered with code.

The card's code stage is 60% synthetic code; this is the laptop-scale counterpart for SFT. Each
task is a function that a request can state in one sentence (sum a list, reverse a string, test
for a prime), with several names, parameter names and bodies (a builtin call, or a loop), and
cases that every body must pass (tests/test_builtin.py runs them all). Requests come with the
signature or without it ("Write a Python function to ..."); answers are the code in a ```python
fence, sometimes with a docstring. The model card's own Fibonacci prompt is kept out on purpose:
it is the demo's held-out sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

XS, S, N = ("numbers", "values", "xs", "nums", "items"), ("s", "text", "word", "string"), ("n", "num", "k")


@dataclass(frozen=True)
class Task:
    names: tuple[str, ...]               # function names
    params: tuple[tuple[str, ...], ...]  # name choices per parameter (bodies use {0}, {1}, ...)
    says: str                            # "returns ..." with {0}, {1} for the parameters
    to: str                              # "compute ...": the request without a signature
    bodies: tuple[str, ...]              # indented body lines
    cases: tuple[tuple[tuple[Any, ...], Any], ...]  # (arguments, expected result)


def _t(names: str, params: tuple[tuple[str, ...], ...], says: str, to: str, bodies: tuple[str, ...],
       cases: tuple[tuple[tuple[Any, ...], Any], ...]) -> Task:
    return Task(tuple(names.split()), params, says, to, bodies, cases)


TASKS = (
    _t("add add_numbers sum_two", (("a", "x", "first"), ("b", "y", "second")),
       "returns the sum of `{0}` and `{1}`", "add two numbers", ("    return {0} + {1}",), (((2, 3), 5),)),
    _t("multiply product times", (("a", "x"), ("b", "y")), "returns the product of `{0}` and `{1}`",
       "multiply two numbers", ("    return {0} * {1}",), (((4, 5), 20),)),
    _t("subtract difference minus", (("a", "x"), ("b", "y")), "returns `{0}` minus `{1}`",
       "subtract one number from another", ("    return {0} - {1}",), (((9, 4), 5),)),
    _t("largest max_value find_max", (XS,), "returns the largest number in the list `{0}`",
       "find the largest number in a list",
       ("    return max({0})", ("    best = {0}[0]\n    for x in {0}[1:]:\n        if x > best:\n            best = x\n"
        "    return best")), ((([3, 9, 2],), 9),)),
    _t("smallest min_value find_min", (XS,), "returns the smallest number in the list `{0}`",
       "find the smallest number in a list",
       ("    return min({0})", ("    best = {0}[0]\n    for x in {0}[1:]:\n        if x < best:\n            best = x\n"
        "    return best")), ((([3, 9, 2],), 2),)),
    _t("total sum_list add_all", (XS,), "returns the sum of the numbers in the list `{0}`",
       "add up the numbers in a list",
       ("    return sum({0})", "    total = 0\n    for x in {0}:\n        total += x\n    return total"),
       ((([1, 2, 3],), 6), (([],), 0))),
    _t("average mean", (XS,), "returns the average of the numbers in the non-empty list `{0}`",
       "compute the average of a list of numbers", ("    return sum({0}) / len({0})",), ((([2, 4, 9],), 5),)),
    _t("reverse reverse_string reversed_text", (S,), "returns the string `{0}` reversed",
       "reverse a string", ("    return {0}[::-1]", '    return "".join(reversed({0}))'), ((("abc",), "cba"),)),
    _t("is_palindrome palindrome", (S,), "returns True if the string `{0}` reads the same forwards and backwards",
       "check whether a string is a palindrome", ("    return {0} == {0}[::-1]",),
       ((("level",), True), (("hello",), False))),
    _t("count_vowels vowels", (S,), "returns the number of vowels in the string `{0}`",
       "count the vowels in a string",
       ('    return sum(1 for c in {0}.lower() if c in "aeiou")',
        '    count = 0\n    for c in {0}.lower():\n        if c in "aeiou":\n            count += 1\n    return count'),
       ((("Education",), 5),)),
    _t("factorial fact", (N,), "returns the factorial of the non-negative integer `{0}`",
       "compute the factorial of a number",
       ("    result = 1\n    for i in range(2, {0} + 1):\n        result *= i\n    return result",
        "    if {0} <= 1:\n        return 1\n    return {0} * FUNC({0} - 1)"), (((5,), 120), ((0,), 1))),
    _t("is_even even", (N,), "returns True if the integer `{0}` is even", "check whether a number is even",
       ("    return {0} % 2 == 0",), (((4,), True), ((7,), False))),
    _t("is_prime prime", (N,), "returns True if `{0}` is a prime number",
       "check whether a number is prime",
       (("    if {0} < 2:\n        return False\n    for i in range(2, int({0} ** 0.5) + 1):\n        if {0} % i == 0:\n"
        "            return False\n    return True"),), (((7,), True), ((9,), False), ((1,), False))),
    _t("count_even evens_count", (XS,), "returns how many numbers in the list `{0}` are even",
       "count the even numbers in a list",
       ("    return sum(1 for x in {0} if x % 2 == 0)",
        "    count = 0\n    for x in {0}:\n        if x % 2 == 0:\n            count += 1\n    return count"),
       ((([1, 2, 4, 7],), 2),)),
    _t("squares squared", (XS,), "returns a list of the squares of the numbers in `{0}`",
       "square every number in a list", ("    return [x * x for x in {0}]",
                                         "    result = []\n    for x in {0}:\n        result.append(x * x)\n    return result"),
       ((([1, 2, 3],), [1, 4, 9]),)),
    _t("only_even filter_even even_numbers", (XS,), "returns the even numbers of the list `{0}`, in order",
       "keep only the even numbers of a list", ("    return [x for x in {0} if x % 2 == 0]",),
       ((([1, 2, 3, 4],), [2, 4]),)),
    _t("greater_than above bigger_than", (XS, ("limit", "threshold", "k")),
       "returns the items of `{0}` that are greater than `{1}`", "keep the numbers of a list above a limit",
       ("    return [x for x in {0} if x > {1}]",), ((([1, 5, 3, 8], 3), [5, 8]),)),
    _t("count_of occurrences", (XS, ("target", "value", "x")), "returns how many times `{1}` appears in the list `{0}`",
       "count how often a value appears in a list", ("    return {0}.count({1})",), ((([1, 2, 1, 1], 1), 3),)),
    _t("unique dedupe remove_duplicates", (XS,),
       "returns the items of `{0}` without duplicates, in the order they first appear",
       "remove the duplicates from a list",
       (("    seen = set()\n    result = []\n    for x in {0}:\n        if x not in seen:\n            seen.add(x)\n"
        "            result.append(x)\n    return result"), "    return list(dict.fromkeys({0}))"),
       ((([3, 1, 3, 2, 1],), [3, 1, 2]),)),
    _t("flatten flat", (("lists", "rows", "nested"),), "returns one list with the items of every list in `{0}`",
       "flatten a list of lists", ("    return [x for row in {0} for x in row]",
                                   "    result = []\n    for row in {0}:\n        result.extend(row)\n    return result"),
       ((([[1, 2], [3], []],), [1, 2, 3]),)),
    _t("gcd greatest_common_divisor", (("a", "x"), ("b", "y")), "returns the greatest common divisor of `{0}` and `{1}`",
       "compute the greatest common divisor of two numbers",
       ("    while {1}:\n        {0}, {1} = {1}, {0} % {1}\n    return {0}",), (((12, 18), 6),)),
    _t("power raise_to", (("base", "x"), ("exponent", "n")), "returns `{0}` raised to the power `{1}`",
       "raise a number to a power", ("    return {0} ** {1}",), (((2, 10), 1024),)),
    _t("celsius_to_fahrenheit to_fahrenheit", (("celsius", "c", "degrees"),),
       "converts the temperature `{0}` from Celsius to Fahrenheit", "convert Celsius to Fahrenheit",
       ("    return {0} * 9 / 5 + 32",), (((100,), 212),)),
    _t("digit_sum sum_digits", (N,), "returns the sum of the digits of the non-negative integer `{0}`",
       "add up the digits of a number", ("    return sum(int(d) for d in str({0}))",
                                         ("    total = 0\n    while {0} > 0:\n        total += {0} % 10\n        {0} //= 10\n"
                                         "    return total")), (((1234,), 10),)),
    _t("word_count count_words", (S,), "returns the number of words in the string `{0}`",
       "count the words in a sentence", ("    return len({0}.split())",), ((("the cat sat",), 3),)),
    _t("capitalize_words title_case", (S,), "returns `{0}` with the first letter of every word in upper case",
       "capitalize every word of a sentence", ('    return " ".join(w.capitalize() for w in {0}.split())',),
       ((("hello big world",), "Hello Big World"),)),
    _t("clamp limit", (("value", "x"), ("low", "lo"), ("high", "hi")),
       "returns `{0}` limited to the range from `{1}` to `{2}`", "clamp a number to a range",
       ("    return max({1}, min({0}, {2}))",), (((15, 0, 10), 10), ((-3, 0, 10), 0))),
    _t("last last_item", (XS,), "returns the last item of the list `{0}`, or None if it is empty",
       "get the last item of a list", ("    if not {0}:\n        return None\n    return {0}[-1]",),
       ((([4, 5],), 5), (([],), None))),
    _t("merge merge_dicts", (("first", "a", "base"), ("second", "b", "extra")),
       "returns a new dictionary with the items of `{0}` and `{1}`, those of `{1}` winning",
       "merge two dictionaries", ("    result = dict({0})\n    result.update({1})\n    return result",
                                  "    return {{**{0}, **{1}}}"), ((({"a": 1}, {"a": 2, "b": 3}), {"a": 2, "b": 3}),)),
    _t("char_counts letter_frequency", (S,),
       "returns a dictionary that maps each character of `{0}` to the number of times it appears",
       "count how often each character appears in a string",
       ("    counts = {{}}\n    for c in {0}:\n        counts[c] = counts.get(c, 0) + 1\n    return counts",),
       ((("aba",), {"a": 2, "b": 1}),)),
    _t("join_words sentence", (("words", "parts"),), "returns the strings of the list `{0}` joined by single spaces",
       "join a list of words into a sentence", ('    return " ".join({0})',), (((["a", "b"],), "a b"),)),
    _t("rectangle_area area", (("width", "w"), ("height", "h")),
       "returns the area of a rectangle of width `{0}` and height `{1}`", "compute the area of a rectangle",
       ("    return {0} * {1}",), (((3, 4), 12),)),
    _t("sort_descending largest_first", (XS,), "returns the numbers of `{0}` sorted from largest to smallest",
       "sort a list from largest to smallest", ("    return sorted({0}, reverse=True)",), ((([2, 9, 4],), [9, 4, 2]),)),
    _t("index_of find_index", (XS, ("target", "value")),
       "returns the index of `{1}` in the list `{0}`, or -1 if it is not there", "find where a value is in a list",
       ("    for i, x in enumerate({0}):\n        if x == {1}:\n            return i\n    return -1",),
       ((([5, 6, 7], 7), 2), (([5], 1), -1))),
    _t("running_totals cumulative_sum", (XS,), "returns the running totals of the numbers in `{0}`",
       "compute the running totals of a list",
       (("    result = []\n    total = 0\n    for x in {0}:\n        total += x\n        result.append(total)\n"
        "    return result"),), ((([1, 2, 3],), [1, 3, 6]),)),
    _t("sum_to triangle_number", (N,), "returns the sum of the integers from 1 to `{0}`",
       "add up the integers from 1 to n", ("    return {0} * ({0} + 1) // 2", "    return sum(range(1, {0} + 1))"),
       (((10,), 55),)),
)
REQUESTS = (
    "Write a Python function `{sig}` that {says}.",
    "Implement `{sig}` in Python: it {says}.",
    "I need a Python function that {says}. Call it `{name}`.",
    "Write a Python function to {to}.",
)
INTROS = ("Here is the function:", "Here is an implementation:", "Sure:", "This does it:")


def render(task: Task, name: str, params: tuple[str, ...], body: str) -> str:
    """The function's source: the def line and the body with its parameter names filled in."""
    return f"def {name}({', '.join(params)}):\n" + body.replace("FUNC", name).format(*params)


def _docstring(says: str, params: tuple[str, ...]) -> str:
    first, _, rest = says.format(*params).partition(" ")
    return f'    """{first[:-1].capitalize() if first.endswith("s") else first.capitalize()} {rest}."""\n'


def code_conversation(rng: random.Random) -> dict[str, Any]:
    """One generated request and its answer."""
    task = rng.choice(TASKS)
    name = rng.choice(task.names)
    params = tuple(rng.choice(choices) for choices in task.params)
    body = rng.choice(task.bodies)
    code = render(task, name, params, body)
    if rng.random() < 0.3:
        head, _, rest = code.partition("\n")
        code = f"{head}\n{_docstring(task.says, params)}{rest}"
    sig = f"{name}({', '.join(params)})"
    request = rng.choice(REQUESTS).format(sig=sig, says=task.says.format(*params), name=name, to=task.to)
    answer = f"{rng.choice(INTROS)}\n\n```python\n{code}\n```"
    return {"messages": [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]}


def code_conversations(seed: int, count: int) -> list[dict[str, Any]]:
    """`count` generated conversations, the same for the same seed."""
    rng = random.Random(f"smallcoder-builtin:sft-code:{seed}")
    return [code_conversation(rng) for _ in range(count)]


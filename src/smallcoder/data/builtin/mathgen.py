"""The built-in corpus, part 3: generated GSM8k-style word problems with worked answers.

Every step of an answer is an equation "a op b = c" computed by `arith` (no eval), and every
template states its answer twice (as a formula and as the last step), so `math_problem` can
check each problem against itself; the tests recompute every equation independently.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from typing import Any

NAMES = ("Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena",
         "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara")
ITEMS = ("notebooks", "pens", "apples", "stickers", "candles", "mugs", "books", "plants", "puzzles", "scarves")
PRODUCTS = ("jacket", "bicycle", "lamp", "backpack", "guitar", "printer", "tent", "watch")
GOODS = ("bottles", "bolts", "cups", "boxes", "labels", "bricks")
_OPS: dict[type, Callable[[Any, Any], Any]] = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                                               ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def arith(expr: str) -> int:
    """Evaluate + - * / over non-negative integers (no eval); the result must be a whole number."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not simple arithmetic: {expr!r}")

    value = ev(ast.parse(expr, mode="eval").body)
    if value != int(value) or value < 0:
        raise ValueError(f"{expr} = {value} is not a whole non-negative number")
    return int(value)


def _eq(expr: str) -> str:
    return f"{expr} = {arith(expr)}"


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    n, (i1, i2) = r.choice(NAMES), r.sample(ITEMS, 2)
    a, p, b, q = r.randint(2, 9), r.randint(2, 15), r.randint(2, 9), r.randint(1, 12)
    total = a * p + b * q
    bill = next(x for x in (20, 50, 100, 200, 500) if x >= total)
    question = (f"{n} buys {a} {i1} that cost ${p} each and {b} {i2} that cost ${q} each. "
                f"{n} pays with a ${bill} bill. How much change does {n} get, in dollars?")
    steps = [f"The {i1} cost {_eq(f'{a} * {p}')} dollars.", f"The {i2} cost {_eq(f'{b} * {q}')} dollars.",
             f"Together they cost {_eq(f'{a * p} + {b * q}')} dollars.",
             f"The change is {_eq(f'{bill} - {total}')} dollars."]
    return question, steps, bill - total


def _speed(r: random.Random) -> tuple[str, list[str], int]:
    s1, h1, s2, h2 = r.randint(3, 24) * 5, r.randint(1, 5), r.randint(3, 24) * 5, r.randint(1, 5)
    question = (f"A train travels at {s1} km per hour for {h1} hours and then at {s2} km per hour for "
                f"{h2} hours. How many kilometers does it travel in total?")
    steps = [f"In the first part it travels {_eq(f'{s1} * {h1}')} km.",
             f"In the second part it travels {_eq(f'{s2} * {h2}')} km.",
             f"In total it travels {_eq(f'{s1 * h1} + {s2 * h2}')} km."]
    return question, steps, s1 * h1 + s2 * h2


def _work_rate(r: random.Random) -> tuple[str, list[str], int]:
    m, h, goods = r.randint(2, 12), r.randint(2, 8), r.choice(GOODS)
    question = f"A machine makes {m} {goods} per minute. How many {goods} does it make in {h} hours?"
    steps = [f"{h} hours is {_eq(f'{h} * 60')} minutes.", f"It makes {_eq(f'{m} * {h * 60}')} {goods}."]
    return question, steps, m * h * 60


def _ages(r: random.Random) -> tuple[str, list[str], int]:
    n1, n2 = r.sample(NAMES, 2)
    if r.random() < 0.5:
        x, d, y = r.randint(5, 40), r.randint(2, 10), r.randint(2, 15)
        question = (f"{n1} is {x} years old. {n2} is {d} years older than {n1}. "
                    f"What will be the sum of their ages in {y} years?")
        steps = [f"{n2} is {_eq(f'{x} + {d}')} years old now.",
                 f"In {y} years {n1} will be {_eq(f'{x} + {y}')} and {n2} will be {_eq(f'{x + d} + {y}')}.",
                 f"The sum of their ages will be {_eq(f'{x + y} + {x + d + y}')}."]
        return question, steps, 2 * x + d + 2 * y
    x, k = r.randint(4, 15), r.randint(2, 4)
    question = f"{n1} is {x} years old. {n1}'s aunt is {k} times as old. How many years older than {n1} is the aunt?"
    steps = [f"The aunt is {_eq(f'{x} * {k}')} years old.", f"She is {_eq(f'{x * k} - {x}')} years older."]
    return question, steps, x * k - x


def _fractions(r: random.Random) -> tuple[str, list[str], int]:
    q, s, k = r.randint(2, 5), r.randint(2, 4), r.randint(2, 10)
    total = q * s * k
    sold1 = total // q
    left1 = total - sold1
    sold2 = left1 // s
    question = (f"A baker makes {total} cookies. The baker sells 1/{q} of them in the morning and 1/{s} of "
                f"the remaining cookies in the afternoon. How many cookies are left at the end of the day?")
    steps = [f"In the morning the baker sells {_eq(f'{total} / {q}')} cookies.",
             f"That leaves {_eq(f'{total} - {sold1}')} cookies.",
             f"In the afternoon the baker sells {_eq(f'{left1} / {s}')} cookies.",
             f"So {_eq(f'{left1} - {sold2}')} cookies are left."]
    return question, steps, left1 - sold2


def _percent(r: random.Random) -> tuple[str, list[str], int]:
    pct = r.choice((5, 10, 15, 20, 25, 30, 40, 50))
    if r.random() < 0.5:
        price, item = r.randint(2, 40) * 20, r.choice(PRODUCTS)
        off = price * pct // 100
        question = f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price in dollars?"
        steps = [f"The discount is {_eq(f'{price} * {pct} / 100')} dollars.",
                 f"The sale price is {_eq(f'{price} - {off}')} dollars."]
        return question, steps, price - off
    pop = r.randint(10, 90) * 100
    grow = pop * pct // 100
    question = (f"A town has {pop} people. Its population grows by {pct}% this year. "
                f"How many people live there at the end of the year?")
    steps = [f"The population grows by {_eq(f'{pop} * {pct} / 100')} people.",
             f"At the end of the year {_eq(f'{pop} + {grow}')} people live there."]
    return question, steps, pop + grow


def _earnings(r: random.Random) -> tuple[str, list[str], int]:
    n, w, h, d = r.choice(NAMES), r.randint(8, 30), r.randint(2, 9), r.randint(3, 7)
    lunch = r.randint(3, min(25, w * h - 1))
    question = (f"{n} earns ${w} per hour and works {h} hours a day for {d} days. Each workday {n} spends "
                f"${lunch} on lunch. How much money does {n} have left after the {d} days?")
    steps = [f"Each day {n} earns {_eq(f'{w} * {h}')} dollars.",
             f"In {d} days that is {_eq(f'{w * h} * {d}')} dollars.",
             f"Lunch costs {_eq(f'{lunch} * {d}')} dollars in total.",
             f"{n} has {_eq(f'{w * h * d} - {lunch * d}')} dollars left."]
    return question, steps, w * h * d - lunch * d


def _arithmetic(r: random.Random) -> tuple[str, list[str], int]:
    a, b, c = r.randint(2, 99), r.randint(2, 99), r.randint(2, 99)
    form = r.randrange(3)
    if form == 0:
        steps = [f"First multiply: {_eq(f'{a} * {b}')}.", f"Then add: {_eq(f'{a * b} + {c}')}."]
        return f"What is {a} * {b} + {c}?", steps, a * b + c
    if form == 1:
        steps = [f"First the parentheses: {_eq(f'{a} + {b}')}.", f"Then multiply: {_eq(f'{a + b} * {c}')}."]
        return f"What is ({a} + {b}) * {c}?", steps, (a + b) * c
    c = r.randint(1, a)
    steps = [f"First divide: {_eq(f'{a * b} / {b}')}.", f"Then subtract: {_eq(f'{a} - {c}')}."]
    return f"What is {a * b} / {b} - {c}?", steps, a - c


MATH_TEMPLATES = (_shopping, _speed, _work_rate, _ages, _fractions, _percent, _earnings, _arithmetic)


def math_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer ending '#### N', N) from a randomly chosen template."""
    question, steps, answer = rng.choice(MATH_TEMPLATES)(rng)
    last = int(steps[-1].rsplit("= ", 1)[1].split()[0].rstrip("."))
    if last != answer:  # every template states its answer twice: as a formula and as the last step
        raise AssertionError(f"math template disagrees with itself: {question!r} {steps} {answer}")
    return question, "\n".join(steps) + f"\n#### {answer}", answer


def math_documents(seed: int, count: int, stream: str = "math") -> list[tuple[str, str]]:
    """`count` (question, answer) pairs; `stream` separates the pretraining and SFT sequences."""
    rng = random.Random(f"smallcoder-builtin:{stream}:{seed}")
    return [math_problem(rng)[:2] for _ in range(count)]


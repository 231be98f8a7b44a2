"""The shared value checks: one wording everywhere, bools are not numbers, and each library
module that takes counts or choices refuses a bad one through them."""

from __future__ import annotations

import dataclasses
import math

import pytest

from smallcoder import checks
from smallcoder.checks import Choice, FieldError, Int, Number, check_fields, checked
from smallcoder.data import builtin, decontam, sources
from smallcoder.errors import SmallCoderError


@pytest.mark.parametrize("call,message", [
    (lambda: checks.integer(0, "seq_len"), "seq_len must be a positive integer, got 0"),
    (lambda: checks.integer(True, "seq_len"), "seq_len must be a positive integer, got True"),
    (lambda: checks.integer(2.0, "seq_len"), "seq_len must be a positive integer, got 2.0"),
    (lambda: checks.integer(-1, "every", minimum=0), "every must be an integer >= 0, got -1"),
    (lambda: checks.integer(9, "k", 1, 8), "k must be an integer in [1, 8], got 9"),
    (lambda: checks.integer("3", "seed", minimum=None), "seed must be an integer, got '3'"),
    (lambda: checks.number(0, "lr", strict=True), "lr must be a number > 0, got 0"),
    (lambda: checks.number(math.inf, "clip"), "clip must be a number >= 0, got inf"),
    (lambda: checks.number(False, "clip"), "clip must be a number >= 0, got False"),
    (lambda: checks.number(1.5, "decay", maximum=1), "decay must be a number in [0, 1], got 1.5"),
    (lambda: checks.number(0.5, "share", below=0.5), "share must be a number in [0, 0.5), got 0.5"),
    (lambda: checks.choice("fp8", "dtype", ("float32", "bfloat16")),
     "dtype must be one of float32, bfloat16, got 'fp8'"),
    (lambda: checks.choice(["a"], "dtype", ("a",)), "dtype must be one of a, got ['a']"),
    (lambda: checks.boolean(1, "compile"), "compile must be true or false, got 1"),
    (lambda: checks.text("", "split"), "split must be a non-empty string, got ''"),
])
def test_one_wording(call, message):
    with pytest.raises(FieldError) as e:
        call()
    assert str(e.value) == message and isinstance(e.value, SmallCoderError)


def test_good_values_pass_through():
    assert checks.integer(3, "n") == 3 and checks.integer(0, "n", minimum=0) == 0
    assert checks.integer(-5, "seed", minimum=None) == -5
    got = checks.number(2, "lr", strict=True)
    assert got == 2.0 and isinstance(got, float)
    assert checks.choice("a", "x", ("a", "b")) == "a" and checks.boolean(False, "b") is False


def test_within_names_the_field_where_it_sits():
    e = FieldError("lr", "must be a number > 0, got 0")
    assert str(e.within("stages[1]")) == "stages[1].lr: must be a number > 0, got 0"
    assert str(FieldError("min_lr", "0.5 is above lr 0.1", ": ").within("stages[0]")) == \
        "stages[0].min_lr: 0.5 is above lr 0.1"


def test_declared_field_checks():
    @dataclasses.dataclass(frozen=True)
    class Spec:
        count: int = checked(1, Int())
        rate: float = checked(1, Number(strict=True))
        mode: str = checked("a", Choice(("a", "b")))

        def __post_init__(self) -> None:
            check_fields(self)

    spec = Spec()
    assert isinstance(spec.rate, float)  # a check's result replaces the value, frozen or not
    with pytest.raises(SmallCoderError, match=r"^count must be a positive integer, got 0$"):
        Spec(count=0)
    with pytest.raises(SmallCoderError, match=r"^mode must be one of a, b, got 'c'$"):
        Spec(mode="c")


@pytest.mark.parametrize("call,message", [
    (lambda tmp: builtin.build_builtin(tmp, seed=True), "seed must be an integer, got True"),
    (lambda tmp: builtin.build_builtin(tmp, math_problems=0), "math_problems must be a positive integer, got 0"),
    (lambda tmp: decontam.Decontaminator(ngram=True),
     "decontamination n-gram size must be a positive integer, got True"),
    (lambda tmp: sources.SourceSpec(kind="hub", name="a/b", limit=2.5), "limit must be a positive integer, got 2.5"),
    (lambda tmp: sources.SourceSpec(kind="hub", name="a/b", split=""), "split must be a non-empty string, got ''"),
])
def test_library_modules_use_the_shared_checks(tmp_path, call, message):
    with pytest.raises(FieldError) as e:
        call(tmp_path / "out")
    assert str(e.value) == message

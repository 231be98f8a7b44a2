"""Value checks written once, so every module refuses a bad value in the same words:
`<name> must be <rule>, got <value>` (e.g. `seq_len must be a positive integer, got 0`).

Two forms of the same checks:
- functions (`integer`, `number`, `choice`, `boolean`, `text`) for a function's arguments;
- declarations for dataclass fields (`checked(default, Int(minimum=0))`), validated together by
  `check_fields(self)` in `__post_init__`, so a spec's bounds are read where its fields are.

Errors are `FieldError`s (a `SmallCoderError`): they know the field they name, and a parser that
knows where the field sits (`run`, `stages[1]`) names the full path with `within`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SmallCoderError

Check = Callable[[Any, str], Any]


class FieldError(SmallCoderError):
    """A bad value in the field `field`: the message is the field's name, `sep`, then `problem`
    (`seq_len must be a positive integer, got 0`; a rule between fields reads better after a
    colon: `min_lr: 0.5 is above lr 0.1`)."""

    def __init__(self, field: str, problem: str, sep: str = " ") -> None:
        super().__init__(f"{field}{sep}{problem}")
        self.field, self.problem = field, problem

    def within(self, where: str) -> FieldError:
        """The same error with the field named where it sits: `run` + `seed` -> `run.seed: must be ...`."""
        return FieldError(f"{where}.{self.field}" if where else self.field, self.problem, ": ")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int to Python, never a count to us); numpy's too."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(value: Any, name: str, minimum: int | None = 1, maximum: int | None = None) -> int:
    """`value` when it is an int (not a bool) in [minimum, maximum] (None: unbounded)."""
    if is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum):
        return int(value)
    if minimum is None:
        rule = "an integer" if maximum is None else f"an integer <= {maximum}"
    elif maximum is not None:
        rule = f"an integer in [{minimum}, {maximum}]"
    else:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise FieldError(name, f"must be {rule}, got {value!r}")


def number(value: Any, name: str, minimum: float = 0.0, *, strict: bool = False,
           maximum: float | None = None, below: float | None = None) -> float:
    """`value` as a float when it is a finite number >= minimum (> with `strict`), <= maximum, < below."""
    ok = _is_number(value) and (value > minimum if strict else value >= minimum) \
        and (maximum is None or value <= maximum) and (below is None or value < below)
    if ok:
        return float(value)
    low = "(" if strict else "["
    if maximum is not None:
        rule = f"a number in {low}{minimum:g}, {maximum:g}]"
    elif below is not None:
        rule = f"a number in {low}{minimum:g}, {below:g})"
    else:
        rule = f"a number {'>' if strict else '>='} {minimum:g}"
    raise FieldError(name, f"must be {rule}, got {value!r}")


def choice(value: Any, name: str, options: Sequence[Any]) -> Any:
    """`value` when it is one of `options`."""
    if value in options:
        return value
    raise FieldError(name, f"must be one of {', '.join(map(str, options))}, got {value!r}")


def known(value: Any, what: str, options: Sequence[Any]) -> Any:
    """`value` when it names one of `options` (a preset, a task, a format): `unknown <what> 'x';
    choose one of: a, b`."""
    if value in options:
        return value
    raise SmallCoderError(f"unknown {what} {value!r}; choose one of: {', '.join(map(str, options))}")


def require_extra(extra: str, modules: Iterable[str], what: str) -> None:
    """One line naming the `pip install` that fixes it when an optional dependency is missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise SmallCoderError(f"{what} needs the '{extra}' extra ({module} is not installed): "
                                  f"pip install 'smallcoder[{extra}]'") from None


def boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise FieldError(name, f"must be true or false, got {value!r}")


def text(value: Any, name: str) -> str:
    """`value` when it is a non-empty string."""
    if isinstance(value, str) and value:
        return value
    raise FieldError(name, f"must be a non-empty string, got {value!r}")


# ---- declarations for dataclass fields -----------------------------------------------------------


@dataclass(frozen=True)
class Int:
    minimum: int | None = 1
    maximum: int | None = None

    def __call__(self, value: Any, name: str) -> int:
        return integer(value, name, self.minimum, self.maximum)


@dataclass(frozen=True)
class Number:
    minimum: float = 0.0
    strict: bool = False
    maximum: float | None = None
    below: float | None = None

    def __call__(self, value: Any, name: str) -> float:
        return number(value, name, self.minimum, strict=self.strict, maximum=self.maximum, below=self.below)


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def __call__(self, value: Any, name: str) -> Any:
        return choice(value, name, self.options)


@dataclass(frozen=True)
class Unset:
    """`check`, or None left as None (a field whose absence means "derive it from others")."""
    check: Any

    def __call__(self, value: Any, name: str) -> Any:
        return None if value is None else self.check(value, name)


@dataclass(frozen=True)
class Bool:
    def __call__(self, value: Any, name: str) -> bool:
        return boolean(value, name)


@dataclass(frozen=True)
class Text:
    def __call__(self, value: Any, name: str) -> str:
        return text(value, name)


def checked(default: Any = dataclasses.MISSING, check: Check | None = None) -> Any:
    """A dataclass field whose value `check_fields` validates with `check(value, field name)`."""
    return dataclasses.field(default=default, metadata={"check": check})


def check_fields(obj: Any) -> None:
    """Run every declared check of the dataclass `obj` in field order; a check's result (an int
    made a float, say) replaces the value, frozen dataclasses included."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            object.__setattr__(obj, f.name, check(getattr(obj, f.name), f.name))

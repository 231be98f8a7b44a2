"""The checks every command and library entry point makes of plain values, each written once.

Each raises `SmallCoderError` with one line naming the value's name (a flag such as `--threads`,
or a field) and the value given, and returns the value so a caller can check and assign at once.
Standard library only: the CLI calls these before anything heavy is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from .errors import SmallCoderError

T = TypeVar("T")


def is_int(value: object) -> bool:
    """An integer that is not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(value: object, name: str) -> int:
    """`value` if it is an integer >= 1."""
    if not is_int(value) or value < 1:
        raise SmallCoderError(f"{name} must be a positive integer, got {value!r}")
    return value


def non_negative_int(value: object, name: str) -> int:
    """`value` if it is an integer >= 0."""
    if not is_int(value) or value < 0:
        raise SmallCoderError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def choice(value: T, name: str, choices: Iterable[T]) -> T:
    """`value` if it is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise SmallCoderError(f"unknown {name} {value!r}; choose one of: {', '.join(map(str, choices))}")
    return value


def require_extra(extra: str, modules: Iterable[str], what: str) -> None:
    """One line naming the `pip install` that fixes it when an optional dependency is missing."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise SmallCoderError(f"{what} needs the '{extra}' extra ({module} is not installed): "
                                  f"pip install 'smallcoder[{extra}]'") from None

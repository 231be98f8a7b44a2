"""Checks of single values that many modules make, written once so the messages match.

Torch- and numpy-free: data, eval and the CLI use them without importing the model code.
"""

from __future__ import annotations

import numbers
from typing import Any

from .errors import SmallCoderError


def positive_int(value: Any, what: str, minimum: int = 1) -> int:
    """`value` as an int when it is an integer (numpy's too, never a bool) >= `minimum`; else one
    line naming `what`: "WHAT must be a positive integer, got VALUE" (or "an integer >= MIN")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SmallCoderError(f"{what} must be {kind}, got {value!r}")
    return int(value)

"""What every benchmark returns: scores with their counts and errors, and a record per sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Score:
    """One metric: the value, the count behind it (e.g. 45 of 164) and its standard error."""

    value: float
    correct: float | None = None  # numerator of a proportion (may be fractional for pass@k>1)
    total: int | None = None  # denominator: number of tasks/items scored
    stderr: float | None = None

    @property
    def count(self) -> str | None:
        if self.correct is None or self.total is None:
            return None
        c = int(self.correct) if float(self.correct).is_integer() else round(self.correct, 2)
        return f"{c}/{self.total}"


@dataclass
class TaskResult:
    """A benchmark run: metrics by name, the settings that produced them, and per-sample records."""

    task: str
    metrics: dict[str, Score]
    settings: dict[str, Any] = field(default_factory=dict)  # n, temperature, seeds, shots, format ...
    samples: list[dict[str, Any]] = field(default_factory=list)  # prompt, completion, code, result, time
    notes: list[str] = field(default_factory=list)  # e.g. which sandbox protections were active

"""Learning-rate schedules for one stage: warmup-stable-decay (WSD) and cosine.

Both are pure functions of the step index, so a resumed run recomputes the exact LR from the
saved step and needs no scheduler state. `step` is the 0-based index of the optimizer step
about to be taken; `total` is the stage's number of steps.

  warmup   linear from peak/warmup to peak over the first `warmup` steps (never 0: a first
           step with LR 0 would be wasted);
  wsd      then constant at `peak` until the last `decay` fraction of the stage, then linear
           down to `min_lr` at the final step (Hägele et al. 2024, "Scaling Laws and
           Compute-Optimal Training Beyond Fixed Training Durations": WSD with a 10-20%
           linear cool-down matches cosine);
  cosine   then half a cosine from `peak` to `min_lr` at the final step.
"""

from __future__ import annotations

import math

from ..errors import SmallCoderError

SCHEDULES = ("wsd", "cosine")


def warmup_steps(warmup: float, total: int) -> int:
    """Warmup in steps: an int is a step count, a float in [0, 1) a fraction of `total`."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        raise SmallCoderError(f"warmup must be a step count >= 0 or a fraction in [0, 1), got {warmup!r}")
    if isinstance(warmup, float):
        if warmup >= 1:
            raise SmallCoderError(f"warmup as a fraction must be below 1, got {warmup!r} (give an int for steps)")
        return round(warmup * total)
    return min(int(warmup), total)


def lr_at(step: int, total: int, *, peak: float, min_lr: float, schedule: str = "wsd",
          warmup: float = 0, decay: float = 0.2) -> float:
    """The learning rate of 0-based optimizer step `step` out of `total` (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise SmallCoderError(f"unknown schedule {schedule!r} (use {', '.join(SCHEDULES)})")
    if total < 1:
        raise SmallCoderError(f"a schedule needs at least one step, got total={total}")
    if not 0 <= step < total:
        raise SmallCoderError(f"step {step} is outside the schedule's {total} steps")
    w = warmup_steps(warmup, total)
    if step < w:
        return peak * (step + 1) / w
    if schedule == "cosine":
        span = total - w
        progress = 1.0 if span <= 1 else (step - w) / (span - 1)
        return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if not 0 <= decay <= 1:
        raise SmallCoderError(f"decay must be a fraction in [0, 1], got {decay!r}")
    n_decay = min(math.ceil(decay * total), total - w)
    start = total - n_decay
    if n_decay == 0 or step < start:
        return peak
    # the first decay step is just below peak, the final one is exactly min_lr
    progress = (step - start + 1) / n_decay
    return peak + (min_lr - peak) * progress

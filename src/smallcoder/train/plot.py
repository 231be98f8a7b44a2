"""The run's loss curve: train and validation loss against tokens, all stages on one plot; the
raw train loss faint under a smoothed line (noisy in small SFT batches), the learning rate on a
second axis, the validation points per stage.

metrics.jsonl is append-only, so a resumed run repeats the steps after its checkpoint; for each
step the last line written wins. A line cut short by a kill is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import atomic_path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Training lines of metrics.jsonl (not events, and with a numeric loss: a window of skipped
    non-finite steps has null), one per step, the last written winning, by step."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a partial last line from a killed run
            if isinstance(rec, dict) and "event" not in rec and isinstance(rec.get("loss"), (int, float)) \
                    and isinstance(rec.get("step"), int):
                by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def smooth(values: list[float], groups: list[str], weight: float = 0.8) -> list[float]:
    """An exponential moving average of `values` (TensorBoard's smoothing, debiased so it starts at
    the first value) that starts again wherever `groups` changes: stages never smooth into each other."""
    out: list[float] = []
    avg = norm = 0.0
    for i, (v, g) in enumerate(zip(values, groups)):
        if i == 0 or g != groups[i - 1]:
            avg = norm = 0.0
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def plot_metrics(metrics: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Write the loss-curve PNG (atomically) and return its path; stage boundaries are dashed and labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics)
    out = Path(out)
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    if recs:
        xs = [r["tokens"] / 1e6 for r in recs]
        losses, stage_of = [r["loss"] for r in recs], [r["stage"] for r in recs]
        ax.plot(xs, losses, lw=0.8, alpha=0.3, color="C0", label="train loss")
        ax.plot(xs, smooth(losses, stage_of), lw=1.6, color="C0", label="train loss, smoothed")
        lrs = [(x, r["lr"]) for x, r in zip(xs, recs) if isinstance(r.get("lr"), (int, float))]
        if lrs:
            ax_lr = ax.twinx()
            ax_lr.plot(*zip(*lrs), lw=0.9, ls=":", color="C2", label="learning rate")
            ax_lr.set_ylabel("learning rate", color="C2")
            ax_lr.tick_params(axis="y", colors="C2")
            ax_lr.set_ylim(bottom=0)
        # validation sets differ per stage: one line per stage, never joined across a boundary
        labelled = False
        for name in dict.fromkeys(r["stage"] for r in recs):
            val = [(r["tokens"] / 1e6, r["val_loss"]) for r in recs if r["stage"] == name and "val_loss" in r]
            if val:
                ax.plot(*zip(*val), "o-", ms=3.5, lw=1.0, color="C1",
                        label=None if labelled else "validation loss (per stage)")
                labelled = True
        # stage boundaries: where the stage name changes
        start = 0.0
        stages: list[tuple[str, float, float]] = []
        for i, r in enumerate(recs):
            if i == 0 or r["stage"] != recs[i - 1]["stage"]:
                if stages:
                    stages[-1] = (stages[-1][0], stages[-1][1], recs[i - 1]["tokens"] / 1e6)
                stages.append((r["stage"], start if i == 0 else recs[i - 1]["tokens"] / 1e6, xs[i]))
        stages[-1] = (stages[-1][0], stages[-1][1], xs[-1])
        top = max(r["loss"] for r in recs)
        for k, (name, lo, hi) in enumerate(stages):
            if k > 0:
                ax.axvline(lo, color="gray", ls="--", lw=0.8)
            ax.text((lo + hi) / 2, top, name, ha="center", va="top", fontsize=9,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none"})
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or f"{Path(metrics).parent.name}: loss by stage")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    try:
        with atomic_path(out) as tmp:  # a temp file beside the target, then one rename
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out

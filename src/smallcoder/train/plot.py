"""The run's loss curve: train and validation loss against tokens, all stages on one plot.

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
        ax.plot(xs, [r["loss"] for r in recs], lw=1.2, label="train loss")
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
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return out

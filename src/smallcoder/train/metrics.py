"""What a run reports while it trains: OUT/metrics.jsonl (one strict-JSON line per logged step or
event), the loss curve OUT/loss.png, and the window of steps each logged line summarises.

MFU = tokens/s x FLOPs per token (`ModelConfig.flops_per_token`) / the device's peak FLOP/s
(`hardware.device_peak_flops`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SmallCoderError
from ..fsutil import atomic_write_text, write_error

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends to OUT/metrics.jsonl and redraws OUT/loss.png; does nothing where not `enabled`
    (ranks other than 0)."""

    def __init__(self, out: Path, enabled: bool) -> None:
        self.out = out
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        """Append one line: strict JSON, a non-finite number written as null."""
        if not self.enabled:
            return
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        path = self.out / METRICS_FILE
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")
                f.flush()
        except OSError as e:
            raise SmallCoderError(f"{path}: could not write it ({write_error(e) or e})") from None

    def keep_until(self, step: int) -> None:
        """Drop the lines logged after `step`, the end-of-run EOS check's (a resumed run runs it
        again) and a line a kill cut short: a resumed run logs the steps after its checkpoint
        again, so each step keeps one line."""
        path = self.out / METRICS_FILE
        if not self.enabled or not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if isinstance(record, dict) and (record.get("event") == "eos_check" or (
                    isinstance(record.get("step"), int) and record["step"] > step)):
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped:
            atomic_write_text(path, "".join(kept))

    def plot(self) -> None:
        """Redraw the loss curve; a convenience, so a failure is a note, never the run's end."""
        if not self.enabled:
            return
        try:
            from .plot import plot_metrics
        except ImportError:  # matplotlib missing
            return
        try:
            plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)
        except ImportError as e:
            print(f"note: no loss plot ({e}); pip install matplotlib", file=sys.stderr)
        except (OSError, SmallCoderError) as e:  # a full disk fails elsewhere
            print(f"note: no loss plot ({write_error(e) or e})", file=sys.stderr)


@dataclass
class Window:
    """The steps since the last logged line: their mean train loss per trained token (finite
    steps only) and their throughput."""

    loss_sum: float = 0.0
    loss_count: float = 0.0
    tokens: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    last_loss: float | None = None  # the last window's mean that had a finite step

    def add(self, loss: float, num_loss_tokens: int, tokens: int, finite: bool) -> None:
        if finite:
            self.loss_sum += loss * num_loss_tokens
            self.loss_count += num_loss_tokens
        self.tokens += tokens

    def close(self) -> tuple[float | None, float]:
        """(mean train loss, tokens/s) of the window, which then starts again; the loss is the
        previous window's when this one had no finite step."""
        dt = time.perf_counter() - self.t0
        tps = self.tokens / dt if dt > 0 else 0.0
        had_loss = bool(self.loss_count)
        if had_loss:
            self.last_loss = self.loss_sum / self.loss_count
        self.loss_sum = self.loss_count = self.tokens = 0.0
        self.t0 = time.perf_counter()
        return (self.last_loss if had_loss else None), tps

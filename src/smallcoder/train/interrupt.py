"""Stopping a training run when asked (Ctrl-C, or the SIGTERM a scheduler sends before it
preempts a job): the step in flight finishes, a resumable checkpoint is written, and the run
ends with one line saying where it stopped and how to continue. A second Ctrl-C stops at once.

Under torchrun every rank must stop at the same step (a checkpoint gathers from all of them), so
the ranks agree on "stop" through the same all-reduce they use for the loss: one more number a step.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, final

from ..errors import SmallCoderError
from .distributed import all_reduce_sum

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(SmallCoderError):
    """The run stopped because it was asked to; the message says where and how to resume."""

    exit_code = 130


@final
class StopRequest:
    """While entered, SIGINT / SIGTERM ask the run to stop after its current step."""

    def __init__(self) -> None:
        self.asked = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.asked = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, info: Any) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer)."""
        return all_reduce_sum(float(self.asked), info) > 0

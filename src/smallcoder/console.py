"""One answer streamed to a terminal, for `smallcoder chat` and `generate`: pieces print as they
come, Ctrl-C stops the answer (not the program; a second Ctrl-C quits), and a summary line says
why it ended and how fast it ran, as llama.cpp's CLI does. Command-layer code: library modules
do not import it.

Ctrl-C only sets a flag; the answer is stopped between two pieces by closing the engine's stream,
its supported way to cancel, so the engine is never interrupted mid-step and serves the next turn.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

FINISH = {"stop": "end of answer", "length": "max-new-tokens reached", "cancelled": "stopped (Ctrl-C)"}


@dataclass
class Answer:
    text: str                   # as shown (the answer-start whitespace stripped for chat)
    finish_reason: str          # "stop", "length" or "cancelled" (Ctrl-C)
    stop_reason: Any = None     # the stop string or EOS id that ended it
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    first_piece_s: float = 0.0  # from the request to its first piece
    seconds: float = 0.0        # from the request to its end
    drafted: int = 0            # speculative decoding: drafts verified, and those kept
    accepted: int = 0

    def summary(self) -> str:
        """`[end of answer (EOS); 42 tokens, 31.2 tok/s; prompt 17 tokens, first piece 0.08 s]`."""
        why = FINISH.get(self.finish_reason, self.finish_reason)
        if self.finish_reason == "stop":
            why += f" (stop string {self.stop_reason!r})" if isinstance(self.stop_reason, str) else " (EOS)"
        if self.new_tokens is None:
            return f"[{why}; {self.seconds:.2f} s]"
        decode = self.seconds - self.first_piece_s
        rate = f", {(self.new_tokens - 1) / decode:.1f} tok/s" if self.new_tokens > 1 and decode > 0 else ""
        drafts = f"; drafts kept {self.accepted}/{self.drafted}" if self.drafted else ""
        return (f"[{why}; {self.new_tokens} tokens{rate}; prompt {self.prompt_tokens} tokens, "
                f"first piece {self.first_piece_s:.2f} s{drafts}]")


@final
class _CtrlC:
    """While entered (main thread only), the first SIGINT sets `asked`; a second one quits."""

    def __init__(self) -> None:
        self.asked = False
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True


def stream_answer(engine: Any, prompt: str, params: Any, show: Callable[[str], str] = str,
                  out: Any = None) -> Answer:
    """Print the answer to `prompt` piece by piece through `show`; Ctrl-C ends it early."""
    out = out or sys.stdout
    t0 = time.perf_counter()
    first: float | None = None
    shown: list[str] = []
    pieces = engine.stream(prompt, params)
    done = None
    with _CtrlC() as ctrl_c:
        while not ctrl_c.asked:
            try:
                piece = next(pieces)
            except StopIteration as end:
                done = end.value  # the Completion
                break
            if first is None:
                first = time.perf_counter() - t0
            text = show(piece)
            shown.append(text)
            print(text, end="", file=out, flush=True)
        else:
            pieces.close()  # cancels the generation
    seconds = time.perf_counter() - t0
    first = seconds if first is None else first
    if done is None:
        return Answer("".join(shown), "cancelled" if ctrl_c.asked else "stop", first_piece_s=first, seconds=seconds)
    return Answer("".join(shown), done.finish_reason, done.stop_reason, done.prompt_tokens, len(done.token_ids),
                  first, seconds, done.drafted_tokens, done.accepted_tokens)


def line_editing() -> None:
    """Arrow keys, history (Up/Down) and Ctrl-R in `input()` where the terminal supports it."""
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - importing it is what turns line editing on
        except ImportError:  # Windows without pyreadline: plain input()
            pass

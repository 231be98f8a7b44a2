"""The requests the engine runs: a generation (`Request`, ending in a `Completion`) or a scoring
(`ScoreRequest`), with the end signal and cancellation they share."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SmallCoderError
from ..tokenizer import Tokenizer
from .detokenize import TextState
from .sampling import SamplingParams
from .scoring import TokenScore
from .speculative import RowStats

OnPiece = Callable[[str | None], None]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    stop_reason: str | int | None = None  # the stop string, or the EOS id, that ended it
    drafted_tokens: int = 0  # speculative decoding: drafts verified for this request
    accepted_tokens: int = 0  # and those kept (each kept draft is a token without a step of its own)


class _Job:
    """What every engine request shares: the end signal and cancellation.

    `on_piece` receives each streamable text piece (from the thread that runs the engine) and
    None once at the end, after `done` is set and the result (or `error`) is in place, so a
    listener that sees None can read the result at once.
    """

    def __init__(self, on_piece: OnPiece | None) -> None:
        self.on_piece = on_piece
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._cancelled = False
        self._queued = False

    def cancel(self) -> None:
        """Stop this request; a queued one never runs, a decoding one frees its slot at the next step."""
        self._cancelled = True

    def _wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class Request(_Job):
    """A prompt to complete: its state while queued or decoding, then its `completion`."""

    def __init__(self, ids: list[int], params: SamplingParams, budget: int, tokenizer: Tokenizer,
                 on_piece: OnPiece | None, warm: bool = False) -> None:
        super().__init__(on_piece)
        self.ids = ids
        self.params = params
        self.warm = warm  # prefill only, generate nothing (the prompt stays cached for reuse)
        self.row = TextState(tokenizer, params, len(ids), budget)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.completion: Completion | None = None
        # set by the engine when it prefills (time.perf_counter() values; statistics for the server)
        self.cached_tokens = 0  # prompt tokens reused from the cache, not recomputed
        self.started_at: float | None = None  # prefill began
        self.first_token_at: float | None = None  # prefill ended: the prompt is processed
        self.spec: RowStats | None = None  # speculative decoding's state for this row (the engine's)

    def only_prefill(self) -> None:
        """Generate nothing more (thread-safe, like `cancel`), but finish computing the prompt's
        keys and values, which stay cached for reuse: the server's answer to a client that would
        not wait for them (llama.cpp's `t_max_prompt_ms`). Ends with finish reason "length"."""
        self.warm = True

    def result(self) -> Completion:
        """Wait for the completion (re-raising the engine's error for this request, if any)."""
        self._wait()
        return self.completion


class ScoreRequest(_Job):
    """Token ids to score (`token_scores`); `scores` is None when it was cancelled before it ran."""

    def __init__(self, ids: list[int], top: int, start: int, on_piece: OnPiece | None) -> None:
        super().__init__(on_piece)
        self.ids, self.top, self.start = ids, top, start
        self.scores: list[TokenScore] | None = None

    def result(self) -> list[TokenScore]:
        self._wait()
        if self.scores is None:
            raise SmallCoderError("the scoring request was cancelled")
        return self.scores

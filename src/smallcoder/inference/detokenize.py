"""Incremental detokenisation of one generated sequence, with stop strings and hold-back.

Text is decoded incrementally (bytes of an unfinished UTF-8 character are held back), stop
strings are matched on the text so they are found even when they span tokens, and a streamed
piece never contains the start of a stop string that may still complete. The editors' line rules
(llama.cpp's `n_indent` and `t_max_predict_ms`, see `SamplingParams`) end a sequence here too,
with finish reason "length" (llama.cpp's "limit").
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..tokenizer import Tokenizer
from .sampling import SamplingParams


class TextState:
    """One sequence's tokens, its confirmed text, and how much of it was already streamed.

    `finish_reason` is "stop" (EOS or a stop string), "length", or what the engine ended it with
    ("cancelled", "error"); `stop_reason` is the stop string or the EOS token id that ended it.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_tokens: int, budget: int) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.prompt_tokens = prompt_tokens
        self.budget = budget
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.line_start, self.line_ok = -1, False  # the line min_indent looks at (from the second on)
        self.first_token_at: float | None = None  # clock() at the first token (newline_time_limit)

    def push(self, token: int) -> str:
        """Add one sampled token; return the text that may now be streamed."""
        if self.finish_reason:
            return ""
        params, tok = self.params, self.tokenizer
        if self.first_token_at is None:
            self.first_token_at = clock()
        if token == tok.eos_id and params.stop_at_eos:
            self.finish_reason, self.stop_reason = "stop", token
            return self._flush()
        self.ids.append(token)
        prev = tok.decode(self.ids[self.prefix_offset:self.read_offset])
        new = tok.decode(self.ids[self.prefix_offset:])
        if len(new) > len(prev) and not new.endswith("\ufffd"):  # a complete UTF-8 character
            piece = new[len(prev):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - max((len(s) for s in params.stop), default=0))
            self.text += piece
            hits = [(p, i) for i, p in enumerate(self.text.find(s, start) for s in params.stop) if p != -1]
            if hits:  # the earliest stop string wins; it and what follows are dropped
                pos, which = min(hits)
                self.text = self.text[:pos]
                self.finish_reason, self.stop_reason = "stop", params.stop[which]
            elif params.min_indent or params.newline_time_limit:
                self._line_rules(piece)
        if self.finish_reason is None and len(self.ids) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason:
            return self._flush()
        end = len(self.text) - held_back(self.text, params.stop)
        piece, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return piece

    def _line_rules(self, piece: str) -> None:
        """llama.cpp's rules for editors, on the text just grown by `piece`: a line after the first
        whose first character other than a space or tab comes at an indentation below
        `min_indent` ends the text just before that character; past `newline_time_limit` seconds
        since the first token, a piece with a newline ends it after that piece."""
        params, text = self.params, self.text
        if params.min_indent:
            if self.line_start < 0 and "\n" in text:
                self.line_start = text.index("\n") + 1
            while self.line_start >= 0:
                if not self.line_ok:  # the line at line_start: decided by its first non-blank
                    pos = self.line_start
                    while pos < len(text) and text[pos] in " \t":
                        pos += 1
                    if pos == len(text):
                        break  # only indentation so far
                    if pos - self.line_start < params.min_indent:
                        self.text, self.finish_reason = text[:pos], "length"
                        return
                    self.line_ok = True
                nl = text.find("\n", self.line_start)
                if nl == -1:
                    break
                self.line_start, self.line_ok = nl + 1, False
        if params.newline_time_limit and "\n" in piece and clock() - self.first_token_at > params.newline_time_limit:
            self.finish_reason = "length"

    def finish(self, reason: str) -> str:
        """End the sequence (if not already ended) with `reason`; return the text still to stream."""
        if self.finish_reason:
            return ""
        self.finish_reason = reason
        return self._flush()

    def _flush(self) -> str:
        """Final text of a finished row: any undecoded tail (e.g. a cut UTF-8 char) included.

        A stop string only ever ends a row right after its text was confirmed, so a tail here
        comes from a row that ended on EOS or on its length, and belongs to the text.
        """
        if self.read_offset < len(self.ids):
            tail = self.tokenizer.decode(self.ids[self.prefix_offset:])
            self.text += tail[len(self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])):]
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (it may yet complete)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


clock = time.monotonic  # the clock of `newline_time_limit` (a module global, so tests can set it)

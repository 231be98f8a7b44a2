"""Fill-in-the-middle prompts for the server: the order, the editors' extra context, and the cut
that makes a prompt fit the context.

Every FIM request is built here as token ids: `/infill`, `/v1/completions` with `suffix`, and a
text prompt an editor filled in itself as `<fim_prefix>…<fim_suffix>…<fim_middle>…` (Continue's
and Tabby's StarCoder template; `prompts.fim_split`). Each piece (prefix, suffix, middle, the
context before) is tokenized on its own and laid out by `prompts.fim_ids` in the server's order
(`--fim-order`): with SPM the suffix comes first, so a prefix that grows as the user types only
appends tokens, and the engine's prefix reuse keeps everything before the edit; with PSM an edit
in the prefix keeps only the tokens before it. The model must have been trained with the order
(the recipes train both).

A prompt longer than `limit` tokens is cut, never refused, as an editor expects: the middle (the
text already typed of the line) is kept whole, and the rest by `prompts.fim_keep` (the one FIM cut
rule, which the evaluation uses too): of the prefix its end and of the suffix its start, the
suffix taking at most a quarter when both are too long (llama.cpp's 3:1); the extra context then
gets the rest, its end kept.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..prompts import FIM_TOKENS, extra_context, fim_ids, fim_keep, repo_tokens
from .protocol import APIError

SENTINELS = len(FIM_TOKENS)
NEEDS_FIM = f"needs fill-in-the-middle tokens ({', '.join(FIM_TOKENS)}), and this model's tokenizer lacks them"


@dataclass
class FimPrompt:
    ids: list[int]
    cut: dict[str, int]  # tokens dropped: "extra" and "prefix" from their start, "suffix" from its end

    @property
    def truncated(self) -> bool:
        return any(self.cut.values())


class FimBuilder:
    """FIM prompts of one tokenizer (which must have the FIM tokens) in one order."""

    def __init__(self, tokenizer: Any, order: str) -> None:
        self.tokenizer, self.order = tokenizer, order
        self.sentinels = [tokenizer.token_to_id(t) for t in FIM_TOKENS]
        self.repo = repo_tokens(tokenizer)

    def extra(self, chunks: Sequence[tuple[str, str]]) -> str:
        """The text before the FIM prompt for an editor's (filename, text) chunks."""
        return extra_context(chunks, self.repo)

    async def build(self, prefix: str, suffix: str, middle: str, head: str, limit: int, field: str) -> FimPrompt:
        """The ids of `head` + the FIM prompt, cut to at most `limit` tokens; a middle that alone
        does not fit is a 400 naming `field`'s middle."""
        try:
            head_ids, pre, suf, mid = await asyncio.to_thread(self.tokenizer.encode_batch,
                                                             [head, prefix, suffix, middle])
        except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate: not encodable text
            raise APIError(400, f"{field} is not valid text ({e})", param=field) from None
        room = limit - SENTINELS - len(mid)
        if room < 0:
            raise APIError(400, f"the middle typed so far is {len(mid)} tokens; with the {SENTINELS} FIM tokens "
                                f"this server accepts at most {limit} prompt tokens (the model's context, less "
                                f"the room kept to generate)", param="prompt", code="context_length_exceeded")
        keep_e, keep_p, keep_s = fim_keep(len(head_ids), len(pre), len(suf), room)
        ids = head_ids[len(head_ids) - keep_e:] + fim_ids(pre[len(pre) - keep_p:], suf[:keep_s], mid, self.order,
                                                           self.sentinels)
        return FimPrompt(ids, {"extra": len(head_ids) - keep_e, "prefix": len(pre) - keep_p,
                               "suffix": len(suf) - keep_s})

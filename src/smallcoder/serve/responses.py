"""Response shaping: engine results as OpenAI JSON, logprobs, and server-sent-event streams."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .protocol import APIError

if TYPE_CHECKING:
    from ..inference import Completion, SamplingParams
    from ..tokenizer import Tokenizer
    from .bridge import Batch

log = logging.getLogger("smallcoder.serve")

DONE = "data: [DONE]\n\n"


def result_of(req: Any) -> Any:
    """A finished engine request's result (a Completion, or scores); a failure becomes a 500, a
    request cancelled by the shutdown a 503."""
    scoring = hasattr(req, "scores")
    if req.error is not None:
        raise APIError(500, f"{'scoring' if scoring else 'generation'} failed: {req.error}", type_="server_error")
    result = req.scores if scoring else req.completion
    if result is None or (not scoring and result.finish_reason == "cancelled"):
        raise APIError(503, "generation was cancelled (the server is shutting down)", type_="server_error")
    return result


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def batch_usage(batch: Batch) -> dict[str, int]:
    comps = [result_of(r) for r in batch.requests]
    return usage(sum(c.prompt_tokens for c in comps), sum(len(c.token_ids) for c in comps))


def seeded(params: SamplingParams, j: int) -> SamplingParams:
    """Params of the j-th of n samples: its own seed (seed + j) so the n samples differ."""
    if j == 0 or params.seed is None:
        return params
    return replace(params, seed=(params.seed + j) % 2**63)


def scored_tokens(tokenizer: Tokenizer, comp: Completion) -> list[int]:
    """The generated ids that logprobs cover: those that make up the text (a stop string cut it;
    the ids past it are dropped), and the EOS token when it ended the completion. OpenAI and vLLM
    return that EOS; lm-eval's `local-completions` drops the last returned position, taking it
    for the one generated token, so without it the last scored token would be lost."""
    ids = comp.token_ids
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(ids[:k])) >= len(comp.text):
            ids = ids[:k]
            break
    if isinstance(comp.stop_reason, int):  # only EOS ends a completion as a token
        ids = ids + [tokenizer.eos_id]
    return ids


def score_job(prompt: list[int], generated: list[int], top: int, echo: bool) -> tuple[list[int], int, int]:
    """The engine scoring request (ids, top, start) behind one choice's logprobs."""
    return prompt + generated, top, max(0 if echo else len(prompt), 1)


def completion_logprobs(tokenizer: Tokenizer, prompt: list[int], generated: list[int], echo: bool,
                        scores: Sequence[tuple[float, list[tuple[int, float]]]]) -> dict[str, Any]:
    """OpenAI completions `logprobs` for the generated tokens (and the prompt's with `echo`)."""
    ids = prompt + generated
    first = 0 if echo else len(prompt)
    decode_batch = tokenizer.backend.decode_batch
    tokens = decode_batch([[t] for t in ids[first:]], skip_special_tokens=False)
    offset = 0 if echo else len(tokenizer.decode(prompt))
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if echo:  # the first token has no context to be predicted from
        token_lps.append(None)
        tops.append(None)
    for lp, alternatives in scores:
        token_lps.append(lp)
        names = decode_batch([[t] for t, _ in alternatives], skip_special_tokens=False) if alternatives else []
        tops.append({name: v for name, (_, v) in zip(names, alternatives)})
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lp: dict[str, Any], top: int) -> dict[str, Any]:
    content = []
    for token, value, alternatives in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({"token": token, "logprob": value, "bytes": list(token.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                                         for t, v in list((alternatives or {}).items())[:top]]})
    return {"content": content}


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _guard(events: AsyncIterator[str], error_fields: dict[str, Any]) -> AsyncIterator[str]:
    """Turn a failure mid-stream into an `error` event (the status line is already sent)."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield sse({**e.body(), **error_fields})
    except Exception as e:
        log.exception("stream failed")
        yield sse({**APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body(),
                   **error_fields})


def event_stream(events: AsyncIterator[str], batch: Batch | None = None,
                 error_fields: dict[str, Any] | None = None) -> Any:
    """A text/event-stream response that cancels its engine requests however it ends; an error
    event carries `error_fields` beside the error (llama.cpp clients read `content` and `stop`)."""
    from starlette.responses import StreamingResponse

    class EngineStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:  # a disconnect lands here too: free the slots now, not at garbage collection
                if batch is not None:
                    batch.cancel()

    return EngineStream(_guard(events, error_fields or {}), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

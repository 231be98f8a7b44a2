"""`POST /v1/completions`: raw prompts (token ids too), FIM through `suffix` or a prompt in the
StarCoder FIM template (both built by `fim`), `n`, `echo`, and `echo` + `logprobs` scoring as
lm-eval's `local-completions` sends it."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .bridge import Batch, drain_or_cancel
from .protocol import APIError, CompletionRequest
from .responses import DONE, batch_usage, event_stream, result_of, scored_tokens, seeded, sse, usage
from .server import Server

if TYPE_CHECKING:
    from starlette.requests import Request


def _prompts(server: Server, req: CompletionRequest) -> list[str | list[int]]:
    if req.prompt is None:
        raise APIError(400, "field 'prompt' is required", param="prompt")
    prompts: list[str | list[int]]
    if isinstance(req.prompt, str):
        prompts = [req.prompt]
    elif req.prompt and isinstance(req.prompt[0], int):
        prompts = [list(req.prompt)]
    else:
        prompts = list(req.prompt)
    if not prompts:
        raise APIError(400, "field 'prompt' is an empty list", param="prompt")
    if req.suffix is not None:
        server.require_fim("suffix", "suffix")
        if req.echo:
            raise APIError(400, "echo cannot be combined with suffix", param="echo")
        if any(not isinstance(p, str) for p in prompts):
            raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
    return prompts


async def _ids(server: Server, req: CompletionRequest, prompts: list[str | list[int]], max_tokens: int
               ) -> list[list[int]]:
    """Token ids of each prompt. FIM prompts (`suffix`, or a text in the FIM template when there is
    something to generate and nothing to echo) are built in the server's order and cut to fit."""
    if req.suffix is not None:
        fim = server.require_fim("suffix", "suffix")
        return [(await fim.build(p, req.suffix, "", fim.extra([]), server.fim_limit(max_tokens), "prompt")).ids
                for p in prompts]
    if max_tokens > 0 and not req.echo:
        return [ids for ids, _ in await server.prompt_ids(prompts, "prompt", max_tokens)]
    return await server.encode(prompts, "prompt", scoring=max_tokens == 0)


async def completions(server: Server, request: Request) -> Any:
    req = await server.read(request, CompletionRequest, "completion")
    prompts = _prompts(server, req)
    name, value = req.requested_max_tokens()
    max_tokens = server.max_new_tokens(value, 16, name)
    logprobs = req.top_logprobs(server.limits)
    n = req.choices(len(prompts), server.limits)
    params = req.sampling_params(max_tokens, server.limits)
    ids = await _ids(server, req, prompts, max_tokens)
    texts = [p if isinstance(p, str) else server.tokenizer.decode(p) for p in prompts]
    echo = bool(req.echo)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": server.model_name}

    if max_tokens == 0:  # nothing to generate: echo and/or scoring only
        lps: list[Any] = [None] * len(ids)
        if logprobs is not None:
            server.check_queue(len(ids))
            lps = await server.logprobs(request, [(p, []) for p in ids], logprobs, echo)
            if lps is None:
                return None
        choices = [{"index": p * n + j, "text": texts[p] if echo else "", "logprobs": lps[p],
                    "finish_reason": "length"} for p in range(len(ids)) for j in range(n)]
        body = {**base, "choices": choices, "usage": usage(sum(len(i) for i in ids) * n, 0)}
        return _static_stream(body, req.include_usage) if req.stream else body

    jobs = [(prompt_ids, seeded(params, j)) for prompt_ids in ids for j in range(n)]
    server.check_queue(len(jobs))
    batch = Batch.generate(server.engine, jobs)
    if req.stream:
        echoed = [texts[k // n] for k in range(len(jobs))] if echo else None
        return event_stream(_events(batch, base, echoed, req.include_usage), batch)
    if not await drain_or_cancel(request, batch):
        return None
    comps = [result_of(r) for r in batch.requests]
    lps = [None] * len(comps)
    if logprobs is not None:
        lps = await server.logprobs(request, [(jobs[k][0], scored_tokens(server.tokenizer, c))
                                              for k, c in enumerate(comps)], logprobs, echo)
        if lps is None:
            return None
    choices = [{"index": k, "text": (texts[k // n] if echo else "") + c.text, "logprobs": lps[k],
                "finish_reason": c.finish_reason} for k, c in enumerate(comps)]
    return {**base, "choices": choices, "usage": usage(sum(len(j[0]) for j in jobs),
                                                       sum(len(c.token_ids) for c in comps))}


def _chunk(base: dict[str, Any], index: int, text: str, finish: str | None, include_usage: bool) -> str:
    body = {**base, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
    if include_usage:
        body["usage"] = None
    return sse(body)


async def _events(batch: Batch, base: dict[str, Any], echo: list[str] | None, include_usage: bool
                  ) -> AsyncIterator[str]:
    if echo:
        for k, text in enumerate(echo):
            yield _chunk(base, k, text, None, include_usage)
    async for index, piece in batch.events():
        if piece is None:
            yield _chunk(base, index, "", result_of(batch.requests[index]).finish_reason, include_usage)
        elif piece:
            yield _chunk(base, index, piece, None, include_usage)
    if include_usage:
        yield sse({**base, "choices": [], "usage": batch_usage(batch)})
    yield DONE


def _static_stream(body: dict[str, Any], include_usage: bool) -> Any:
    """The stream of a request with nothing to generate: its choices, usage, [DONE]."""
    async def events() -> AsyncIterator[str]:
        base = {k: v for k, v in body.items() if k not in ("choices", "usage")}
        for choice in body["choices"]:
            yield sse({**base, "choices": [choice], **({"usage": None} if include_usage else {})})
        if include_usage:
            yield sse({**base, "choices": [], "usage": body["usage"]})
        yield DONE
    return event_stream(events())

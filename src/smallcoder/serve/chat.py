"""`POST /v1/chat/completions`: messages in the card's `User:/Assistant:` format."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from ..prompts import AnswerStream, answer_text, format_chat
from .bridge import Batch, drain_or_cancel
from .protocol import APIError, ChatRequest
from .responses import DONE, batch_usage, chat_logprobs, event_stream, result_of, scored_tokens, seeded, sse, usage
from .server import Server

if TYPE_CHECKING:
    from starlette.requests import Request


def _prompt(server: Server, req: ChatRequest) -> str:
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages.{i}.content")
            content = "".join(part.text for part in content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    if not messages:
        raise APIError(400, "field 'messages' is empty", param="messages")
    try:
        return format_chat(messages, add_generation_prompt=True, eos_token=server.tokenizer.eos_token)
    except SmallCoderError as e:
        raise APIError(400, str(e), param="messages") from None


async def chat(server: Server, request: Request) -> Any:
    req = await server.read(request, ChatRequest, "chat")
    [ids] = await server.encode([_prompt(server, req)], "messages")
    name, value = req.requested_max_tokens()
    max_tokens = server.max_new_tokens(value, min(server.max_tokens, server.engine.context_length - len(ids)), name)
    top = req.top(server.limits)
    n = req.choices(1, server.limits)
    params = req.sampling_params(max_tokens, server.limits, chat=True)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": server.model_name}
    if max_tokens == 0:  # nothing to generate
        if req.stream:
            return event_stream(_events(None, n, len(ids), base, req.include_usage))
        choices = [{"index": j, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": "length"} for j in range(n)]
        return {**base, "choices": choices, "usage": usage(len(ids) * n, 0)}
    jobs = [(ids, seeded(params, j)) for j in range(n)]
    server.check_queue(len(jobs))
    batch = Batch.generate(server.engine, jobs)
    if req.stream:
        return event_stream(_events(batch, n, len(ids), base, req.include_usage), batch)
    if not await drain_or_cancel(request, batch):
        return None
    comps = [result_of(r) for r in batch.requests]
    lps: list[Any] = [None] * n
    if req.logprobs:
        lps = await server.logprobs(request, [(ids, scored_tokens(server.tokenizer, c)) for c in comps],
                                    max(top, 1), echo=False)
        if lps is None:
            return None
        lps = [chat_logprobs(lp, top) for lp in lps]
    choices = [{"index": k, "message": {"role": "assistant", "content": answer_text(c.text)}, "logprobs": lps[k],
                "finish_reason": c.finish_reason} for k, c in enumerate(comps)]
    return {**base, "choices": choices, "usage": batch_usage(batch)}


async def _events(batch: Batch | None, n: int, prompt_tokens: int, base: dict[str, Any], include_usage: bool
                  ) -> AsyncIterator[str]:
    """The chunks: a role chunk per choice, the content, a finish chunk per choice, usage, [DONE].
    Without a batch (nothing to generate) every choice finishes at once with "length"."""
    base = {**base, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, str], finish: str | None) -> str:
        body = {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    for k in range(n):
        yield chunk(k, {"role": "assistant", "content": ""}, None)
    if batch is None:
        for k in range(n):
            yield chunk(k, {}, "length")
    else:
        shown = [AnswerStream() for _ in range(n)]
        async for index, piece in batch.events():
            if piece is None:
                yield chunk(index, {}, result_of(batch.requests[index]).finish_reason)
                continue
            piece = shown[index](piece)
            if piece:
                yield chunk(index, {"content": piece}, None)
    if include_usage:
        yield sse({**base, "choices": [], "usage": batch_usage(batch) if batch else usage(prompt_tokens * n, 0)})
    yield DONE

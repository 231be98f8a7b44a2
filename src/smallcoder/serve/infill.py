"""`POST /infill`: llama.cpp's fill-in-the-middle endpoint (llama.vscode), its request and reply shapes.

The prompt is `[input_extra]<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>{prompt}`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ..prompts import FIM_TOKENS, fim_prompt
from .bridge import Batch, drain_or_cancel
from .protocol import APIError, InfillRequest
from .responses import event_stream, result_of, sse
from .server import Server

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..inference import Completion


async def infill(server: Server, request: Request) -> Any:
    req = await server.read(request, InfillRequest, "infill")
    if not server.has_fim:
        raise APIError(400, f"/infill needs fill-in-the-middle tokens ({', '.join(FIM_TOKENS)}), and this "
                            "model's tokenizer lacks them")
    extra = "".join(chunk.text for chunk in req.input_extra or [])
    [ids] = await server.encode([extra + fim_prompt(req.input_prefix, req.input_suffix, req.prompt)], "input_prefix")
    value = req.n_predict if req.n_predict is not None else req.max_tokens
    if value is not None and value < 0:  # llama.cpp: -1 = until the context is full
        value = None
    max_tokens = server.max_new_tokens(value, min(server.max_tokens, server.engine.context_length - len(ids)),
                                       "n_predict")
    params = req.sampling_params(max_tokens, server.limits)
    t0 = time.perf_counter()

    def final(content: str, comp: Completion | None) -> dict[str, Any]:
        """llama.cpp's closing object: the text (empty when streamed), why it stopped, counts, timings."""
        seconds = time.perf_counter() - t0
        predicted = len(comp.token_ids) if comp else 0
        word = comp.stop_reason if comp and isinstance(comp.stop_reason, str) else ""
        stop_type = "limit" if comp is None or comp.finish_reason == "length" else "word" if word else "eos"
        return {"content": content, "stop": True, "index": 0, "model": server.model_name, "stop_type": stop_type,
                "stopping_word": word, "tokens_predicted": predicted, "tokens_evaluated": len(ids),
                "truncated": False,
                "timings": {"prompt_n": len(ids), "predicted_n": predicted, "predicted_ms": seconds * 1000,
                            "predicted_per_second": predicted / seconds if seconds > 0 else 0.0}}

    if max_tokens == 0:  # llama.vscode's warm-up request: nothing to generate
        if req.stream:
            async def once() -> AsyncIterator[str]:
                yield sse(final("", None))
            return event_stream(once())
        return final("", None)
    server.check_queue(1)
    batch = Batch.generate(server.engine, [(ids, params)])
    if req.stream:
        async def events() -> AsyncIterator[str]:
            async for _, piece in batch.events():
                if piece is None:
                    yield sse(final("", result_of(batch.requests[0])))
                elif piece:
                    yield sse({"content": piece, "stop": False, "index": 0})
        return event_stream(events(), batch)
    if not await drain_or_cancel(request, batch):
        return None
    comp = result_of(batch.requests[0])
    return final(comp.text, comp)

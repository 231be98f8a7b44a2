"""`smallcoder serve`: an OpenAI-compatible HTTP server over the continuous-batching `Engine`.

Endpoints: `/v1/completions` (raw prompts, FIM through `suffix`, `echo` + `logprobs` scoring as
lm-eval's `local-completions` sends it), `/v1/chat/completions` (the card's `User:/Assistant:`
format), `/infill` (llama.cpp's, for llama.vscode), `/v1/models` and `/health`. Streaming is
server-sent events; every request becomes engine requests that share one batch with everyone
else's. A client that goes away cancels its generation at once, every limit is checked before
the engine sees a request, and a bad request gets an OpenAI-style JSON error naming the field
and the limit, never a crash. fastapi, uvicorn and torch are imported inside functions so
`smallcoder --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import SmallCoderError

if TYPE_CHECKING:
    import socket

    from fastapi import FastAPI
    from starlette.requests import Request

    from .generate import Engine, SamplingParams

log = logging.getLogger("smallcoder.serve")

FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
CHAT_STOP = "\nUser:"  # the card's next turn: a chat answer ends there even without EOS
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass
class ServeLimits:
    """Bounds on one request, checked before it reaches the engine (None: from the model)."""

    max_prompt_tokens: int | None = None  # default: context length - 1
    max_tokens: int | None = None  # largest max_tokens a request may ask for; default: context length
    max_choices: int = 64  # n x number of prompts in one request
    max_queue: int = 256  # requests waiting for a batch slot before new ones get 503
    max_stop: int = 64  # stop strings per request (editors send 10+)
    max_stop_chars: int = 512
    max_logprobs: int = 20  # top alternatives per token
    max_body_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            low = 0 if name == "max_queue" else 1
            if value is not None and (not isinstance(value, int) or value < low):
                flag = f" (--{name.replace('_', '-')})" if name in ("max_prompt_tokens", "max_tokens", "max_queue") else ""
                raise SmallCoderError(f"serve limit {name}{flag} must be an integer >= {low}, got {value!r}")


class _ClientGone(Exception):
    """The client disconnected before its request was complete: nothing to answer."""


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request schemas (pydantic; unknown fields are kept in model_extra and logged) ---------------

def _schemas() -> dict[str, Any]:
    """Build the pydantic request models on first use (keeps pydantic out of `--help`)."""
    from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

    class _Base(BaseModel):
        model_config = ConfigDict(extra="allow")

    class StreamOptions(_Base):
        include_usage: StrictBool | None = False

    class _Sampling(_Base):
        model: str | None = None
        max_tokens: StrictInt | None = None
        max_completion_tokens: StrictInt | None = None
        temperature: float | None = None
        top_p: float | None = None
        top_k: StrictInt | None = None  # vLLM / llama.cpp extension; <= 0 is off
        n: StrictInt | None = None
        stream: StrictBool | None = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: StrictInt | None = None
        user: str | None = None
        ignore_eos: StrictBool | None = False  # vLLM extension

    class CompletionRequest(_Sampling):
        prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] | None = None
        suffix: str | None = None
        echo: StrictBool | None = False
        logprobs: StrictInt | None = None

    class ContentPart(_Base):
        type: str
        text: str | None = None

    class Message(_Base):
        role: str
        content: str | list[ContentPart] | None = None

    class ChatRequest(_Sampling):
        messages: list[Message]
        logprobs: StrictBool | None = False
        top_logprobs: StrictInt | None = None

    class InputExtra(_Base):
        filename: str | None = None
        text: str = ""

    class InfillRequest(_Base):
        input_prefix: str = ""
        input_suffix: str = ""
        input_extra: list[InputExtra] | None = None
        prompt: str = ""
        n_predict: StrictInt | None = None
        max_tokens: StrictInt | None = None
        temperature: float | None = None
        top_k: StrictInt | None = None
        top_p: float | None = None
        stop: str | list[str] | None = None
        seed: StrictInt | None = None
        stream: StrictBool | None = False
        ignore_eos: StrictBool | None = False

    return {"completion": CompletionRequest, "chat": ChatRequest, "infill": InfillRequest}


_SCHEMAS: dict[str, Any] = {}

# Fields that clients commonly send with their default meaning; ignored without a log line.
_QUIET_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "best_of": (1, None),
    "logit_bias": (None, {}), "cache_prompt": (True, False, None), "samplers": (), "n_indent": (),
    "t_max_prompt_ms": (), "t_max_predict_ms": (), "response_fields": (),
}


# ---- bridging engine requests (threads) into asyncio --------------------------------------------

class _Batch:
    """The engine requests of one HTTP request, their pieces merged into one asyncio queue."""

    def __init__(self, engine: Engine, jobs: Sequence[tuple[list[int], SamplingParams]]) -> None:
        import asyncio

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        self.requests: list[Any] = []
        try:
            for i, (ids, params) in enumerate(jobs):
                self.requests.append(engine.submit(ids, params, on_piece=self._callback(i)))
        except BaseException:
            self.cancel()
            raise

    def _callback(self, index: int) -> Callable[[str | None], None]:
        def on_piece(piece: str | None) -> None:  # runs on the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, piece))
            except RuntimeError:  # the event loop is closed (server shutting down): nobody listens
                pass
        return on_piece

    async def events(self) -> AsyncIterator[tuple[int, str | None]]:
        """(choice index, text piece) until every request ended; None marks one's end, settled."""
        import asyncio

        open_ = set(range(len(self.requests)))
        while open_:
            try:
                index, piece = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                # safety net: a request the engine finished without a final on_piece(None)
                for i in sorted(open_):
                    if self.requests[i].done.is_set():
                        open_.discard(i)
                        yield i, None
                continue
            if piece is None:
                if index not in open_:
                    continue
                open_.discard(index)
                await self._settled(index)
            yield index, piece

    async def _settled(self, index: int) -> None:
        """Wait (briefly) for the engine to publish the request's completion after its last piece."""
        import asyncio

        req = self.requests[index]
        for _ in range(10_000):
            if req.done.is_set():
                return
            await asyncio.sleep(0.001)
        raise RuntimeError(f"engine request {index} sent its last piece but never finished")

    def cancel(self) -> None:
        """Cancel whatever has not finished (no-op for finished requests); frees the slots."""
        for req in self.requests:
            if not req.done.is_set():
                req.cancel()


async def _until_disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _drain_or_cancel(request: Request, batch: _Batch) -> bool:
    """Wait for a non-streamed batch to finish; cancel it if the client leaves first.

    Returns True when it finished, False when the client disconnected.
    """
    import asyncio

    async def drain() -> None:
        async for _ in batch.events():
            pass

    work = asyncio.ensure_future(drain())
    watch = asyncio.ensure_future(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            batch.cancel()
    if work in done:
        work.result()  # re-raise a failure
        return True
    return False


# ---- the server --------------------------------------------------------------------------------

class Server:
    """The request handling, independent of the HTTP framework's routing (see `create_app`)."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None,
                 limits: ServeLimits | None = None) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.api_key = api_key or None
        self.limits = limits or ServeLimits()
        ctx = engine.context_length
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or ctx - 1, ctx - 1)
        self.max_tokens = self.limits.max_tokens or ctx
        self.created = int(time.time())
        from concurrent.futures import ThreadPoolExecutor

        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smallcoder-score")
        self._logged_fields: set[str] = set()
        self._log_lock = threading.Lock()
        fim = [self.tokenizer.token_to_id(t) for t in FIM_TOKENS]
        self.has_fim = all(i is not None for i in fim)
        if not _SCHEMAS:
            _SCHEMAS.update(_schemas())

    def close(self) -> None:
        self._scorer.shutdown(wait=False, cancel_futures=True)

    # -- common checks ----------------------------------------------------------------------------

    def check_auth(self, headers: Any) -> None:
        """401 unless the request carries the API key (`Authorization: Bearer KEY` or `x-api-key`)."""
        import secrets

        if self.api_key is None:
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not given or not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           type_="authentication_error", code="invalid_api_key")

    async def read_json(self, request: Request, kind: str) -> Any:
        """The body parsed into the request schema `kind`, or a 400/413 that says what is wrong."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {int(declared)} bytes; this server accepts at most {limit} bytes")
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is over {limit} bytes, the most this server accepts")
                chunks.append(chunk)
        except ClientDisconnect:
            raise _ClientGone() from None
        try:
            data = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
        from pydantic import ValidationError

        try:
            req = _SCHEMAS[kind].model_validate(data)
        except ValidationError as e:
            raise _validation_error(e, data) from None
        self._log_unused(req, kind)
        return req

    def _log_unused(self, req: Any, kind: str) -> None:
        """Accept fields this server does not use, logging each name once (not per request)."""
        extra = dict(req.model_extra or {})
        new = []
        for name, value in extra.items():
            if name in _QUIET_DEFAULTS and (not _QUIET_DEFAULTS[name] or value in _QUIET_DEFAULTS[name]):
                continue
            key = f"{kind}.{name}"
            with self._log_lock:
                if key in self._logged_fields:
                    continue
                self._logged_fields.add(key)
            new.append(name)
        if new:
            log.info("ignoring field(s) this server does not use in %s requests: %s", kind, ", ".join(sorted(new)))

    def _max_tokens(self, value: int | None, default: int, name: str = "max_tokens") -> int:
        if value is None:
            return default
        if value < 0:
            raise APIError(400, f"{name} must be >= 0, got {value}", param=name)
        if value > self.max_tokens:
            raise APIError(400, f"{name} is {value}; this server allows at most {self.max_tokens} "
                                f"(the --max-tokens limit)", param=name, code="max_tokens_exceeded")
        return value

    def _stop(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.limits.max_stop:
            raise APIError(400, f"stop has {len(stops)} strings; this server accepts at most {self.limits.max_stop}",
                           param="stop")
        for s in stops:
            if len(s) > self.limits.max_stop_chars:
                raise APIError(400, f"a stop string is {len(s)} characters; this server accepts at most "
                                    f"{self.limits.max_stop_chars}", param="stop")
        return tuple(s for s in stops if s)  # an empty stop string would end every completion at once

    def _params(self, req: Any, max_tokens: int, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        from .generate import SamplingParams

        if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
            raise APIError(400, f"seed {req.seed} is out of range [{SEED_RANGE[0]}, {SEED_RANGE[1]}]", param="seed")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        top_k = max(0, req.top_k or 0)
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=req.seed, stop=self._stop(req.stop) + extra_stop,
                                  stop_at_eos=not req.ignore_eos)
        except SmallCoderError as e:
            raise APIError(400, str(e)) from None

    def _n(self, n: int | None, prompts: int) -> int:
        n = 1 if n is None else n
        if n < 1:
            raise APIError(400, f"n must be >= 1, got {n}", param="n")
        if n * prompts > self.limits.max_choices:
            raise APIError(400, f"n ({n}) x prompts ({prompts}) = {n * prompts} choices; this server returns at "
                                f"most {self.limits.max_choices} per request", param="n")
        return n

    def _check_queue(self, jobs: int) -> None:
        queued = self.engine.num_queued
        if queued + jobs > self.limits.max_queue:
            raise APIError(503, f"server busy: {queued} requests are waiting for a slot (the --max-queue limit "
                                f"is {self.limits.max_queue}); retry shortly", type_="server_error", code="busy")

    async def _encode(self, prompts: Sequence[str | list[int]], param: str, scoring: bool = False
                      ) -> list[list[int]]:
        """Token ids of each prompt (strings tokenized off the event loop), with the prompt limit checked.

        A scoring-only request (`max_tokens: 0`) may fill the whole context: nothing is generated.
        """
        import asyncio

        texts = [p for p in prompts if isinstance(p, str)]
        try:
            encoded = iter(await asyncio.to_thread(self.tokenizer.encode_batch, texts) if texts else [])
        except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate: not encodable text
            raise APIError(400, f"{param} is not valid text ({e})", param=param) from None
        vocab = self.tokenizer.vocab_size
        limit = self.engine.context_length if scoring else self.max_prompt_tokens
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = next(encoded)
            else:
                bad = next((t for t in p if not 0 <= t < vocab), None)
                if bad is not None:
                    raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {vocab})",
                                   param=param)
                ids = list(p)
            ids = ids or [self.tokenizer.eos_id]  # an empty prompt starts from the document separator
            if len(ids) > limit:
                which = f"{param}[{i}]" if len(prompts) > 1 else param
                raise APIError(400, f"{which} is {len(ids)} tokens; this server accepts at most {limit} prompt "
                                    f"tokens (the model's context is {self.engine.context_length} tokens"
                                    f"{'' if scoring else ', one is kept to generate; --max-prompt-tokens'})",
                               param=param, code="context_length_exceeded")
            out.append(ids)
        return out

    # -- completions --------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Any:
        import uuid

        req = await self.read_json(request, "completion")
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
            if not self.has_fim:
                raise APIError(400, f"suffix needs fill-in-the-middle tokens ({', '.join(FIM_TOKENS)}), and this "
                                    "model's tokenizer lacks them", param="suffix")
            if req.echo:
                raise APIError(400, "echo cannot be combined with suffix", param="echo")
            if any(not isinstance(p, str) for p in prompts):
                raise APIError(400, "suffix needs a text prompt, not token ids", param="suffix")
            prompts = [f"<fim_prefix>{p}<fim_suffix>{req.suffix}<fim_middle>" for p in prompts]
        max_tokens = self._max_tokens(req.max_tokens if req.max_tokens is not None else req.max_completion_tokens,
                                      16, "max_tokens" if req.max_tokens is not None else "max_completion_tokens")
        logprobs = req.logprobs
        if logprobs is not None and not 0 <= logprobs <= self.limits.max_logprobs:
            raise APIError(400, f"logprobs must be in [0, {self.limits.max_logprobs}], got {logprobs}",
                           param="logprobs")
        if req.stream and logprobs is not None:
            raise APIError(400, "logprobs are not available when streaming; send stream: false", param="logprobs")
        n = self._n(req.n, len(prompts))
        params = self._params(req, max_tokens)
        ids = await self._encode(prompts, "prompt", scoring=max_tokens == 0)
        texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        echo = bool(req.echo)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if max_tokens == 0:  # nothing to generate: echo and/or scoring only, no engine slot needed
            choices = []
            for p, (text, prompt_ids) in enumerate(zip(texts, ids)):
                lp = await self._logprobs(prompt_ids, [], logprobs, echo=echo) if logprobs is not None else None
                for j in range(n):
                    choices.append({"index": p * n + j, "text": text if echo else "", "logprobs": lp,
                                    "finish_reason": "length"})
            usage = _usage(sum(len(i) for i in ids) * n, 0)
            body = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": choices, "usage": usage}
            if req.stream:
                return self._sse_static(body, "text_completion", _include_usage(req))
            return body

        jobs = [(prompt_ids, _seeded(params, j)) for prompt_ids in ids for j in range(n)]
        self._check_queue(len(jobs))
        batch = _Batch(self.engine, jobs)
        if req.stream:
            return self._stream_completion(batch, rid, created, [texts[k // n] for k in range(len(jobs))] if echo
                                           else None, _include_usage(req))
        if not await _drain_or_cancel(request, batch):
            return None
        choices = []
        for k, r in enumerate(batch.requests):
            comp = _completion(r)
            text = comp.text
            lp = None
            if logprobs is not None:
                lp = await self._logprobs(jobs[k][0], _text_tokens(self.tokenizer, comp.token_ids, text),
                                          logprobs, echo=echo)
            choices.append({"index": k, "text": (texts[k // n] if echo else "") + text, "logprobs": lp,
                            "finish_reason": comp.finish_reason})
        prompt_tokens = sum(len(j[0]) for j in jobs)
        completion_tokens = sum(len(_completion(r).token_ids) for r in batch.requests)
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}

    def _stream_completion(self, batch: _Batch, rid: str, created: int, echo: list[str] | None,
                           include_usage: bool) -> Any:
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}

        def chunk(index: int, text: str, finish: str | None) -> str:
            body = {**base, "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events() -> AsyncIterator[str]:
            if echo:
                for k, text in enumerate(echo):
                    yield chunk(k, text, None)
            async for index, piece in batch.events():
                if piece is None:
                    comp = _completion(batch.requests[index])
                    yield chunk(index, "", comp.finish_reason)
                elif piece:
                    yield chunk(index, piece, None)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": self._batch_usage(batch)})
            yield "data: [DONE]\n\n"

        return self._sse_response(events(), batch)

    # -- chat ---------------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Any:
        import uuid

        from .tokenizer import format_chat

        req = await self.read_json(request, "chat")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages.{i}.content")
                content = "".join(part.text for part in content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content})
        if not messages:
            raise APIError(400, "field 'messages' is empty", param="messages")
        try:
            prompt = format_chat(messages, add_generation_prompt=True, eos_token=self.tokenizer.eos_token)
        except SmallCoderError as e:
            raise APIError(400, str(e), param="messages") from None
        [ids] = await self._encode([prompt], "messages")
        name = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
        value = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
        max_tokens = self._max_tokens(value, min(self.max_tokens, self.engine.context_length - len(ids)), name)
        top = req.top_logprobs or 0
        if req.logprobs and not 0 <= top <= self.limits.max_logprobs:
            raise APIError(400, f"top_logprobs must be in [0, {self.limits.max_logprobs}], got {top}",
                           param="top_logprobs")
        if req.stream and req.logprobs:
            raise APIError(400, "logprobs are not available when streaming; send stream: false", param="logprobs")
        n = self._n(req.n, 1)
        params = self._params(req, max_tokens, extra_stop=(CHAT_STOP,))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if max_tokens == 0:
            choices = [{"index": j, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": "length"} for j in range(n)]
            return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": choices, "usage": _usage(len(ids) * n, 0)}
        jobs = [(ids, _seeded(params, j)) for j in range(n)]
        self._check_queue(len(jobs))
        batch = _Batch(self.engine, jobs)
        if req.stream:
            return self._stream_chat(batch, rid, created, _include_usage(req))
        if not await _drain_or_cancel(request, batch):
            return None
        choices = []
        for k, r in enumerate(batch.requests):
            comp = _completion(r)
            lp = None
            if req.logprobs:
                lp = _chat_logprobs(await self._logprobs(ids, _text_tokens(self.tokenizer, comp.token_ids, comp.text),
                                                         max(top, 1), echo=False), top)
            choices.append({"index": k, "message": {"role": "assistant", "content": comp.text.lstrip()},
                            "logprobs": lp, "finish_reason": comp.finish_reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": choices, "usage": self._batch_usage(batch)}

    def _stream_chat(self, batch: _Batch, rid: str, created: int, include_usage: bool) -> Any:
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}

        def chunk(index: int, delta: dict[str, str], finish: str | None) -> str:
            body = {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events() -> AsyncIterator[str]:
            started = [False] * len(batch.requests)
            for k in range(len(batch.requests)):
                yield chunk(k, {"role": "assistant", "content": ""}, None)
            async for index, piece in batch.events():
                if piece is None:
                    yield chunk(index, {}, _completion(batch.requests[index]).finish_reason)
                    continue
                if not started[index]:  # the answer follows "Assistant:" after a space: drop it
                    piece = piece.lstrip()
                    started[index] = bool(piece)
                if piece:
                    yield chunk(index, {"content": piece}, None)
            if include_usage:
                yield _sse({**base, "choices": [], "usage": self._batch_usage(batch)})
            yield "data: [DONE]\n\n"

        return self._sse_response(events(), batch)

    # -- llama.cpp /infill --------------------------------------------------------------------------

    async def infill(self, request: Request) -> Any:
        """llama.cpp's `/infill`: `[input_extra]<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>{prompt}`."""
        req = await self.read_json(request, "infill")
        if not self.has_fim:
            raise APIError(400, f"/infill needs fill-in-the-middle tokens ({', '.join(FIM_TOKENS)}), and this "
                                "model's tokenizer lacks them")
        extra = "".join(chunk.text for chunk in req.input_extra or [])
        prompt = f"{extra}<fim_prefix>{req.input_prefix}<fim_suffix>{req.input_suffix}<fim_middle>{req.prompt}"
        [ids] = await self._encode([prompt], "input_prefix")
        value = req.n_predict if req.n_predict is not None else req.max_tokens
        if value is not None and value < 0:  # llama.cpp: -1 = until the context is full
            value = None
        max_tokens = self._max_tokens(value, min(self.max_tokens, self.engine.context_length - len(ids)), "n_predict")
        params = self._params(req, max_tokens)
        t0 = time.perf_counter()

        def final(content: str, comp: Any | None) -> dict[str, Any]:
            """llama.cpp's closing object: the text (empty when streamed), why it stopped, counts, timings."""
            seconds = time.perf_counter() - t0
            predicted = len(comp.token_ids) if comp else 0
            word = _stop_word(self.tokenizer, comp, params) if comp else ""
            stop_type = "limit" if comp is None or comp.finish_reason == "length" else "word" if word else "eos"
            return {"content": content, "stop": True, "index": 0, "model": self.model_name, "stop_type": stop_type,
                    "stopping_word": word, "tokens_predicted": predicted, "tokens_evaluated": len(ids),
                    "truncated": False,
                    "timings": {"prompt_n": len(ids), "predicted_n": predicted, "predicted_ms": seconds * 1000,
                                "predicted_per_second": predicted / seconds if seconds > 0 else 0.0}}

        if max_tokens == 0:
            return final("", None)
        self._check_queue(1)
        batch = _Batch(self.engine, [(ids, params)])
        if req.stream:
            async def events() -> AsyncIterator[str]:
                async for _, piece in batch.events():
                    if piece is None:
                        yield _sse(final("", _completion(batch.requests[0])))
                    elif piece:
                        yield _sse({"content": piece, "stop": False, "index": 0})
            return self._sse_response(events(), batch)
        if not await _drain_or_cancel(request, batch):
            return None
        comp = _completion(batch.requests[0])
        return final(comp.text, comp)

    # -- helpers ------------------------------------------------------------------------------------

    def _batch_usage(self, batch: _Batch) -> dict[str, int]:
        comps = [_completion(r) for r in batch.requests]
        return _usage(sum(c.prompt_tokens for c in comps), sum(len(c.token_ids) for c in comps))

    def _sse_response(self, events: AsyncIterator[str], batch: _Batch) -> Any:
        return _make_stream_response(_guard_stream(events), batch)

    def _sse_static(self, body: dict[str, Any], obj: str, include_usage: bool) -> Any:
        """A stream for a request with nothing to generate: its choices, usage, [DONE]."""
        async def events() -> AsyncIterator[str]:
            for choice in body["choices"]:
                yield _sse({**body, "object": obj, "choices": [choice], **({"usage": None} if include_usage else {})})
            if include_usage:
                yield _sse({**body, "choices": []})
            yield "data: [DONE]\n\n"
        return _make_stream_response(events(), None)

    async def _logprobs(self, prompt: list[int], generated: list[int], top: int, echo: bool) -> dict[str, Any]:
        """OpenAI completions `logprobs` for the generated tokens (and the prompt's with `echo`).

        Scoring and decoding run on one worker thread (one forward pass at a time), off the event loop.
        """
        import asyncio

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._scorer, self._build_logprobs, prompt, generated, top, echo)

    def _build_logprobs(self, prompt: list[int], generated: list[int], top: int, echo: bool) -> dict[str, Any]:
        ids = prompt + generated
        first = 0 if echo else len(prompt)
        scored = self.engine.token_logprobs(ids, top, start=max(first, 1))
        decode_batch = self.tokenizer.backend.decode_batch
        tokens = decode_batch([[t] for t in ids[first:]], skip_special_tokens=False)
        offset = 0 if echo else len(self.tokenizer.decode(prompt))
        token_lps: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets = []
        if echo:  # the first token has no context to be predicted from
            token_lps.append(None)
            tops.append(None)
        for lp, alternatives in scored:
            token_lps.append(lp)
            names = decode_batch([[t] for t, _ in alternatives], skip_special_tokens=False) if alternatives else []
            tops.append({name: v for name, (_, v) in zip(names, alternatives)})
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}


def _validation_error(e: Any, data: dict[str, Any]) -> APIError:
    """A 400 naming the field, what it must be and the value given, from pydantic's first error."""
    err = e.errors()[0]
    # drop the union-member tags pydantic adds to the location ("prompt.list[int]" -> "prompt")
    loc = [p for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "float", "bool"))]
    where = ".".join(str(p) for p in loc) or "body"
    value: Any = data
    for p in loc:
        value = value[p] if isinstance(value, (dict, list)) and (isinstance(p, int) or p in value) else None
    shown = json.dumps(value, default=str)[:80]
    field = str(loc[-1]) if loc else ""
    if field in _UNION_FIELDS and err["type"] != "missing":
        message = f"field '{where}' must be {_UNION_FIELDS[field]} (got {shown})"
    elif err["type"] == "missing":
        message = f"field '{where}' is required"
    else:
        message = f"field '{where}': {err['msg']} (got {shown})"
    return APIError(400, message, param=where)


def _text_tokens(tokenizer: Any, token_ids: list[int], text: str) -> list[int]:
    """The generated ids that make up `text` (a stop string cut the text; drop the ids past it)."""
    for k in range(len(token_ids) + 1):
        if len(tokenizer.decode(token_ids[:k])) >= len(text):
            return token_ids[:k]
    return token_ids


def _chat_logprobs(lp: dict[str, Any], top: int) -> dict[str, Any]:
    content = []
    for token, value, alternatives in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        content.append({"token": token, "logprob": value, "bytes": list(token.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8", "replace"))}
                                         for t, v in list((alternatives or {}).items())[:top]]})
    return {"content": content}


def _completion(req: Any) -> Any:
    """A finished engine request's Completion; an engine failure or shutdown becomes an APIError."""
    if req.error is not None:
        raise APIError(500, f"generation failed: {req.error}", type_="server_error")
    comp = req.completion
    if comp is None or comp.finish_reason == "cancelled":
        raise APIError(503, "generation was cancelled (the server is shutting down)", type_="server_error")
    return comp


def _stop_word(tokenizer: Any, comp: Any, params: SamplingParams) -> str:
    """The stop string that ended a completion ("" when it ended on EOS or its length)."""
    if comp.finish_reason != "stop" or not params.stop:
        return ""
    rest = tokenizer.decode(comp.token_ids)[len(comp.text):]
    return next((s for s in params.stop if rest.startswith(s)), "")


def _seeded(params: SamplingParams, j: int) -> SamplingParams:
    """Params of the j-th of n samples: its own seed (seed + j) so the n samples differ."""
    if j == 0 or params.seed is None:
        return params
    from dataclasses import replace

    return replace(params, seed=(params.seed + j) % 2**63)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _include_usage(req: Any) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _guard_stream(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Turn a failure mid-stream into an `error` event (the status line is already sent)."""
    try:
        async for event in events:
            yield event
    except APIError as e:
        yield _sse(e.body())
    except Exception as e:
        log.exception("stream failed")
        yield _sse(APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").body())


def _make_stream_response(events: AsyncIterator[str], batch: _Batch | None) -> Any:
    """A text/event-stream response that cancels its engine requests however it ends."""
    from starlette.responses import StreamingResponse

    class EngineStream(StreamingResponse):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:  # a disconnect lands here too: free the slots now, not at garbage collection
                if batch is not None:
                    batch.cancel()

    return EngineStream(events, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine: Engine, model_name: str = "smallcoder", api_key: str | None = None,
               limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine's scheduler on startup and closes it on shutdown."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server = Server(engine, model_name, api_key, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.close()
            server.close()

    app = FastAPI(title="SmallCoder", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # the client gets a JSON 500; Starlette re-raises afterwards so uvicorn logs the traceback
        body = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").body()
        return JSONResponse(body, status_code=500)

    # Plain Starlette routes: each endpoint takes the Request and returns a Response, so nothing
    # depends on FastAPI resolving the (postponed) annotations of these nested functions.
    def route(path: str, method: str, handler: Callable[[Request], Any], auth: bool = True) -> None:
        async def endpoint(request: Request) -> Response:
            if auth:
                server.check_auth(request.headers)
            try:
                result = await handler(request)
            except SmallCoderError as e:  # e.g. the engine refusing a prompt
                raise APIError(400, str(e)) from None
            except _ClientGone:
                result = None
            if result is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            return result if isinstance(result, Response) else JSONResponse(result)
        app.add_route(path, endpoint, methods=[method])

    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": server.created,
                                            "owned_by": "smallcoder", "max_model_len": engine.context_length}]}

    async def health(request: Request) -> dict[str, Any]:
        if not engine.alive:
            raise APIError(503, "the engine loop is not running", type_="server_error", code="engine_stopped")
        return {"status": "ok", "model": model_name, "active": engine.num_active, "queued": engine.num_queued,
                "max_batch": engine.max_batch, "context_length": engine.context_length}

    route("/v1/completions", "POST", server.completions)
    route("/v1/chat/completions", "POST", server.chat)
    route("/infill", "POST", server.infill)
    route("/v1/models", "GET", models)
    route("/health", "GET", health, auth=False)
    return app


# ---- CLI ---------------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a SmallCoderError naming both (port 0 = any free port)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SmallCoderError(f"--host {host!r}: cannot resolve it ({e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SmallCoderError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> None:
    # OpenMP threads that spin between ops starve the event loop and the engine's Python work of
    # the cores they share (measured: 2.9 vs 120 tok/s for one client on 2 busy cores); let them
    # sleep instead. Read when torch loads, so only effective if torch is not imported yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from .checkpoint import load
    from .generate import Engine

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    for name, value in (("--port", args.port), ("--max-batch", args.max_batch)):
        if value < (0 if name == "--port" else 1):
            raise SmallCoderError(f"{name} must be {'>= 0' if name == '--port' else '>= 1'}, got {value}")
    api_key = args.api_key or os.environ.get("SMALLCODER_API_KEY") or None
    if not _is_loopback(args.host):
        log.warning("listening on %s, reachable from other machines%s", args.host,
                    "" if api_key else " WITHOUT an API key (set --api-key or SMALLCODER_API_KEY)")
    if args.threads is not None:
        if args.threads < 1:
            raise SmallCoderError(f"--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_queue=args.max_queue)
    sock = bind_socket(args.host, args.port)  # fail fast, before the model loads
    try:
        model, tokenizer = load(args.model, dtype=args.dtype)
    except BaseException:
        sock.close()
        raise
    engine = Engine(model, tokenizer, max_batch=args.max_batch)
    app = create_app(engine, model_name=args.model_name or args.model, api_key=api_key, limits=limits)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {args.model_name or args.model} ({args.dtype}, max batch {args.max_batch}, context "
          f"{engine.context_length}) at http://{shown}:{port}/v1{' (API key required)' if api_key else ''}",
          flush=True)
    # limit_concurrency: connections beyond it get an immediate 503 instead of exhausting memory or files
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5,
                            access_log=args.log_level == "debug", limit_concurrency=1024)
    uvicorn.Server(config).run(sockets=[sock])


def register(subparsers: Any) -> None:
    """Add the `serve` command."""
    from .cli import add_model_args

    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, FIM infill, streaming)",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, "
                    "/infill (llama.cpp), /v1/models, /health. Concurrent requests share one batch.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY); default: $SMALLCODER_API_KEY, else none")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); fewer when the cores are shared")
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: --model)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: context length - 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: context length)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 503s")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)

"""What every endpoint shares: the engine and limits, auth, reading a request, encoding prompts,
the queue bound, and scoring through the engine's queue."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..checks import known
from ..prompts import FIM_ORDERS, fim_split, has_fim
from .bridge import Batch, ClientGone, drain_or_cancel
from .clients import SlotOwners
from .fim import NEEDS_FIM, FimBuilder
from .limits import ServeLimits
from .protocol import QUIET_DEFAULTS, APIError, parse_request
from .responses import completion_logprobs, result_of, score_job

if TYPE_CHECKING:
    from pydantic import BaseModel
    from starlette.requests import Request

    from ..inference import Engine

log = logging.getLogger("smallcoder.serve")

class Server:
    """The state and checks the endpoint modules (completions, chat, infill) share."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None = None,
                 limits: ServeLimits | None = None, fim_order: str = "spm") -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.api_key = api_key or None
        self.limits = limits or ServeLimits()
        ctx = engine.context_length
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or ctx - 1, ctx - 1)
        self.max_tokens = self.limits.max_tokens or ctx
        self.created = int(time.time())
        self._logged_fields: set[str] = set()
        self._log_lock = threading.Lock()
        self.has_fim = has_fim(self.tokenizer)
        self.fim_order = known(fim_order, "FIM order (--fim-order)", FIM_ORDERS)
        self.fim = FimBuilder(self.tokenizer, self.fim_order) if self.has_fim else None
        self.slots = SlotOwners()  # each client's slot and the request it runs (llama.cpp's id_slot)

    def require_fim(self, what: str, param: str) -> FimBuilder:
        """The FIM prompt builder, or a 400 naming `param` when the tokenizer has no FIM tokens."""
        if self.fim is None:
            raise APIError(400, f"{what} {NEEDS_FIM}", param=param)
        return self.fim

    def fim_limit(self, reserve: int) -> int:
        """The most tokens a FIM prompt keeps when `reserve` new tokens are asked for: the room held
        back for them is at most a quarter of the context (the prompt is the editor's file)."""
        ctx = self.engine.context_length
        return min(self.max_prompt_tokens, ctx - max(1, min(reserve, ctx // 4)))

    async def prompt_ids(self, prompts: Sequence[str | list[int]], param: str, reserve: int
                         ) -> list[tuple[list[int], bool]]:
        """(token ids, whether cut) of each prompt to generate from: a text an editor filled in as a
        FIM prompt (`prompts.fim_split`) is built anew in this server's order and cut to fit
        (`fim`); any other prompt is taken as it is (over the limit: 400)."""
        out = []
        for i, p in enumerate(prompts):
            name = f"{param}[{i}]" if len(prompts) > 1 else param
            parts = fim_split(p) if isinstance(p, str) else None
            if parts is None:
                out.append(((await self.encode([p], name))[0], False))
                continue
            head, prefix, suffix, middle = parts
            fim = await self.require_fim("a fill-in-the-middle prompt", param).build(
                prefix, suffix, middle, head, self.fim_limit(reserve), name)
            out.append((fim.ids, fim.truncated))
        return out

    def check_auth(self, headers: Any) -> None:
        """401 unless the request carries the API key (`Authorization: Bearer KEY` or `x-api-key`)."""
        if self.api_key is None:
            return
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else headers.get("x-api-key", "")
        if not given or not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                           type_="authentication_error", code="invalid_api_key")

    async def read(self, request: Request, schema: type[BaseModel], kind: str) -> Any:
        """The body parsed into `schema`, or a 400/408/413 that says what is wrong."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {int(declared)} bytes; this server accepts at most {limit} bytes")
        try:
            raw = await asyncio.wait_for(self._body(request, limit), timeout=self.limits.body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"request body not received within {self.limits.body_timeout:g} s "
                                "(the --body-timeout limit)") from None
        req = parse_request(raw, schema)
        self._log_unused(req, kind)
        return req

    @staticmethod
    async def _body(request: Request, limit: int) -> bytes:
        from starlette.requests import ClientDisconnect

        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"request body is over {limit} bytes, the most this server accepts")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientGone() from None
        return b"".join(chunks)

    def _log_unused(self, req: Any, kind: str) -> None:
        """Accept fields this server does not use, logging each name once (not per request)."""
        new = []
        for name, value in dict(req.model_extra or {}).items():
            if name in QUIET_DEFAULTS and (not QUIET_DEFAULTS[name] or value in QUIET_DEFAULTS[name]):
                continue
            key = f"{kind}.{name}"
            with self._log_lock:
                if key in self._logged_fields:
                    continue
                self._logged_fields.add(key)
            new.append(name)
        if new:
            log.info("ignoring field(s) this server does not use in %s requests: %s", kind, ", ".join(sorted(new)))

    def note_once(self, key: str, message: str) -> None:
        """Log `message` the first time `key` comes up (a behaviour clients should know of, not per request)."""
        with self._log_lock:
            if key in self._logged_fields:
                return
            self._logged_fields.add(key)
        log.info("%s", message)

    def max_new_tokens(self, value: int | None, default: int, name: str = "max_tokens") -> int:
        """A request's token budget: its own (within --max-tokens), else `default`."""
        if value is None:
            return default
        if value < 0:
            raise APIError(400, f"{name} must be >= 0, got {value}", param=name)
        if value > self.max_tokens:
            raise APIError(400, f"{name} is {value}; this server allows at most {self.max_tokens} "
                                f"(the --max-tokens limit)", param=name, code="max_tokens_exceeded")
        return value

    def check_queue(self, jobs: int) -> None:
        """503 when `jobs` more engine requests (generation or scoring) would overfill the queue."""
        queued = self.engine.num_queued
        if queued + jobs > self.limits.max_queue:
            raise APIError(503, f"server busy: {queued} requests are waiting for the engine (the --max-queue "
                                f"limit is {self.limits.max_queue}); retry shortly", type_="server_error", code="busy")

    async def encode(self, prompts: Sequence[str | list[int]], param: str, scoring: bool = False) -> list[list[int]]:
        """Token ids of each prompt (strings tokenized off the event loop), with the prompt limit checked.

        A scoring-only request (`max_tokens: 0`) may fill the whole context: nothing is generated.
        """
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

    async def logprobs(self, request: Request, items: Sequence[tuple[list[int], list[int]]], top: int,
                       echo: bool) -> list[dict[str, Any]] | None:
        """Completions `logprobs` for each (prompt ids, generated ids), scored as engine requests
        (queued behind the others, cancelled when the client leaves); None if it left."""
        batch = Batch.score(self.engine, [score_job(p, g, top, echo) for p, g in items])
        if not await drain_or_cancel(request, batch):
            return None
        return [completion_logprobs(self.tokenizer, p, g, echo, result_of(r))
                for (p, g), r in zip(items, batch.requests)]

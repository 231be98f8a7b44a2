"""The engine <-> asyncio bridge: engine requests (run on the engine's thread) as async events.

The engine calls each request's `on_piece` with its text pieces and, once the request's result
is in place, with None; the callbacks only hand these to the event loop, so a handler that reads
None can read the result at once (no polling).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request

    from ..inference import Engine, SamplingParams

OnPiece = Callable[[str | None], None]


class ClientGone(Exception):
    """The client disconnected before its request was complete: nothing to answer."""


class Batch:
    """The engine requests of one HTTP request, their pieces merged into one asyncio queue."""

    def __init__(self, submits: Sequence[Callable[[OnPiece], Any]]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()
        self.requests: list[Any] = []
        self.superseded = False  # cancelled by the same client's newer request (`clients.SlotOwners`)
        try:
            for i, submit in enumerate(submits):
                self.requests.append(submit(self._callback(i)))
        except BaseException:
            self.cancel()
            raise

    @classmethod
    def generate(cls, engine: Engine, jobs: Sequence[tuple[list[int], SamplingParams]], warm: bool = False) -> Batch:
        """Generation requests; `warm` ones only prefill (`Engine.submit`)."""
        return cls([lambda cb, ids=ids, p=p: engine.submit(ids, p, on_piece=cb, warm=warm) for ids, p in jobs])

    @classmethod
    def score(cls, engine: Engine, jobs: Sequence[tuple[list[int], int, int]]) -> Batch:
        """Scoring requests (ids, top, start): queued and cancelled like any generation."""
        return cls([lambda cb, j=j: engine.submit_score(*j, on_piece=cb) for j in jobs])

    def _callback(self, index: int) -> OnPiece:
        def on_piece(piece: str | None) -> None:  # runs on the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, piece))
            except RuntimeError:  # the event loop is closed (server shutting down): nobody listens
                pass
        return on_piece

    async def events(self) -> AsyncIterator[tuple[int, str | None]]:
        """(request index, text piece) until every request ended; None marks one's end, its
        result already in place."""
        open_ = set(range(len(self.requests)))
        while open_:
            index, piece = await self.queue.get()
            if piece is None:
                open_.discard(index)
            yield index, piece

    def cancel(self, warm: bool = False) -> None:
        """Cancel whatever has not finished (no-op for finished requests); frees the slots. A warm
        request (prefill only) is left to finish, its keys and values for whoever comes next, unless
        `warm`: a client's newer request replaces it (and computes the same prefix itself)."""
        for req in self.requests:
            if not req.done.is_set() and (warm or not getattr(req, "warm", False)):
                req.cancel()


async def until_disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def drain_or_cancel(request: Request, batch: Batch, events: AsyncIterator[Any] | None = None) -> bool:
    """Wait for a non-streamed batch to finish (its `events()`, or the `events` given); cancel it
    if the client leaves first.

    Returns True when it finished, False when the client disconnected.
    """
    async def drain() -> None:
        async for _ in (batch.events() if events is None else events):
            pass

    work = asyncio.ensure_future(drain())
    watch = asyncio.ensure_future(until_disconnected(request))
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

"""Connection admission: header timeouts and per-client connection limits for uvicorn.

uvicorn waits for a request's head as long as a client likes, and its `limit_concurrency` counts
idle connections too, so ~1,000 connections that each send half a request line made every
request, `/health` included, answer 503 for as long as they stayed open. Here every connection
has `header_timeout` seconds to send each request's head (else 408 and closed; after a response,
the next head gets the same time), one client address may hold `max_connections_per_client`
connections and all clients together `max_connections`. A new connection over either bound first
evicts the oldest connection that is only waiting for a request head (408: idle connections are
cheap to reopen, a request in progress is not); only when none is idle is it refused (429 / 503).
So idle half-requests cannot starve anyone, not even a `/health` probe from the same address. The body has its own timeout
(`Server.read`). Built on uvicorn's HTTP protocol class: only its documented-by-use hooks
(`connection_made`, `data_received`, `connection_lost`, `on_response_complete`, `cycle`) are used.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter, OrderedDict
from typing import Any

from .limits import ServeLimits


def _reply(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class _Guard:
    """What all connections of one server share: the bounds, the replies, the counts, the idle set."""

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.open_per_client: Counter[str] = Counter()
        self.idle: OrderedDict[Any, str] = OrderedDict()  # connections waiting for a head, oldest first
        self.timeout_reply = _reply(408, "Request Timeout", f"no complete request head within "
                                    f"{limits.header_timeout:g} s (the --header-timeout limit)", "header_timeout")
        self.per_client_reply = _reply(429, "Too Many Requests", f"this client already holds "
                                       f"{limits.max_connections_per_client} connections (the "
                                       "--max-connections-per-client limit); close some first", "too_many_connections")
        self.total_reply = _reply(503, "Service Unavailable", f"the server holds {limits.max_connections} "
                                  "connections (the --max-connections limit); retry shortly", "too_many_connections")
        self.evicted_reply = _reply(408, "Request Timeout", "closed while waiting for a request head: a newer "
                                    "connection needed the room (--max-connections / --max-connections-per-client)",
                                    "evicted_idle")

    def admit(self, client: str) -> bytes | None:
        """Make room for a new connection of `client` (evicting idle ones); the refusal, or None."""
        if self.open_per_client[client] >= self.limits.max_connections_per_client and not self.evict(client):
            return self.per_client_reply
        if sum(self.open_per_client.values()) >= self.limits.max_connections and not self.evict(None):
            return self.total_reply
        self.open_per_client[client] += 1
        return None

    def evict(self, client: str | None) -> bool:
        """Close the oldest idle connection (of `client`, or of anyone); False if there is none."""
        victim = next((c for c, owner in self.idle.items() if client is None or owner == client), None)
        if victim is None:
            return False
        victim._close_idle(self.evicted_reply)
        return True

    def release(self, client: str) -> None:
        self.open_per_client[client] -= 1
        if self.open_per_client[client] <= 0:
            del self.open_per_client[client]


def refuse(transport: asyncio.BaseTransport, reply: bytes) -> None:
    """Answer and close politely: the reply, then end of stream, then close a second later (what
    the client sent meanwhile is read and dropped: closing on unread data would reset the
    connection and lose the reply)."""
    transport.write(reply)
    if transport.can_write_eof():
        transport.write_eof()
    asyncio.get_running_loop().call_later(1.0, transport.close)


class GuardedMixin:
    """The connection bounds, mixed in front of uvicorn's HTTP protocol class (`guarded_protocol`)."""

    _guard: _Guard
    _client_key: str | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _waiting_since: Any = None  # the request cycle that was current when the head timer started

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        key = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer)
        refusal = self._guard.admit(key)
        if refusal is not None:
            refuse(transport, refusal)
            return
        self._client_key = key
        super().connection_made(transport)  # type: ignore[misc]
        self._await_head()

    def _close_idle(self, reply: bytes) -> None:
        """Evicted or timed out while waiting for a head: its room is freed now; it gets the reply
        and is closed politely (what it sent but the loop has not read yet must not turn the close
        into a reset that loses the reply)."""
        self._stop_timer()
        if self._client_key is not None and not self.transport.is_closing():  # type: ignore[attr-defined]
            refuse(self.transport, reply)  # type: ignore[attr-defined]
        self._release()

    def _release(self) -> None:
        if self._client_key is not None:
            self._guard.release(self._client_key)
            self._client_key = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._client_key is None and not hasattr(self, "transport"):
            return  # refused in connection_made: uvicorn never saw it
        self._release()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._client_key is None:  # refused or evicted: dropped
            return
        super().data_received(data)  # type: ignore[misc]
        if self._head_timer is not None and self.cycle is not self._waiting_since:  # type: ignore[attr-defined]
            self._stop_timer()  # a new request's head is complete

    def on_response_complete(self) -> None:
        before = self.cycle  # type: ignore[attr-defined]
        super().on_response_complete()  # type: ignore[misc]
        if self.cycle is before and not self.transport.is_closing():  # type: ignore[attr-defined]
            self._await_head()  # no pipelined request began: wait for the next head

    def _await_head(self) -> None:
        self._stop_timer()
        self._waiting_since = self.cycle  # type: ignore[attr-defined]
        self._head_timer = self.loop.call_later(self._guard.limits.header_timeout,  # type: ignore[attr-defined]
                                                self._head_timed_out)
        self._guard.idle[self] = self._client_key

    def _stop_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._guard.idle.pop(self, None)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is self._waiting_since:  # type: ignore[attr-defined]
            self._close_idle(self._guard.timeout_reply)


def guarded_protocol(base: type[asyncio.Protocol], limits: ServeLimits) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol `base` that enforces `limits`' connection bounds."""
    return type(f"Guarded{base.__name__}", (GuardedMixin, base), {"_guard": _Guard(limits)})

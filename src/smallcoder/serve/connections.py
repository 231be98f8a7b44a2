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


def guarded_protocol(base: type[asyncio.Protocol], limits: ServeLimits) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol `base` that enforces `limits`' connection bounds."""
    open_per_client: Counter[str] = Counter()
    idle: OrderedDict[Any, str] = OrderedDict()  # connections waiting for a head, oldest first -> client
    timeout_reply = _reply(408, "Request Timeout", f"no complete request head within {limits.header_timeout:g} s "
                           "(the --header-timeout limit)", "header_timeout")
    per_client_reply = _reply(429, "Too Many Requests", f"this client already holds "
                              f"{limits.max_connections_per_client} connections (the --max-connections-per-client "
                              "limit); close some first", "too_many_connections")
    total_reply = _reply(503, "Service Unavailable", f"the server holds {limits.max_connections} connections "
                         "(the --max-connections limit); retry shortly", "too_many_connections")
    evicted_reply = _reply(408, "Request Timeout", "closed while waiting for a request head: a newer connection "
                           "needed the room (--max-connections / --max-connections-per-client)", "evicted_idle")

    def evict(client: str | None) -> bool:
        """Close the oldest idle connection (of `client`, or of anyone); False if there is none."""
        victim = next((c for c, owner in idle.items() if client is None or owner == client), None)
        if victim is None:
            return False
        victim._close_idle(evicted_reply)
        return True

    class Guarded(base):  # type: ignore[valid-type, misc]
        _client_key: str | None = None
        _head_timer: asyncio.TimerHandle | None = None
        _waiting_since: Any = None  # the request cycle that was current when the head timer started

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            key = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer)
            reply = None
            if open_per_client[key] >= limits.max_connections_per_client and not evict(key):
                reply = per_client_reply
            elif sum(open_per_client.values()) >= limits.max_connections and not evict(None):
                reply = total_reply
            if reply is None:
                self._client_key = key
                open_per_client[key] += 1
                super().connection_made(transport)
                self._await_head()
                return
            self._refuse(transport, reply)

        def _refuse(self, transport: asyncio.BaseTransport, reply: bytes) -> None:
            """Answer and close politely: the reply, then end of stream, then close a second later
            (what the client sent meanwhile is read and dropped: closing on unread data would
            reset the connection and lose the reply)."""
            transport.write(reply)
            if transport.can_write_eof():
                transport.write_eof()
            asyncio.get_running_loop().call_later(1.0, transport.close)

        def _close_idle(self, reply: bytes) -> None:
            """Evicted or timed out while waiting for a head: its room is freed now; it gets the
            reply and is closed politely (what it sent but the loop has not read yet must not turn
            the close into a reset that loses the reply)."""
            self._stop_timer()
            if self._client_key is not None and not self.transport.is_closing():
                self._refuse(self.transport, reply)
            self._release()

        def _release(self) -> None:
            if self._client_key is None:
                return
            open_per_client[self._client_key] -= 1
            if open_per_client[self._client_key] <= 0:
                del open_per_client[self._client_key]
            self._client_key = None

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            if self._client_key is None and not hasattr(self, "transport"):
                return  # refused in connection_made: uvicorn never saw it
            self._release()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._client_key is None:  # refused: dropped
                return
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not self._waiting_since:
                self._stop_timer()  # a new request's head is complete

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            if self.cycle is before and not self.transport.is_closing():  # no pipelined request began
                self._await_head()

        def _await_head(self) -> None:
            self._stop_timer()
            self._waiting_since = self.cycle
            self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)
            idle[self] = self._client_key

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            idle.pop(self, None)

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is self._waiting_since:
                self._close_idle(timeout_reply)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded

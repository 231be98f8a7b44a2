"""Connection admission: header timeouts and per-client connection limits for uvicorn.

uvicorn waits for a request's head as long as a client likes, and its `limit_concurrency` counts
idle connections too, so ~1,000 connections that each send half a request line made every
request, `/health` included, answer 503 for as long as they stayed open. Here every connection
has `header_timeout` seconds to send each request's head (else 408 and closed; after a response,
the next head gets the same time), one client address may hold `max_connections_per_client`
connections (more get 429 at once) and all clients together `max_connections` (more get 503), so
one client's idle half-requests cannot starve the others. The body has its own timeout
(`Server.read`). Built on uvicorn's HTTP protocol class: only its documented-by-use hooks
(`connection_made`, `data_received`, `connection_lost`, `on_response_complete`, `cycle`) are used.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from .limits import ServeLimits


def _reply(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def guarded_protocol(base: type[asyncio.Protocol], limits: ServeLimits) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol `base` that enforces `limits`' connection bounds."""
    open_per_client: Counter[str] = Counter()
    timeout_reply = _reply(408, "Request Timeout", f"no complete request head within {limits.header_timeout:g} s "
                           "(the --header-timeout limit)", "header_timeout")
    per_client_reply = _reply(429, "Too Many Requests", f"this client already holds "
                              f"{limits.max_connections_per_client} connections (the --max-connections-per-client "
                              "limit); close some first", "too_many_connections")
    total_reply = _reply(503, "Service Unavailable", f"the server holds {limits.max_connections} connections "
                         "(the --max-connections limit); retry shortly", "too_many_connections")

    class Guarded(base):  # type: ignore[valid-type, misc]
        _client_key: str | None = None
        _head_timer: asyncio.TimerHandle | None = None
        _waiting_since: Any = None  # the request cycle that was current when the head timer started

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = transport.get_extra_info("peername")
            key = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else str(peer)
            if sum(open_per_client.values()) >= limits.max_connections:
                reply = total_reply
            elif open_per_client[key] >= limits.max_connections_per_client:
                reply = per_client_reply
            else:
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

        def connection_lost(self, exc: Exception | None) -> None:
            if self._client_key is None:  # refused in connection_made: uvicorn never saw it
                return
            open_per_client[self._client_key] -= 1
            if open_per_client[self._client_key] <= 0:
                del open_per_client[self._client_key]
            self._client_key = None
            self._stop_timer()
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

        def _stop_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.cycle is self._waiting_since and not self.transport.is_closing():
                self.transport.write(timeout_reply)
                self.transport.close()  # uvicorn's parser has read everything sent: nothing is reset

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded

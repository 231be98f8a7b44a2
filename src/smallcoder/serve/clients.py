"""Same-client replacement: a new request cancels the stale one of the same client at once.

What makes two requests "the same client" is what the editors send. llama.vscode names a slot in
every `/infill` request (`id_slot: 0`; in llama.cpp, one slot holds one sequence) and sends one
request per keystroke, so a request that names a slot replaces the request of the same client in
that slot: same address, same credentials (`Authorization` or `x-api-key`), same `User-Agent`,
same `id_slot`. Continue and Tabby name no slot; they cancel a stale request by closing its
connection, which cancels it at once already (`bridge`). A request that generates nothing (a
warm-up, `n_predict: 0`) replaces nothing. The replaced request stops all its work, the prefill
that goes on after a late answer (`t_max_prompt_ms`) included: a prefill stops between chunks and
keeps those done, which the newer request reuses. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.requests import Request

    from .bridge import Batch

Key = tuple[str, str, str, int]


def client_key(request: Request, id_slot: int | None) -> Key | None:
    """The key of the slot a request names, or None when it names none (`id_slot` absent or -1)."""
    if id_slot is None or id_slot < 0:
        return None
    h = request.headers
    host = request.client.host if request.client else ""
    return host, h.get("authorization") or h.get("x-api-key") or "", h.get("user-agent", ""), id_slot


class SlotOwners:
    """The batch each client's slot runs now."""

    def __init__(self) -> None:
        self._current: dict[Key, Any] = {}

    def take(self, key: Key | None, batch: Batch) -> None:
        """`batch` is `key`'s request now: the one it replaces is cancelled and marked superseded."""
        if key is None:
            return
        old = self._current.get(key)
        self._current[key] = batch
        if old is not None and old is not batch:
            old.superseded = True
            old.cancel(warm=True)  # a prefill still running for it is stale too

    def release(self, key: Key | None, batch: Batch) -> None:
        if key is not None and self._current.get(key) is batch:
            del self._current[key]

"""Prefix reuse: which cache row a new prompt goes to, and how much of it is already computed.

A free cache row keeps the keys and values its last prompt's prefill computed (whole prefill
chunks only: see `Engine`). A new prompt goes to the free row that shares its longest
chunk-aligned prefix and recomputes only the rest (few-shot prompts, chat turns, an editor's file
context typed into); when a busy row shares a longer one, that prefix is copied into a free row
instead (a copy is far cheaper than recomputing it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def pick_slot(kept: Mapping[int, Sequence[int]], ids: Sequence[int], free: Sequence[int], rows: int,
              chunk: int, reuse: bool = True) -> tuple[int, int, int | None]:
    """(slot, reusable prefix length, row to copy that prefix from or None) for prompt `ids`.

    `kept` holds each cache row's computed prompt tokens, `free` the rows (and new row numbers)
    a prompt may take, `rows` the rows the cache has. A shared prefix counts up to a chunk
    boundary, and the last prompt token is always recomputed: its logits start the generation."""
    shared = {}
    if reuse:
        shared = {i: common_prefix(toks, ids, len(ids) - 1) // chunk * chunk for i, toks in kept.items()
                  if i < rows}
    best_free = max(free, key=lambda i: (shared.get(i, 0), -i), default=None)
    best_any = max(shared, key=lambda i: (shared[i], -i), default=None)
    if best_free is not None and shared.get(best_free, 0) > 0 and shared[best_free] >= shared.get(best_any, 0):
        return best_free, shared[best_free], None
    unused = [i for i in free if not kept.get(i)]
    slot = (unused or list(free))[0]
    if best_any is not None and shared[best_any] > 0 and best_any != slot:
        return slot, shared[best_any], best_any
    return slot, shared.get(slot, 0), None


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens `a` and `b` share, at most `limit`."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

"""One engine step (`Engine` runs them): admit queued requests, prefill them together, then
decode one token for every active row, or verify every row's drafts in one multi-position step
(speculative.py), and advance each request's text.

Greedy output is the same whatever the engine ran before: prompts are prefilled in chunks of
`prefill_chunk` tokens aligned to absolute positions (0..C-1, C..2C-1, ...), and a cached prefix
is reused only up to a chunk boundary, so a prompt's keys, values and logits come from the same
operations on the same inputs with or without reuse. (A forward over the unshared tail alone
would run matrix products of another shape, whose rounding differs: in bfloat16 enough to change
the greedy token.) Only positions that prefill computed are reused, never those decoding wrote.
In the C++ kernel a token's logits do not depend on the tokens beside it in a step, so prompts
prefill together and drafts are verified beside other rows' decoding without changing a token.
"""

from __future__ import annotations

import logging
import time

import torch

from ..errors import SmallCoderError
from ..kernels import kernel_faster
from ..model import KVCache
from .prefix import common_prefix, pick_slot
from .requests import Completion, Request, ScoreRequest, _Job
from .sampling import probabilities, sample
from .scoring import token_scores
from .speculative import Draft, RowStats, accept

log = logging.getLogger("smallcoder.inference")


class EngineSteps:
    """The step half of `Engine` (a mixin: the state it uses is made by `Engine.__init__`)."""

    @torch.inference_mode()
    def _fail_all(self, error: BaseException) -> None:
        """A decode step failed: every sequence in it fails (the step's error is theirs)."""
        for i, r in enumerate(self._slots):
            if r is not None:
                r.error = error
                self._finish(i, r, "error")
        if self._cache is not None:
            self._cache.reset()
        self._kept.clear()
        if self._draft is not None:
            self._draft.known.clear()

    @torch.inference_mode()
    def _step(self) -> None:
        """Admit queued requests (prefill into free slots, at most one scoring request), then
        decode one token for every active sequence."""
        for i, r in enumerate(self._slots):
            if r is not None and (r._cancelled or r.warm):  # warm here: `only_prefill` after its prefill
                self._finish(i, r, "cancelled" if r._cancelled else "length")
        scored = False
        admitted: list[tuple[Request, int, int]] = []
        while True:
            with self._lock:
                if not self._queue:
                    break
                job = self._queue[0]
                if (scored if isinstance(job, ScoreRequest) else self.num_active >= self.max_batch):
                    break
                self._queue.popleft()
            if job._cancelled:
                self._end(job, "cancelled")
            elif isinstance(job, ScoreRequest):
                scored = True
                self._score(job)
            elif job.row.budget <= 0 and not job.warm:
                self._end(job, "length")
            elif self._shares_a_chunk(job, admitted):  # next step, to reuse what this one computes
                with self._lock:
                    self._queue.appendleft(job)
                break
            else:
                plan = self._admit(job)
                if plan is not None:
                    admitted.append(plan)
        if admitted:
            self._prefill(admitted)
        active = [(i, r) for i, r in enumerate(self._slots) if r is not None]
        if not active:
            return
        drafts = self._drafts(active) if self._planner is not None else {}
        if drafts:
            self._verify(active, drafts)
            return
        lo, n = active[0][0], active[-1][0] + 1  # the rows from the first active one to the last
        cache = self._cache.rows(lo, n)
        starts = cache.lengths.clone()  # an active row continues where it is
        tokens = []
        for i in range(lo, n):
            r = self._slots[i]
            if r is None:  # an idle row between decodes a dummy token just past what it keeps for reuse
                kept = self._kept.get(i, [])
                if len(kept) >= cache.max_length - 1:
                    kept = self._kept[i] = []
                starts[i - lo] = len(kept)
            tokens.append(r.next_token if r is not None else self.tokenizer.eos_id)
        began = time.perf_counter()
        logits = self._forward(torch.tensor(tokens, device=self.device)[:, None], cache, starts)
        if self._planner is not None:
            self._planner.cost.add(n - lo, time.perf_counter() - began)
            for _, r in active:
                self._planner.settle(r.spec, 0, 0)
        self._sample_and_advance([(i, r, logits[i - lo]) for i, r in active])

    def _drafts(self, active: list[tuple[int, Request]]) -> dict[int, Draft]:
        """Each active row's draft for this step (none where the planner finds it not worth it)."""
        cache = self._cache
        rows = []
        for i, r in active:
            cap = min(r.row.budget - len(r.row.ids) - 1, cache.max_length - 2 - int(cache.lengths[i]))
            rows.append((i, r.spec, cap))
        if self._draft is not None and self._draft.drafted:
            self._planner.draft_cost = self._draft.seconds / self._draft.drafted
        lengths = self._planner.lengths(rows)
        if not lengths:
            return {}
        by_slot = dict(active)
        if self._draft is None:  # prompt lookup
            drafts = {}
            for i, k in lengths.items():
                r = by_slot[i]
                r.spec.lookup.extend(r.ids + r.row.ids)
                tokens = r.spec.lookup.propose(k)
                if tokens:
                    drafts[i] = Draft(tokens)
            return drafts
        return self._draft.propose([(i, by_slot[i].ids + by_slot[i].row.ids, k, by_slot[i].params, by_slot[i].generator)
                                    for i, k in lengths.items()])

    def _verify(self, active: list[tuple[int, Request]], drafts: dict[int, Draft]) -> None:
        """One step over every active row's next token and its drafts (consecutive positions of its
        cache row), then each row with drafts keeps what `speculative.accept` accepts, and each one
        without samples its next token as a plain step does."""
        cache = self._cache
        tokens, crow, pos, spans = [], [], [], []
        for i, r in active:
            d = drafts.get(i, Draft([]))
            start = int(cache.lengths[i])
            seq = [r.next_token, *d.tokens]
            spans.append((i, r, d, start, len(tokens)))
            tokens += seq
            crow += [i] * len(seq)
            pos += range(start, start + len(seq))
        began = time.perf_counter()
        logits = self.model.forward_rows(torch.tensor(tokens, device=self.device), cache, crow, pos,
                                         list(range(len(tokens))), decode_kernel=self.decode_kernel)
        if self._planner is not None:
            self._planner.cost.add(len(tokens), time.perf_counter() - began)
        plain = []
        for i, r, d, start, first in spans:
            k = len(d.tokens)
            if k == 0:
                plain.append((i, r, logits[first]))
                if self._planner is not None:
                    self._planner.settle(r.spec, 0, 0)
                continue
            try:
                rows = logits[first:first + k + 1]
                if not bool((rows.amax(dim=-1) < float("inf")).all()):
                    raise SmallCoderError("the model's next-token logits for this request are not finite "
                                          "(NaN or +inf); try float32 or bfloat16 instead of float16")
                emitted = accept(d, probabilities(rows, r.params), r.params, r.generator)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                r.error = e
                self._finish(i, r, "error")
                continue
            self._planner.settle(r.spec, k, len(emitted) - 1)
            self.drafted_tokens += k
            self.accepted_tokens += len(emitted) - 1
            pushed = 0
            for token in emitted:
                pushed += 1
                if not self._advance(i, r, token) or r._cancelled:
                    break
            cache.lengths[i] = start + pushed  # the last token pushed is fed next step
        if plain:
            self._sample_and_advance(plain)

    def _forward(self, ids: torch.Tensor, cache: KVCache, starts: torch.Tensor | list[int]) -> torch.Tensor:
        """Last-position logits (B, V) of one new token per row (B, 1), row b's at starts[b]."""
        return self.model(ids, cache=cache, last_only=True, starts=starts, decode_kernel=self.decode_kernel)[:, -1]

    def _score(self, job: ScoreRequest) -> None:
        try:
            job.scores = token_scores(self.model, job.ids, job.top, job.start)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            job.error = e
        self._end(job, "stop")

    def _shares_a_chunk(self, request: Request, admitted: list[tuple[Request, int, int]]) -> bool:
        """Whether `request` shares a whole prefill chunk with a prompt admitted this step beyond
        what the cache already holds for it (few-shot prompts): then it waits one step and reuses it."""
        if not self.prefix_cache or not admitted:
            return False
        chunk = self.prefill_chunk
        return any(common_prefix(r.ids, request.ids, len(request.ids) - 1) // chunk * chunk > reuse
                   for r, _, reuse in admitted)

    def _admit(self, request: Request) -> tuple[Request, int, int] | None:
        """Give a prompt a cache row (the one sharing its longest chunk-aligned prefix, copied in
        from a busy row where that shares more): (request, slot, reused tokens), or None where it
        failed alone (e.g. out of memory growing the cache)."""
        ids, chunk = request.ids, self.prefill_chunk
        rows = self._cache.batch_size if self._cache is not None else 0
        free = [i for i in range(max(rows, len(self._slots))) if i >= len(self._slots) or self._slots[i] is None]
        slot, reuse, source = pick_slot(self._kept, ids, free or [len(self._slots)], rows, chunk, self.prefix_cache)
        try:
            self._ensure_cache(slot, len(ids) + request.row.budget)
            if source is not None:
                for t in self._cache.k + self._cache.v:
                    t[slot, :, :reuse] = t[source, :, :reuse]
        except Exception as e:  # noqa: BLE001 - only this row's cache was touched
            request.error = e
            self._end(request, "error")
            return None
        while len(self._slots) <= slot:
            self._slots.append(None)
        self._slots[slot] = request
        self._kept.pop(slot, None)
        request.cached_tokens, request.started_at = reuse, time.perf_counter()
        if self._planner is not None:
            request.spec = RowStats(self._planner.prior)
        self.reused_tokens += reuse
        return request, slot, reuse

    def _prefill(self, admitted: list[tuple[Request, int, int]]) -> None:
        """Compute the admitted prompts' keys/values from their reused prefixes on, one aligned
        chunk of each per round, the round's chunks in one `forward_rows` call (one pass over the
        weights for every prompt where the C++ kernel runs it). A chunk short enough for the kernel
        (`kernels.kernel_faster`) always runs there, a longer one always alone in PyTorch, whatever
        shares its round, so each chunk is computed alike with or without reuse and batch-mates.
        A request cancelled meanwhile stops between rounds, and the chunks done stay for reuse (an
        editor's next keystroke shares them); one with no tokens to generate ends there (a warm-up)."""
        chunk = self.prefill_chunk
        kernel = self.decode_kernel or self.model.decode_kernel
        done = {slot: reuse for _, slot, reuse in admitted}
        pending = list(admitted)
        last: dict[int, torch.Tensor] = {}
        while pending:
            groups: dict[bool, list[tuple[Request, int]]] = {True: [], False: []}
            for request, slot, _ in pending:
                n = min(chunk, len(request.ids) - done[slot])
                small = kernel is not None and kernel_faster(kernel.weight_dtype, n)
                groups[small].append((request, slot))
            for group in groups.values():
                if not group:
                    continue
                tokens, crow, pos, heads = [], [], [], []
                for request, slot in group:
                    part = request.ids[done[slot]:done[slot] + chunk]
                    tokens += part
                    crow += [slot] * len(part)
                    pos += range(done[slot], done[slot] + len(part))
                    heads.append(len(tokens) - 1)
                try:
                    logits = self.model.forward_rows(torch.tensor(tokens, device=self.device), self._cache, crow, pos,
                                                     heads, decode_kernel=self.decode_kernel)
                except Exception as e:  # noqa: BLE001 - only these rows' caches were touched
                    for request, slot in group:
                        request.error = e
                        self._finish(slot, request, "error")
                        done.pop(slot)
                    continue
                for (request, slot), row in zip(group, logits):
                    done[slot] = min(done[slot] + chunk, len(request.ids))
                    last[slot] = row
            still = []
            for request, slot, reuse in pending:
                if slot not in done:
                    continue
                if done[slot] < len(request.ids) and not request._cancelled:
                    still.append((request, slot, reuse))
                    continue
                self._kept[slot] = request.ids[:done[slot] // chunk * chunk]
                if done[slot] < len(request.ids):
                    self._finish(slot, request, "cancelled")
                    continue
                request.first_token_at = time.perf_counter()
                if request.row.budget <= 0 or request.warm:
                    self._finish(slot, request, "length")
                else:
                    self._sample_and_advance([(slot, request, last[slot])])
            pending = still

    def _ensure_cache(self, row: int, length: int) -> None:
        """Grow the preallocated cache to hold `row` and `length` positions (contents kept)."""
        old = self._cache
        rows = max(min(self.max_batch, row + 1 + len(self._queue)), row + 1)
        if old is not None and old.batch_size > row and old.max_length >= length:
            return
        if old is not None:
            rows, length = max(rows, old.batch_size), max(length, old.max_length)
        length = min(self.context_length, -(-length // 128) * 128)
        if old is None:
            self._cache = KVCache(self.model.config, rows, length, self.kv_dtype, self.device)
        else:
            self._cache = old.grown(rows, length)
        if self._draft is not None:
            self._draft.grow(self._cache.batch_size)

    def _sample_and_advance(self, rows: list[tuple[int, Request, torch.Tensor]]) -> None:
        """Pick each row's next token and advance its text. A failure here (non-finite logits, a
        sampler or callback error) ends that request with the error; the other rows go on."""
        logits = torch.stack([x for _, _, x in rows]) if len(rows) > 1 else rows[0][2][None]
        bad = (~(logits.amax(dim=-1) < float("inf"))).tolist()  # NaN or +inf anywhere (one pass)
        greedy = [j for j, (_, r, _) in enumerate(rows) if r.params.greedy and not bad[j]]
        chosen: dict[int, int] = {}
        if greedy:  # one argmax for all greedy rows
            chosen = dict(zip(greedy, sample(logits[greedy], rows[greedy[0]][1].params, None).tolist()))
        for j, (slot, r, row_logits) in enumerate(rows):
            try:
                if bad[j]:
                    raise SmallCoderError("the model's next-token logits for this request are not finite "
                                          "(NaN or +inf); try float32 or bfloat16 instead of float16")
                token = chosen[j] if j in chosen else int(sample(row_logits[None], r.params, r.generator)[0])
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                r.error = e
                self._finish(slot, r, "error")
                continue
            self._advance(slot, r, token)

    def _advance(self, slot: int, r: Request, token: int) -> bool:
        """Push a chosen token to a request's text (streaming its piece); whether it goes on."""
        try:
            piece = r.row.push(token)
            if piece and r.on_piece is not None:
                r.on_piece(piece)
        except Exception as e:  # noqa: BLE001 - this request fails (a listener's error), the others go on
            r.error = e
            self._finish(slot, r, "error")
            return False
        if r.row.finish_reason:
            self._finish(slot, r, r.row.finish_reason)
            return False
        r.next_token = token
        return True

    def _finish(self, slot: int, request: Request, reason: str) -> None:
        self._slots[slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        self._end(request, reason)

    def _end(self, job: _Job, reason: str) -> None:
        """Publish a request's result, then signal its end: `done`, then on_piece(None)."""
        try:
            if isinstance(job, Request):
                row = job.row
                piece = row.finish(reason)
                if piece and job.on_piece is not None and job.error is None:
                    try:
                        job.on_piece(piece)
                    except Exception as e:  # noqa: BLE001 - the listener's failure is this request's
                        job.error = e
                spec = job.spec
                job.completion = Completion(row.text, row.ids, row.finish_reason, row.prompt_tokens,
                                            row.stop_reason, spec.drafted if spec else 0, spec.accepted if spec else 0)
        finally:
            job.done.set()
            if job.on_piece is not None:
                try:
                    job.on_piece(None)
                except Exception:  # a listener's failure must not stop the engine
                    log.exception("an engine request's end callback failed")

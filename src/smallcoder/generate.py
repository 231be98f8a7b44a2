"""The generation engine: batched decoding with a KV cache, sampling, stop strings, streaming,
and log-likelihood scoring of given text.

Chat, evaluation and the server all call `Engine`; there is no second decode loop, and scoring
runs the same model forward (one full pass, no KV cache) that generation prefills with.
Text is decoded incrementally (bytes of an unfinished UTF-8 character are held back), stop
strings are matched on the text so they are found even when they span tokens, and a streamed
piece never contains the start of a stop string that may still complete.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .errors import SmallCoderError
from .model import KVCache, SmallCoder
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    truncate: bool = False  # keep the end of a prompt longer than the context instead of refusing

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise SmallCoderError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise SmallCoderError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise SmallCoderError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise SmallCoderError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if any(not s for s in self.stop):
            raise SmallCoderError("stop strings must be non-empty")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy, or temperature with top-k / top-p."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class _Row:
    """One sequence's decoding state: tokens, confirmed text, and what was already streamed."""

    prompt_tokens: int
    budget: int
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None


class Request:
    """A prompt submitted to the engine: its state while queued or decoding, then its result.

    `on_piece` receives each streamable text piece (from the thread that runs the engine) and
    None once at the end; `done` is set after `completion` (or `error`) is.
    """

    def __init__(self, ids: list[int], params: SamplingParams, budget: int,
                 on_piece: Callable[[str | None], None] | None) -> None:
        self.ids = ids
        self.params = params
        self.row = _Row(len(ids), budget)
        self.on_piece = on_piece
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.done = threading.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None
        self._cancelled = False
        self._queued = False

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the engine's next step."""
        self._cancelled = True

    def result(self) -> Completion:
        """Wait for the completion (re-raising the engine's error for this request, if any)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.completion


class Engine:
    """Runs a model and its tokenizer; the single decode loop of SmallCoder.

    Continuous batching: up to `max_batch` sequences decode together, one row (slot) of a
    preallocated KV cache each; a sequence that finishes frees its slot at once and the next
    queued prompt is prefilled into it. A free row keeps its last sequence's keys and values, and
    a new prompt goes to the row that shares its longest prefix and recomputes only the rest
    (few-shot prompts, chat turns, an editor's repeated context). `generate`/`stream` run the loop in the calling thread;
    `start` runs it in a background thread that `submit` feeds (the server).
    """

    def __init__(self, model: SmallCoder, tokenizer: Tokenizer, max_batch: int = 16,
                 use_kernel: bool = True, prefix_cache: bool = True) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise SmallCoderError(f"max_batch must be a positive integer, got {max_batch!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if use_kernel and self.device.type == "cpu" and model.decode_kernel is None:
            from .kernels import attach

            attach(model)
        if model.decode_kernel is not None:
            self.dtype = torch.float32  # the kernel's KV cache (prefill writes it in any dtype)
        self._queue: deque[Request] = deque()
        self._slots: list[Request | None] = []
        self._cache: KVCache | None = None
        self._lock = threading.Lock()  # guards the queue
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one thread runs steps at a time
        self._stepped = threading.Condition()  # notified after each background step
        self._thread: threading.Thread | None = None
        self._closing = False
        # prefix reuse: the tokens whose keys/values each cache row still holds (positions 0..n-1)
        self.prefix_cache = prefix_cache
        self._kept: dict[int, list[int]] = {}
        self.reused_tokens = 0  # prompt tokens not recomputed thanks to it (a statistic)

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def alive(self) -> bool:
        """Whether the background loop (`start`) is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_queued(self) -> int:
        return len(self._queue)

    def prepare(self, prompt: str | Sequence[int], params: SamplingParams) -> list[int]:
        """Token ids of a prompt, refused (or with `truncate`, cut from the left) if over the context."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            ids = [self.tokenizer.eos_id]  # an empty prompt starts from the document separator
        ctx = self.context_length
        if len(ids) >= ctx:
            if not params.truncate:
                raise SmallCoderError(
                    f"prompt is {len(ids)} tokens; the model's context is {ctx} tokens, so it is "
                    f"{len(ids) - ctx + 1} token(s) too long to generate anything (pass truncate to "
                    "keep its end)")
            ids = ids[-max(1, ctx - max(params.max_new_tokens, 1)):]
        return ids

    def _request(self, prompt: str | Sequence[int], params: SamplingParams,
                 on_piece: Callable[[str | None], None] | None = None) -> Request:
        ids = self.prepare(prompt, params)
        return Request(ids, params, min(params.max_new_tokens, self.context_length - len(ids)), on_piece)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               on_piece: Callable[[str | None], None] | None = None) -> Request:
        """Queue a prompt (thread-safe); the background loop (`start`) or a caller's loop runs it."""
        request = self._request(prompt, params or SamplingParams(), on_piece)
        with self._work:
            if self._closing:
                raise SmallCoderError("the engine is closed")
            self._queue.append(request)
            request._queued = True
            self._work.notify()
        return request

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 on_complete: Callable[[int], None] | None = None) -> list[Completion]:
        """Complete every prompt (continuously batched); one Completion per prompt, in order.

        `on_complete(i)` is called as prompt i finishes (progress bars)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or token lists")
        params = params or SamplingParams()

        def notify(i: int) -> Callable[[str | None], None] | None:
            return None if on_complete is None else (lambda piece: piece is None and on_complete(i))

        requests = [self._request(p, params, notify(i)) for i, p in enumerate(prompts)]  # all validated first
        self.run(requests)
        return [r.result() for r in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as soon as each is certain.

        Closing the iterator early (a client that goes away) cancels the generation."""
        pieces: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        request = self._request(prompt, params or SamplingParams(), pieces.put)
        steps = self._steps([request])
        try:
            while True:
                while pieces.empty() and next(steps, StopIteration) is not StopIteration:
                    pass
                if pieces.empty():
                    break
                piece = pieces.get()
                if piece is None:
                    break
                if piece:
                    yield piece
        finally:
            steps.close()
        request.result()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, requests: list[Request]) -> None:
        """Run submitted requests to the end in this thread (without the background loop)."""
        for _ in self._steps(requests):
            pass

    def _steps(self, requests: list[Request]) -> Iterator[None]:
        """Queue `requests`, then run engine steps in this thread (or, while the background loop
        runs, wait for its steps) until they are all done, yielding after each step. Closing
        the generator early cancels the requests that are not done."""
        with self._work:
            self._queue.extend(r for r in requests if not r._queued)
            for r in requests:
                r._queued = True
            self._work.notify()
        try:
            while not all(r.done.is_set() for r in requests):
                thread = self._thread
                if thread is not None:
                    if not thread.is_alive():
                        raise SmallCoderError("the engine's background loop has stopped; start() it again")
                    with self._stepped:
                        self._stepped.wait(timeout=0.5)
                else:
                    with self._step_lock:
                        try:
                            self._step()
                        except BaseException as e:
                            self._fail_all(e)
                            raise
                yield
        finally:
            for r in requests:
                if not r.done.is_set():
                    r.cancel()
            if self._thread is None:
                with self._step_lock:
                    while not all(r.done.is_set() for r in requests):
                        self._step()

    def start(self) -> None:
        """Run the engine loop in a background thread (idempotent); `submit` feeds it."""
        with self._work:
            self._closing = False
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._serve, name="smallcoder-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background loop; requests not finished end as "cancelled"."""
        with self._work:
            self._closing = True
            self._work.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None
        with self._step_lock:
            for r in list(self._queue) + [r for r in self._slots if r is not None]:
                r.cancel()
            while self._queue or self.num_active:
                self._step()

    def _serve(self) -> None:
        while True:
            with self._work:
                while not self._closing and not self._queue and not self.num_active:
                    self._work.wait()
                if self._closing:
                    return
            with self._step_lock:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                    self._fail_all(e)
            with self._stepped:
                self._stepped.notify_all()

    @torch.inference_mode()
    def _fail_all(self, error: BaseException) -> None:
        for i, r in enumerate(self._slots):
            if r is not None:
                r.error = error
                self._finish(i, r, "error")
        if self._cache is not None:
            self._cache.reset()
        self._kept.clear()

    @torch.inference_mode()
    def _step(self) -> None:
        """Admit queued requests into free slots (prefill), then decode one token for all."""
        for i, r in enumerate(self._slots):
            if r is not None and r._cancelled:
                self._finish(i, r, "cancelled")
        while True:
            with self._lock:
                if not self._queue or self.num_active >= self.max_batch:
                    break
                request = self._queue.popleft()
            if request._cancelled or request.row.budget <= 0:
                self._complete(request, "cancelled" if request._cancelled else "length")
                continue
            self._prefill(request)
        active = [(i, r) for i, r in enumerate(self._slots) if r is not None]
        if not active:
            return
        n = active[-1][0] + 1
        cache = self._cache.rows(0, n)
        tokens = []
        for i in range(n):
            r = self._slots[i]
            if r is None:  # an idle row decodes a dummy token just past what it keeps for reuse
                kept = self._kept.get(i, [])
                if len(kept) >= cache.max_length - 1:
                    kept = self._kept[i] = []
                cache.lengths[i] = len(kept)
            tokens.append(r.next_token if r is not None else self.tokenizer.eos_id)
        logits = self.model(torch.tensor(tokens, device=self.device)[:, None], cache=cache, last_only=True)[:, -1]
        for i in range(n):
            r = self._slots[i]
            if r is None:
                cache.lengths[i] = len(self._kept.get(i, []))
            else:
                self._kept.setdefault(i, []).append(r.next_token)
        self._sample_and_advance([(i, r, logits[i]) for i, r in active])

    def _pick_slot(self, ids: list[int]) -> tuple[int, int, int | None]:
        """(slot, reusable prefix length, row to copy that prefix from or None).

        The free cache row whose kept tokens share the longest prefix with `ids` is used as is;
        when a busy row shares a longer one, its keys/values are copied into a free row (a copy
        is far cheaper than recomputing them). At least the last prompt token is always
        recomputed, since its logits start the generation."""
        rows = self._cache.batch_size if self._cache is not None else 0
        free = [i for i in range(max(rows, len(self._slots)))
                if i >= len(self._slots) or self._slots[i] is None]
        shared = {}
        if self.prefix_cache:
            shared = {i: _common_prefix(kept, ids, len(ids) - 1) for i, kept in self._kept.items() if i < rows}
        best_free = max(free, key=lambda i: (shared.get(i, 0), -i), default=None)
        best_any = max(shared, key=lambda i: (shared[i], -i), default=None)
        if best_free is not None and shared.get(best_free, 0) > 0 and \
                shared[best_free] >= shared.get(best_any, 0):
            return best_free, shared[best_free], None
        unused = [i for i in free if not self._kept.get(i)]
        slot = (unused or free or [len(self._slots)])[0]
        if best_any is not None and shared[best_any] > 0 and best_any != slot:
            return slot, shared[best_any], best_any
        return slot, shared.get(slot, 0), None

    def _prefill(self, request: Request) -> None:
        slot, reuse, source = self._pick_slot(request.ids)
        self._ensure_cache(slot, len(request.ids) + request.row.budget)
        while len(self._slots) <= slot:
            self._slots.append(None)
        self._slots[slot] = request
        if source is not None:
            for t in self._cache.k + self._cache.v:
                t[slot, :, :reuse] = t[source, :, :reuse]
        cache = self._cache.rows(slot, slot + 1)
        cache.lengths.fill_(reuse)
        self._kept[slot] = list(request.ids)
        self.reused_tokens += reuse
        ids = torch.tensor([request.ids[reuse:]], device=self.device)
        logits = self.model(ids, cache=cache, last_only=True)[:, -1]
        self._sample_and_advance([(slot, request, logits[0])])

    def _ensure_cache(self, row: int, length: int) -> None:
        """Grow the preallocated cache to hold `row` and `length` positions (contents kept)."""
        old = self._cache
        rows = max(min(self.max_batch, row + 1 + len(self._queue)), row + 1)
        if old is not None and old.batch_size > row and old.max_length >= length:
            return
        if old is not None:
            rows, length = max(rows, old.batch_size), max(length, old.max_length)
        length = min(self.context_length, -(-length // 128) * 128)
        new = KVCache(self.model.config, rows, length, self.dtype, self.device)
        if old is not None:
            for dst, src in zip(new.k + new.v, old.k + old.v):
                dst[:old.batch_size, :, :old.max_length] = src
            new.lengths[:old.batch_size] = old.lengths
        self._cache = new

    def _sample_and_advance(self, rows: list[tuple[int, Request, torch.Tensor]]) -> None:
        greedy = [j for j, (_, r, _) in enumerate(rows) if r.params.temperature == 0]
        chosen = {}
        if greedy:  # one argmax for all greedy rows
            picks = sample(torch.stack([rows[j][2] for j in greedy]), rows[greedy[0]][1].params, None)
            chosen = dict(zip(greedy, picks.tolist()))
        for j, (slot, r, logits) in enumerate(rows):
            token = chosen[j] if j in chosen else int(sample(logits[None], r.params, r.generator)[0])
            piece = self._advance(r.row, token, r.params)
            if piece and r.on_piece is not None:
                r.on_piece(piece)
            if r.row.finish_reason:
                self._finish(slot, r, r.row.finish_reason)
            else:
                r.next_token = token

    def _finish(self, slot: int, request: Request, reason: str) -> None:
        self._slots[slot] = None
        while self._slots and self._slots[-1] is None:
            self._slots.pop()
        self._complete(request, reason)

    def _complete(self, request: Request, reason: str) -> None:
        row = request.row
        if row.finish_reason is None:
            row.finish_reason = reason
            piece = self._flush(row)
            if piece and request.on_piece is not None:
                request.on_piece(piece)
        request.completion = Completion(row.text, row.ids, row.finish_reason, row.prompt_tokens)
        if request.on_piece is not None:
            request.on_piece(None)
        request.done.set()

    # ---- scoring -------------------------------------------------------------------------------
    # The conventions are lm-evaluation-harness's (lm_eval/api/model.py `TemplateLM._encode_pair`,
    # `loglikelihood`; lm_eval/models/huggingface.py `_loglikelihood_tokens`; lm_eval/utils.py
    # `get_rolling_token_windows`, `make_disjoint_window`), so our ARC/HellaSwag/Wikitext numbers
    # are comparable with published lm-eval numbers for the same model.

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a (context, continuation) pair, split as lm-eval splits them.

        Trailing whitespace of the context moves to the continuation (BPE tokenizers attach a
        space to the word after it). The continuation's ids are those of encode(context +
        continuation) past the first len(encode(context)) ids, so the continuation is tokenized as
        it would be inside the joined text, not as a text on its own. An empty context becomes
        the EOS token (= BOS for StarCoder), lm-eval's prefix token.
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        if not context:  # empty, or only whitespace (which now leads the continuation)
            return [self.tokenizer.eos_id], self.tokenizer.encode(continuation)
        context_ids = self.tokenizer.encode(context)
        return context_ids, self.tokenizer.encode(context + continuation)[len(context_ids):]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                      desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """For each (context, continuation): the summed log-probability of the continuation's
        tokens given the context, and whether greedy decoding would produce exactly those tokens.

        A context that does not fit is cut from the left; the continuation is always scored whole.
        """
        encoded = []
        for i, (context, continuation) in enumerate(requests):
            if not isinstance(context, str) or not isinstance(continuation, str):
                raise SmallCoderError(f"loglikelihood request {i}: context and continuation must be "
                                      f"strings, got {type(context).__name__} and {type(continuation).__name__}")
            ctx, cont = self.encode_pair(context, continuation)
            if not cont:
                raise SmallCoderError(f"loglikelihood request {i}: the continuation {continuation!r:.80} "
                                      "has no tokens of its own (after the context it encodes to nothing)")
            encoded.append((ctx, cont))
        return self.loglikelihood_tokens(encoded, batch_size=batch_size, desc=desc)

    def loglikelihood_rolling(self, documents: Sequence[str | Sequence[int]], batch_size: int = 8,
                              desc: str = "perplexity") -> list[float]:
        """Total log-likelihood of each document, every token predicted exactly once.

        The token list is cut into disjoint windows of the context length (`rolling_windows`):
        the first token is predicted from the EOS/BOS token, each later window from inside
        itself plus the one token before it, and the last, shorter window is given a full context
        of earlier tokens but scores only its new tokens. Documents are scored independently.
        """
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for d, doc in enumerate(documents):
            ids = self.tokenizer.encode(doc) if isinstance(doc, str) else list(doc)
            for window in rolling_windows(ids, self.tokenizer.eos_id, self.context_length):
                windows.append(window)
                owner.append(d)
        totals = [0.0] * len(documents)
        for d, (ll, _) in zip(owner, self.loglikelihood_tokens(windows, batch_size=batch_size, desc=desc)):
            totals[d] += ll
        return totals

    @torch.inference_mode()
    def token_logprobs(self, ids: Sequence[int], top: int = 0, start: int = 1
                       ) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each position i in [start, len(ids)): log p(ids[i] | ids[:i]) and the `top`
        likeliest (id, logprob) there (the server's echo + logprobs, lm-eval's scoring call).

        One forward over ids[:-1] (so len(ids) <= context + 1) with the same conventions as
        `loglikelihood_tokens`; it waits for the decode step in progress, never runs beside it.
        """
        ids = list(ids)
        if not 1 <= start <= len(ids):
            return []
        if len(ids) - 1 > self.context_length:
            raise SmallCoderError(f"cannot score {len(ids)} tokens: the model's context is {self.context_length}")
        with self._step_lock:
            logits = self.model(torch.tensor([ids[:-1]], dtype=torch.long, device=self.device))[0, start - 1:]
        logprobs = logits.float().log_softmax(dim=-1)
        target = torch.tensor(ids[start:], dtype=torch.long, device=self.device)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
        alternatives: list[list[tuple[int, float]]] = [[] for _ in picked]
        if top:
            values, indices = logprobs.topk(top, dim=-1)
            alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
        return list(zip(picked, alternatives))

    @torch.inference_mode()
    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                             batch_size: int = 16, desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        """`loglikelihood` on token ids: (sum of log p(continuation | context), is greedy) each.

        The input is (context + continuation)[-(ctx_len + 1):][:-1], as in lm-eval: at most a
        context length of tokens, left-truncated, whose last len(continuation) positions predict
        the continuation. Requests are sorted longest first (the memory peak comes at once, and
        rows of a batch have similar lengths), right-padded (causal attention keeps padding out of
        every real position, so no mask is needed), and returned in the original order. The
        log-softmax is taken in float32 over the continuation positions only, one row at a time,
        so the extra memory beyond the model's (batch, length, vocab) logits is one row's worth.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SmallCoderError(f"batch_size must be a positive integer, got {batch_size!r}")
        max_len = self.context_length
        inputs: list[list[int]] = []
        targets: list[list[int]] = []
        for i, (context, continuation) in enumerate(requests):
            context, continuation = list(context) or [self.tokenizer.eos_id], list(continuation)
            if not continuation:
                raise SmallCoderError(f"scoring request {i}: the continuation has no tokens")
            if len(continuation) > max_len:
                raise SmallCoderError(f"scoring request {i}: the continuation is {len(continuation)} tokens; "
                                      f"the model's context is {max_len} tokens, so it cannot be scored whole")
            inputs.append((context + continuation)[-(max_len + 1):][:-1])
            targets.append(continuation)

        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
        pad = self.tokenizer.eos_id
        with tqdm(total=len(order), desc=desc, unit="req", disable=None, leave=False) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                width = len(inputs[rows[0]])
                tokens = torch.tensor([inputs[i] + [pad] * (width - len(inputs[i])) for i in rows],
                                      dtype=torch.long, device=self.device)
                logits = self.model(tokens)
                for r, i in enumerate(rows):
                    n_in, target = len(inputs[i]), targets[i]
                    logprobs = logits[r, n_in - len(target):n_in].float().log_softmax(dim=-1)
                    ids = torch.tensor(target, dtype=torch.long, device=self.device)
                    picked = logprobs.gather(-1, ids[:, None]).squeeze(-1)
                    greedy = bool((logprobs.argmax(dim=-1) == ids).all())
                    results[i] = (float(picked.double().sum()), greedy)
                del logits
                bar.update(len(rows))
        return results

    def _advance(self, row: _Row, token: int, params: SamplingParams) -> str:
        """Add one sampled token to a row; return the text that may now be streamed."""
        if row.finish_reason:
            return ""
        if token == self.tokenizer.eos_id and params.stop_at_eos:
            row.finish_reason = "stop"
            return self._flush(row)
        row.ids.append(token)
        prev = self.tokenizer.decode(row.ids[row.prefix_offset:row.read_offset])
        new = self.tokenizer.decode(row.ids[row.prefix_offset:])
        if len(new) > len(prev) and not new.endswith("\ufffd"):  # a complete UTF-8 character
            piece = new[len(prev):]
            row.prefix_offset, row.read_offset = row.read_offset, len(row.ids)
            start = max(0, len(row.text) - max((len(s) for s in params.stop), default=0))
            row.text += piece
            hits = [p for p in (row.text.find(s, start) for s in params.stop) if p != -1]
            if hits:  # the earliest stop string wins; it and what follows are dropped
                row.text = row.text[:min(hits)]
                row.finish_reason = "stop"
        if row.finish_reason is None and len(row.ids) >= row.budget:
            row.finish_reason = "length"
        if row.finish_reason:
            return self._flush(row)
        end = len(row.text) - _held_back(row.text, params.stop)
        piece, row.emitted = row.text[row.emitted:end], max(row.emitted, end)
        return piece

    def _flush(self, row: _Row) -> str:
        """Final text of a finished row: any undecoded tail (e.g. a cut UTF-8 char) included.

        A stop string only ever ends a row right after its text was confirmed, so a tail here
        comes from a row that ended on EOS or on its length, and belongs to the text.
        """
        if row.read_offset < len(row.ids):
            tail = self.tokenizer.decode(row.ids[row.prefix_offset:])
            row.text += tail[len(self.tokenizer.decode(row.ids[row.prefix_offset:row.read_offset])):]
        piece, row.emitted = row.text[row.emitted:], len(row.text)
        return piece


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (it may yet complete)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int
                    ) -> list[tuple[list[int], list[int]]]:
    """Disjoint (context, continuation) scoring windows that predict every token exactly once.

    lm-eval's `get_rolling_token_windows(..., context_len=1)` followed by `make_disjoint_window`:
    the first window is [prefix] + tokens[:max_len - 1] predicting tokens[:max_len]; each later
    window predicts the next max_len tokens from the one token before them; the last window
    predicts what is left, with the tokens before it as context so its input is still max_len
    tokens. Example (max_len 4, tokens 0..9): BOS 0 1 2 -> 0 1 2 3; 3 4 5 6 -> 4 5 6 7;
    5 6 7 8 -> 8 9.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    windows = [([prefix_token], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_len)
        end = predicted + n
        context = tokens[end - max_len - 1:end - 1]
        windows.append((context[:len(context) - (n - 1)], tokens[end - n:end]))
        predicted = end
    return windows

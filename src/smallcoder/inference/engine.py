"""The continuous-batching engine: the single decode loop of SmallCoder.

Chat, evaluation and the server all call `Engine`; there is no second decode loop. Generation
and per-token scoring are both requests in one queue, run by one step at a time (the caller's
thread, or the background loop the server starts), so a bound on the queue bounds both and a
cancelled request never reaches the model.

One step (admission, prefill, decode or speculative verification) is `steps.EngineSteps`; this
module holds the requests' API and the loop that runs steps.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..checks import integer
from ..errors import SmallCoderError
from ..model import KVCache, SmallCoder
from ..tokenizer import Tokenizer
from .requests import Completion, OnPiece, Request, ScoreRequest, _Job
from .sampling import SamplingParams
from .scoring import Scoring, TokenScore
from .speculative import DraftModel, Planner, Speculation, parse_speculative
from .steps import EngineSteps

if TYPE_CHECKING:
    from ..kernels import DecodeKernel

log = logging.getLogger("smallcoder.inference")

class Engine(EngineSteps, Scoring):
    """Runs a model and its tokenizer: continuous batching, prefix reuse, scoring.

    Up to `max_batch` sequences decode together, one row (slot) of a preallocated KV cache each;
    a sequence that finishes frees its slot at once and the next queued prompt is prefilled into
    it. A free row keeps its last prompt's keys and values, and a new prompt goes to the row that
    shares its longest (chunk-aligned) prefix and recomputes only the rest (few-shot prompts, chat
    turns, an editor's repeated context). `generate`/`stream` run the loop in the calling thread;
    `start` runs it in a background thread that `submit` feeds (the server). `kv_dtype` sets the
    cache's dtype (default: the kernel's `cache_dtype`, else the weights'). `speculative`
    (a `Speculation`, or "lookup" / "draft:PATH" / "off") drafts tokens that one multi-position
    step verifies (speculative.py); the output is the same as without it.
    """

    def __init__(self, model: SmallCoder, tokenizer: Tokenizer, max_batch: int = 16,
                 use_kernel: bool = True, prefix_cache: bool = True, prefill_chunk: int = 128,
                 kv_dtype: torch.dtype | None = None, speculative: Speculation | str | None = None) -> None:
        integer(max_batch, "max_batch")
        integer(prefill_chunk, "prefill_chunk")
        self.model = model  # used as given: no train-only layers, every forward under inference_mode
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.device = next(model.parameters()).device
        # the engine's own C++ decode step, passed to each forward: the caller's model is not changed
        self.decode_kernel: DecodeKernel | None = None
        if use_kernel and self.device.type == "cpu" and model.decode_kernel is None:
            from ..kernels import build

            self.decode_kernel = build(model)
        kernel = self.decode_kernel or model.decode_kernel
        # the KV cache's dtype: the weights' in PyTorch, the kernel's choice with it (fp16 for
        # bf16 and int8 weights: half the bytes a long-context step reads)
        self.kv_dtype = kv_dtype or (kernel.cache_dtype if kernel is not None else next(model.parameters()).dtype)
        self._queue: deque[_Job] = deque()
        self._slots: list[Request | None] = []
        self._cache: KVCache | None = None
        self._lock = threading.Lock()  # guards the queue
        self._work = threading.Condition(self._lock)
        self._step_lock = threading.Lock()  # one thread runs steps at a time
        self._stepped = threading.Condition()  # notified after each background step
        self._thread: threading.Thread | None = None
        self._closing = False
        # prefix reuse: the prompt tokens whose keys/values each cache row holds from prefill
        self.prefix_cache = prefix_cache
        self._kept: dict[int, list[int]] = {}
        self.reused_tokens = 0  # prompt tokens not recomputed thanks to it (a statistic)
        # speculative decoding: the draft source, how far each row drafts, and the counts
        spec = parse_speculative(speculative) if isinstance(speculative, str) else speculative
        self.speculative = spec
        self._draft: DraftModel | None = None
        if spec is not None and spec.source == "draft":
            if spec.draft_model is not None:
                dm, dt = spec.draft_model
                self._draft = DraftModel(dm, dt, tokenizer, "draft model", max_batch)
            else:
                self._draft = DraftModel.load(spec.draft_path, tokenizer, spec.draft_dtype, max_batch)
        self._planner = Planner(spec, prior=0.5) if spec is not None else None
        self.drafted_tokens = self.accepted_tokens = 0  # statistics: drafts verified, drafts kept

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
        """Requests waiting to run, generation and scoring alike."""
        return len(self._queue)

    # ---- requests ------------------------------------------------------------------------------

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
                    f"{len(ids) - ctx + 1} token(s) too long to generate anything (--truncate, or "
                    "SamplingParams(truncate=True), keeps its end)")
            ids = ids[-max(1, ctx - max(params.max_new_tokens, 1)):]
        return ids

    def _request(self, prompt: str | Sequence[int], params: SamplingParams,
                 on_piece: OnPiece | None = None, warm: bool = False) -> Request:
        ids = self.prepare(prompt, params)
        budget = min(params.max_new_tokens, self.context_length - len(ids))
        return Request(ids, params, budget, self.tokenizer, on_piece, warm)

    def _score_request(self, ids: Sequence[int], top: int, start: int, on_piece: OnPiece | None) -> ScoreRequest:
        ids = [int(t) for t in ids]
        if len(ids) - 1 > self.context_length:
            raise SmallCoderError(f"cannot score {len(ids)} tokens: the model's context is {self.context_length}")
        integer(top, "top", minimum=0)
        return ScoreRequest(ids, top, start, on_piece)

    def _enqueue(self, job: _Job) -> None:
        with self._work:
            if self._closing:
                raise SmallCoderError("the engine is closed")
            self._queue.append(job)
            job._queued = True
            self._work.notify()

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               on_piece: OnPiece | None = None, warm: bool = False) -> Request:
        """Queue a prompt (thread-safe); the background loop (`start`) or a caller's loop runs it.
        `warm` only prefills the prompt (generating nothing), so a later prompt that shares its
        prefix reuses it (llama.cpp's `n_predict: 0`, an editor's warm-up request)."""
        request = self._request(prompt, params or SamplingParams(), on_piece, warm)
        self._enqueue(request)
        return request

    def submit_score(self, ids: Sequence[int], top: int = 0, start: int = 1,
                     on_piece: OnPiece | None = None) -> ScoreRequest:
        """Queue token ids for `token_logprobs`-style scoring (thread-safe), like `submit`."""
        job = self._score_request(ids, top, start, on_piece)
        self._enqueue(job)
        return job

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None,
                 on_complete: Callable[[int], None] | None = None) -> list[Completion]:
        """Complete every prompt (continuously batched); one Completion per prompt, in order.

        `on_complete(i)` is called as prompt i finishes (progress bars)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or token lists")
        params = params or SamplingParams()

        def notify(i: int) -> OnPiece | None:
            return None if on_complete is None else (lambda piece: piece is None and on_complete(i))

        requests = [self._request(p, params, notify(i)) for i, p in enumerate(prompts)]  # all validated first
        self.run(requests)
        return [r.result() for r in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None
               ) -> Generator[str, None, Completion]:
        """Yield the completion of one prompt as text pieces, as soon as each is certain; the
        generator's return value (StopIteration.value) is the Completion.

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
        return request.result()

    def token_logprobs(self, ids: Sequence[int], top: int = 0, start: int = 1) -> list[TokenScore]:
        """For each position i in [start, len(ids)): log p(ids[i] | ids[:i]) and the `top`
        likeliest (id, logprob) there (the server's echo + logprobs, lm-eval's scoring call).

        One forward over ids[:-1] (so len(ids) <= context + 1) with the conventions of
        `loglikelihood_tokens`, run as a queued request like any generation."""
        job = self._score_request(ids, top, start, None)
        self.run([job])
        return job.result()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self, requests: Sequence[_Job]) -> None:
        """Run requests to the end in this thread (or wait for the background loop to run them)."""
        for _ in self._steps(requests):
            pass

    def _steps(self, requests: Sequence[_Job]) -> Iterator[None]:
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
        try:
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
        finally:
            if not self._closing:  # died (a BaseException): nobody would ever end the requests left
                stopped = SmallCoderError("the engine's background loop stopped")
                with self._step_lock:
                    with self._work:
                        left, self._queue = list(self._queue), deque()
                    self._fail_all(stopped)
                    for job in left:
                        job.error = stopped
                        self._end(job, "error")

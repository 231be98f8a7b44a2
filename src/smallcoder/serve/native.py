"""llama.cpp's native API: `POST /completion` (Continue's llama.cpp provider, Tabby) and
`POST /infill` (llama.vscode), with the fields and reply shapes of llama.cpp's server.

Reply, per completion (a list when there are several prompts or `n_cmpl` > 1): `content`, `stop`,
`stop_type` (eos / word / limit), `stopping_word`, `tokens_predicted`, `tokens_evaluated`,
`tokens_cached` (prompt tokens reused from the cache), `truncated`, `generation_settings` (with
`n_ctx`), `timings` (cache_n, prompt_n, prompt_ms, prompt_per_token_ms, prompt_per_second, and
the same for predicted). Streamed: `data: {"content": piece, "stop": false, ...}` events, then
the final object with empty content; no `[DONE]`, as llama.cpp. An error event also carries
`"content": ""` and `"stop": true` (Tabby parses both out of every event).

Fields: `n_predict` (-1: until the context is full; above `--max-tokens` it is capped, as
llama.cpp caps it to its `-n`; 0: the prompt is only prefilled, for the next request to reuse:
llama.vscode's warm-up), `n_cmpl` / `n`, `temperature` (0.8), `top_k` (40), `top_p` (0.95),
`min_p` (0.05) with llama.cpp's defaults, `samplers` (the steps in order; a step not named is not
applied; `dry`, `typ_p`, `xtc`, `infill`, `penalties` and `top_n_sigma` are accepted and not
applied), `seed` (-1 = random), `stop`, `ignore_eos`, `n_indent`, `t_max_predict_ms` (see
`SamplingParams`), `t_max_prompt_ms` (the reply waits no longer for the prompt: at the limit the
completion ends with no text and `stop_type: "limit"`, and its prefill goes on so the next request
reuses it), `id_slot` (`clients`: the same client's newer request replaces it),
`return_tokens`. `cache_prompt` is accepted; the cache is always used, since reuse does not
change the output here (`Engine`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError
from ..inference import SamplingParams
from .bridge import Batch, drain_or_cancel
from .clients import client_key
from .protocol import APIError, InfillRequest, LlamaRequest
from .responses import event_stream, result_of, seeded, sse
from .server import Server

if TYPE_CHECKING:
    from starlette.requests import Request

log = logging.getLogger("smallcoder.serve")

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}  # llama.cpp's
SAMPLER_NAMES = {"top_k": "top_k", "top-k": "top_k", "top_p": "top_p", "top-p": "top_p", "nucleus": "top_p",
                 "min_p": "min_p", "min-p": "min_p", "temperature": "temperature", "temp": "temperature"}
NOT_APPLIED = {"dry", "typ_p", "typical_p", "typ-p", "typical-p", "typical", "typ", "xtc", "infill", "penalties",
               "top_n_sigma", "top-n-sigma"}
DEFAULT_SAMPLERS = ("top_k", "top_p", "min_p", "temperature")  # llama.cpp's default order, the steps we have
RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp's "pick a random seed"
ERROR_FIELDS = {"content": "", "stop": True}


@dataclass
class Prompt:
    ids: list[int]
    cut: bool  # a FIM prompt cut to fit the context


async def completion(server: Server, request: Request) -> Any:
    req = await server.read(request, LlamaRequest, "completion")
    if req.prompt is None:
        raise APIError(400, "field 'prompt' is required", param="prompt")
    prompts: list[str | list[int]]
    if isinstance(req.prompt, str) or (req.prompt and isinstance(req.prompt[0], int)):
        prompts = [req.prompt]
    else:
        prompts = list(req.prompt)
    if not prompts:
        raise APIError(400, "field 'prompt' is an empty list", param="prompt")
    budget = _budget(server, req)
    built = await server.prompt_ids(prompts, "prompt", budget)
    return await _run(server, request, req, [Prompt(ids, cut) for ids, cut in built], budget, len(prompts) > 1)


async def infill(server: Server, request: Request) -> Any:
    req = await server.read(request, InfillRequest, "infill")
    fim = server.require_fim("/infill", "input_prefix")
    budget = _budget(server, req)
    head = fim.extra([(c.filename if c.filename is not None else "tmp", c.text) for c in req.input_extra or []])
    built = await fim.build(req.input_prefix, req.input_suffix, req.prompt, head, server.fim_limit(budget),
                            "input_prefix")
    return await _run(server, request, req, [Prompt(built.ids, built.truncated)], budget, False)


def _budget(server: Server, req: LlamaRequest) -> int:
    """New tokens asked for: n_predict (or max_tokens), -1 or absent meaning as many as allowed."""
    name, value = ("n_predict", req.n_predict) if req.n_predict is not None else ("max_tokens", req.max_tokens)
    if value is None or value == -1:
        return server.max_tokens
    if value < -1:
        raise APIError(400, f"{name} must be -1 (until the context is full) or >= 0, got {value}", param=name)
    if value > server.max_tokens:
        server.note_once(f"{name}.capped", f"{name} above {server.max_tokens} (the --max-tokens limit) is capped "
                                           "to it, as llama.cpp caps it to its -n")
        return server.max_tokens
    return value


def _samplers(server: Server, names: Sequence[str] | None) -> tuple[str, ...]:
    if names is None:
        return DEFAULT_SAMPLERS
    steps = []
    for name in names:
        if name in SAMPLER_NAMES:
            steps.append(SAMPLER_NAMES[name])
        elif name in NOT_APPLIED:
            server.note_once(f"sampler.{name}", f"sampler {name!r} is accepted and not applied by this server")
        else:
            raise APIError(400, f"samplers: unknown sampler {name!r}; this server applies "
                                f"{', '.join(sorted(SAMPLER_NAMES))} and accepts {', '.join(sorted(NOT_APPLIED))}",
                           param="samplers")
    return tuple(steps)


def _params(server: Server, req: LlamaRequest, budget: int) -> SamplingParams:
    def value(name: str) -> Any:
        v = getattr(req, name)
        return DEFAULTS[name] if v is None else v

    try:
        return SamplingParams(
            max_new_tokens=budget, temperature=value("temperature"), top_k=max(0, value("top_k")),
            top_p=value("top_p"), min_p=value("min_p"), seed=None if req.seed in RANDOM_SEEDS else req.seed,
            stop=req.stops(server.limits), stop_at_eos=not req.ignore_eos, samplers=_samplers(server, req.samplers),
            min_indent=req.n_indent or 0, newline_time_limit=max(0.0, req.t_max_predict_ms or 0.0) / 1000)
    except SmallCoderError as e:
        raise APIError(400, str(e)) from None


class _Run:
    """One HTTP request's engine requests, and what its replies say about them."""

    def __init__(self, server: Server, req: LlamaRequest, prompts: list[Prompt], params: SamplingParams,
                 n: int) -> None:
        self.server, self.req, self.params = server, req, params
        self.warm = params.max_new_tokens == 0
        self.jobs = [(p, seeded(params, j)) for p in prompts for j in range(1 if self.warm else n)]
        self.batch = Batch.generate(server.engine, [(p.ids, q) for p, q in self.jobs], warm=self.warm)
        self.late: set[int] = set()  # requests whose prompt outlasted t_max_prompt_ms (answered empty)

    def expire(self) -> None:
        """t_max_prompt_ms has passed: a request whose prompt is still being processed answers now,
        with nothing, and its prefill goes on (`Request.only_prefill`)."""
        for k, r in enumerate(self.batch.requests):
            if r.first_token_at is None and not r.done.is_set():
                r.only_prefill()
                self.late.add(k)
                self.batch.queue.put_nowait((k, None))  # its end, for the reply (`_ends`)

    def final(self, k: int, stream: bool) -> dict[str, Any]:
        """llama.cpp's closing object for request k (content empty when streamed)."""
        server, r = self.server, self.batch.requests[k]
        prompt, _ = self.jobs[k]
        text, ids, word, finish = "", [], "", "length"  # answered late: nothing
        if k not in self.late:
            comp = r.completion
            if comp is None or r.error is not None or (comp.finish_reason == "cancelled" and not self.batch.superseded):
                result_of(r)  # raises: a failure (500) or the shutdown (503)
            text, ids, finish = comp.text, comp.token_ids, comp.finish_reason
            word = comp.stop_reason if finish == "stop" and isinstance(comp.stop_reason, str) else ""
        stop_type = "word" if word else "eos" if finish == "stop" else "limit"
        now = time.perf_counter()
        start, first = r.started_at or now, r.first_token_at or now
        prompt_ms, predicted_ms = (first - start) * 1000, (now - first) * 1000 if ids else 0.0
        processed, ctx = len(prompt.ids) - r.cached_tokens, server.engine.context_length
        body = {
            "index": k, "content": "" if stream else text, "tokens": list(ids) if self.req.return_tokens else [],
            "id_slot": self.req.id_slot if self.req.id_slot is not None else -1, "stop": True,
            "model": server.model_name, "tokens_predicted": len(ids), "tokens_evaluated": len(prompt.ids),
            "generation_settings": self.settings(), "prompt": server.tokenizer.decode(prompt.ids),
            "has_new_line": "\n" in text, "truncated": prompt.cut or len(prompt.ids) + len(ids) >= ctx,
            "stop_type": stop_type, "stopping_word": word, "tokens_cached": r.cached_tokens,
            "timings": {"cache_n": r.cached_tokens, "prompt_n": processed, "prompt_ms": prompt_ms,
                        "prompt_per_token_ms": prompt_ms / processed if processed else 0.0,
                        "prompt_per_second": processed / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
                        "predicted_n": len(ids), "predicted_ms": predicted_ms,
                        "predicted_per_token_ms": predicted_ms / len(ids) if ids else 0.0,
                        "predicted_per_second": len(ids) / predicted_ms * 1000 if predicted_ms > 0 else 0.0}}
        if r.completion is not None and r.completion.drafted_tokens:  # llama.cpp's names for speculation's counts
            body["timings"].update(draft_n=r.completion.drafted_tokens, draft_n_accepted=r.completion.accepted_tokens)
        if finish == "cancelled":
            body["superseded"] = True  # ours: the same client's newer request replaced this one
        return body

    def settings(self) -> dict[str, Any]:
        p, req = self.params, self.req
        return {"n_ctx": self.server.engine.context_length, "model": self.server.model_name,
                "n_predict": p.max_new_tokens, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                "min_p": p.min_p, "seed": p.seed if p.seed is not None else -1, "stop": list(p.stop),
                "ignore_eos": not p.stop_at_eos, "samplers": list(p.samplers), "n_indent": p.min_indent,
                "t_max_predict_ms": p.newline_time_limit * 1000, "stream": bool(req.stream), "n_probs": 0}


async def _run(server: Server, request: Request, req: LlamaRequest, prompts: list[Prompt], budget: int,
               many: bool) -> Any:
    n = req.n_cmpl or req.n or 1
    if n * len(prompts) > server.limits.max_choices:
        raise APIError(400, f"n_cmpl ({n}) x prompts ({len(prompts)}) = {n * len(prompts)} completions; this server "
                            f"returns at most {server.limits.max_choices} per request", param="n_cmpl")
    params = _params(server, req, budget)
    server.check_queue(len(prompts) * n)
    run = _Run(server, req, prompts, params, n)
    key = client_key(request, req.id_slot) if not run.warm else None
    server.slots.take(key, run.batch)
    timer = None
    if req.t_max_prompt_ms and req.t_max_prompt_ms > 0 and not run.warm:
        timer = asyncio.get_running_loop().call_later(req.t_max_prompt_ms / 1000, run.expire)
    array = many or len(run.jobs) > 1
    if req.stream:
        return event_stream(_events(run, key, timer), run.batch, ERROR_FIELDS)
    try:
        if not await _wait(request, run):
            return None
        finals = [run.final(k, stream=False) for k in range(len(run.jobs))]
    finally:
        server.slots.release(key, run.batch)
        if timer is not None:
            timer.cancel()
    return finals if array else finals[0]


async def _wait(request: Request, run: _Run) -> bool:
    """Until every request is finished (or answered late); False, with them cancelled, if the
    client left first."""
    return await drain_or_cancel(request, run.batch, _ends(run))


async def _ends(run: _Run) -> AsyncIterator[tuple[int, str | None]]:
    """The batch's (index, piece) events, None marking a request's end, until every request
    ended; a request answered late ends then (`_Run.expire`), and what it sends later is dropped."""
    ended: set[int] = set()
    while len(ended) < len(run.jobs):
        k, piece = await run.batch.queue.get()
        if k in ended:
            continue
        if piece is None:
            ended.add(k)
        yield k, piece


async def _events(run: _Run, key: Any, timer: asyncio.TimerHandle | None) -> AsyncIterator[str]:
    try:
        async for k, piece in _ends(run):
            if piece is None:
                yield sse(run.final(k, stream=True))
            elif piece and k not in run.late:
                r = run.batch.requests[k]
                yield sse({"index": k, "content": piece, "tokens": [], "stop": False,
                           "id_slot": run.req.id_slot if run.req.id_slot is not None else -1,
                           "tokens_predicted": len(r.row.ids), "tokens_evaluated": len(r.ids)})
    finally:
        run.server.slots.release(key, run.batch)
        if timer is not None:
            timer.cancel()

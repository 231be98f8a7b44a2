"""Sampling: the parameters of one generation and the choice of each next token from logits.

Every valid parameter value gives a valid distribution: the logits are shifted so their maximum
is 0 and divided by the temperature in float64, so any temperature > 0 gives finite values or
-inf (never NaN or +inf). A tiny temperature (1e-45, even 5e-324) therefore acts as greedy, ties
shared; a huge one (1e308) as uniform; a tiny top_p (1e-320) keeps the top token. Values that
cannot mean anything (negative, NaN, infinite) are refused with the field named.

The steps (temperature, top-k, top-p, min-p) run in `samplers` order; a step not named there is
not applied (llama.cpp's `samplers`, whose default order puts the temperature last). By default
the temperature comes first, as OpenAI's API applies it. A generation may also stop at a line
indented less than `min_indent` or, past `newline_time_limit` seconds, at its next newline
(llama.cpp's `n_indent` and `t_max_predict_ms`; `detokenize` applies them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checks import integer, is_int
from ..errors import SmallCoderError

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
SAMPLERS = ("temperature", "top_k", "top_p", "min_p")  # the steps `sample` knows, in its default order


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
    min_p: float = 0.0  # 0 = off; else drop tokens below min_p x the likeliest one's probability
    samplers: Sequence[str] = SAMPLERS  # the order of the steps; a step not named is not applied
    min_indent: int = 0  # 0 = off; else stop at a later line indented less (llama.cpp's n_indent)
    newline_time_limit: float = 0.0  # 0 = off; else seconds after the first token, then stop at a newline

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        integer(self.max_new_tokens, "max_new_tokens", minimum=0)
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise SmallCoderError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SmallCoderError(f"top_p must be in (0, 1], got {self.top_p!r}")
        integer(self.top_k, "top_k", minimum=0)
        if self.seed is not None and (not is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise SmallCoderError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SmallCoderError("stop strings must be non-empty strings")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise SmallCoderError(f"min_p must be in [0, 1], got {self.min_p!r}")
        self.samplers = tuple(self.samplers)
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown:
            raise SmallCoderError(f"unknown sampler {unknown[0]!r}; choose from: {', '.join(SAMPLERS)}")
        integer(self.min_indent, "min_indent", minimum=0)
        if not isinstance(self.newline_time_limit, (int, float)) or not math.isfinite(self.newline_time_limit) \
                or self.newline_time_limit < 0:
            raise SmallCoderError(f"newline_time_limit must be a number of seconds >= 0, got "
                                  f"{self.newline_time_limit!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: the next token is the argmax, whatever the order (the other steps always
        keep the likeliest token). Even where `samplers` leaves the temperature step out, where
        llama.cpp would draw at temperature 1: a client that asks for 0 wants greedy."""
        return self.temperature == 0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy, or the `samplers` steps, then a draw."""
    if params.greedy:
        return logits.argmax(dim=-1)
    x, ids = _candidates(logits, params)
    choice = draw(x.softmax(dim=-1), generator)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from, dense over the vocabulary: (B, V) float64 (greedy: all
    mass on the argmax). Speculative sampling accepts and corrects drafts against it, so its output
    keeps exactly the distribution plain sampling has."""
    if params.greedy:
        out = torch.zeros(logits.shape, dtype=torch.float64)
        return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True).cpu(), 1.0)
    x, ids = _candidates(logits, params)
    probs = x.softmax(dim=-1).cpu()
    if ids is None:
        return probs
    return torch.zeros(logits.shape, dtype=torch.float64).scatter_(-1, ids.cpu(), probs)


def _candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `samplers` steps on logits (B, V): float64 log-weights of the candidates (-inf: dropped)
    and their token ids (None: the candidates are the whole vocabulary, in order)."""
    steps = list(params.samplers)
    x = ids = None  # ids: once top-k has run, the token ids of the candidates x holds (B, k)
    # top-k first, on the float32 logits, where the steps before it (temperature, min-p) keep the
    # order and the likeliest token, so commute with it: three passes over the vocabulary fewer
    # (each cache-cold after a decode step: ~0.4 ms a token)
    if 0 < params.top_k < logits.shape[-1] and "top_k" in steps \
            and set(steps[:steps.index("top_k")]) <= {"temperature", "min_p"}:
        vals, order, alone = _top_k(logits, params.top_k)
        if alone:
            x, ids = vals.double(), order
            steps.remove("top_k")
    # shifted to max 0 (then divided): finite or -inf for every temperature > 0 (see the module doc)
    x = logits.double() if x is None else x
    x = x - x.max(dim=-1, keepdim=True).values
    for step in steps:
        if step == "temperature":
            x = x / params.temperature  # > 0 here: temperature 0 is greedy, above
        elif step == "top_k" and 0 < params.top_k < x.shape[-1]:
            vals, order, alone = _top_k(x, params.top_k)
            if alone:  # the later steps and the draw run on the k candidates alone
                x, ids = vals, order if ids is None else ids.gather(-1, order)
            else:  # ties with the k-th value beyond k: they all stay, as on the full vocabulary
                x = x.masked_fill(x < vals[:, -1:], float("-inf"))
        elif step == "top_p" and params.top_p < 1.0:
            sorted_x, order, drop = _nucleus(x, params.top_p)
            x, ids = sorted_x.masked_fill(drop, float("-inf")), order if ids is None else ids.gather(-1, order)
        elif step == "min_p" and params.min_p > 0:
            # p < min_p * p_max  <=>  x - x_max < log(min_p); the likeliest token always stays
            top = x.max(dim=-1, keepdim=True).values
            x = x.masked_fill(x - top < math.log(params.min_p), float("-inf"))
    return x, ids


def _top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The k likeliest of x (B, n), values and indices, and whether they are all top-k keeps (no
    value beyond them ties the k-th): then the later steps may run on them alone, the same
    distribution without a sort of 49,152 float64 values per token (milliseconds)."""
    vals, order = torch.topk(x, k, dim=-1)
    kth = vals[:, -1:]
    return vals, order, bool(((x >= kth).sum(-1) == k).all()) or bool(torch.isinf(kth).all())


def _nucleus(x: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The likeliest candidates of x (B, n) in descending order (values, their indices) and which of
    them top-p drops: a token whose better-ranked tokens already hold top_p of the mass (the first
    always stays: its mass above is exactly 0, and top_p > 0 even in float64's smallest denormal).
    Only as many candidates as the nucleus needs are sorted (64, then 8x more while some row's
    nucleus runs past them): a full sort of 49,152 float64 values took 7 ms a token here."""
    n = x.shape[-1]
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    k = min(n, 64)
    while True:
        vals, order = torch.topk(x, k, dim=-1)
        probs = (vals - lse).exp()
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        if k == n or bool(drop[:, -1].all()):
            return vals, order, drop
        k = min(n, k * 8)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row (B, 1) drawn from probs (B, n), by the inverse CDF of one uniform number.
    Why not torch.multinomial: on a 49,152-token vocabulary it took 1.5 ms a token here (a
    temperature without top-k, as Continue sends), this 0.1 ms. A zero-probability index is never
    drawn: its CDF interval is empty."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=cdf.dtype) * total
    idx = torch.searchsorted(cdf, u, right=True)
    # u rounded up to the total (rand just below 1): the first index that reaches it, which has mass
    return torch.where(idx < probs.shape[-1], idx, torch.searchsorted(cdf, total))

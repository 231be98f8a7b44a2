"""Speculative decoding: draft a few tokens cheaply, verify them in one multi-position step.

Why: at batch 1 a decode step reads every weight once for one token, so it is bound by memory
bandwidth; a step over k + 1 positions reads the same weights and costs little more. A draft
source proposes k tokens per sequence; the target model scores the sequence's next token and the
k drafts in one `SmallCoder.forward_rows` step (per row inside continuous batching, each row with
its own draft length), and the longest acceptable prefix of the drafts is kept, plus one token of
the target's own, so every step yields at least the one token plain decoding would.

- Greedy: a draft is kept while it equals the target's argmax there, so the output is plain greedy
  decoding's, token for token (the C++ step computes a token's logits bitwise alike whatever rows
  share the step; in PyTorch, alike up to matmul rounding).
- Sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023). Draft x ~ q is kept
  with probability min(1, p(x) / q(x)); at the first rejection the token is drawn from
  norm(max(p - q, 0)); with every draft kept, one more from p. p and q are the distributions
  `sampling.probabilities` gives (temperature, top-k, top-p, min-p applied), so each token keeps
  exactly the target's distribution. A lookup draft is a point mass: kept with probability p(x).

Draft sources: `lookup` (the last n tokens matched earlier in the prompt and the text generated so
far, the tokens after the match proposed: llama.cpp's lookup decoding, transformers'
`prompt_lookup_num_tokens`) and `draft:PATH` (a smaller checkpoint with the same tokenizer, with its
own KV cache; `DraftModel`).

How many tokens to draft (`Planner`): each row's acceptance rate is tracked; its i-th draft token is
worth alpha^i expected tokens, and is drafted only while that beats what the extra row costs the
step, from step times measured as the engine runs (t(M) ~ a + b M over the rows M). So speculation
switches itself off where acceptance is low or where a large batch already keeps the cores busy,
and a row that stopped drafting probes again as its estimate relaxes toward the prior.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import SmallCoderError
from .sampling import SamplingParams, draw, probabilities

if TYPE_CHECKING:
    from ..model import KVCache, SmallCoder
    from ..tokenizer import Tokenizer

SPECULATIVE_CHOICES = "lookup | draft:PATH | off"
MAX_DRAFT = 10  # drafts per row and step (transformers' prompt lookup proposes 10)
MAX_NGRAM = 3  # the longest suffix lookup matches (it tries 3, then 2, then 1 token)


@dataclass
class Speculation:
    """What `--speculative` asked for: the draft source and how far to draft.

    `adaptive=False` drafts `max_draft` tokens whenever the source has them (tests and
    measurements of a fixed draft length)."""

    source: str  # "lookup" or "draft"
    draft_path: str | None = None  # the draft checkpoint (folder or Hub id)
    max_draft: int = MAX_DRAFT
    adaptive: bool = True
    draft_dtype: str = "float32"  # the draft's weights, as `load` takes them
    draft_model: tuple | None = None  # a loaded (model, tokenizer) instead of draft_path

    def __post_init__(self) -> None:
        if self.source not in ("lookup", "draft"):
            raise SmallCoderError(f"speculative source must be 'lookup' or 'draft', got {self.source!r}")
        if not isinstance(self.max_draft, int) or isinstance(self.max_draft, bool) or self.max_draft < 1:
            raise SmallCoderError(f"max_draft must be an integer >= 1, got {self.max_draft!r}")


def parse_speculative(value: str | None) -> Speculation | None:
    """`--speculative` (lookup | draft:PATH | off) as a Speculation (None: off)."""
    if value is None or value == "off":
        return None
    if value == "lookup":
        return Speculation("lookup")
    if value.startswith("draft:"):
        path = value[len("draft:"):]
        if not path:
            raise SmallCoderError("--speculative draft:PATH needs the draft checkpoint's folder or Hub id after 'draft:'")
        return Speculation("draft", path)
    raise SmallCoderError(f"--speculative: unknown value {value!r}; choose {SPECULATIVE_CHOICES}")


def check_same_tokenizer(draft: Tokenizer, target: Tokenizer, where: str) -> None:
    """Refuse a draft whose tokens mean something else: every id must map to the same token."""
    if draft.vocab_size != target.vocab_size:
        raise SmallCoderError(f"{where}: the draft model's tokenizer has {draft.vocab_size} tokens, the model's "
                              f"{target.vocab_size}; speculative decoding needs the same tokenizer")
    dv, tv = draft.backend.get_vocab(with_added_tokens=True), target.backend.get_vocab(with_added_tokens=True)
    if dv != tv:
        token = next(t for t in sorted(set(dv) | set(tv)) if dv.get(t) != tv.get(t))
        raise SmallCoderError(f"{where}: the draft model's tokenizer differs from the model's (token {token!r} is id "
                              f"{dv.get(token)} there, {tv.get(token)} here); speculative decoding needs the same "
                              "tokenizer")
    if draft.eos_id != target.eos_id:
        raise SmallCoderError(f"{where}: the draft model's end-of-sequence id is {draft.eos_id}, the model's "
                              f"{target.eos_id}")


@dataclass
class Draft:
    """Tokens proposed for one row, and the distribution each was drawn from ((k, V) float64;
    None: point masses, as lookup's)."""

    tokens: list[int]
    q: torch.Tensor | None = None


class Lookup:
    """n-gram prompt lookup over one sequence, indexed as it grows: `propose` finds the latest
    earlier occurrence of the sequence's last MAX_NGRAM (then fewer) tokens and proposes what
    followed it. The index maps each n-gram to the position after its latest occurrence; a
    position is indexed only once a later token exists, so the suffix never matches itself."""

    def __init__(self) -> None:
        self.seq: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(MAX_NGRAM)]

    def extend(self, seq: Sequence[int]) -> None:
        """Catch up with the sequence (the prompt plus the tokens generated so far)."""
        old = len(self.seq)
        self.seq.extend(seq[old:])
        for end in range(max(old, 1), len(self.seq)):  # n-grams ending before position `end`
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self.index[n - 1][tuple(self.seq[end - n:end])] = end

    def propose(self, k: int) -> list[int]:
        seq = self.seq
        for n in range(min(MAX_NGRAM, len(seq)), 0, -1):
            at = self.index[n - 1].get(tuple(seq[len(seq) - n:]))
            if at is not None:
                return seq[at:at + k]
        return []


@dataclass
class RowStats:
    """One request's speculation: its acceptance estimate and counts (reported in its Completion)."""

    alpha: float
    drafted: int = 0
    accepted: int = 0
    lookup: Lookup = field(default_factory=Lookup)


class StepCost:
    """Measured target-step time as a function of the rows in the step: t(M) ~ a + b M, a least-
    squares line through the last steps (one sample per step). Until two row counts have been seen,
    b / a is assumed `prior` (a small batch-1 step here costs ~8% more per extra row)."""

    def __init__(self, prior: float = 0.1, window: int = 64) -> None:
        self.prior = prior
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def add(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, seconds))

    def line(self) -> tuple[float, float]:
        """(a, b) of t(M) = a + b M, both > 0."""
        if not self.samples:
            return 1.0, self.prior
        ms = [m for m, _ in self.samples]
        ts = [t for _, t in self.samples]
        mean_m, mean_t = sum(ms) / len(ms), sum(ts) / len(ts)
        var = sum((m - mean_m) ** 2 for m in ms)
        if var > 0:
            b = sum((m - mean_m) * (t - mean_t) for m, t in zip(ms, ts)) / var
            a = mean_t - b * mean_m
            if a > 0 and b > 0:
                return a, b
        a = mean_t / (1 + self.prior * mean_m)
        return a, self.prior * a


class Planner:
    """How many tokens each row drafts this step (see the module doc): candidates in order of
    worth, alpha^i for a row's i-th, each taken while worth / (tokens the step already yields)
    beats the relative cost of one more row (plus, with a draft model, the measured time it takes
    to draft a token)."""

    def __init__(self, spec: Speculation, prior: float) -> None:
        self.spec, self.prior = spec, prior
        self.cost = StepCost()
        self.draft_cost = 0.0  # seconds a draft model spends per drafted token (measured; 0 for lookup)

    def lengths(self, rows: Sequence[tuple[int, RowStats, int]]) -> dict[int, int]:
        """rows: (slot, stats, most tokens it may draft); returns slot -> tokens to draft."""
        if not self.spec.adaptive:
            return {slot: min(self.spec.max_draft, cap) for slot, _, cap in rows if cap > 0}
        a, b = self.cost.line()
        candidates = [(st.alpha ** i, slot) for slot, st, cap in rows
                      for i in range(1, min(self.spec.max_draft, cap) + 1)]
        candidates.sort(key=lambda c: -c[0])
        m = len(rows)
        expected = float(m)  # each row yields at least one token
        out: dict[int, int] = {}
        for worth, slot in candidates:
            if worth / expected <= (b + self.draft_cost) / (a + b * m):
                break
            out[slot] = out.get(slot, 0) + 1
            expected += worth
            m += 1
        return out

    def settle(self, stats: RowStats, drafted: int, accepted: int) -> None:
        """Update a row's estimate after a step: per drafted token, an exponential average of
        whether it was kept (a rejection ends a span, so the tokens after it are not counted);
        without drafts, relax toward the prior so the row probes again later."""
        stats.drafted += drafted
        stats.accepted += accepted
        if drafted == 0:
            stats.alpha += (self.prior - stats.alpha) / 32
            return
        judged = min(drafted, accepted + 1)
        for i in range(judged):
            kept = 1.0 if i < accepted else 0.0
            stats.alpha += (kept - stats.alpha) / 8


def accept(drafts: Draft, probs: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """The tokens a verified row emits: the kept prefix of the drafts, then one of the target's.

    probs (k + 1, V): the target's distribution (`sampling.probabilities`) after the row's last
    token and after each draft. Greedy rows keep a draft while it is the argmax."""
    out: list[int] = []
    for j, token in enumerate(drafts.tokens):
        p = probs[j]
        if params.greedy:
            best = int(p.argmax())
            if best != token:
                return out + [best]
            out.append(token)
            continue
        q_token = 1.0 if drafts.q is None else float(drafts.q[j, token])
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        if u * q_token < float(p[token]):  # u < p / q, without dividing
            out.append(token)
            continue
        residual = p.clone()
        if drafts.q is None:
            residual[token] = 0.0
        else:
            residual = (residual - drafts.q[j]).clamp_(min=0.0)
        if not float(residual.sum()) > 0:  # p <= q everywhere, so p == q: a rejection cannot happen
            residual = p
        return out + [int(draw(residual[None], generator)[0, 0])]
    last = probs[len(drafts.tokens)]
    return out + [int(last.argmax()) if params.greedy else int(draw(last[None], generator)[0, 0])]


class DraftModel:
    """A smaller model with the target's tokenizer, drafting for every speculating row in batched
    steps on its own KV cache. Each cache row remembers the tokens it holds (`known`), so a row
    catches up on only what is new: the prompt once, then the tokens the last step kept."""

    def __init__(self, model: SmallCoder, tokenizer: Tokenizer, target_tokenizer: Tokenizer, where: str,
                 rows: int, kv_dtype: torch.dtype | None = None) -> None:
        check_same_tokenizer(tokenizer, target_tokenizer, where)
        from ..kernels import build
        from ..model import KVCache

        self.model = model
        self.device = next(model.parameters()).device
        self.kernel = build(model) if self.device.type == "cpu" else None
        dtype = kv_dtype or (self.kernel.cache_dtype if self.kernel is not None else next(model.parameters()).dtype)
        self.context = model.config.max_position_embeddings
        self.cache: KVCache = KVCache(model.config, rows, self.context, dtype, self.device)
        self.known: dict[int, list[int]] = {}
        self.seconds = 0.0  # time spent drafting, and the tokens drafted (the planner's cost of a draft)
        self.drafted = 0

    @classmethod
    def load(cls, path: str, target_tokenizer: Tokenizer, dtype: str, rows: int,
             kv_dtype: torch.dtype | None = None) -> DraftModel:
        from ..checkpoint import load

        if not Path(path).exists() and "/" not in path:
            raise SmallCoderError(f"--speculative draft:{path}: no such folder (give a checkpoint folder or a Hub repo id)")
        model, tokenizer = load(path, dtype=dtype)
        return cls(model, tokenizer, target_tokenizer, f"--speculative draft:{path}", rows, kv_dtype)

    @torch.inference_mode()
    def propose(self, rows: Sequence[tuple[int, list[int], int, SamplingParams, torch.Generator | None]]
                ) -> dict[int, Draft]:
        """rows: (slot, the sequence so far, tokens to draft, params, generator) -> slot -> Draft."""
        started = time.perf_counter()
        live = []
        tokens, crow, pos, last = [], [], [], []
        for slot, seq, k, params, gen in rows:
            if len(seq) + k > self.context or slot >= self.cache.batch_size:
                continue
            known = self.known.get(slot, [])
            common = 0
            for a, b in zip(known, seq):
                if a != b:
                    break
                common += 1
            common = min(common, len(seq) - 1)  # the last token is always fed: its logits are needed
            new = seq[common:]
            tokens += new
            crow += [slot] * len(new)
            pos += range(common, len(seq))
            last.append(len(tokens) - 1)
            live.append([slot, seq, k, params, gen, [], []])
        out: dict[int, Draft] = {}
        while live:
            logits = self.model.forward_rows(torch.tensor(tokens, device=self.device), self.cache, crow, pos, last,
                                             decode_kernel=self.kernel)
            tokens, crow, pos, last, still = [], [], [], [], []
            for row, lg in zip(live, logits):
                slot, seq, k, params, gen, drafted, qs = row
                q = probabilities(lg[None].float(), params)
                token = int(q[0].argmax()) if params.greedy else int(draw(q, gen)[0, 0])
                drafted.append(token)
                qs.append(q[0])
                if len(drafted) < k:
                    tokens.append(token)
                    crow.append(slot)
                    pos.append(len(seq) + len(drafted) - 1)
                    last.append(len(tokens) - 1)
                    still.append(row)
                else:
                    self.known[slot] = seq + drafted[:-1]
                    out[slot] = Draft(drafted, torch.stack(qs))
            live = still
        self.seconds += time.perf_counter() - started
        self.drafted += sum(len(d.tokens) for d in out.values())
        return out

    def forget(self, slot: int) -> None:
        self.known.pop(slot, None)

    def grow(self, rows: int) -> None:
        if rows > self.cache.batch_size:
            self.cache = self.cache.grown(rows, self.cache.max_length)

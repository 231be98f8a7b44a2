"""The generation engine: batched decoding with a KV cache, sampling, stop strings, streaming,
and log-likelihood scoring of given text.

Chat, evaluation and the server all call `Engine`; there is no second decode loop, and scoring
runs the same model forward (one full pass, no KV cache) that generation prefills with.
Text is decoded incrementally (bytes of an unfinished UTF-8 character are held back), stop
strings are matched on the text so they are found even when they span tokens, and a streamed
piece never contains the start of a stop string that may still complete.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


class Engine:
    """Runs a model and its tokenizer; the single decode loop of SmallCoder."""

    def __init__(self, model: SmallCoder, tokenizer: Tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

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

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | None = None
                 ) -> list[Completion]:
        """Complete every prompt (batched); returns one Completion per prompt, in order."""
        params = params or SamplingParams()
        rows: list[_Row] = []
        for _ in self._run(prompts, params, rows):
            pass
        return [Completion(r.text, r.ids, r.finish_reason or "length", r.prompt_tokens) for r in rows]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as soon as each is certain."""
        for pieces in self._run([prompt], params or SamplingParams(), []):
            if pieces[0]:
                yield pieces[0]

    # ---- the loop ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams,
             rows: list[_Row]) -> Iterator[list[str]]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or token lists")
        encoded = [self.prepare(p, params) for p in prompts]
        if not encoded:
            return
        B, L = len(encoded), max(len(e) for e in encoded)
        ctx = self.context_length
        rows.extend(_Row(len(e), min(params.max_new_tokens, ctx - len(e))) for e in encoded)
        steps = max(r.budget for r in rows)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)

        pad = self.tokenizer.eos_id
        tokens = torch.tensor([[pad] * (L - len(e)) + e for e in encoded], device=self.device)
        key_mask = position_ids = None
        if any(len(e) != L for e in encoded):  # left padding: mask it and count positions per row
            key_mask = torch.tensor([[0] * (L - len(e)) + [1] * (len(e) + steps) for e in encoded],
                                    device=self.device)
            position_ids = (key_mask[:, :L].cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(self.model.config, B, L + steps, self.dtype, self.device)
        for r in rows:
            if r.budget <= 0:
                r.finish_reason = "length"

        logits = self.model(tokens, cache=cache, position_ids=position_ids, key_mask=key_mask,
                            last_only=True)[:, -1]
        for step in range(steps):
            next_ids = sample(logits, params, generator)
            pieces = [self._advance(r, int(t), params) for r, t in zip(rows, next_ids.tolist())]
            yield pieces
            if all(r.finish_reason for r in rows):
                return
            if position_ids is not None:
                position_ids = position_ids[:, -1:] + 1
            logits = self.model(next_ids[:, None], cache=cache, position_ids=position_ids,
                                key_mask=key_mask, last_only=True)[:, -1]

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

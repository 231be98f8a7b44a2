"""Log-likelihood scoring of given text: lm-eval's conventions, one full forward, no KV cache.

The conventions are lm-evaluation-harness's (lm_eval/api/model.py `TemplateLM._encode_pair`,
`loglikelihood`; lm_eval/models/huggingface.py `_loglikelihood_tokens`; lm_eval/utils.py
`get_rolling_token_windows`, `make_disjoint_window`), so our ARC/HellaSwag/Wikitext numbers are
comparable with published lm-eval numbers for the same model. `Scoring` is mixed into `Engine`
(which supplies `model`, `tokenizer`, `device` and `context_length`); `token_scores` is the
per-token scoring the engine runs as a queued request (the server's echo + logprobs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..checks import integer
from ..errors import SmallCoderError

if TYPE_CHECKING:
    from ..model import SmallCoder
    from ..tokenizer import Tokenizer

TokenScore = tuple[float, list[tuple[int, float]]]  # log p(token), the top (id, log p) there


@torch.inference_mode()
def token_scores(model: SmallCoder, ids: Sequence[int], top: int, start: int) -> list[TokenScore]:
    """For each position i in [start, len(ids)): log p(ids[i] | ids[:i]) and the `top` likeliest
    (id, logprob) there. One forward over ids[:-1], log-softmax in float32."""
    ids = list(ids)
    if not 1 <= start < len(ids):
        return []
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids[:-1]], dtype=torch.long, device=device))[0, start - 1:]
    logprobs = logits.float().log_softmax(dim=-1)
    target = torch.tensor(ids[start:], dtype=torch.long, device=device)
    picked = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
    alternatives: list[list[tuple[int, float]]] = [[] for _ in picked]
    if top:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return list(zip(picked, alternatives))


class Scoring:
    """lm-eval's loglikelihood family on the engine's model and tokenizer."""

    model: SmallCoder
    tokenizer: Tokenizer
    device: torch.device
    context_length: int

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
        integer(batch_size, "batch_size")
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

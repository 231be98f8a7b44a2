"""SFT formatting with the model card's "EOS fix", and batch collation.

The card's fix: an SFT model learns to stop only if the EOS that closes each answer keeps its
label. So the loss mask is 1 on ` {answer}<|endoftext|>` of every assistant turn (the space after
`Assistant:` included, since the model generates it at inference) and 0 on everything else;
padding is found by position (past each record's length) and never by comparing ids with EOS
(StarCoder's pad id = EOS id = 0, which is how the classic bug taught models never to stop).
Batches are right-padded and attention is causal, so real tokens never attend to the padding
after them: no attention mask is needed.

Labels are aligned with `input_ids` (HF style) and the loss shifts them; the trainer's step loss is
`model(input_ids, labels=labels)` (`loss.next_token_loss_sum`), that is::

    cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100, reduction="sum")
    / num_loss_tokens_of_the_whole_optimizer_step

so a position-0 label never counts, and `num_loss_tokens` counts labels[:, 1:] != -100.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SmallCoderError
from ..labels import IGNORE_INDEX
from ..prompts import ASSISTANT_PREFIX, format_chat

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

Record = tuple[np.ndarray, "np.ndarray | None"]


def _answer_spans(messages: Sequence[Mapping[str, str]], eos_token: str) -> list[tuple[int, int]]:
    """Character spans of ` {content}<eos>` of each assistant turn in the rendered conversation."""
    spans, pos = [], 0
    for m in messages:
        piece = format_chat([m], add_generation_prompt=False, eos_token=eos_token)
        if m.get("role") == "assistant":
            start = pos + len(ASSISTANT_PREFIX)
            spans.append((start, pos + len(piece)))
        pos += len(piece)
    return spans


def _render(messages: Any, where: str, eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and its answer spans, after checking that it ends with an answer."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise SmallCoderError(f"{where}: must be a non-empty list of messages, got {messages!r:.80}")
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "assistant":
        role = last.get("role") if isinstance(last, Mapping) else type(last).__name__
        raise SmallCoderError(f"{where}: message {len(messages) - 1} has role {role!r}; an SFT conversation "
                              "must end with an assistant turn (its answer is what is trained)")
    try:
        text = format_chat(messages, add_generation_prompt=False, eos_token=eos_token)
    except SmallCoderError as e:
        raise SmallCoderError(f"{where}: {e}") from None
    return text, _answer_spans(messages, eos_token)


def _mask_from_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 for each token whose character span overlaps one of `spans` (sorted, disjoint)."""
    mask = [0] * len(offsets)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        if k < len(spans) and e > spans[k][0]:
            mask[t] = 1
    return mask


def encode_conversations(conversations: Iterable[Sequence[Mapping[str, str]]], tokenizer: Tokenizer,
                         max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Token ids of `format_chat(messages, add_generation_prompt=False)` and the SFT loss mask, for each.

    The ids come from one encoding of the whole rendered string, so they equal
    `tokenizer.encode(format_chat(...))` for any tokenizer; the mask comes from the tokens'
    character offsets: 1 for a token that overlaps an assistant answer (` {content}` + EOS), 0
    otherwise. `max_len` keeps the first `max_len` tokens (a cut answer then lacks its EOS, which
    teaches nothing wrong: every trained position still continues the answer). Uses the
    tokenizer's parallel batch encoder.
    """
    if max_len is not None and max_len < 1:
        raise SmallCoderError(f"encode_conversations: max_len must be >= 1, got {max_len}")
    rendered = [_render(msgs, f"conversation {i}", tokenizer.eos_token) for i, msgs in enumerate(conversations)]
    encs = tokenizer.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    out = []
    for enc, (_, spans) in zip(encs, rendered):
        ids, mask = list(enc.ids), _mask_from_offsets(enc.offsets, spans)
        if max_len is not None:
            ids, mask = ids[:max_len], mask[:max_len]
        out.append((ids, mask))
    return out


def count_loss_tokens(ids: np.ndarray, mask: np.ndarray | None, seq_len: int) -> int:
    """Labels of one record that the shifted loss uses once collated to `seq_len` (cheap: no batch)."""
    n = min(len(ids), seq_len)
    if mask is None:
        return max(n - 1, 0)
    return int(np.count_nonzero(mask[1:n]))


def collate(records: Sequence[Record], seq_len: int, pad_id: int,
            pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """Right-pad records into a batch: `input_ids`, `labels` (B, T) int64, and `num_loss_tokens`.

    T is `seq_len` by default: one fixed shape, so a compiled model never recompiles. With
    `pad_to_multiple_of`, T is the longest record rounded up to that multiple (at most
    `seq_len`), which saves compute on short SFT batches at the cost of a few shapes.
    Records longer than `seq_len` are cut. A record with mask None (packed pretraining) trains
    every token; otherwise a label is kept where the mask is 1. Padding gets label -100 by
    position, whatever the pad id is.
    """
    import torch

    if not records:
        raise SmallCoderError("collate: got no records")
    if seq_len < 2:
        raise SmallCoderError(f"collate: seq_len must be >= 2, got {seq_len}")
    lengths = [min(len(ids), seq_len) for ids, _ in records]
    if pad_to_multiple_of is None:
        T = seq_len
    else:
        if pad_to_multiple_of < 1:
            raise SmallCoderError(f"collate: pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        T = min(seq_len, max(pad_to_multiple_of, math.ceil(max(lengths) / pad_to_multiple_of) * pad_to_multiple_of))
    B = len(records)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    for b, ((ids, mask), n) in enumerate(zip(records, lengths)):
        if mask is not None and len(mask) != len(ids):
            raise SmallCoderError(f"collate: record {b} has {len(ids)} ids but a loss mask of {len(mask)}")
        row = np.asarray(ids[:n], dtype=np.int64)
        input_ids[b, :n] = row
        labels[b, :n] = row if mask is None else np.where(mask[:n] != 0, row, IGNORE_INDEX)
    num = int(np.count_nonzero(labels[:, 1:] != IGNORE_INDEX))
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels), "num_loss_tokens": num}

"""Fill-in-the-middle training data (Bavarian et al. 2022), applied as StarCoder's Megatron loader
applies it: to each packed training context as the mixture loader draws it (context-level FIM).

Why context-level (after packing) and not document-level (before packing):
- every FIM example lies within the one context the model trains on. Document-level examples are
  cut by packing like any document, so the middle of a document longer than the context lands in
  another context than its prefix and suffix: in the tiny recipe most documents (standard-library
  modules) run to thousands of tokens against a 256-token context. The paper names this
  fragmenting as document-level FIM's drawback;
- the packs stay plain left-to-right text: the stage's validation reads them as they are, so its
  loss measures the same thing with and without FIM, and `fim_rate` is no part of the stage data's
  cache key (train/stagedata.py): changing it reuses the packs, with nothing to pack again;
- a record drawn again in a later epoch is split anew (the draw is keyed by the epoch).
The price is tokenizing during training: a transformed document is decoded and its three pieces
tokenized again (the `tokenizers` library, one batch per step and rank; README "FIM").

The transform of one context (`FimTransform.apply`):
1. the context is split at EOS into segments (whole documents, and the parts of documents cut at
   the context's two edges); the EOS tokens stay where they are;
2. each non-empty segment is, with probability `rate`, decoded and split at two character positions
   drawn uniformly from 0..len(text) and sorted (prefix | middle | suffix; any part may be empty);
   each piece is tokenized on its own and the three are laid out by `prompts.fim_ids`, in SPM order
   with probability `spm_rate`, else PSM;
3. the result is cut back to the context's length, or padded with `<fim_pad>` (StarCoder's pad;
   EOS where the tokenizer has none), so every record keeps `seq_len` tokens.

Kept as they are even when drawn: segments of fewer than 3 characters (no room for three parts;
three sentinels around one or two characters teach nothing), and segments whose tokens do not
decode to whole characters (a multi-byte character cut at a context's edge decodes to U+FFFD: the
paper warns against training on such spurious characters). StarCoder's `permute` has neither rule.

The loss is on every token, sentinels and padding included (as StarCoder): a transformed context is
a packed record like any other, its labels its inputs.

Randomness: one generator per drawn record, keyed by (loader seed, component, epoch, record index)
(`record_rng`): a pure function of what is drawn, so there is no state to save, every rank
transforms a record the same way, and a resumed run sees exactly the examples of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..checks import number
from ..errors import SmallCoderError
from ..prompts import FIM_ORDERS, FIM_PAD, FIM_TOKENS, fim_ids, has_fim

MIN_CHARS = 3             # shorter segments are kept as they are
_FIM_STREAM = 2           # SeedSequence key (after the mixture loader's 0 and 1)
_REPLACEMENT = "\ufffd"   # what a cut multi-byte character decodes to


def record_rng(seed: int, component_key: int, epoch: int, index: int) -> np.random.Generator:
    """The generator that decides record `index`'s transform when drawn in `epoch`."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, _FIM_STREAM, component_key, epoch, index])))


def split_points(length: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two character positions drawn uniformly from 0..length, sorted (the paper's split)."""
    a, b = (int(x) for x in rng.integers(0, length + 1, size=2))
    return min(a, b), max(a, b)


@dataclass
class _Plan:
    """One segment to transform: where it sits in its record, its three pieces and its order."""

    record: int
    start: int
    end: int
    pieces: tuple[str, str, str]  # prefix, middle, suffix
    order: str


class FimTransform:
    """Context-level FIM for packed records of one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any, rate: float, spm_rate: float) -> None:
        self.rate = number(rate, "fim_rate", maximum=1.0)
        self.spm_rate = number(spm_rate, "fim_spm_rate", maximum=1.0)
        if not has_fim(tokenizer):
            missing = [t for t in FIM_TOKENS if tokenizer.token_to_id(t) is None]
            raise SmallCoderError(f"FIM needs {', '.join(FIM_TOKENS)} as single tokens of the tokenizer, "
                                  f"which lacks {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.eos_id = int(tokenizer.eos_id)
        self.sentinel_ids = tuple(int(tokenizer.token_to_id(t)) for t in FIM_TOKENS)
        pad = tokenizer.token_to_id(FIM_PAD)
        self.pad_id = self.eos_id if pad is None else int(pad)

    def describe(self) -> dict[str, float]:
        """The settings, as the loader's saved state records them."""
        return {"rate": self.rate, "spm_rate": self.spm_rate}

    def _plan(self, r: int, ids: np.ndarray, rng: np.random.Generator) -> list[_Plan]:
        """The segments of record `r` to transform, drawn in order (one coin per non-empty segment;
        for a drawn one, its split and its order)."""
        plans = []
        breaks = [int(i) for i in np.flatnonzero(ids == self.eos_id)]
        start = 0
        for end in [*breaks, len(ids)]:
            if end > start and rng.random() < self.rate:
                text = self.tokenizer.decode(ids[start:end].tolist())
                if len(text) >= MIN_CHARS and _REPLACEMENT not in text:
                    a, b = split_points(len(text), rng)
                    order = FIM_ORDERS[1] if rng.random() < self.spm_rate else FIM_ORDERS[0]
                    plans.append(_Plan(r, start, end, (text[:a], text[a:b], text[b:]), order))
            start = end + 1
        return plans

    def apply(self, records: Sequence[np.ndarray], rngs: Sequence[np.random.Generator]) -> list[np.ndarray]:
        """Each packed record transformed with its generator; each result holds as many tokens as
        its record (uint16, like the store's). One tokenizer batch for all of them."""
        if len(records) != len(rngs):
            raise SmallCoderError(f"FIM: {len(records)} records but {len(rngs)} generators")
        plans = [p for r, (ids, rng) in enumerate(zip(records, rngs)) for p in self._plan(r, np.asarray(ids), rng)]
        encoded = self.tokenizer.encode_batch([piece for p in plans for piece in p.pieces]) if plans else []
        by_record: dict[int, list[tuple[_Plan, list[int]]]] = {}
        for n, p in enumerate(plans):
            prefix, middle, suffix = encoded[3 * n:3 * n + 3]
            by_record.setdefault(p.record, []).append((p, fim_ids(prefix, suffix, middle, p.order, self.sentinel_ids)))
        out = []
        for r, ids in enumerate(records):
            ids = np.asarray(ids)
            if r not in by_record:
                out.append(ids)
                continue
            parts, at = [], 0
            for p, new in by_record[r]:
                parts += [ids[at:p.start], np.asarray(new, dtype=ids.dtype)]
                at = p.end
            parts.append(ids[at:])
            joined = np.concatenate(parts)[:len(ids)]
            if len(joined) < len(ids):
                joined = np.concatenate([joined, np.full(len(ids) - len(joined), self.pad_id, dtype=ids.dtype)])
            out.append(joined)
        return out

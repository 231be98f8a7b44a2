"""The stage mixture loader: weighted, deterministic, resumable, and the same on every rank.

Each optimizer step draws `global_batch` records. Record j's component is drawn with probability
= its weight from an RNG keyed by (seed, step), so the draw needs no saved RNG state and is the
same on every rank; the record is that component's next one in a per-epoch permutation keyed by
(seed, component name, epoch), re-shuffled each epoch. Rank r takes its contiguous slice of the
global batch and splits it into micro-batches. So the ranks' parts are disjoint and together are
exactly the single-process batch: 2-process DDP sees the same data as 1 process, and a run may
resume on a different number of ranks. The state (step, tokens, each component's epoch and
cursor) is a small JSON-able dict saved with the checkpoint.

With `fim` (a `data.fim.FimTransform`), each packed record this rank takes is transformed for
fill-in-the-middle with a generator keyed by (seed, component, epoch, index): the same record drawn
at the same point gives the same example on any rank and after a resume, and needs no saved state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..checks import integer
from ..errors import SmallCoderError
from .sft import collate, count_loss_tokens

STATE_VERSION = 1
_CHOICE_STREAM = 0  # SeedSequence key of the component draw
_PERM_STREAM = 1    # ... and of the per-epoch permutations (data.fim uses 2)
KINDS = ("packed", "sft")


@runtime_checkable
class RecordDataset(Protocol):
    """What the loader reads: `pack.TokenDataset`, or any in-memory equivalent.

    `ds[i]` is (uint16 ids, uint8 loss mask or None); None marks packed pretraining records,
    which all hold `seq_len` tokens and train every token.
    """

    kind: str
    seq_len: int

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]: ...


@dataclass
class Component:
    """One source of a stage mixture and its share of the drawn records."""

    name: str
    dataset: RecordDataset
    weight: float


@dataclass
class Step:
    """One optimizer step's data for this rank.

    `num_loss_tokens` and `tokens` count the whole global batch (all ranks): divide each
    micro-batch's summed loss (`model(ids, labels=labels)`) by `num_loss_tokens` (and, under DDP's gradient averaging,
    multiply by the world size) to get the mean loss per trained token of the whole step.
    """

    step: int                            # 1-based number of this optimizer step
    micro_batches: list[dict[str, Any]]  # this rank's, each from `sft.collate`
    num_loss_tokens: int                 # shifted labels != -100 in the global batch
    tokens: int                          # real (non-pad) tokens in the global batch
    tokens_seen: int                     # global tokens drawn so far, this step included
    records: list[tuple[str, int]] = field(default_factory=list)  # this rank's (component, index)


@dataclass
class _Cursor:
    epoch: int = 0
    cursor: int = 0
    records: int = 0  # drawn so far (global), for the realised-mixture report
    tokens: int = 0
    perm: np.ndarray | None = None


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")


class MixtureLoader:
    """Draws weighted global batches from several record datasets; see the module docstring."""

    def __init__(self, components: Sequence[Component], *, seq_len: int, global_batch: int, micro_batch: int,
                 seed: int, pad_id: int, rank: int = 0, world_size: int = 1,
                 pad_to_multiple_of: int | None = None, fim: Any = None) -> None:
        self.seq_len = integer(seq_len, "mixture loader: seq_len", 2)
        self.global_batch = integer(global_batch, "mixture loader: global_batch")
        self.micro_batch = integer(micro_batch, "mixture loader: micro_batch")
        self.world_size = integer(world_size, "mixture loader: world_size")
        self.seed = integer(seed, "mixture loader: seed", 0)
        self.pad_id = integer(pad_id, "mixture loader: pad_id", 0)
        self.rank = integer(rank, "mixture loader: rank", 0)
        if self.rank >= self.world_size:
            raise SmallCoderError(f"mixture loader: rank {rank} is outside world_size {world_size}")
        if self.global_batch % (self.world_size * self.micro_batch):
            raise SmallCoderError(
                f"mixture loader: global_batch {global_batch} is not divisible by world_size {world_size} "
                f"x micro_batch {micro_batch} = {self.world_size * self.micro_batch}")
        self.pad_to_multiple_of = pad_to_multiple_of
        self.fim = fim
        self.components = list(components)
        self._validate_components()
        w = np.array([float(c.weight) for c in self.components])
        self._p = w / w.sum()
        self._keys = [_name_key(c.name) for c in self.components]
        self._state = [_Cursor() for _ in self.components]
        self.step = 0
        self.tokens_seen = 0

    def _validate_components(self) -> None:
        if not self.components:
            raise SmallCoderError("mixture loader: needs at least one component")
        seen: set[str] = set()
        for c in self.components:
            if not isinstance(c.name, str) or not c.name:
                raise SmallCoderError(f"mixture component {c.name!r}: name must be a non-empty string")
            if c.name in seen:
                raise SmallCoderError(f"mixture component {c.name!r}: duplicate name")
            seen.add(c.name)
            w = c.weight
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise SmallCoderError(f"mixture component {c.name!r}: weight must be a positive number, got {w!r}")
            kind = getattr(c.dataset, "kind", None)
            if kind not in KINDS:
                raise SmallCoderError(f"mixture component {c.name!r}: dataset kind must be one of {KINDS}, "
                                      f"got {kind!r}")
            if len(c.dataset) == 0:
                raise SmallCoderError(f"mixture component {c.name!r}: dataset is empty (0 records)")
            ds_len = getattr(c.dataset, "seq_len", None)
            if kind == "packed" and ds_len != self.seq_len:
                raise SmallCoderError(f"mixture component {c.name!r}: packed records hold seq_len {ds_len} "
                                      f"tokens but the loader's seq_len is {self.seq_len}; repack or change seq_len")
            if kind == "sft" and isinstance(ds_len, int) and ds_len > self.seq_len:
                raise SmallCoderError(f"mixture component {c.name!r}: SFT records run up to {ds_len} tokens but "
                                      f"the loader's seq_len is {self.seq_len}, which would cut answers and their "
                                      "EOS; repack with a smaller max_len or raise seq_len")
        total = sum(float(c.weight) for c in self.components)
        if abs(total - 1.0) > 1e-6:
            detail = ", ".join(f"{c.name}={c.weight}" for c in self.components)
            raise SmallCoderError(f"mixture weights must sum to 1 (within 1e-6), got {total:.9g} ({detail})")

    # -- drawing ---------------------------------------------------------------------------------

    def _next_index(self, k: int) -> tuple[int, int]:
        """(epoch, index) of component k's next record."""
        st = self._state[k]
        n = len(self.components[k].dataset)
        if st.cursor >= n:  # epoch done: re-shuffle
            st.epoch, st.cursor, st.perm = st.epoch + 1, 0, None
        if st.perm is None:  # made lazily, also after load_state_dict
            st.perm = self._permutation(k, st.epoch)
        i = int(st.perm[st.cursor])
        st.cursor += 1
        return st.epoch, i

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        ss = np.random.SeedSequence([self.seed, _PERM_STREAM, self._keys[k], epoch])
        return np.random.Generator(np.random.PCG64(ss)).permutation(len(self.components[k].dataset))

    def _draw_components(self, step: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, _CHOICE_STREAM, step])))
        return rng.choice(len(self.components), size=self.global_batch, p=self._p)

    def next_step(self) -> Step:
        """The next optimizer step's micro-batches for this rank (the caller counts the steps: a
        stage's length is fixed before it starts, see `train.stagedata.prepare_stage`)."""
        picks = [(int(k), *self._next_index(int(k))) for k in self._draw_components(self.step)]
        per_rank = self.global_batch // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        mine: list[tuple[np.ndarray, np.ndarray | None]] = []
        num_loss = tokens = 0
        for j, (k, _, i) in enumerate(picks):
            ids, mask = self.components[k].dataset[i]
            n = min(len(ids), self.seq_len)
            num_loss += count_loss_tokens(ids, mask, self.seq_len)
            tokens += n
            st = self._state[k]
            st.records += 1
            st.tokens += n
            if lo <= j < hi:
                mine.append((ids, mask))
        if self.fim is not None:
            mine = self._fim(picks[lo:hi], mine)
        micro = [collate(mine[s:s + self.micro_batch], self.seq_len, self.pad_id, self.pad_to_multiple_of)
                 for s in range(0, len(mine), self.micro_batch)]
        self.step += 1
        self.tokens_seen += tokens
        names = [(self.components[k].name, i) for k, _, i in picks[lo:hi]]
        return Step(step=self.step, micro_batches=micro, num_loss_tokens=num_loss, tokens=tokens,
                    tokens_seen=self.tokens_seen, records=names)

    def _fim(self, picks: list[tuple[int, int, int]], records: list[tuple[np.ndarray, np.ndarray | None]],
             ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """This rank's records with the packed ones FIM-transformed (same length: the step's
        token and loss counts, made from the untransformed records, stay true)."""
        from .fim import record_rng

        todo = [n for n, (_, mask) in enumerate(records) if mask is None]
        rngs = [record_rng(self.seed, self._keys[picks[n][0]], picks[n][1], picks[n][2]) for n in todo]
        out = list(records)
        for n, ids in zip(todo, self.fim.apply([records[n][0] for n in todo], rngs)):
            out[n] = (ids, None)
        return out

    # -- reporting and resuming ------------------------------------------------------------------

    def mixture(self) -> dict[str, dict[str, float]]:
        """The realised mixture so far (global): records and tokens per component, next to the weight."""
        total_r = sum(st.records for st in self._state) or 1
        total_t = sum(st.tokens for st in self._state) or 1
        return {c.name: {"weight": float(c.weight), "records": st.records, "record_share": st.records / total_r,
                         "tokens": st.tokens, "token_share": st.tokens / total_t, "epoch": st.epoch}
                for c, st in zip(self.components, self._state)}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (the draw RNG is keyed by seed and step)."""
        return {
            "version": STATE_VERSION, "seed": self.seed, "step": self.step, "tokens_seen": self.tokens_seen,
            "seq_len": self.seq_len, "global_batch": self.global_batch,
            "fim": None if self.fim is None else self.fim.describe(),
            "components": {c.name: {"weight": float(c.weight), "size": len(c.dataset), "epoch": st.epoch,
                                    "cursor": st.cursor,
                                    "records": st.records, "tokens": st.tokens}
                           for c, st in zip(self.components, self._state)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s output; refuse one from a different mixture or seed."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise SmallCoderError(f"loader state: version {got!r} is not supported (expected {STATE_VERSION})")
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("global_batch", self.global_batch)):
            if state.get(key) != mine:
                raise SmallCoderError(f"loader state: {key} is {state.get(key)!r} but this loader has {mine!r}; "
                                      "a resumed run must keep the seed, seq_len and global batch")
        fim = None if self.fim is None else self.fim.describe()
        if state.get("fim") != fim:
            raise SmallCoderError(f"loader state: FIM settings were {state.get('fim')!r} but this loader has {fim!r}; "
                                  "a resumed run must keep fim_rate and fim_spm_rate")
        saved = state.get("components")
        names = [c.name for c in self.components]
        if not isinstance(saved, dict) or sorted(saved) != sorted(names):
            got = sorted(saved) if isinstance(saved, dict) else saved
            raise SmallCoderError(f"loader state: components {got!r} do not match this loader's {sorted(names)!r}")
        new_state = []
        for c in self.components:
            s = saved[c.name]
            try:
                size, weight, epoch, cursor = int(s["size"]), float(s["weight"]), int(s["epoch"]), int(s["cursor"])
                records, tokens = int(s["records"]), int(s["tokens"])
            except (KeyError, TypeError, ValueError) as e:
                raise SmallCoderError(f"loader state: component {c.name!r}: bad or missing field ({e})") from None
            if size != len(c.dataset):
                raise SmallCoderError(f"loader state: component {c.name!r}: size was {size} records, now "
                                      f"{len(c.dataset)}; the data changed since the state was saved")
            if abs(weight - float(c.weight)) > 1e-9:
                raise SmallCoderError(f"loader state: component {c.name!r}: weight was {weight}, now {c.weight}")
            if epoch < 0 or not 0 <= cursor <= size:
                raise SmallCoderError(f"loader state: component {c.name!r}: epoch {epoch} / cursor {cursor} "
                                      f"out of range for {size} records")
            new_state.append(_Cursor(epoch=epoch, cursor=cursor, records=records, tokens=tokens))
        step, seen = state.get("step"), state.get("tokens_seen")
        if not isinstance(step, int) or step < 0 or not isinstance(seen, int) or seen < 0:
            raise SmallCoderError(f"loader state: step {step!r} / tokens_seen {seen!r} must be integers >= 0")
        self._state, self.step, self.tokens_seen = new_state, step, seen

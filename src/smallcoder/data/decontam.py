"""Benchmark decontamination: drop training documents that share a word n-gram with a benchmark.

A model that saw HumanEval, MBPP or GSM8k test items in training reports inflated scores, so
training text is checked against the benchmarks before packing (the GPT-3 / Llama recipe: a
document is contaminated when it shares a 13-word sequence with a benchmark item).

Normalisation, chosen so trivial edits do not evade it: the text is lowercased and split into
`\\w+` runs (letters, digits, underscore; Unicode-aware). Whitespace, indentation, line endings,
punctuation and operators are thereby ignored, so re-indented or reformatted code, `\\r\\n`
versus `\\n`, or `a+b` versus `a + b` all give the same words; identifiers stay whole words.

What is indexed for each benchmark item:
- humaneval: the prompt followed by the canonical solution, as one word sequence (so n-grams of
  the prompt, of the solution and across the two all count; a one-line solution is only matched
  together with the end of its prompt, because alone it is generic code like `return a + b`).
- mbpp: the task text, and separately the reference code (all 974 tasks).
- gsm8k: the test question.
- arc_easy / arc_challenge: question followed by the choices; hellaswag: context followed by the
  gold ending; wikitext2: each article (split at its ` = Title = ` lines).
A sequence shorter than n words is used whole as its own n-gram (e.g. MBPP/62's reference code is
a 6-word one-liner), so short items are matched too, at their own length.

N-grams are stored as 64-bit polynomial hashes of 64-bit BLAKE2b word hashes (stable across
processes and machines, unlike Python's salted `hash(str)`), in sorted numpy arrays behind a 4 MB
presence filter: the three default benchmarks give 76k n-grams and the whole index takes about
22 MB, words kept for reporting included. Checking runs at roughly 2M words/s. A hash hit is
confirmed by comparing the actual words, so a hash collision can never remove a document.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checks import integer
from ..errors import SmallCoderError
from ..fsutil import atomic_write

DEFAULT_TASKS = ("humaneval", "mbpp", "gsm8k")
MAX_REPORTED_REMOVALS = 50
_WORD = re.compile(r"\w+")
_WIKI_TITLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)
_MASK = (1 << 64) - 1
_FILTER_BITS = 22
_BASE = 0x9E3779B97F4A7C15  # odd, so it is invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)


def words(text: str) -> list[str]:
    """The normalised word sequence that n-grams are taken from (see the module docstring)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Hit:
    """Why a document counts as contaminated: which benchmark item, and the shared words."""

    benchmark: str  # a task name, e.g. "humaneval"
    item_id: str  # e.g. "HumanEval/12", "MBPP/2", "GSM8K/17" (row in test.jsonl)
    ngram: str  # the shared words, space-joined after normalisation


class _Hasher:
    """Word hashes and vectorised polynomial n-gram hashes over uint64 arrays."""

    def __init__(self, cache_limit: int = 2_000_000) -> None:
        self._cache: dict[str, int] = {}
        self._cache_limit = cache_limit
        self._pow = None  # _BASE ** k
        self._inv_pow = None  # _BASE_INV ** k

    def word_ids(self, ws: Sequence[str]):
        import numpy as np

        cache = self._cache
        if len(cache) > self._cache_limit:  # a long-tailed corpus: keep memory bounded
            cache.clear()
        ids = list(map(cache.get, ws))
        if None in ids:
            for i, h in enumerate(ids):
                if h is None:
                    w = ws[i]
                    ids[i] = cache[w] = int.from_bytes(
                        hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
        return np.array(ids, dtype=np.uint64)

    def _powers(self, n: int):
        import numpy as np

        if self._pow is None or len(self._pow) < n:
            size = max(n, 1024, 2 * (len(self._pow) if self._pow is not None else 0))
            # Python ints mod 2**64 keep this exact (numpy would mix int64 with uint64 into float64).
            pw, inv = [1] * size, [1] * size
            for k in range(1, size):
                pw[k] = pw[k - 1] * _BASE & _MASK
                inv[k] = inv[k - 1] * _BASE_INV & _MASK
            self._pow, self._inv_pow = np.array(pw, dtype=np.uint64), np.array(inv, dtype=np.uint64)
        return self._pow, self._inv_pow

    def prefix(self, ids):
        """P[k] = sum_{j<k} ids[j] * B^-j (mod 2**64); any window's hash then costs O(1)."""
        import numpy as np

        _, inv = self._powers(len(ids) + 1)
        out = np.zeros(len(ids) + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.cumsum(ids * inv[: len(ids)], out=out[1:])
        return out

    def windows(self, prefix, m: int):
        """Hashes of every m-word window: sum_j ids[i+j] * B^(m-1-j), for i = 0 .. len-m."""
        import numpy as np

        n = len(prefix) - 1
        if n < m:
            return np.empty(0, dtype=np.uint64)
        pw, _ = self._powers(n)
        with np.errstate(over="ignore"):
            return (prefix[m:] - prefix[: n - m + 1]) * pw[m - 1: n]


class Decontaminator:
    """An index of benchmark n-grams; `find` checks one text, `filter` a stream of documents."""

    def __init__(self, ngram: int = 13) -> None:
        self.ngram = integer(ngram, "decontamination n-gram size")
        self._hasher = _Hasher()
        self._items: list[tuple[str, str, list[str]]] = []  # (benchmark, item_id, words)
        self._entries: dict[int, dict[int, tuple[int, int]]] = {}  # length -> hash -> (item, start)
        self._tables: dict[int, Any] | None = None  # length -> sorted uint64 array of hashes
        self._filter: Any = None  # bool array over the hashes' top _FILTER_BITS bits
        self._item_keys: set[tuple[str, str]] = set()
        self.items_per_benchmark: Counter[str] = Counter()
        self._seen = 0  # report counters, accumulated over filter() calls
        self._removed = 0
        self._removed_per: Counter[str] = Counter()
        self._removals: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- building

    @classmethod
    def from_benchmarks(cls, benchmarks: Mapping[str, list[dict] | str], ngram: int = 13) -> Decontaminator:
        """Index the test items of each benchmark: `{task name: its items}`, the items as
        `smallcoder.eval.data.load_task_data` returns them. The caller loads them (the trainer, the
        `data decontam` command), so this package never reads benchmark files itself."""
        if not isinstance(benchmarks, Mapping):
            raise SmallCoderError(f"Decontaminator.from_benchmarks takes {{task name: items}}, got "
                                  f"{type(benchmarks).__name__}; load the items with "
                                  "smallcoder.eval.data.load_tasks(tasks, data_dir)")
        self = cls(ngram)
        for task, data in benchmarks.items():
            if task not in _BENCHMARK_TEXTS:
                raise SmallCoderError(f"unknown benchmark {task!r} for decontamination; "
                                      f"choose from: {', '.join(_BENCHMARK_TEXTS)}")
            for item_id, text in _BENCHMARK_TEXTS[task](data):
                self.add(task, item_id, text)
        return self

    def add(self, benchmark: str, item_id: str, text: str) -> None:
        """Index one benchmark text (an item may add several, e.g. MBPP's text and its code)."""
        ws = words(text)
        if not ws:
            return
        index = len(self._items)
        self._items.append((benchmark, item_id, ws))
        if (benchmark, item_id) not in self._item_keys:
            self._item_keys.add((benchmark, item_id))
            self.items_per_benchmark[benchmark] += 1
        m = min(self.ngram, len(ws))
        table = self._entries.setdefault(m, {})
        hashes = self._hasher.windows(self._hasher.prefix(self._hasher.word_ids(ws)), m)
        for start, h in enumerate(hashes.tolist()):
            table.setdefault(h, (index, start))
        self._tables = None

    @property
    def num_ngrams(self) -> int:
        """Distinct indexed n-grams (short items count once, at their own length)."""
        return sum(len(t) for t in self._entries.values())

    def _lookup_tables(self) -> dict[int, Any]:
        import numpy as np

        if self._tables is None:
            self._tables = {m: np.sort(np.fromiter(t.keys(), dtype=np.uint64, count=len(t)))
                            for m, t in sorted(self._entries.items(), reverse=True)}
            # A 4 MB presence filter on the hash's top bits: most windows are rejected by one
            # gather, and only the few that pass (~2% at 76k n-grams) pay for a binary search.
            self._filter = np.zeros(1 << _FILTER_BITS, dtype=bool)
            for table in self._tables.values():
                self._filter[(table >> np.uint64(64 - _FILTER_BITS)).astype(np.intp)] = True
        return self._tables

    # ---------------------------------------------------------------- checking

    def find(self, text: str) -> Hit | None:
        """The first (leftmost) benchmark n-gram in `text`, or None when it is clean."""
        import numpy as np

        if not self._entries:
            raise SmallCoderError("the decontaminator has no benchmark items; build it with "
                                  "Decontaminator.from_benchmarks(...) or add(...) items first")
        if not isinstance(text, str):
            raise SmallCoderError(f"a document to check must be a str, got {type(text).__name__}: {text!r:.60}")
        ws = words(text)
        tables = self._lookup_tables()
        if not ws or len(ws) < min(tables):
            return None
        prefix = self._hasher.prefix(self._hasher.word_ids(ws))
        best: tuple[int, int, int, int] | None = None  # (position, length, item, start)
        for m, table in tables.items():
            hashes = self._hasher.windows(prefix, m)
            maybe = np.flatnonzero(self._filter[(hashes >> np.uint64(64 - _FILTER_BITS)).astype(np.intp)])
            if not len(maybe):
                continue
            candidates = hashes[maybe]
            pos = np.minimum(np.searchsorted(table, candidates), len(table) - 1)
            found = maybe[table[pos] == candidates]
            for i in found.tolist():
                if best is not None and i >= best[0]:
                    break
                item, start = self._entries[m][int(hashes[i])]
                if self._items[item][2][start:start + m] == ws[i:i + m]:  # rule out hash collisions
                    best = (i, m, item, start)
                    break
        if best is None:
            return None
        _, m, item, start = best
        benchmark, item_id, item_words = self._items[item]
        return Hit(benchmark, item_id, " ".join(item_words[start:start + m]))

    def filter(self, texts: Iterable[str], labels: Iterable[Any] | None = None) -> Iterator[str]:
        """Yield the clean documents of `texts`, recording each removal for `report()`."""
        label_iter = iter(labels) if labels is not None else None
        for text in texts:
            label = next(label_iter, None) if label_iter is not None else None
            index = self._seen
            self._seen += 1
            hit = self.find(text)
            if hit is None:
                yield text
                continue
            self._removed += 1
            self._removed_per[hit.benchmark] += 1
            if len(self._removals) < MAX_REPORTED_REMOVALS:
                self._removals.append({"index": index, "label": label, "benchmark": hit.benchmark,
                                       "item_id": hit.item_id, "ngram": hit.ngram})

    def report(self) -> dict[str, Any]:
        """Counts over every `filter` call so far, and the first removals with their reasons."""
        return {
            "ngram": self.ngram,
            "normalisation": "lowercase, words = \\w+ runs",
            "benchmarks": dict(self.items_per_benchmark),
            "indexed_ngrams": self.num_ngrams,
            "documents": self._seen,
            "kept": self._seen - self._removed,
            "removed": self._removed,
            "removed_per_benchmark": {b: self._removed_per.get(b, 0) for b in self.items_per_benchmark},
            "removals": list(self._removals),
            "removals_listed": f"first {MAX_REPORTED_REMOVALS}",
        }


# (item id, text) pairs to index, per benchmark; see the module docstring for the choice.

def _humaneval_texts(data: list[dict]) -> Iterator[tuple[str, str]]:
    for r in data:
        yield r["task_id"], r["prompt"] + "\n" + r["canonical_solution"]


def _mbpp_texts(data: list[dict]) -> Iterator[tuple[str, str]]:
    for r in data:
        yield f"MBPP/{r['task_id']}", r["text"]
        yield f"MBPP/{r['task_id']}", r["code"]


def _gsm8k_texts(data: list[dict]) -> Iterator[tuple[str, str]]:
    for i, r in enumerate(data):
        yield f"GSM8K/{i}", r["question"]


def _arc_texts(data: list[dict]) -> Iterator[tuple[str, str]]:
    for r in data:
        yield f"ARC/{r['id']}", r["question"] + "\n" + "\n".join(r["choices"])


def _hellaswag_texts(data: list[dict]) -> Iterator[tuple[str, str]]:
    for i, r in enumerate(data):
        yield f"HellaSwag/{i}", r["ctx"] + " " + r["endings"][r["label"]]


def _wikitext_texts(data: str) -> Iterator[tuple[str, str]]:
    titles = list(_WIKI_TITLE.finditer(data))
    for k, t in enumerate(titles):
        end = titles[k + 1].start() if k + 1 < len(titles) else len(data)
        yield f"WikiText-2/{t.group(0).strip(' =')}", data[t.start():end]


_BENCHMARK_TEXTS: dict[str, Callable[[Any], Iterator[tuple[str, str]]]] = {
    "humaneval": _humaneval_texts, "humaneval_plus": _humaneval_texts, "mbpp": _mbpp_texts,
    "gsm8k": _gsm8k_texts, "arc_easy": _arc_texts, "arc_challenge": _arc_texts,
    "hellaswag": _hellaswag_texts, "wikitext2": _wikitext_texts,
}
# Every benchmark the index can read (smallcoder.eval.data's task names).
BENCHMARKS = tuple(_BENCHMARK_TEXTS)


# ---------------------------------------------------------------- writing

def decontaminate_to_jsonl(deco: Decontaminator, docs: Iterable[tuple[str, Any]], out: str | Path,
                           progress: bool = True) -> dict[str, Any]:
    """Filter (text, label) pairs and write the clean ones as `{"text": ...}` lines to `out`."""
    from tqdm import tqdm

    bar = tqdm(docs, desc="decontaminating", unit=" docs", file=sys.stderr, disable=None if progress else True)
    # filter() takes one label right after each text, so the two tee'd streams stay one item apart.
    a, b = itertools.tee(bar, 2)

    def write(f) -> None:
        for text in deco.filter((t for t, _ in a), (label for _, label in b)):
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")

    try:
        atomic_write(Path(out), write)
    finally:
        bar.close()
    return deco.report()

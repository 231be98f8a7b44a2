"""Packing: tokenized training data written into the token store (`smallcoder.data.store`).

One format serves pretraining and SFT: the pack folder described in `smallcoder.data.store`
(index.json written last, uint16 token shards, SFT masks and offsets).

kind "packed": documents are tokenized, each followed by EOS, concatenated, and cut into records
of exactly `seq_len` tokens. The final partial record (fewer than `seq_len` tokens) is dropped
and counted in `totals.dropped_tail_tokens`: every record is full, so a trainer never pads, and
what is kept is exactly the prefix of the EOS-joined token stream. Empty documents are skipped
(counted in `totals.empty_documents`).

kind "sft": one record per example (ids + loss mask), variable length up to `seq_len` (the
`max_len` given); longer examples are dropped whole and counted (`totals.dropped_over_long`),
since cutting one would lose the answer's final EOS that the card's "EOS fix" always trains.

The folder is built in a temporary sibling and renamed into place, and holds no timestamps, so
the same inputs and tokenizer give a byte-identical pack.

Reading a pack is `smallcoder.data.store.TokenDataset` (also importable from here).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import integer
from ..errors import SmallCoderError
from ..fsutil import atomic_folder, atomic_write_text
from .store import (  # noqa: F401 - TokenDataset and the constants are the store's; named here for packers too
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MASK_DTYPE,
    MAX_VOCAB,
    OFFSET_DTYPE,
    TOKEN_DTYPE,
    VERIFIED_FILE,
    TokenDataset,
    tokenizer_hash,
)

SHARD_RECORDS = 262_144  # 512 MiB of tokens per shard at seq_len 1024
DEFAULT_SOURCE = "texts"


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer.vocab_size > MAX_VOCAB:
        raise SmallCoderError(f"tokenizer vocab_size {tokenizer.vocab_size:,} does not fit uint16 token shards "
                              f"(at most {MAX_VOCAB:,} tokens)")


def _created_by() -> str:
    from .. import __version__

    return f"smallcoder {__version__}"


def _labelled(items: Iterable[Any] | Sequence[Iterable[Any]], source_labels: Sequence[str] | None,
              ) -> tuple[list[str], Iterator[tuple[int, Any]]]:
    """(labels, stream of (source index, item)): one unnamed source, or one iterable per label."""
    if source_labels is None:
        return [DEFAULT_SOURCE], ((0, x) for x in items)
    labels = [str(s) for s in source_labels]
    if len(set(labels)) != len(labels):
        raise SmallCoderError(f"source_labels must be distinct, got {labels}")
    if not isinstance(items, Sequence) or len(items) != len(labels):
        raise SmallCoderError(f"with source_labels ({len(labels)} labels), pass one iterable per source "
                              f"(got {type(items).__name__})")
    return labels, ((i, x) for i, src in enumerate(items) for x in src)


class _ShardWriter:
    """Appends records to numbered shards in `folder`, hashing each file as it is written."""

    def __init__(self, folder: Path, kind: str, shard_records: int) -> None:
        self.folder, self.kind, self.shard_records = folder, kind, shard_records
        self.shards: list[dict[str, Any]] = []
        self._files: dict[str, Any] = {}
        self._hashes: dict[str, Any] = {}
        self._records = 0
        self._tokens = 0
        self._offsets: list[int] = []

    def _open(self) -> None:
        n = len(self.shards)
        names = {"tokens": f"tokens-{n:05d}.bin"}
        if self.kind == "sft":
            names.update(mask=f"mask-{n:05d}.bin", offsets=f"offsets-{n:05d}.bin")
        self._names = names
        # held open across write calls; closed in _close() or abort()
        self._files = {k: open(self.folder / v, "wb") for k, v in names.items() if k != "offsets"}  # noqa: SIM115
        self._hashes = {k: hashlib.sha256() for k in names}
        self._records, self._tokens, self._offsets = 0, 0, [0]

    def _write(self, key: str, array: np.ndarray) -> None:
        data = array.tobytes()
        self._files[key].write(data)
        self._hashes[key].update(data)

    def _close(self) -> None:
        if not self._files:
            return
        if self.kind == "sft":
            offsets = np.asarray(self._offsets, dtype=OFFSET_DTYPE)
            with open(self.folder / self._names["offsets"], "wb") as f:
                f.write(offsets.tobytes())
            self._hashes["offsets"].update(offsets.tobytes())
        for f in self._files.values():
            f.close()
        self.shards.append({"files": dict(self._names), "records": self._records, "num_tokens": self._tokens,
                            "sha256": {k: h.hexdigest() for k, h in self._hashes.items()}})
        self._files = {}

    def _room(self) -> int:
        if self._files and self._records >= self.shard_records:
            self._close()
        if not self._files:
            self._open()
        return self.shard_records - self._records

    def write_packed(self, tokens: np.ndarray, seq_len: int) -> None:
        """`tokens` holds whole records (a multiple of seq_len), split across shards as they fill."""
        records = len(tokens) // seq_len
        done = 0
        while done < records:
            take = min(self._room(), records - done)
            self._write("tokens", tokens[done * seq_len:(done + take) * seq_len])
            self._records += take
            self._tokens += take * seq_len
            done += take

    def write_example(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self._room()
        self._write("tokens", ids)
        self._write("mask", mask)
        self._tokens += len(ids)
        self._records += 1
        self._offsets.append(self._tokens)

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.shards

    def abort(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}


def _write_index(folder: Path, index: dict[str, Any]) -> None:
    """index.json, written last and atomically: a folder without it is an interrupted write."""
    atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2, ensure_ascii=False) + "\n")


def _base_index(kind: str, seq_len: int, tokenizer: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "seq_len": seq_len,
            "dtype": "uint16", "byteorder": "little", "eos_id": int(tokenizer.eos_id),
            "vocab_size": int(tokenizer.vocab_size), "tokenizer_hash": tokenizer_hash(tokenizer)}


def _encoder(tokenizer: Any):
    """Batch encoder returning id lists: `encode_batch_fast` (no offsets, Rust threads) when present."""
    backend = getattr(tokenizer, "backend", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None:
        return lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]
    return tokenizer.encode_batch


def pack_texts(texts: Iterable[str] | Sequence[Iterable[str]], tokenizer: Any, out_dir: str | Path,
               seq_len: int = 1024, *, source_labels: Sequence[str] | None = None, batch_docs: int = 1024,
               shard_records: int = SHARD_RECORDS, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenize documents, join them with EOS, cut into `seq_len`-token records; returns the index.

    `texts` is one iterable of documents, or, with `source_labels`, one iterable per label (the
    index then counts documents per source). Batches of `batch_docs` documents go through the
    tokenizer's multithreaded `encode_batch_fast`, one batch ahead of reading and writing. The
    last partial record is dropped and counted (`totals.dropped_tail_tokens`).
    """
    from tqdm import tqdm

    seq_len = integer(seq_len, "seq_len")
    batch_docs = integer(batch_docs, "batch_docs")
    shard_records = integer(shard_records, "shard_records")
    _check_tokenizer(tokenizer)
    labels, stream = _labelled(texts, source_labels)
    encode = _encoder(tokenizer)
    eos = int(tokenizer.eos_id)
    doc_counts = [0] * len(labels)
    seen = [0] * len(labels)
    empty = 0
    total_tokens = 0  # document tokens plus one EOS each

    def doc_batches() -> Iterator[list[str]]:
        """Batches of non-empty documents, checked and counted as they are read."""
        nonlocal empty
        while batch := list(itertools.islice(stream, batch_docs)):
            docs = []
            for src, text in batch:
                if not isinstance(text, str):
                    raise SmallCoderError(f"source {labels[src]!r}, document {seen[src]}: "
                                          f"expected a string, got {type(text).__name__}")
                seen[src] += 1
                if text:
                    docs.append(text)
                    doc_counts[src] += 1
                else:
                    empty += 1
            bar.update(len(batch))
            if docs:
                yield docs

    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, "packed", shard_records)
        pending = np.zeros(0, dtype=TOKEN_DTYPE)

        def consume(ids: list[list[int]]) -> None:
            nonlocal pending, total_tokens
            n = sum(len(x) for x in ids) + len(ids)
            part = np.fromiter(itertools.chain.from_iterable(x + [eos] for x in ids), dtype=TOKEN_DTYPE, count=n)
            total_tokens += n
            joined = np.concatenate([pending, part]) if len(pending) else part
            full = len(joined) // seq_len * seq_len
            writer.write_packed(joined[:full], seq_len)
            pending = joined[full:].copy()

        bar = tqdm(desc="packing", unit=" docs", file=sys.stderr, disable=None if progress else True)
        try:
            # The tokenizer releases the GIL: batch k+1 is tokenized (Rust threads) while this thread
            # reads the next documents and writes batch k. Results are consumed in order.
            with ThreadPoolExecutor(1, thread_name_prefix="smallcoder-tokenize") as pool:
                running: Future | None = None
                for docs in doc_batches():
                    nxt = pool.submit(encode, docs)
                    if running is not None:
                        consume(running.result())
                    running = nxt
                if running is not None:
                    consume(running.result())
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        records = sum(s["records"] for s in shards)
        if records == 0:
            raise SmallCoderError(f"no records: {sum(doc_counts):,} documents gave {total_tokens:,} tokens "
                                  f"(EOS included), fewer than seq_len {seq_len}")
        index = _base_index("packed", seq_len, tokenizer)
        index.update({
            "shards": shards,
            "totals": {"documents": sum(doc_counts), "empty_documents": empty, "document_tokens": total_tokens,
                       "tokens": records * seq_len, "records": records, "dropped_tail_tokens": len(pending)},
            "sources": [{"label": lb, "documents": c} for lb, c in zip(labels, doc_counts)],
            "created_by": _created_by(),
        })
        _write_index(tmp, index)
    return index


def pack_examples(examples: Iterable[tuple[Sequence[int], Sequence[int]]] | Sequence[Iterable[Any]],
                  tokenizer: Any, out_dir: str | Path, max_len: int = 1024, *,
                  source_labels: Sequence[str] | None = None, shard_records: int = SHARD_RECORDS,
                  overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Store SFT examples `(token ids, loss mask 0/1)` as variable-length records; returns the index.

    Examples longer than `max_len` tokens and empty ones are dropped and counted. With
    `source_labels`, `examples` is one iterable per label, as in `pack_texts`.
    """
    from tqdm import tqdm

    max_len = integer(max_len, "max_len")
    shard_records = integer(shard_records, "shard_records")
    _check_tokenizer(tokenizer)
    vocab = tokenizer.vocab_size
    labels, stream = _labelled(examples, source_labels)
    counts = [0] * len(labels)
    seen = [0] * len(labels)
    over_long = over_long_tokens = empty = loss_tokens = 0
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = _ShardWriter(tmp, "sft", shard_records)
        try:
            for src, example in tqdm(stream, desc="packing", unit=" examples", file=sys.stderr,
                                     disable=None if progress else True):
                where = f"source {labels[src]!r}, example {seen[src]}"
                seen[src] += 1
                try:
                    ids_in, mask_in = example
                    ids = np.asarray(ids_in, dtype=np.int64)
                    mask = np.asarray(mask_in, dtype=np.int64)
                except (TypeError, ValueError) as e:
                    raise SmallCoderError(f"{where}: expected (token ids, loss mask) lists of integers ({e})") from None
                if ids.ndim != 1 or mask.shape != ids.shape:
                    raise SmallCoderError(f"{where}: ids and loss mask differ in length "
                                          f"({ids.shape} vs {mask.shape})")
                if len(ids) == 0:
                    empty += 1
                    continue
                if ids.min() < 0 or ids.max() >= vocab:
                    bad = int(ids[(ids < 0) | (ids >= vocab)][0])
                    raise SmallCoderError(f"{where}: token id {bad} is outside the tokenizer's vocabulary (0..{vocab - 1})")
                if not np.isin(mask, (0, 1)).all():
                    bad = int(mask[~np.isin(mask, (0, 1))][0])
                    raise SmallCoderError(f"{where}: loss mask value {bad} is not 0 or 1")
                if len(ids) > max_len:
                    over_long += 1
                    over_long_tokens += len(ids)
                    continue
                writer.write_example(ids.astype(TOKEN_DTYPE), mask.astype(MASK_DTYPE))
                counts[src] += 1
                loss_tokens += int(mask.sum())
            shards = writer.finish()
        except BaseException:
            writer.abort()
            raise
        records = sum(s["records"] for s in shards)
        if records == 0:
            raise SmallCoderError(f"no records: of {sum(seen):,} examples, {over_long:,} were longer than "
                                  f"max_len {max_len} and {empty:,} were empty")
        index = _base_index("sft", max_len, tokenizer)
        index.update({
            "mask_dtype": "uint8", "offsets_dtype": "int64",
            "shards": shards,
            "totals": {"documents": sum(seen), "tokens": sum(s["num_tokens"] for s in shards), "records": records,
                       "loss_tokens": loss_tokens, "dropped_over_long": over_long,
                       "dropped_over_long_tokens": over_long_tokens, "dropped_empty": empty},
            "sources": [{"label": lb, "documents": n, "records": c} for lb, n, c in zip(labels, seen, counts)],
            "created_by": _created_by(),
        })
        _write_index(tmp, index)
    return index

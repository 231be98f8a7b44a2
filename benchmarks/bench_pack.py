"""Tokenize + pack throughput: `pack_texts` end to end, and its tokenizer step three ways.

    python benchmarks/bench_pack.py [--mb 20] [--runs 3] [--tokenizer PATH] [--workers N]

Corpus: the running Python's standard-library `.py` sources (read-only), sorted by path and
capped at `--mb` MB of UTF-8. Tokenizer: ../shared/data's StarCoder tokenizer when present,
else one trained here on the corpus (printed). Figures are medians of `--runs` runs:
  pack_texts    the library path: encode_batch_fast (Rust threads) + EOS join + uint16 shards
  threads       tokenizing only, `encode_batch_fast` over batches of 1024 documents, all cores
  1 thread      the same with TOKENIZERS_PARALLELISM=false
  process pool  tokenizing only, N worker processes (one thread each), uint16 arrays sent back
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from smallcoder import Tokenizer
from smallcoder.data.pack import pack_texts

BATCH = 1024


def stdlib_corpus(max_bytes: int) -> list[str]:
    """Standard-library sources in path order until `max_bytes` of UTF-8 text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return texts


def load_tokenizer(arg: str | None, texts: list[str]) -> tuple[Tokenizer, str]:
    if arg:
        return Tokenizer.load(arg), arg
    shared = Path(os.environ.get("SMALLCODER_DATA", ROOT.parent / "shared" / "data")) / "tokenizers" / "starcoder"
    if (shared / "tokenizer.json").exists():
        return Tokenizer.load(shared), f"StarCoder ({shared})"
    from smallcoder.tokenizer_train import train_tokenizer

    t0 = time.perf_counter()
    tok = train_tokenizer(texts, 16384)
    return tok, f"trained here on the corpus, vocab 16384 ({time.perf_counter() - t0:.1f} s)"


def _batches(texts: list[str]) -> list[list[str]]:
    return [texts[i:i + BATCH] for i in range(0, len(texts), BATCH)]


def encode_threads(tok: Tokenizer, texts: list[str]) -> int:
    n = 0
    for batch in _batches(texts):
        encs = tok.backend.encode_batch_fast(batch, add_special_tokens=False)
        ids = [e.ids + [0] for e in encs]
        n += len(np.fromiter((i for x in ids for i in x), dtype=np.uint16, count=sum(map(len, ids))))
    return n


_worker_tok = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    from tokenizers import Tokenizer as Backend

    _worker_tok = Backend.from_str(tokenizer_json)


def _encode_chunk(texts: list[str]) -> np.ndarray:
    ids = [e.ids + [0] for e in _worker_tok.encode_batch_fast(texts, add_special_tokens=False)]
    return np.fromiter((i for x in ids for i in x), dtype=np.uint16, count=sum(map(len, ids)))


def encode_pool(pool, texts: list[str], chunk: int) -> int:
    chunks = [texts[i:i + chunk] for i in range(0, len(texts), chunk)]
    return sum(len(a) for a in pool.imap(_encode_chunk, chunks))  # imap keeps document order


class single_thread:
    """TOKENIZERS_PARALLELISM=false for the block: `tokenizers` reads it at every call."""

    def __enter__(self) -> None:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"

    def __exit__(self, *exc) -> None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size cap in MB of UTF-8 (default 20)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="process pool size")
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args()

    texts = stdlib_corpus(int(args.mb * 1e6))
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok, tok_desc = load_tokenizer(args.tokenizer, texts)
    print(f"corpus: {len(texts):,} stdlib files, {mb:.1f} MB; tokenizer: {tok_desc}; "
          f"{os.cpu_count()} CPUs; medians of {args.runs} runs")
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    chunk = max(1, min(BATCH, len(texts) // (4 * args.workers)))
    with single_thread():  # workers inherit it: one thread each
        pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(tok.backend.to_str(),))
    pool.map(abs, range(args.workers))  # workers started before timing

    def one_thread() -> int:
        with single_thread():
            return encode_threads(tok, texts)

    tmp = tempfile.TemporaryDirectory()
    out = Path(tmp.name) / "pack"

    def run_pack() -> int:
        index = pack_texts(texts, tok, out, args.seq_len, overwrite=True, progress=False)
        return index["totals"]["document_tokens"]

    modes = [("pack_texts (threads, end to end)", run_pack),
             ("tokenize only: encode_batch_fast, threads", lambda: encode_threads(tok, texts)),
             ("tokenize only: 1 thread", one_thread),
             (f"tokenize only: process pool x{args.workers}", lambda: encode_pool(pool, texts, chunk))]
    times: dict[str, list[float]] = {name: [] for name, _ in modes}
    tokens: dict[str, int] = {}
    # Rounds alternate the modes (rotating the order), so load from other processes spreads evenly.
    for r in range(args.runs):
        for name, fn in modes[r % len(modes):] + modes[:r % len(modes)]:
            t0 = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - t0)
    pool.close()
    pool.join()
    tmp.cleanup()
    assert len(set(tokens.values())) == 1, f"modes disagree on the token count: {tokens}"
    results = [(name, statistics.median(times[name]), tokens[name]) for name, _ in modes]

    print(f"{'':44s} {'seconds':>8s} {'tokens':>11s} {'tokens/s':>11s} {'MB/s':>7s}")
    for name, dt, n in results:
        print(f"{name:44s} {dt:8.2f} {n:11,d} {n / dt:11,.0f} {mb / dt:7.2f}")


if __name__ == "__main__":
    main()

"""Mixture-loader throughput at the tiny preset's training shape, against the rate it must beat.

    python benchmarks/bench_loader.py [--tokenizer ../shared/data/tokenizers/starcoder] [--rounds 5] [--fim-rate 0.5]

Packs a synthetic code corpus (packed pretraining records) and synthetic chat examples (SFT
records) into real `TokenDataset` folders in a temporary directory, then times `next_step()` of a
60/40 mixture at global batch 16 x 512 tokens, micro-batch 8 (as rank 0 of 1 and of 2
processes, with packed data alone, and packed data with context-level FIM at --fim-rate, which
re-tokenizes the transformed documents on the way). Prints per-round rates, then medians. The loader must
deliver at least 50x the trainer's rate for the tiny preset on this CPU (458 tokens/s, from
../shared/PERF-NOTES.md), so loading never shows in a training step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

TRAINER_TOKENS_PER_S = 458.0  # tiny preset, batch 8 x 512, fp32 (../shared/PERF-NOTES.md)
REQUIRED_FACTOR = 50.0


def _code_docs(n: int, seed: int) -> list[str]:
    """Deterministic Python-like documents (a few hundred tokens each)."""
    rnd = random.Random(seed)
    names = ["total", "items", "count", "value", "result", "index", "node", "left", "right", "key"]
    docs = []
    for d in range(n):
        lines = [f"def func_{d}({rnd.choice(names)}, {rnd.choice(names)}):"]
        for _ in range(rnd.randint(8, 40)):
            a, b = rnd.choice(names), rnd.choice(names)
            lines.append(rnd.choice([f"    {a} = {b} + {rnd.randint(0, 999)}",
                                     f"    if {a} > {b}:\n        return {a}",
                                     f"    for {a} in range({rnd.randint(1, 99)}):\n        {b} += {a}",
                                     f"    # update {a} from {b}"]))
        lines.append(f"    return {rnd.choice(names)}\n")
        docs.append("\n".join(lines))
    return docs


def main() -> None:
    repo = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default=str(repo.parent / "shared" / "data" / "tokenizers" / "starcoder"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps timed per round")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--docs", type=int, default=3000, help="synthetic code documents to pack")
    ap.add_argument("--fim-rate", type=float, default=0.5, help="the FIM setup's fim_rate (0: no FIM setup)")
    args = ap.parse_args()

    from smallcoder import Tokenizer
    from smallcoder.data.fim import FimTransform
    from smallcoder.data.mixture import Component, MixtureLoader
    from smallcoder.data.pack import TokenDataset, pack_examples, pack_texts
    from smallcoder.data.sft import encode_conversations

    tok = Tokenizer.load(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        pack_texts(_code_docs(args.docs, 0), tok, f"{tmp}/code", seq_len=args.seq_len, progress=False)
        convs = [[{"role": "user", "content": f"Write a function number {i}."},
                  {"role": "assistant", "content": doc}] for i, doc in enumerate(_code_docs(args.docs // 2, 1))]
        pack_examples(encode_conversations(convs, tok, max_len=None), tok, f"{tmp}/sft", max_len=args.seq_len,
                      progress=False)
        code, sft = TokenDataset(f"{tmp}/code"), TokenDataset(f"{tmp}/sft")
        print(f"packed in {time.perf_counter() - t0:.1f} s: {code!r}\n                 {sft!r}")

        setups = {
            "60/40 packed+sft, 1 rank": ([("code", code, 0.6), ("sft", sft, 0.4)], 0, 1, None),
            "60/40 packed+sft, rank 0 of 2": ([("code", code, 0.6), ("sft", sft, 0.4)], 0, 2, None),
            "packed only, 1 rank": ([("code", code, 1.0)], 0, 1, None),
        }
        if args.fim_rate > 0:
            setups[f"packed only, 1 rank, FIM {args.fim_rate:g}"] = (
                [("code", code, 1.0)], 0, 1, FimTransform(tok, args.fim_rate, 0.5))
        rates: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
        for r in range(args.rounds):
            for name, (comps, rank, world, fim) in setups.items():
                loader = MixtureLoader([Component(n, d, w) for n, d, w in comps], seq_len=args.seq_len,
                                       global_batch=args.global_batch, micro_batch=args.micro_batch, seed=r,
                                       pad_id=tok.eos_id, rank=rank, world_size=world, fim=fim)
                loader.next_step()  # warm: first permutations, page cache
                t = time.perf_counter()
                tokens = 0
                for _ in range(args.steps):
                    step = loader.next_step()
                    tokens += step.tokens / world  # this rank's share of the global batch
                dt = time.perf_counter() - t
                rates[name].append((args.steps / dt, tokens / dt))
                print(f"round {r} {name:30s} {args.steps / dt:8.1f} steps/s {tokens / dt:12,.0f} tokens/s")

    need = TRAINER_TOKENS_PER_S * REQUIRED_FACTOR
    print(f"\nglobal batch {args.global_batch} x {args.seq_len} tokens, micro-batch {args.micro_batch}; "
          f"tokens/s = this rank's share of the global batch's real (non-pad) tokens; medians of "
          f"{args.rounds} rounds")
    print(f"trainer (tiny preset, this CPU): {TRAINER_TOKENS_PER_S:.0f} tokens/s; "
          f"required >= {REQUIRED_FACTOR:.0f}x = {need:,.0f} tokens/s")
    for name, v in rates.items():
        steps, toks = statistics.median(s for s, _ in v), statistics.median(t for _, t in v)
        print(f"{name:30s} median {steps:8.1f} steps/s ({steps * args.global_batch:9.0f} global records/s) "
              f"{toks:12,.0f} tokens/s = {toks / TRAINER_TOKENS_PER_S:6.0f}x trainer "
              f"[{'ok' if toks >= need else 'TOO SLOW'}]")


if __name__ == "__main__":
    main()

"""Prefix reuse in the engine on MBPP's 3-shot prompts: with and without, alternated.

    python benchmarks/bench_prefix.py [--model FOLDER] [--limit 24] [--rounds 2] [--new-tokens 32]

Every MBPP prompt repeats the same three worked examples (~625 tokens); with reuse, the engine
computes them once and copies or keeps their keys/values for the next prompts. Without --model a
fresh `tiny` preset with the StarCoder tokenizer of ../shared/data is used (speed only).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smallcoder import Engine, SamplingParams, Tokenizer, load, new_model, preset
from smallcoder.eval.data import load_task_data
from smallcoder.eval.mbpp import mbpp_prompt, split
from smallcoder.paths import default_data_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args()
    data = default_data_dir()
    if data is None:
        raise SystemExit("needs ../shared/data (MBPP and the StarCoder tokenizer); set SMALLCODER_DATA")
    if args.model:
        model, tok = load(args.model)
    else:
        tok = Tokenizer.load(data / "tokenizers" / "starcoder")
        model = new_model(preset("tiny").replace(vocab_size=tok.vocab_size), seed=0).eval()
    shots, test = split(load_task_data("mbpp", data), limit=args.limit)
    prompts = [mbpp_prompt(r, shots) for r in test]
    total = sum(len(tok.encode(p)) for p in prompts)
    params = SamplingParams(max_new_tokens=args.new_tokens, stop_at_eos=False)
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs, reused = {}, 0
    for _ in range(args.rounds):
        for reuse in (True, False):
            engine = Engine(model, tok, max_batch=args.max_batch, prefix_cache=reuse)
            t0 = time.perf_counter()
            outputs[reuse] = [c.token_ids for c in engine.generate(prompts, params)]
            times[reuse].append(time.perf_counter() - t0)
            if reuse:
                reused = engine.reused_tokens
    with_, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"{len(prompts)} MBPP prompts, {total / len(prompts):.0f} tokens each on average, "
          f"{args.new_tokens} new tokens, max_batch {args.max_batch}, {torch.get_num_threads()} threads")
    print(f"with prefix reuse    {with_:.2f} s (rounds {', '.join(f'{t:.2f}' for t in times[True])}); "
          f"{reused:,} of {total:,} prompt tokens not recomputed")
    print(f"without prefix reuse {without:.2f} s (rounds {', '.join(f'{t:.2f}' for t in times[False])})")
    print(f"speed-up {without / with_:.2f}x; identical outputs: {outputs[True] == outputs[False]}")


if __name__ == "__main__":
    main()

"""Batch-1 greedy decode speed of SmallCoder vs transformers on the same weights, A/B alternated.

    python benchmarks/bench_generate.py [--preset smallcoder-303m] [--dtype float32] [--rounds 5]

Prints per-round figures, then medians, the ratio ours/transformers, the bytes of weights each
token must stream (embedding rows excluded: one row is read) and the achieved GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from smallcoder import Engine, SamplingParams, load, new_model, preset, save


class _IdsOnly:
    eos_id = -1

    @staticmethod
    def decode(ids, skip_special_tokens=False):
        return ""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="smallcoder-303m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    config = preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        save(new_model(config, seed=0), None, f"{tmp}/m")
        ours, _ = load(f"{tmp}/m", dtype=args.dtype, with_tokenizer=False)
        hf = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/m", dtype=getattr(torch, args.dtype)).eval()
    engine = Engine(ours, _IdsOnly())
    prompt = torch.randint(1, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def run_ours(k: int) -> float:
        t = time.perf_counter()
        engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=k))
        return time.perf_counter() - t

    def run_hf(k: int) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k, min_new_tokens=k,
                        do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    run_ours(2), run_hf(2)  # warm-up
    rates: dict[str, list[float]] = {"smallcoder": [], "transformers": []}
    for r in range(args.rounds):
        for name, fn in (("smallcoder", run_ours), ("transformers", run_hf)) if r % 2 == 0 else (
                ("transformers", run_hf), ("smallcoder", run_ours)):
            t1, tn = fn(1), fn(n)  # decode rate excludes prefill: (n - 1) tokens in tn - t1
            rates[name].append((n - 1) / (tn - t1))
            print(f"round {r} {name:12s} decode {rates[name][-1]:6.1f} tok/s")
    bytes_per_token = (config.num_parameters - config.vocab_size * config.hidden_size) * ours.model.norm.weight.element_size()
    print(f"\n{args.preset} {args.dtype}, batch 1, prompt {args.prompt_tokens}, {n} new tokens, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, m in med.items():
        print(f"{name:12s} median {m:6.1f} tok/s  {m * bytes_per_token / 1e9:5.1f} GB/s of weights")
    print(f"ratio smallcoder/transformers: {med['smallcoder'] / med['transformers']:.2f}x")


if __name__ == "__main__":
    main()

"""One C++ decode step of an int8 model, two kernel builds alternated: ms per step at two contexts.

    python benchmarks/kernel_step.py --model FOLDER [--rounds 7] [--steps 20] [--flags-b=-DSC_INT8_WIDEN]

FOLDER is a checkpoint (an int8 one from `smallcoder quantize`, or a float one, quantized as it
loads). The long-context cases run once per KV cache dtype of `--kv`. Build A is the kernel as shipped (kernels.build_flags()); build B adds `--flags-b`
(default `-DSC_INT8_WIDEN`: the former path that widens every int8 weight to fp32). Each round
times, for A then B, `--steps` one-token steps at context 32 and at context `--long`, and a
16-token prefill chunk (an editor's keystroke) ending at 48 and at `--long`; medians over rounds are printed
(the machine may be shared: alternating keeps both builds under the same load).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from smallcoder import KVCache, load
from smallcoder.kernels import DecodeKernel, build_flags, compile_library, int8_path

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")


def cpu_flags() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return "?"
    have = set(line.split(":", 1)[1].split())
    return " ".join(f for f in CPU_FLAGS if f in have) or "none of " + ",".join(CPU_FLAGS)


KV_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


def filled_cache(cfg, length: int, dtype: torch.dtype) -> KVCache:
    """A cache of random keys and values (attention's cost does not depend on their values)."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache(cfg, 1, length, dtype)
    for t in cache.k + cache.v:
        src = torch.randn(t.shape, generator=g)
        t.copy_(src.mul(40).round().clamp(-127, 127) if dtype == torch.int8 else src)
    for t in (cache.k_scale or []) + (cache.v_scale or []):
        t.fill_(0.02)
    return cache


def kv_bytes(cache: KVCache, ctx: int) -> int:
    """Bytes of keys, values (and int8 scales) a step at context ctx reads."""
    per_pos = sum(t[0, :, 0].numel() * t.element_size() for plane in cache.planes() for t in plane)
    return per_pos * ctx


def step_ms(kernel: DecodeKernel, x: torch.Tensor, cache: KVCache, pos: int, steps: int) -> float:
    starts = torch.tensor([pos])
    t0 = time.perf_counter()
    for _ in range(steps):
        kernel(x, cache, starts)
    return (time.perf_counter() - t0) / steps * 1e3


def prefill_ms(kernel: DecodeKernel, x: torch.Tensor, cache: KVCache, end: int) -> float:
    t0 = time.perf_counter()
    kernel.prefill(x, cache, end - x.shape[0], last_only=True)
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--long", type=int, default=1000, help="the long context (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flags-b", default="-DSC_INT8_WIDEN", help="extra compiler flags of build B")
    ap.add_argument("--kv", default="fp32,fp16,int8",
                    help="KV cache dtypes the long-context cases run with (default %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load(args.model, dtype="int8")
    cfg = model.config
    if args.long + 1 > cfg.max_position_embeddings:
        raise SystemExit(f"--long {args.long}: the model holds {cfg.max_position_embeddings} positions")
    builds = {}
    for name, extra in (("A", ""), ("B", args.flags_b)):
        lib = compile_library(build_flags() + extra.split())
        builds[name] = (DecodeKernel(model, lib), int8_path(lib), extra or "-")
    kvs = [KV_DTYPES[name] for name in args.kv.split(",")]
    caches = {kv: filled_cache(cfg, args.long + 1, kv) for kv in kvs}
    x1 = model.model.embed_tokens(torch.tensor([17])).float()
    x16 = model.model.embed_tokens(torch.arange(100, 116)).float()
    first = caches[kvs[0]]
    cases = [("step ctx 32", 32, lambda kn: step_ms(kn, x1, first, 32, args.steps)),
             ("prefill 16 -> ctx 48", 48, lambda kn: prefill_ms(kn, x16, first, 48))]
    for kv, c in caches.items():
        name = str(kv).removeprefix("torch.")
        cases += [(f"step ctx {args.long}, {name} KV", args.long,
                   lambda kn, c=c: step_ms(kn, x1, c, args.long, args.steps)),
                  (f"prefill 16 -> ctx {args.long}, {name} KV", args.long,
                   lambda kn, c=c: prefill_ms(kn, x16, c, args.long + 1))]
    for kn, _, _ in builds.values():  # warm up: page in the weights, start the OpenMP threads
        for _, _, fn in cases:
            fn(kn)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, (kn, _, _) in builds.items():
            for case, _, fn in cases:
                times.setdefault((name, case), []).append(fn(kn))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    nbytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                 if "embed_tokens" not in n and "norm" not in n)
    print(f"\nmodel {args.model}: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{nbytes / 1e6:.0f} MB of int8 weights read per step; {args.threads} threads")
    print(f"CPU flags: {cpu_flags()}")
    for name, (_, path, extra) in builds.items():
        print(f"build {name}: int8 path {path} (extra flags: {extra})")
    print(f"medians of {args.rounds} alternated rounds ({args.steps} steps each for the decode cases):")
    print("A GB/s: the weights and the keys and values a step reads, over A's time")
    print("A min: A's fastest round (the shared machine's noise only ever adds time)")
    print(f"{'case':38s} {'A ms':>8s} {'B ms':>8s} {'B/A':>6s} {'A tok/s':>8s} {'B tok/s':>8s} {'A GB/s':>7s} "
          f"{'A min':>7s}")
    for case, ctx, _ in cases:
        a, b = (statistics.median(times[n, case]) for n in ("A", "B"))
        tok = 16 if case.startswith("prefill") else 1
        kv = next((c for k, c in caches.items() if f"{str(k).removeprefix('torch.')} KV" in case), first)
        read = nbytes + kv_bytes(kv, ctx)
        print(f"{case:38s} {a:8.2f} {b:8.2f} {b / a:6.2f} {tok * 1e3 / a:8.1f} {tok * 1e3 / b:8.1f} "
              f"{read / a / 1e6:7.1f} {min(times['A', case]):7.2f}")


if __name__ == "__main__":
    main()

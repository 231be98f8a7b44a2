"""One C++ decode step of an int8 model, two kernel builds alternated: ms per step.

    python benchmarks/kernel_step.py --model FOLDER [--rounds 7] [--steps 20] [--flags-b=-DSC_INT8_WIDEN]
    python benchmarks/kernel_step.py --preset smallcoder-303m --rows 1,4,8,16,32 --prefill 512 --sources-b HEAD~1

FOLDER is a checkpoint (an int8 one from `smallcoder quantize`, or a float one, quantized as it
loads); `--preset NAME` instead makes a model of that config with random weights, quantized (the
speed does not depend on the values). Build A is the kernel as shipped (kernels.build_flags(),
which `SMALLCODER_KERNEL_FLAGS` extends: `-march=haswell` for the AVX2 path); build B adds
`--flags-b` (default `-DSC_INT8_WIDEN`: the former path that widens every int8 weight to fp32) and,
with `--sources-b REV`, compiles csrc/ as git revision REV has it (default flags then none extra).

Without `--rows`/`--prefill`, each round times `--steps` one-token steps at context 32 and at
context `--long` (the latter once per KV cache dtype of `--kv`), and a 16-token prefill chunk (an
editor's keystroke) ending at 48 and at `--long`. With `--rows M,..`, it times instead `--steps`
steps of M rows (one token each, int8 KV cache of 128 positions, every row at position 32), and
with `--prefill T` one prefill of T tokens from position 0 (`DecodeKernel.prefill`, last_only).
Medians over rounds are printed; the machine may be shared: the builds alternate within each
round (A first in odd rounds, B first in even ones) so both see the same load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from smallcoder import KVCache, kernels, load, new_model
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


def compile_at(rev: str, flags: list[str]):
    """The kernel as git revision `rev` has csrc/ (every file of it), built with `flags` (cached
    like the shipped one: the key covers the sources)."""
    csrc = kernels.SOURCE.parent
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=csrc, capture_output=True, text=True,
                               check=True).stdout.strip())
    rel = csrc.relative_to(root).as_posix()
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{rel}"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.split()
    tmp = Path(tempfile.mkdtemp(prefix="kernel_step-"))
    for name in names:
        (tmp / name).write_bytes(subprocess.run(["git", "show", f"{rev}:{rel}/{name}"], cwd=root,
                                                capture_output=True, check=True).stdout)
    saved = kernels.SOURCE, kernels.HEADERS
    kernels.SOURCE = tmp / kernels.SOURCE.name
    kernels.HEADERS = tuple(sorted(tmp.glob("*.h")))
    try:
        return compile_library(flags)
    finally:
        kernels.SOURCE, kernels.HEADERS = saved


def rows_ms(kernel: DecodeKernel, x: torch.Tensor, cache: KVCache, steps: int) -> float:
    starts = torch.full((x.shape[0],), 32)
    t0 = time.perf_counter()
    for _ in range(steps):
        kernel(x, cache, starts)
    return (time.perf_counter() - t0) / steps * 1e3


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


def alternated(builds: dict, cases: list, rounds: int) -> dict[tuple[str, str], list[float]]:
    """Each case's ms per round and build: A then B in odd rounds, B then A in even ones."""
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for name in (list(builds) if r % 2 == 0 else list(builds)[::-1]):
            kn = builds[name][0]
            for case, *_, fn in cases:
                times.setdefault((name, case), []).append(fn(kn))
        print(f"round {r + 1}/{rounds} done", flush=True)
    return times


def rows_and_prefill(args: argparse.Namespace, model, builds: dict) -> None:
    """The M-row step cases (`--rows`) and the T-token prefill (`--prefill`)."""
    cfg = model.config
    cases = []  # (name, tokens per call, fn)
    for M in [int(m) for m in args.rows.split(",") if m]:
        x = model.model.embed_tokens(torch.arange(100, 100 + M) % cfg.vocab_size).float()
        cache = KVCache(cfg, M, 128, torch.int8)
        cases.append((f"{M} rows, ctx 32", M, lambda kn, x=x, c=cache: rows_ms(kn, x, c, args.steps)))
    if args.prefill:
        T = args.prefill
        x = model.model.embed_tokens(torch.arange(T) % cfg.vocab_size).float()
        cache = KVCache(cfg, 1, T, torch.int8)
        cases.append((f"prefill {T}", T, lambda kn, x=x, c=cache: prefill_ms(kn, x, c, T)))
    for kn, _, _ in builds.values():
        for *_, fn in cases:
            fn(kn)
    times = alternated(builds, cases, args.rounds)
    print(f"\nmodel {args.model or args.preset}: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
          f"FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}; {args.threads} threads")
    print(f"CPU flags: {cpu_flags()}")
    for name, (_, path, extra) in builds.items():
        print(f"build {name}: int8 path {path} (extra flags: {extra})")
    print(f"medians of {args.rounds} alternated rounds ({args.steps} steps each for the row cases); "
          "min: the fastest round")
    print(f"{'case':20s} {'A ms':>8s} {'B ms':>8s} {'B/A':>6s} {'A tok/s':>8s} {'B tok/s':>8s} {'A min':>8s} "
          f"{'B min':>8s}")
    for case, tok, _ in cases:
        a, b = (statistics.median(times[n, case]) for n in ("A", "B"))
        print(f"{case:20s} {a:8.2f} {b:8.2f} {b / a:6.2f} {tok * 1e3 / a:8.1f} {tok * 1e3 / b:8.1f} "
              f"{min(times['A', case]):8.2f} {min(times['B', case]):8.2f}")


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder")
    src.add_argument("--preset", help="a config preset (smallcoder.config.preset), random int8 weights")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--long", type=int, default=1000, help="the long context (default %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flags-b", default=None,
                    help="extra compiler flags of build B (default -DSC_INT8_WIDEN, none with --sources-b)")
    ap.add_argument("--sources-b", default=None, metavar="REV", help="build B from csrc/ at git revision REV")
    ap.add_argument("--rows", default="", help="row counts M of the M-row step cases, e.g. 1,4,8,16,32")
    ap.add_argument("--prefill", type=int, default=0, help="tokens of the prefill case (0: none)")
    ap.add_argument("--kv", default="fp32,fp16,int8",
                    help="KV cache dtypes the long-context cases run with (default %(default)s)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        model, _ = load(args.model, dtype="int8")
    else:
        from smallcoder.config import preset
        from smallcoder.quant import quantize_model

        model = quantize_model(new_model(preset(args.preset), seed=0)).eval()
    cfg = model.config
    if args.long + 1 > cfg.max_position_embeddings:
        raise SystemExit(f"--long {args.long}: the model holds {cfg.max_position_embeddings} positions")
    flags_b = args.flags_b if args.flags_b is not None else ("" if args.sources_b else "-DSC_INT8_WIDEN")
    builds = {}
    for name, extra in (("A", ""), ("B", flags_b)):
        if name == "B" and args.sources_b:
            lib = compile_at(args.sources_b, build_flags() + extra.split())
            extra = f"{extra} sources at {args.sources_b}".strip()
        else:
            lib = compile_library(build_flags() + extra.split())
        builds[name] = (DecodeKernel(model, lib), int8_path(lib), extra or "-")
    if args.rows or args.prefill:
        return rows_and_prefill(args, model, builds)
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
    times = alternated(builds, cases, args.rounds)
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

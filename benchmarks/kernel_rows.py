"""Multi-row C++ kernel steps, two builds alternated in one process: ms per step and tok/s per row count.

    python benchmarks/kernel_rows.py [--kinds fp32,bf16] [--rows 1,2,4,8,16,32,64] [--base HEAD]
                                     [--flags-b=...] [--prefill 512] [--rounds 5] [--policy 1,16,64,256]

The model is the 303M config (`config.preset("smallcoder-303m")`) with random weights, as fp32,
bf16 or int8 (`--kinds`). A step of M rows is a batched decode step: M cache rows, one new token
each at position `--ctx` (`DecodeKernel.__call__`). Build A is this worktree's kernel
(kernels.build_flags()); build B is the csrc of git revision `--base` (default HEAD, the last
commit: so A/B shows what the uncommitted change does), compiled with the same flags plus
`--flags-b`, or with `--base ''` this worktree's csrc with `--flags-b`. Builds must share
sc_decode's ABI (the ragged one: a cache row per kernel row). Each round times A then B on every
case; medians over rounds are printed (the machine may be shared: alternating keeps both builds
under the same load). `--prefill N` adds one N-token prefill of one row (last logits only).

`--policy N,...` instead times, per kind, a one-row span of N tokens through A's kernel
(`DecodeKernel.rows`) and through PyTorch's forward, alternated, and prints which was faster:
what kernels.KERNEL_SPAN is tuned from.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smallcoder import KVCache, config, kernels, new_model
from smallcoder.kernels import DecodeKernel, build_flags, compile_library, gemm_path, int8_path
from smallcoder.quant import quantize_model

sys.path.insert(0, str(Path(__file__).parent))
from kernel_step import cpu_flags

REPO = Path(__file__).resolve().parents[1]


def revision_source(rev: str) -> Path:
    """decode.cpp and its headers as of git revision `rev`, in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="kernel-rows-"))
    for path in (kernels.SOURCE, *kernels.HEADERS):
        rel = path.relative_to(REPO).as_posix()
        text = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{rel}"], capture_output=True, check=True).stdout
        (folder / path.name).write_bytes(text)
    return folder / kernels.SOURCE.name


def make_model(kind: str, cfg) -> torch.nn.Module:
    m = new_model(cfg, seed=0).eval()
    if kind == "bf16":
        m = m.to(torch.bfloat16)
    elif kind == "int8":
        quantize_model(m)
    return m


def flops_per_token(cfg) -> float:
    h, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    return 2.0 * (cfg.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * f) + h * cfg.vocab_size)


def timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1e3


def compare(args, cfg, libs) -> None:
    ftok = flops_per_token(cfg)
    for kind in args.kinds.split(","):
        model = make_model(kind, cfg)
        kns = {name: DecodeKernel(model, lib) for name, lib in libs.items()}
        kv = kns["A"].cache_dtype
        cases = []
        for M in (int(v) for v in args.rows.split(",")):
            cache = KVCache(cfg, M, args.ctx + 1, kv)
            x = torch.randn(M, cfg.hidden_size, generator=torch.Generator().manual_seed(M))
            starts = torch.full((M,), args.ctx, dtype=torch.int64)
            steps = max(1, round(args.steps * 4 / (4 + M)))  # about the same time per case
            cases.append((f"{kind} M={M}", M, lambda kn, c=cache, x=x, s=starts, n=steps: timed(lambda: kn(x, c, s), n)))
        if args.prefill:
            T = args.prefill
            cache = KVCache(cfg, 1, T, kv)
            x = torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(T))
            cases.append((f"{kind} prefill {T}", T, lambda kn, c=cache, x=x: timed(lambda: kn.prefill(x, c, 0, True), 1)))
        for kn in kns.values():  # warm up: page in the weights, start the OpenMP threads
            for _, _, fn in cases:
                fn(kn)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for case, _, fn in cases:
                for name, kn in kns.items():
                    times.setdefault((name, case), []).append(fn(kn))
        print(f"{'case':18s} {'A ms':>8s} {'B ms':>8s} {'A/B':>6s} {'A tok/s':>8s} {'B tok/s':>8s} {'A GF/s':>7s} "
              f"{'A min':>8s} {'B min':>8s}")
        for case, M, _ in cases:
            a, b = (statistics.median(times[n, case]) for n in ("A", "B"))
            print(f"{case:18s} {a:8.1f} {b:8.1f} {a / b:6.2f} {M * 1e3 / a:8.1f} {M * 1e3 / b:8.1f} "
                  f"{M * ftok / a / 1e6:7.1f} {min(times['A', case]):8.1f} {min(times['B', case]):8.1f}", flush=True)
        del model, kns


def policy_kind(kind: str, cfg, lib, sizes: list[int], rounds: int) -> None:
    model = make_model(kind, cfg)
    kn = DecodeKernel(model, lib)
    print(f"{kind}: {'N':>5s} {'kernel ms':>10s} {'torch ms':>10s} {'kernel/torch':>13s}")
    for N in sizes:
        ids = torch.randint(0, cfg.vocab_size, (N,), generator=torch.Generator().manual_seed(N))
        rows, pos, last = torch.zeros(N, dtype=torch.int64), torch.arange(N), torch.tensor([N - 1])
        ck, ct = KVCache(cfg, 1, N, kn.cache_dtype), KVCache(cfg, 1, N, kn.cache_dtype)
        run_kernel = lambda: kn.rows(model.model.embed_tokens(ids), ck, rows, pos, last)  # noqa: B023
        run_torch = lambda: model(ids[None], cache=ct, starts=[0], last_only=True)  # noqa: B023
        run_kernel(), run_torch()
        tk, tt = [], []
        for _ in range(rounds):
            tk.append(timed(run_kernel, 1))
            tt.append(timed(run_torch, 1))
        k, t = statistics.median(tk), statistics.median(tt)
        print(f"{kind}: {N:5d} {k:10.1f} {t:10.1f} {k / t:13.2f}  {'kernel' if k < t else 'torch'}", flush=True)


def policy(args, cfg, lib) -> None:
    """One-row spans of N tokens: the kernel step against PyTorch's forward of them."""
    for kind in args.kinds.split(","):
        policy_kind(kind, cfg, lib, [int(v) for v in args.policy.split(",")], args.rounds)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="fp32,bf16")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--ctx", type=int, default=32, help="the decode rows' position (default %(default)s)")
    ap.add_argument("--prefill", type=int, default=0, help="also an N-token one-row prefill")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round at M=1 (fewer for more rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--base", default="HEAD", help="git revision of build B's csrc ('' = this worktree's)")
    ap.add_argument("--flags-b", default="", help="extra compiler flags of build B")
    ap.add_argument("--policy", default="", help="one-row span lengths to time kernel against PyTorch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.preset("smallcoder-303m")
    lib_a = compile_library(build_flags())
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; model 303M config, random weights")
    print(f"build A: this worktree, {' '.join(build_flags())} (gemm {gemm_path(lib_a)}, int8 {int8_path(lib_a)})")
    if args.policy:
        policy(args, cfg, lib_a)
        return
    source = revision_source(args.base) if args.base else kernels.SOURCE
    lib_b = compile_library(build_flags() + args.flags_b.split(), source)
    print(f"build B: {'revision ' + args.base if args.base else 'this worktree'}, extra flags "
          f"{args.flags_b or '-'} (gemm {gemm_path(lib_b)}, int8 {int8_path(lib_b)})")
    print(f"medians of {args.rounds} alternated rounds; GF/s: model FLOPs (no attention) over A's time")
    compare(args, cfg, {"A": lib_a, "B": lib_b})


if __name__ == "__main__":
    main()

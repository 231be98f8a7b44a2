"""What one trainer change buys: SmallCoder's training step with and without it, alternated per step.

    python benchmarks/bench_train_ab.py --change loss   --preset smallcoder-303m --pairs 8 --compile
    python benchmarks/bench_train_ab.py --change loss   --preset tiny --batch 8 --seq 512 --pairs 12 --compile
    python benchmarks/bench_train_ab.py --change malloc --preset smallcoder-303m --pairs 6

One model, one optimizer, one process, so the two variants see the same machine state within a
few seconds of each other; the figure is the median of the per-pair speedups. `loss`: the chunked
head loss (`model(ids, labels=ids)`, `smallcoder.loss`) against `cross_entropy` over the full
logits. `malloc`: the trainer's `keep_freed_memory` against glibc's default settings, switched with
`mallopt` between steps (one settling step after each switch is not timed); minor page faults per
step are printed too. The comparison against transformers is bench_train.py.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from smallcoder import new_model, preset
from smallcoder.data.sft import IGNORE_INDEX
from smallcoder.train.hardware import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--change", required=True, choices=["loss", "malloc"])
    ap.add_argument("--preset", default="smallcoder-303m")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as run.compile=true)")
    args = ap.parse_args()
    config = preset(args.preset)
    model = new_model(config, seed=0).train()
    fwd = torch.compile(model) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    ids = torch.randint(1, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    targets = F.pad(ids[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)

    def chunked() -> torch.Tensor:
        return fwd(ids, labels=ids)

    def full_logits() -> torch.Tensor:
        return F.cross_entropy(fwd(ids).reshape(-1, config.vocab_size).float(), targets,
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def step(loss_fn) -> tuple[float, int]:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        (loss_fn() / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    if args.change == "loss":
        keep_freed_memory()
        variants = {"full logits": (full_logits, None), "chunked loss": (chunked, None)}
    else:
        variants = {"glibc default": (chunked, False), "keep freed memory": (chunked, True)}
    for fn, malloc in variants.values():  # warm-up (and compilation) of each variant
        if malloc is not None:
            keep_freed_memory(malloc)
        for _ in range(2):
            step(fn)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.pairs):
        for name in names if i % 2 == 0 else names[::-1]:
            fn, malloc = variants[name]
            if malloc is not None:
                keep_freed_memory(malloc)
                step(fn)  # settle the allocator after the switch
            dt, faults = step(fn)
            times[name].append(dt)
            print(f"pair {i} {name:18s} {dt:7.3f} s  {faults * resource.getpagesize() / 2**20:7.0f} MB page-faulted",
                  flush=True)
    base, new = names
    speedups = [a / b for a, b in zip(times[base], times[new])]
    print(f"\n{args.preset} {args.batch} x {args.seq}, compile={args.compile}: {base} "
          f"{statistics.median(times[base]):.3f} s/step, {new} {statistics.median(times[new]):.3f} s/step; "
          f"speedup (median of {len(speedups)} pairs) {statistics.median(speedups):.3f}x")


if __name__ == "__main__":
    main()

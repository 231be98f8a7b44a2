"""Training throughput (tokens/s) and MFU of SmallCoder vs transformers' LlamaForCausalLM, A/B alternated.

    python benchmarks/bench_train.py --preset tiny                      # batch 8 x 512
    python benchmarks/bench_train.py --preset smallcoder-303m --steps 1 --rounds 10 --compile smallcoder
    python benchmarks/bench_train.py --preset smallcoder-303m --device cuda --dtype bfloat16 --batch 16
    python benchmarks/bench_train.py --preset smallcoder-303m --steps 1 --rounds 3 --optimizers adamw,muon

Both models get the same config and weights, the same batch and the same optimizer (AdamW β 0.9/0.95,
weight decay 0.1, foreach or fused alike) and grad clipping at 1.0. Ours is trained the way the
trainer does it (`model(ids, labels=labels) / count`: the chunked head loss of `smallcoder.loss`);
transformers the usual way (`model(input_ids, labels=labels).loss`). Each model lives in its own
worker process, as each would in a user's run, so each has its own allocator state: ours applies
the trainer's `keep_freed_memory` on CPU as `smallcoder train` does (`--same-allocator` leaves
glibc's defaults to both, which isolates the code). This process asks the two workers for steps in
turn: each round times `--steps` full optimizer steps of one model then the other, the order
flipping every round; medians over rounds are reported, with the forward / backward / optimizer
split, and the median of the per-round ratios. FLOPs per token: `ModelConfig.flops_per_token` (the trainer's),
6 * N_matmul (every Linear incl. lm_head, not the embedding lookup) + 12 * layers * hidden * seq
(attention scores and values, fwd + bwd); MFU is against the matmul peak measured here (2048^3 fp32 on CPU, 8192^3 in --dtype on
CUDA). bf16 runs under autocast with fp32 master weights, as the trainer does; on a CPU without
native bf16 that is ~20x slower than fp32, so train and measure fp32 there.

`--optimizers adamw,muon` times our model under each optimizer instead (AdamW as above; Muon as the
trainer builds it for `optimizer = "muon"`: train/muon.py on the layers' matrices, fused AdamW on
the rest), and prints Muon's step cost over AdamW's per timed step and per optimizer step of a
global batch (`--global-batch-tokens`, default the 303M recipe's 524,288: forward and backward run
once per micro-batch, the optimizer once per global batch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from smallcoder import ModelConfig, new_model, preset

DEFAULT_SHAPE = {"tiny": (8, 512), "smallcoder-303m": (1, 1024)}
PHASES = ("forward", "backward", "optimizer")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, reps: int = 5) -> float:
    """Median FLOP/s of an n^3 matmul: the ceiling that MFU is measured against."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b  # warm-up (thread pool, cuBLAS handle)
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


class Runner:
    """One model + its optimizer; `step()` runs one timed optimizer step and returns its phases."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 args: argparse.Namespace, device: torch.device, amp: torch.dtype | None, muon: bool = False) -> None:
        self.model, self.loss_fn, self.device, self.amp = model, loss_fn, device, amp
        opt_kw = {"fused": True} if args.optimizer == "fused" else {"foreach": True}
        if muon:
            from smallcoder.train.muon import Muon, MuonAdamW, named_split

            matrices, rest = named_split(model)
            self.opt = MuonAdamW(Muon([p for _, p in matrices], lr=1e-4, weight_decay=0.1),
                                 torch.optim.AdamW([p for _, p in rest], lr=1e-4, betas=(0.9, 0.95),
                                                   weight_decay=0.1, **opt_kw))
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, **opt_kw)

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        sync(self.device)
        t0 = time.perf_counter()
        with autocast:
            loss = self.loss_fn(ids, labels)
        sync(self.device)
        t1 = time.perf_counter()
        loss.backward()
        sync(self.device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2}


def build(name: str, args: argparse.Namespace, config: ModelConfig, device: torch.device) -> Runner:
    """Our model, or transformers' loaded with the same weights (same work, same numbers)."""
    amp = None if args.dtype == "float32" else getattr(torch, args.dtype)
    ours = new_model(config, seed=0).to(device).train()
    if name.startswith("smallcoder"):
        fwd: torch.nn.Module = torch.compile(ours) if args.compile else ours

        def ours_loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return fwd(ids, labels=labels) / (labels.shape[0] * (labels.shape[1] - 1))

        return Runner(ours, ours_loss, args, device, amp, muon=name == "smallcoder+muon")
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.to_hf_dict().items()
                                            if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    hf_config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_config).to(device).train()
    missing = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    del ours
    hf_fwd: torch.nn.Module = torch.compile(hf) if args.compile == "both" else hf

    def hf_loss(ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return hf_fwd(input_ids=ids, labels=labels, use_cache=False).loss

    return Runner(hf, hf_loss, args, device, amp)


def run_worker(args: argparse.Namespace, config: ModelConfig, batch: int, seq: int) -> None:
    """Child process: build one model, warm it up, then time one step per `step` line on stdin."""
    device = torch.device(args.device)
    if args.worker.startswith("smallcoder") and device.type == "cpu" and not args.same_allocator:
        from smallcoder.train.hardware import keep_freed_memory

        keep_freed_memory()  # what `smallcoder train` does on a CPU
    runner = build(args.worker, args, config, device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, config.vocab_size, (batch, seq), generator=g).to(device)
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    for _ in range(warmup):  # allocator, optimizer state, compilation
        runner.step(ids, ids)
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print("RESULT " + json.dumps(runner.step(ids, ids)), flush=True)


class Worker:
    """The parent's handle on one child process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--worker", name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.times: dict[str, list[float]] = {p: [] for p in PHASES}
        self.rates: list[float] = []

    def expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):]
        sys.exit(f"the {self.name} worker exited (status {self.proc.wait()}) before sending {prefix.strip()}")

    def step(self) -> dict[str, float]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return json.loads(self.expect("RESULT "))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(DEFAULT_SHAPE))
    ap.add_argument("--batch", type=int, help="sequences per step (default: 8 for tiny, 1 for 303m)")
    ap.add_argument("--seq", type=int, help="tokens per sequence (default: 512 for tiny, 1024 for 303m)")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per model per round")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds; the order flips each round")
    ap.add_argument("--compile", nargs="?", const="both", choices=["both", "smallcoder"],
                    help="torch.compile both models (default when given) or only ours")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="autocast dtype (weights stay fp32)")
    ap.add_argument("--optimizer", default="fused", choices=["foreach", "fused"],
                    help="AdamW kernel for both models (fused: the trainer's and transformers' default)")
    ap.add_argument("--same-allocator", action="store_true",
                    help="glibc's default malloc settings for both (ours otherwise keeps freed memory, as the trainer does)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--warmup", type=int, help="untimed steps per model first (default 1; 2 with --compile, "
                    "whose second call recompiles once)")
    ap.add_argument("--only", choices=["smallcoder", "transformers"], help="time one model (profiling)")
    ap.add_argument("--optimizers", choices=["adamw,muon"], help="time our model under AdamW and under Muon")
    ap.add_argument("--global-batch-tokens", type=int, default=524_288,
                    help="--optimizers: the global batch the per-optimizer-step ratio is given for")
    ap.add_argument("--worker", choices=["smallcoder", "smallcoder+muon", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = preset(args.preset)
    batch, seq = DEFAULT_SHAPE[args.preset]
    batch, seq = args.batch or batch, args.seq or seq
    if seq > config.max_position_embeddings:
        sys.exit(f"--seq {seq} exceeds the preset's context {config.max_position_embeddings}")
    if args.worker:
        return run_worker(args, config, batch, seq)
    import transformers

    peak_dtype = torch.float32 if args.dtype == "float32" else getattr(torch, args.dtype)
    peak = matmul_peak(device, peak_dtype, 2048 if device.type == "cpu" else 8192)
    fpt = config.flops_per_token(seq)
    allocator = "glibc defaults for both" if args.same_allocator else "ours keeps freed memory (as the trainer)"
    print(f"{args.preset} ({config.num_parameters / 1e6:.1f}M params), batch {batch} x {seq}, {args.dtype}, "
          f"{device}, {args.threads} threads, AdamW {args.optimizer}, compile={args.compile}, malloc: {allocator}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({peak_dtype}); {fpt / 1e9:.3f} GFLOP per token trained",
          flush=True)

    workers = []
    names = ["smallcoder", "smallcoder+muon"] if args.optimizers else ["smallcoder", "transformers"]
    for name in [args.only] if args.only else names:
        workers.append(Worker(name))
        workers[-1].expect("READY")  # one at a time: warm-up and compilation do not overlap
    tokens = batch * seq
    try:
        for rnd in range(args.rounds):
            for w in workers if rnd % 2 == 0 else workers[::-1]:
                phases = [w.step() for _ in range(args.steps)]
                w.rates.append(tokens * args.steps / sum(sum(p.values()) for p in phases))
                for p in PHASES:
                    w.times[p].append(statistics.median(ph[p] for ph in phases))
                print(f"round {rnd} {w.name:15s} {w.rates[-1]:9.1f} tok/s", flush=True)
    finally:
        for w in workers:
            w.close()

    print()
    med = {}
    for w in workers:
        med[w.name] = m = statistics.median(w.rates)
        split = "  ".join(f"{p} {statistics.median(w.times[p]) * 1e3:7.0f} ms" for p in PHASES)
        print(f"{w.name:15s} median {m:9.1f} tok/s  MFU {m * fpt / peak:6.1%}  per step: {split}")
    if len(med) == 2 and args.optimizers:
        a, m = workers
        paired = [x / y for x, y in zip(a.rates, m.rates)]  # time ratio muon/adamw = rate ratio adamw/muon
        fb = statistics.median(a.times["forward"] + m.times["forward"]) + \
            statistics.median(a.times["backward"] + m.times["backward"])
        opt_a, opt_m = statistics.median(a.times["optimizer"]), statistics.median(m.times["optimizer"])
        micro = max(1, args.global_batch_tokens // tokens)
        print(f"step cost muon/adamw, one step of {tokens:,} tokens: per-round {' '.join(f'{x:.2f}' for x in paired)}, "
              f"median {statistics.median(paired):.2f}x (optimizer {opt_m:.2f} s vs {opt_a:.2f} s)")
        print(f"per optimizer step of a {args.global_batch_tokens:,}-token global batch ({micro} micro-steps of "
              f"forward+backward {fb:.2f} s, then one optimizer step): "
              f"{(micro * fb + opt_m) / (micro * fb + opt_a):.3f}x")
    elif len(med) == 2:
        # Each round times both models back to back, so a per-round ratio cancels most of the drift of a
        # shared, noisy machine; its median is the figure to quote (the ratio of medians is printed too).
        paired = [a / b for a, b in zip(workers[0].rates, workers[1].rates)]
        print(f"ratio smallcoder/transformers: {med['smallcoder'] / med['transformers']:.2f}x (of medians); "
              f"per-round {' '.join(f'{x:.2f}' for x in paired)}, median {statistics.median(paired):.2f}x")


if __name__ == "__main__":
    main()

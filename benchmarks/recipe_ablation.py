"""Optimizer ablation at the tiny recipe's shape: AdamW+WSD against Muon+WSD at one token budget.

    python benchmarks/recipe_ablation.py [--tokens 300000] [--seeds 0,1,2] [--adamw-lrs 3e-4,1e-3,3e-3,1e-2]
        [--muon-lrs 3e-3,1e-2,3e-2,1e-1] [--work DIR] [--plot PNG]

Each arm trains the tiny recipe's model (hidden 192, 4 layers, its 4,096-token tokenizer) on one
stage of the built-in corpus (code 80% / prose 20%, as the tiny recipe's code stage, FIM off) for
--tokens tokens with the WSD schedule, through `smallcoder train` (a subprocess per run, its own
folder under --work). The LR of each arm is tuned on its grid with seed 0 (every grid point's
final validation loss is printed); the other seeds then run at the arm's best LR. Printed per arm:
the final validation loss per seed, the median and the spread (max - min) across seeds; then the
tokens each Muon seed needs to reach the AdamW arm's median final validation loss (linear between
evaluations), against AdamW's whole budget: the tokens-to-target ratio. A claim holds only where the
difference exceeds the spread. Validation losses are deterministic given the seed (no timing), so
the machine's load does not change them. Every run holds out the same documents (`split_seed = 0`),
so seeds differ in initialization and data order only and are scored on one validation set. The
plot (--plot, default WORK/ablation.png) shows each arm's validation loss against tokens at its best
LR: the median over seeds, the band between the lowest and the highest seed, and the target line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE = """
[model]
preset = "tiny"
hidden_size = 192
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 4
intermediate_size = 512
tokenizer = "{tokenizer}"

[run]
seed = {seed}
split_seed = 0
dtype = "float32"
device = "cpu"
keep_last = 1
checkpoint_every = 100000
eval_every = {eval_every}
eval_batches = 4
log_every = 1000
val_docs = 64

[[stages]]
name = "code"
tokens = {tokens}
seq_len = 256
global_batch_tokens = 2048
micro_batch = 8
schedule = "wsd"
warmup = 10
decay = 0.25
lr = {lr}
min_lr = {min_lr}
weight_decay = 0.1
grad_clip = 1.0
optimizer = "{optimizer}"
[[stages.sources]]
source = "builtin:code"
weight = 0.8
[[stages.sources]]
source = "builtin:prose"
weight = 0.2
"""


def tokenizer(work: Path) -> Path:
    """The tiny recipe's tokenizer, trained once into WORK/tokenizer."""
    out = work / "tokenizer"
    if not (out / "tokenizer.json").exists():
        inputs = [x for part in ("prose", "code", "math", "sft") for x in ("--input", f"builtin:{part}")]
        subprocess.run([sys.executable, "-m", "smallcoder", "tokenizer", "train", "--vocab-size", "4096",
                        "--limit-docs", "300", "--out", str(out), *inputs], check=True, stdout=subprocess.DEVNULL)
    return out


def run(work: Path, tok: Path, optimizer: str, lr: float, seed: int, tokens: int, eval_every: int) -> list[tuple[int, float]]:
    """(tokens, validation loss) at each evaluation of one training run, the last at the budget."""
    out = work / f"{optimizer}-lr{lr:g}-seed{seed}"
    curve_file = out / "curve.json"
    if curve_file.exists():
        return [tuple(x) for x in json.loads(curve_file.read_text())]
    recipe = work / f"{out.name}.toml"
    recipe.write_text(RECIPE.format(tokenizer=tok, seed=seed, eval_every=eval_every, tokens=tokens, lr=lr,
                                    min_lr=lr / 10, optimizer=optimizer))
    proc = subprocess.run([sys.executable, "-m", "smallcoder", "train", str(recipe), "--out", str(out), "--force",
                           "--threads", "2"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name}: train failed\n{proc.stderr[-3000:]}")
    curve = [(r["tokens"], r["val_loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("val_loss") is not None]
    curve_file.write_text(json.dumps(curve))
    return curve


def tokens_to(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the curve first reaches `target` (linear between evaluations), or None."""
    prev = None
    for t, v in curve:
        if v <= target:
            if prev is None:
                return float(t)
            (t0, v0) = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v) if v0 != v else float(t)
        prev = (t, v)
    return None


def plot(curves: dict[str, list[list[tuple[int, float]]]], lrs: dict[str, float], target: float, out: Path) -> Path:
    """Validation loss against tokens per arm: the median over seeds and the min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for k, (arm, runs) in enumerate(curves.items()):
        n = min(len(c) for c in runs)
        xs = [runs[0][i][0] / 1e3 for i in range(n)]
        per = [[c[i][1] for c in runs] for i in range(n)]
        ax.plot(xs, [statistics.median(v) for v in per], "o-", ms=2.5, color=f"C{k}",
                label=f"{arm} (lr {lrs[arm]:g}), median of {len(runs)} seeds")
        ax.fill_between(xs, [min(v) for v in per], [max(v) for v in per], color=f"C{k}", alpha=0.2)
    ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target: AdamW's median final {target:.3f}")
    ax.set_xlabel("tokens (thousands)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], target + 2.0))
    ax.set_title("optimizer ablation, tiny shape, one code stage, WSD")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--adamw-lrs", default="3e-4,1e-3,3e-3,1e-2")
    ap.add_argument("--muon-lrs", default="3e-3,1e-2,3e-2,1e-1")
    ap.add_argument("--plot", default=None, help="PNG of the curves (default: WORK/ablation.png)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps (2,048 tokens each) between evaluations")
    ap.add_argument("--work", default=None, help="folder for the runs, kept (default: a temporary one); finished "
                                                 "runs found there are reused")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ablation-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(work)
    seeds = [int(s) for s in args.seeds.split(",")]
    grids = {"adamw": [float(x) for x in args.adamw_lrs.split(",")],
             "muon": [float(x) for x in args.muon_lrs.split(",")]}
    finals: dict[str, list[float]] = {}
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    best_lr: dict[str, float] = {}
    print(f"tiny shape, one code stage of {args.tokens:,} tokens, WSD; LR grid on seed {seeds[0]}:")
    for arm, grid in grids.items():
        tuned = {lr: run(work, tok, arm, lr, seeds[0], args.tokens, args.eval_every) for lr in grid}
        for lr, curve in tuned.items():
            print(f"  {arm:5s} lr {lr:<8g} final val loss {curve[-1][1]:.4f}", flush=True)
        best = best_lr[arm] = min(tuned, key=lambda lr: tuned[lr][-1][1])
        curves[arm] = [tuned[best]] + [run(work, tok, arm, best, s, args.tokens, args.eval_every) for s in seeds[1:]]
        finals[arm] = [c[-1][1] for c in curves[arm]]
        edge = " (at the grid's edge: widen the grid)" if best in (min(grid), max(grid)) and len(grid) > 1 else ""
        print(f"  {arm}: best lr {best:g}{edge}", flush=True)
    print(f"\n{'arm':6s} {'final val loss per seed':32s} {'median':>8s} {'spread':>8s}")
    for arm, vals in finals.items():
        print(f"{arm:6s} {', '.join(f'{v:.4f}' for v in vals):32s} {statistics.median(vals):8.4f} "
              f"{max(vals) - min(vals):8.4f}")
    target = statistics.median(finals["adamw"])
    budget = curves["adamw"][0][-1][0]
    reached = [tokens_to(c, target) for c in curves["muon"]]
    shown = ", ".join("never" if r is None else f"{r:,.0f}" for r in reached)
    print(f"\ntokens for Muon to reach AdamW's median final val loss {target:.4f}: {shown} (AdamW: {budget:,})")
    if all(r is not None for r in reached):
        ratio = budget / statistics.median(reached)
        print(f"tokens-to-target ratio (AdamW / Muon, median over seeds): {ratio:.2f}x")
    gap = statistics.median(finals["adamw"]) - statistics.median(finals["muon"])
    spread = max(max(v) - min(v) for v in finals.values())
    rel = gap / statistics.median(finals["adamw"])
    print(f"Muon's median final val loss is {abs(rel):.1%} {'lower' if gap > 0 else 'higher'} than AdamW's "
          f"(difference {gap:+.4f}); the largest spread across seeds {spread:.4f}: the difference "
          f"{'exceeds' if abs(gap) > spread else 'does not exceed'} it")
    png = plot(curves, {arm: best_lr[arm] for arm in curves}, target, Path(args.plot or work / "ablation.png"))
    print(f"plot: {png}")
    print(f"runs in {work}")


if __name__ == "__main__":
    main()

"""`smallcoder train`: run a recipe (default: the built-in tiny curriculum) end to end."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import SmallCoderError

DEFAULT_RECIPE = "tiny"

EPILOG = """\
recipes: a TOML file, or the name of a packaged one (tiny, smallcoder-303m).
overrides: --set KEY=VALUE, KEY a dotted path (list items by index), VALUE a TOML value
  (a bare word is a string), e.g. --set stages.0.tokens=200000 --set run.seed=3
  --set model.preset=tiny --set stages.1.sources.0.weight=0.5 --set defaults.seq_len=128
resume: --resume continues from the newest valid checkpoint in --out (a corrupt newest one is
  moved to checkpoints/corrupt/ with a warning and the previous one used); it is refused where
  --out holds no run (a mistyped folder); --resume-or-start starts one there instead.
  A run that stopped before saving anything (no checkpoint yet) may simply be started again.
force: --force starts over in a used --out; its checkpoints, stage-*/, final/ and metrics are
  deleted only once the new run has its data, tokenizer and model ready (the caches are kept).
lock: a run holds --out/.lock (flock) while it runs; a second run on that folder is refused.
scale-out: torchrun --nproc-per-node N -m smallcoder train RECIPE ... (gloo on CPU, NCCL on GPU;
  run.strategy = "ddp" or "fsdp2")."""


def _recipe_path(arg: str | None) -> Path:
    from .recipe import packaged_recipe

    if arg is None:
        return packaged_recipe(DEFAULT_RECIPE)
    p = Path(arg)
    if p.exists():
        return p
    if "/" not in arg and not arg.endswith(".toml"):
        return packaged_recipe(arg)
    raise SmallCoderError(f"{arg}: recipe file not found")


def format_stage_table(result) -> str:
    """The stages' end-of-stage losses as an aligned table."""
    rows = [("stage", "steps", "tokens", "train loss", "val loss")]
    for s in result.stages:
        rows.append((s.name, f"{s.steps:,}", f"{s.tokens:,}",
                     "-" if s.train_loss is None else f"{s.train_loss:.4f}",
                     "-" if s.val_loss is None else f"{s.val_loss:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])])
                     for r in rows)


def cmd_train(args: argparse.Namespace) -> None:
    from ..cli import program_name, set_threads
    from .recipe import load_recipe
    from .report import MAX_NEW_TOKENS, REPORT_FILE, format_report
    from .trainer import Trainer

    path = _recipe_path(args.recipe)
    recipe = load_recipe(path, args.set or [])
    out = Path(args.out) if args.out else Path("runs") / path.stem
    set_threads(args.threads)
    result = Trainer(recipe, out, resume=args.resume or args.resume_or_start, force=args.force,
                     resume_or_start=args.resume_or_start, max_steps=args.max_steps,
                     peak_tflops=args.peak_tflops).run()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    minutes, seconds = divmod(round(result.wall_s), 60)
    took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    print(f"\ntrained {path.name} into {out}: {result.steps:,} steps in {took}")
    print(format_stage_table(result))
    if result.report.get("after"):
        print(format_report(result.report))
    if result.eos_share is not None:
        print(f"answers ending with EOS (greedy, held-out SFT prompts of every kind, <= {MAX_NEW_TOKENS} new tokens): "
              f"{result.eos_share:.0%}")
    print(f"metrics: {out / 'metrics.jsonl'}; loss curve: {out / 'loss.png'}; report: {out / REPORT_FILE}")
    print(f"checkpoint: {result.final}")
    print(f"chat with it: {program_name()} chat --model {result.final}")


def register(subparsers) -> None:
    from ..cli import add_threads_arg

    p = subparsers.add_parser("train", help="train a model from a recipe (default: the tiny built-in curriculum)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default=None,
                   help=f"recipe TOML file or packaged recipe name (default: {DEFAULT_RECIPE})")
    p.add_argument("--out", default=None, help="output folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its newest valid checkpoint (refused where --out holds no run)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue the run in --out, or start one where there is none (for jobs that are relaunched)")
    p.add_argument("--force", action="store_true",
                   help="start over in a non-empty --out (deletes its checkpoints once the new run is ready; "
                        "keeps the packed-data cache)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe field (repeatable)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="debug: at most N optimizer steps per stage (the schedule spans the shortened stage)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: known GPUs' bf16 peak, or a measured CPU peak)")
    add_threads_arg(p)
    p.set_defaults(func=cmd_train)


if __name__ == "__main__":  # pragma: no cover - `python -m smallcoder.train.cli` for torchrun users
    from ..cli import main

    sys.exit(main(["train", *sys.argv[1:]]))

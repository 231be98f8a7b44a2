"""HumanEval-infilling anchors, every task of the four files: canonical middles pass, empty ones count.

    python benchmarks/infill_canonical.py [--data-dir ../shared/data] [--workers N] [--json out.json]

For each split it scores, through `smallcoder.eval.infill.score_infill` (what `smallcoder eval
--tasks humaneval_infill_<split> --samples FILE.jsonl` runs, sandbox and checked runs included):

1. the canonical middles: every task must pass and match exactly (1,033 + 5,815 + 1,640 + 164);
2. empty completions: how many tasks an empty middle passes, and that it passes every task whose
   canonical middle is empty (the data's own answer there), which then counts as an exact match;
3. single-line only: the canonical lines without their newline (the lm-evaluation-harness rule,
   which drops the stop string): how many still pass, i.e. what keeping the newline is worth.

Prints one line per split and measure with the count, the total and the wall time. Exit status 0
when 1 and 2 hold everywhere, 1 when they do not (the failures are listed), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from smallcoder import SmallCoderError
from smallcoder.eval.data import INFILL_SPLITS, load_task_data
from smallcoder.eval.infill import score_infill

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def score(task: str, rows: list[dict], completions: list[str], workers: int | None) -> tuple[Any, float]:
    t0 = time.perf_counter()
    samples = [{"task_id": r["task_id"], "completion": c} for r, c in zip(rows, completions)]
    return score_infill(task, rows, samples, workers=workers, progress=sys.stderr.isatty()), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--workers", type=int, default=None, help="parallel sandbox processes (default 2 per core)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    try:
        data = {task: load_task_data(task, args.data_dir) for task in INFILL_SPLITS}
    except SmallCoderError as e:
        print(f"infill_canonical: error: {e}", file=sys.stderr)
        return 2
    figures: dict[str, dict[str, Any]] = {}
    problems = []
    started = time.perf_counter()
    for task, rows in data.items():
        entry: dict[str, Any] = {"tasks": len(rows)}
        canon, secs = score(task, rows, [r["canonical_solution"] for r in rows], args.workers)
        bad = [(s["task_id"], s["status"], s["detail"]) for s in canon.samples
               if s["status"] != "passed" or not s["exact_match"]]
        entry["canonical"] = {"pass": canon.metrics["pass@1"].count, "exact_match": canon.metrics["exact_match"].count,
                              "seconds": round(secs, 1), "failures": bad[:20]}
        problems += [f"{task}: canonical {t}: {st} ({d})" for t, st, d in bad]
        print(f"{task}: canonical middles pass {entry['canonical']['pass']}, exact match "
              f"{entry['canonical']['exact_match']} in {secs:.1f} s", flush=True)

        empty, secs = score(task, rows, [""] * len(rows), args.workers)
        by_id = {s["task_id"]: s for s in empty.samples}
        must = [r["task_id"] for r in rows if r["canonical_solution"] == ""]
        missed = [t for t in must if by_id[t]["status"] != "passed" or not by_id[t]["exact_match"]]
        entry["empty"] = {"pass": empty.metrics["pass@1"].count, "exact_match": empty.metrics["exact_match"].count,
                          "empty_canonical": len(must), "seconds": round(secs, 1),
                          "passing": [s["task_id"] for s in empty.samples if s["status"] == "passed"]}
        problems += [f"{task}: empty completion fails {t}, whose canonical middle is empty" for t in missed]
        print(f"{task}: empty completions pass {entry['empty']['pass']} (exact match {entry['empty']['exact_match']}; "
              f"{len(must)} canonical middles are empty, {len(must) - len(missed)} of them passed) in {secs:.1f} s",
              flush=True)

        if task == "humaneval_infill_single":
            cut, secs = score(task, rows, [r["canonical_solution"].removesuffix("\n") for r in rows], args.workers)
            entry["no_newline"] = {"pass": cut.metrics["pass@1"].count, "seconds": round(secs, 1)}
            print(f"{task}: canonical lines without their newline pass {entry['no_newline']['pass']} "
                  f"in {secs:.1f} s", flush=True)
        figures[task] = entry
    total = time.perf_counter() - started
    print(f"all: {sum(e['tasks'] for e in figures.values())} tasks, {total:.0f} s "
          f"({canon.settings['sandbox_workers']} sandbox workers)")
    if args.json is not None:
        args.json.write_text(json.dumps({"figures": figures, "seconds": round(total, 1),
                                         "sandbox": canon.settings["sandbox"]}, indent=1) + "\n")
    for p in problems:
        print(f"FAILED {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())

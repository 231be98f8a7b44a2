"""`smallcoder eval`: run the card's benchmarks on a model, or score a ready samples file.

Kept light at import time (the CLI imports it for `--help`): torch, the tokenizer and the task
modules load inside `cmd_eval`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ..checks import number
from ..cli import DTYPE_HELP, add_kv_cache_arg, add_speculative_arg, kv_dtype, speculation
from ..errors import SmallCoderError
from ..prompts import FIM_ORDERS
from .data import EVAL_TASKS as TASKS
from .data import INFILL_SPLITS

CODE_TASKS = ("humaneval", "humaneval_plus", "mbpp", *INFILL_SPLITS)


def register(subparsers: Any) -> None:
    """Add the `eval` command."""
    p = subparsers.add_parser(
        "eval", help="run benchmarks (HumanEval(+), HumanEval-infilling, MBPP, GSM8k, Wikitext-2, ARC, HellaSwag) "
                     "or score a samples file",
        description="Evaluate a model with the card's protocols and print the card's table. "
                    "With --samples, score ready completions without a model.")
    p.add_argument("--model", default=None, help="checkpoint folder or Hugging Face Hub repo id")
    p.add_argument("--tasks", required=True, help=f"comma-separated: {','.join(TASKS)}")
    p.add_argument("--samples", default=None, metavar="FILE.jsonl",
                   help='score {"task_id", "completion"} lines for one code task (no model needed)')
    p.add_argument("--n-samples", type=int, default=1, help="samples per code task (pass@k needs n >= k)")
    p.add_argument("--k", default="1", help="pass@k values, comma-separated (default 1)")
    p.add_argument("--temperature", type=float, default=None,
                   help="code tasks: default 0.2 (the card's); HumanEval-infilling: default 0 (greedy, as "
                        "lm-eval); GSM8k is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512, help="card: 512")
    p.add_argument("--limit", type=int, default=None, help="only the first K items of each task")
    p.add_argument("--seed", type=int, default=0, help="sample j of each task uses seed + j")
    p.add_argument("--data-dir", default=None,
                   help="benchmark files in the layout of shared/data (default: $SMALLCODER_DATA or "
                        "../shared/data if present, else the Hub)")
    p.add_argument("--out", default=None, help="folder for results.json, results.md and samples_<task>.jsonl")
    p.add_argument("--format", dest="fmt", choices=("instruct", "base"), default="instruct",
                   help="HumanEval prompt: the card's User:/Assistant: format, or the raw prompt")
    p.add_argument("--fim-order", choices=FIM_ORDERS, default="psm",
                   help="HumanEval-infilling prompt: prefix-suffix-middle or suffix-prefix-middle (default psm)")
    p.add_argument("--code-extraction", choices=("raw", "extract"), default=None,
                   help="how a completion becomes the code that runs: as generated (raw, lm-eval's and the "
                        "original harnesses' rule), or the first Python fence else the longest part that parses "
                        "(extract). Default: extract for the instruct format, raw for --format base, MBPP "
                        "and --samples")
    p.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    add_kv_cache_arg(p)
    add_speculative_arg(p)
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences decoded together (continuous batching) / scored per forward")
    p.add_argument("--workers", type=int, default=None, help="parallel sandbox processes (default: all cores)")
    p.add_argument("--timeout", type=float, default=None,
                   help="CPU seconds per program (default 10; a busy machine does not eat into it); the "
                        "wall-clock limit, which only ends samples that sleep, is 6x that and at least 60 s")
    p.add_argument("--compare-card", action="store_true", help="add the card's published numbers to the table")
    p.set_defaults(func=cmd_eval)


def parse_tasks(text: str) -> list[str]:
    """Task names in the order given, without repeats; unknown names list the valid ones."""
    tasks = list(dict.fromkeys(t.strip().lower().replace("-", "_") for t in text.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SmallCoderError(f"--tasks: unknown task(s) {', '.join(map(repr, unknown))}; "
                              f"valid tasks: {', '.join(TASKS)}")
    if not tasks:
        raise SmallCoderError(f"--tasks: name at least one task ({', '.join(TASKS)})")
    return tasks


def _check_args(args: argparse.Namespace) -> None:
    for name in ("n_samples", "batch_size", "max_new_tokens", "limit", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_new_tokens" else 1):
            flag = "--" + name.replace("_", "-")
            raise SmallCoderError(f"{flag} must be {'>= 0' if name == 'max_new_tokens' else '>= 1'}, got {value}")
    if args.temperature is not None and args.temperature < 0:
        raise SmallCoderError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise SmallCoderError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.timeout is not None:
        number(args.timeout, "--timeout (CPU seconds)", strict=True)


def _data_dir(args: argparse.Namespace) -> Path | None:
    if args.data_dir is not None:
        path = Path(args.data_dir)
        if not path.is_dir():
            raise SmallCoderError(f"--data-dir {path}: no such folder")
        return path
    from ..paths import default_data_dir

    return default_data_dir()


def _limits(args: argparse.Namespace) -> Any:
    if args.timeout is None:
        return None
    import math

    from .sandbox import Limits

    return Limits(cpu_seconds=max(1, math.ceil(args.timeout)), timeout=max(60.0, 6 * args.timeout))


def _load(task: str, data_dir: Path | None) -> Any:
    from .data import load_task_data

    return load_task_data(task, data_dir)


def cmd_eval(args: argparse.Namespace) -> None:
    """Validate everything cheap first (tasks, k, files, data), then load the model and run."""
    from .passk import check_ks, parse_ks
    from .report import markdown_table, read_samples, write_report

    tasks = parse_tasks(args.tasks)
    ks = parse_ks(args.k)
    _check_args(args)
    data_dir = _data_dir(args)
    progress = sys.stderr.isatty()
    settings: dict[str, Any] = {
        "model": args.model, "dtype": args.dtype, "tasks": tasks, "n_samples": args.n_samples, "k": ks,
        "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
        "limit": args.limit, "seed": args.seed, "format": args.fmt, "batch_size": args.batch_size,
        "code_extraction": args.code_extraction, "fim_order": args.fim_order,
        "data_dir": str(data_dir) if data_dir else None, "samples": args.samples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
        "platform": platform.platform()}
    results = []
    started = time.perf_counter()

    if args.samples is not None:
        if args.model is not None:
            raise SmallCoderError("--samples scores a ready file without a model: drop --model (or --samples)")
        if len(tasks) != 1 or tasks[0] not in CODE_TASKS:
            raise SmallCoderError(f"--samples scores one code task: use --tasks {', --tasks '.join(CODE_TASKS)} "
                                  f"(got --tasks {','.join(tasks)})")
        from .humaneval import score_humaneval
        from .humanevalplus import score_humaneval_plus
        from .infill import score_infill
        from .mbpp import score_mbpp

        samples = read_samples(args.samples, solution_ok=tasks[0] != "mbpp")
        records = _load(tasks[0], data_dir)
        t0 = time.perf_counter()
        common = {"ks": ks, "limits": _limits(args), "workers": args.workers, "progress": progress,
                  "source": args.samples}
        if tasks[0] == "humaneval":
            result = score_humaneval(records, samples, fmt="base", extraction=args.code_extraction, **common)
        elif tasks[0] == "humaneval_plus":
            result = score_humaneval_plus(records, samples, fmt="base", extraction=args.code_extraction, **common)
        elif tasks[0] in INFILL_SPLITS:
            result = score_infill(tasks[0], records, samples, **common)
        else:
            result = score_mbpp(records, samples, extraction=args.code_extraction or "raw", **common)
        result.settings["wall_seconds"] = round(time.perf_counter() - t0, 3)
        results.append(result)
    else:
        if args.model is None:
            raise SmallCoderError("--model is needed to run benchmarks (a checkpoint folder or Hub repo id); "
                                  "to score ready completions use --samples FILE.jsonl")
        if any(t in CODE_TASKS for t in tasks):
            check_ks(ks, args.n_samples)
        speculation(args)  # a bad --speculative fails before anything loads
        data = {t: _load(t, data_dir) for t in tasks}  # a missing file fails before the model loads
        engine = _engine(args)
        if any(t in INFILL_SPLITS for t in tasks):  # before any task generates
            from .infill import require_fim

            require_fim(engine.tokenizer, f"--model {args.model}")
        settings["parameters"] = engine.model.num_parameters()
        for task in tasks:
            t0 = time.perf_counter()
            items = data[task]
            whole = isinstance(items, str) or task == "mbpp"  # text, or records of every split
            count = "" if whole else f" ({min(len(items), args.limit or len(items)):,} items)"
            print(f"{task}: running{count}", file=sys.stderr, flush=True)  # a long task is never silent
            result = _run_task(task, engine, items, args, ks, progress)
            result.settings["wall_seconds"] = round(time.perf_counter() - t0, 3)
            results.append(result)
            print(f"{task}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        if engine.speculative is not None:
            settings["speculative"] = args.speculative
            settings["drafts"] = {"verified": engine.drafted_tokens, "kept": engine.accepted_tokens}
            print(f"speculative ({args.speculative}): {engine.accepted_tokens:,} of {engine.drafted_tokens:,} drafted "
                  "tokens kept", file=sys.stderr)
    settings["wall_seconds"] = round(time.perf_counter() - started, 3)
    table = markdown_table(results, compare_card=args.compare_card)
    print(table, end="")
    for r in results:
        for note in r.notes:
            print(f"note ({r.task}): {note}")
    if args.out is not None:
        from . import sandbox

        written = write_report(args.out, results, settings, sandbox.protections(), compare_card=args.compare_card)
        print(f"wrote {written['results']} (+ {written['table'].name}, samples_<task>.jsonl)")
    else:
        print("(pass --out DIR to keep results.json and every sample)", file=sys.stderr)


def _engine(args: argparse.Namespace) -> Any:
    from ..checkpoint import load
    from ..inference import Engine

    spec = speculation(args)
    model, tokenizer = load(args.model, dtype=args.dtype)
    return Engine(model, tokenizer, max_batch=args.batch_size, kv_dtype=kv_dtype(args.kv_cache), speculative=spec)


def _run_task(task: str, engine: Any, data: Any, args: argparse.Namespace, ks: list[int], progress: bool) -> Any:
    """Dispatch one task to its module with the shared settings."""
    limit = args.limit
    default_t = 0.0 if task in INFILL_SPLITS else 0.2
    code = {"n_samples": args.n_samples, "ks": ks,
            "temperature": default_t if args.temperature is None else args.temperature,
            "max_new_tokens": args.max_new_tokens, "seed": args.seed, "batch_size": args.batch_size,
            "top_p": args.top_p, "limits": _limits(args), "workers": args.workers, "progress": progress}
    if task in ("humaneval", "humaneval_plus"):
        from .humaneval import run_humaneval
        from .humanevalplus import run_humaneval_plus

        problems = data[:limit] if limit is not None else data
        run = run_humaneval if task == "humaneval" else run_humaneval_plus
        return run(engine, problems, fmt=args.fmt, extraction=args.code_extraction, **code)
    if task in INFILL_SPLITS:
        from .infill import run_infill

        problems = data[:limit] if limit is not None else data
        return run_infill(engine, task, problems, order=args.fim_order, model=f"--model {args.model}", **code)
    if task == "mbpp":
        from .mbpp import run_mbpp

        return run_mbpp(engine, data, limit=limit, extraction=args.code_extraction or "raw", **code)
    if task == "gsm8k":
        from .gsm8k import run_gsm8k

        items = data[:limit] if limit is not None else data
        return run_gsm8k(engine, items, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         seed=args.seed, progress=progress)
    from . import lm_tasks

    if task == "wikitext2":
        return lm_tasks.run_wikitext2(engine, data, limit=limit, batch_size=args.batch_size)
    return lm_tasks.run_multiple_choice(engine, task, data, limit=limit, batch_size=args.batch_size)

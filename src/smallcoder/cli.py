"""The `smallcoder` command: thin argument parsing over the library.

Every user error surfaces as one line, `smallcoder: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checks import integer
from .errors import SmallCoderError

# ("module[:function]", group): the function (default `register`) adds its commands to that group.
SUBCOMMAND_MODULES = [
    ("smallcoder.data.cli", "data"),
    ("smallcoder.data.cli:register_tokenizer", "tokenizer"),
    ("smallcoder.eval.cli", None),
    ("smallcoder.train.cli", None),
    ("smallcoder.export", None),
    ("smallcoder.serve.cli", None),
]


def _sampling(args: argparse.Namespace):
    from .inference import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop=tuple(args.stop or ()), truncate=getattr(args, "truncate", False),
                          stop_at_eos=not getattr(args, "ignore_eos", False))


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the likeliest tokens up to this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh one each run)")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """--threads, the same for every command that runs torch on the CPU (`set_threads` applies it)."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per core); fewer when the cores are shared")


def check_threads(threads: int | None) -> None:
    """Refuse a --threads value that is not a positive integer (None: torch's default)."""
    if threads is not None:
        integer(threads, "--threads")


def set_threads(threads: int | None) -> None:
    """Apply --threads to torch (checked first); None keeps torch's default."""
    check_threads(threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


DTYPE_HELP = ("float32 | bfloat16 | float16 | int8 (weights; int8 quantizes a float checkpoint as it "
              "loads, or loads one saved by `smallcoder quantize`)")


def program_name() -> str:
    """How to run smallcoder again the way it runs now, for the commands our messages suggest: bare
    `smallcoder` where PATH finds this install, else the path it was started by (`.venv/bin/smallcoder`
    when the venv is not activated), else `python -m smallcoder`."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "smallcoder":
        found = shutil.which("smallcoder")
        return "smallcoder" if found and Path(found).resolve() == argv0.resolve() else sys.argv[0]
    python = shutil.which(Path(sys.executable).name)
    exe = Path(sys.executable).name if python and Path(python).resolve() == Path(sys.executable).resolve() \
        else sys.executable
    return f"{exe} -m smallcoder"


KV_CACHES = {"auto": None, "fp32": "float32", "fp16": "float16", "int8": "int8"}


def add_kv_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=tuple(KV_CACHES), default="auto",
                   help="the KV cache's dtype (default auto: as precise as the weights; with the CPU decode "
                        "kernel fp32 for float32 weights, fp16 for bfloat16, int8 for int8)")


def kv_dtype(name: str) -> Any:
    """The torch dtype of a --kv-cache choice (None: the engine's default)."""
    import torch

    return None if KV_CACHES[name] is None else getattr(torch, KV_CACHES[name])


def add_speculative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", default="off", metavar="lookup|draft:PATH|off",
                   help="speculative decoding, output unchanged: lookup drafts the tokens that followed the "
                        "text's last words where they occurred before (edits of code in the prompt); "
                        "draft:PATH drafts with a smaller checkpoint that has the same tokenizer (default off)")


def speculation(args: argparse.Namespace) -> Any:
    """The engine's `speculative` argument from --speculative (checked here, before a model loads);
    a draft model loads with the model's --dtype."""
    from .inference.speculative import parse_speculative

    spec = parse_speculative(args.speculative)
    if spec is not None:
        spec.draft_dtype = args.dtype
    return spec


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --dtype, --kv-cache and --speculative, the same for every command that runs a model."""
    p.add_argument("--model", required=True, help="checkpoint folder or Hugging Face Hub repo id")
    p.add_argument("--dtype", default="float32", help=DTYPE_HELP)
    add_kv_cache_arg(p)
    add_speculative_arg(p)


def cmd_init(args: argparse.Namespace) -> None:
    from .checkpoint import new_model, save
    from .config import preset
    from .fsutil import FORCE_HINT, refuse_used_folder
    from .tokenizer import Tokenizer

    refuse_used_folder(args.out, overwrite=args.force, hint=FORCE_HINT)  # before building the model
    config = preset(args.preset)
    tokenizer = Tokenizer.load(args.tokenizer)
    if tokenizer.vocab_size != config.vocab_size:
        print(f"note: vocab_size {config.vocab_size} -> {tokenizer.vocab_size} to fit the tokenizer")
        config = config.replace(vocab_size=tokenizer.vocab_size)
    config = config.replace(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
    model = new_model(config, seed=args.seed, dtype=args.dtype)
    save(model, tokenizer, args.out, overwrite=args.force)
    print(f"wrote {args.out}: preset {args.preset}, {model.num_parameters():,} parameters, "
          f"seed {args.seed}, {args.dtype}")


def _engine(args: argparse.Namespace):
    from .checkpoint import load
    from .inference import Engine

    spec = speculation(args)
    model, tokenizer = load(args.model, dtype=args.dtype)
    return Engine(model, tokenizer, kv_dtype=kv_dtype(args.kv_cache), speculative=spec)


def cmd_generate(args: argparse.Namespace) -> None:
    from .prompts import AnswerStream, chat_stops, format_chat

    params = _sampling(args)
    engine = _engine(args)
    from .console import stream_answer

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    shown = str
    if args.chat:
        prompt, params.stop, shown = format_chat(prompt), chat_stops(params.stop), AnswerStream()
    answer = stream_answer(engine, prompt, params, shown)
    print()
    if args.verbose:
        print(answer.summary(), file=sys.stderr)
    if answer.finish_reason == "cancelled":
        raise KeyboardInterrupt


def cmd_quantize(args: argparse.Namespace) -> None:
    from .checkpoint import load, save
    from .fsutil import FORCE_HINT, refuse_used_folder

    refuse_used_folder(args.out, overwrite=args.force, hint=FORCE_HINT)  # before loading the model
    model, tokenizer = load(args.model, dtype="int8")
    save(model, tokenizer, args.out, overwrite=args.force)
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out}: int8 weights (one fp32 scale per output row), {size / 1e6:.1f} MB; "
          f"run it with --dtype int8")


def cmd_chat(args: argparse.Namespace) -> None:
    from .console import line_editing
    from .prompts import chat_stops

    engine = _engine(args)
    params = _sampling(args)
    params.truncate = True
    params.stop = chat_stops(params.stop)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    line_editing()
    print(f"chatting with {args.model} ({args.dtype}); /reset clears the history, /quit or Ctrl-D ends, "
          "Ctrl-C stops an answer")
    _chat_loop(engine, params, messages, args.system)


def _read_turn() -> str | None:
    """The user's next line, None at the end of input. Piped in (a script, a test), the line is read
    first and then shown after its prompt, so the transcript reads as a terminal session does."""
    tty = sys.stdin.isatty()
    try:
        line = input("\nUser: " if tty else "")
    except EOFError:
        if tty:
            print()
        return None
    if not tty:
        print(f"\nUser: {line}")
    return line


def _chat_loop(engine, params, messages: list[dict[str, str]], system: str | None) -> None:
    from .console import stream_answer
    from .prompts import AnswerStream, format_chat

    while True:
        line = _read_turn()
        if line is None:
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.strip() == "/reset":
            messages[:] = messages[:1] if system else []
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        answer = stream_answer(engine, format_chat(messages), params, AnswerStream())
        print()
        print(answer.summary(), file=sys.stderr)
        messages.append({"role": "assistant", "content": answer.text.strip()})


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="smallcoder", description="Train, evaluate and run small code models.")
    parser.add_argument("--version", action="version", version=f"smallcoder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="write a freshly initialised checkpoint folder")
    p.add_argument("--preset", required=True, help="smallcoder-303m | tiny")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder, tokenizer.json or Hub repo id")
    p.add_argument("--out", required=True, help="checkpoint folder to create")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="complete a prompt and print the completion")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text, or - to read it from stdin")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the card's User:/Assistant: format")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt longer than the context")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past EOS (time a fixed number of tokens)")
    p.add_argument("--verbose", action="store_true",
                   help="then, on stderr: why it ended, tokens, tokens/s, prompt tokens, time to the first piece")
    _add_sampling_args(p, max_new_tokens=256, temperature=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("quantize", help="write an int8 (weight-only) copy of a checkpoint folder")
    p.add_argument("--model", required=True, help="float checkpoint folder or Hub repo id")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("chat", help="interactive chat that streams the answer")
    add_model_args(p)
    p.add_argument("--system", default=None, help="text placed before the conversation")
    _add_sampling_args(p, max_new_tokens=512, temperature=0.2)
    p.set_defaults(func=cmd_chat)


    # Subsystems register their own subcommands; each module keeps heavy imports inside functions.
    import importlib

    groups = {"data": "prepare training data (built-in corpus, packing, decontamination)",
              "tokenizer": "train a byte-level BPE tokenizer"}
    group_subs = {}
    for name, help_text in groups.items():
        g = sub.add_parser(name, help=help_text)
        group_subs[name] = g.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
    for spec, group in SUBCOMMAND_MODULES:
        module, _, function = spec.partition(":")
        target = group_subs[group] if group else sub
        getattr(importlib.import_module(module), function or "register")(target)
    _show_defaults(parser)
    return parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one and its help does not say it
    already), and keeps an epilog's own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every command's --help in `HelpFormatter`, whichever module registered it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for p in action.choices.values():
                _show_defaults(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except SmallCoderError as e:
        code = getattr(e, "exit_code", 2)  # 130: stopped as asked (Ctrl-C), not an error
        print(f"smallcoder: {'error' if code == 2 else 'stopped'}: {e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""int8 quality guard: does per-row int8 (quant.py) keep a trained model's behaviour?

    smallcoder train                                  # the tiny recipe -> runs/tiny/final
    python benchmarks/int8_quality.py --model runs/tiny/final [--wikitext-limit 0] [--json out.json]

Loads the float checkpoint twice from the same folder, as float32 and as int8 (quantized on load),
and measures, on a fixed set of 40 prompts (14 `User: ...\\nAssistant:` requests written here, so
held out of every training set, 13 code and 13 prose prefixes; greedy, 64 new tokens, EOS not
treated as a stop so both models produce the same number of tokens):

- teacher-forced top-1 agreement (the gated measure, target >= 95%): the prompt plus the float32
  model's own greedy continuation is fed to both models in one forward pass; at every position that
  predicts a continuation token we compare the two argmaxes. Each position is judged on the same
  context, so one early disagreement does not decide the rest (llama.cpp's `perplexity
  --kl-divergence` reports the same figure as "Same top p"). Mean KL(fp32 || int8) comes with it (gated only
  with --max-kl; on the tiny checkpoint both fixed targets also pass a per-row 4-bit quantizer, and
  mean KL is what tells them apart: 2.9e-5 nats for int8, 2.9e-3 for 4-bit).
- the same through the C++ decode kernel (gated: >= 99% and, with --max-kl, the same KL bound),
  where it builds: the int8 logits come from one-token decode steps with a KV cache, as in
  generation, and the kernel also quantizes activations (int16, one scale a row: csrc/q8dot.h), so this is
  what chat, serve and eval decode with.
- free-running agreement (reported, not gated): both models generate on their own through the
  Engine (the C++ decode kernel where it builds); per prompt, the tokens before the first
  divergence count as agreeing and everything after it as not (after a divergence the two
  continue from different texts, so comparing later positions measures nothing). Reported as the
  exact-prefix share (sum of common-prefix lengths / all tokens) and the number of identical
  completions.
- Wikitext-2 (raw test, lm-eval's document-level protocol, `eval.lm_tasks.run_wikitext2`) word
  perplexity of both, over the first `--wikitext-limit` articles (default 16 of 62, about 2 minutes
  for the tiny model on 2 cores; 0 = all, about 5 minutes); gated: rise <= 1%.

It also writes an int8 copy with `smallcoder quantize` into a temp folder, prints the sizes of the
float and int8 folders, and checks that loading the saved int8 copy gives bit-identical logits to
quantizing on load. Exit status: 0 when every target is met, 1 when one is missed (so CI can run
it), 2 on bad input (the message names what is wrong).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from smallcoder import Engine, KVCache, SamplingParams, SmallCoderError, format_chat, kernels, load
from smallcoder.hub import resolve

MIN_AGREEMENT = 0.95   # teacher-forced top-1 agreement, int8 vs float32
MIN_KERNEL_AGREEMENT = 0.99  # the same, the int8 logits from the C++ kernel's decode steps
MAX_PPL_RISE = 0.01    # relative rise of Wikitext-2 word perplexity
NEW_TOKENS = 64
WIKITEXT_LIMIT = 16   # articles; 0 = all 62
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Requests in the style of the built-in SFT data (code from a signature and a docstring; GSM8k-style
# word problems) but written here, so no model trained on that data has seen them.
CHAT_REQUESTS = [
    "Write a Python function `is_palindrome(s)` that returns True when s reads the same forwards and backwards.",
    "Write a Python function `flatten(items)` that turns a list of lists into one flat list.",
    "Write a Python function `count_words(text)` that returns a dict mapping each word to how many times it occurs.",
    "Write a Python function `clamp(x, lo, hi)` that limits x to the range from lo to hi.",
    "Write a Python function `chunks(seq, n)` that yields successive pieces of seq of length n.",
    "Write a Python function `read_lines(path)` that returns the lines of a text file without their newlines.",
    "Implement `merge_dicts(a, b)` in Python: return a new dict with the keys of both, b winning on conflicts.",
    "Write a Python function `gcd(a, b)` that returns the greatest common divisor of two integers.",
    "How do I reverse a list in Python?",
    "Explain what a Python generator is and when to use one.",
    ("A shop sells pencils for $3 each and pens for $7 each. Maria buys 4 pencils and 2 pens. "
     "How much does she spend, in dollars?"),
    "A car travels at 60 km per hour for 3 hours. How many kilometers does it travel?",
    "Tom has 45 marbles. He gives 1/3 of them to his sister. How many marbles does he have left?",
    "A factory makes 12 chairs per hour. How many chairs does it make in 8 hours?",
]
CODE_PREFIXES = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\n\n\ndef list_python_files(root):\n",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n",
    "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n",
    "def _parse_header(line):\n    name, _, value = line.partition(':')\n",
    "for i, line in enumerate(lines):\n    if not line.strip():\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n    def __repr__(self):\n",
    "def quote(s, safe='/'):\n    \"\"\"Quote special characters in a URL path.\"\"\"\n",
    "import re\n\n_WORD = re.compile(r'\\w+')\n\n\ndef tokenize(text):\n",
    "try:\n    import zlib\nexcept ImportError:\n",
    "def __eq__(self, other):\n    if not isinstance(other, type(self)):\n",
    '    def close(self):\n        """Close the file and release its resources."""\n',
]
PROSE_PREFIXES = [
    "The for statement is used to iterate over the elements of a sequence",
    "A dictionary maps keys to values. Keys must be",
    "Return a new list containing",
    "This module provides functions for",
    "Exceptions are raised when",
    "The with statement is used to wrap the execution of a block",
    "The quick brown fox",
    "In computer science, a hash table is",
    "Robert Boulter is an English film, television and theatre actor.",
    "The history of the city begins in",
    "If the argument is omitted, the function returns",
    "Strings are immutable sequences of Unicode code points.",
    "Raise ValueError if",
]


def prompt_set() -> list[tuple[str, str]]:
    """The fixed 40 (kind, prompt text) pairs; chat requests rendered in the card's chat format."""
    return ([("chat", format_chat(r)) for r in CHAT_REQUESTS] + [("code", p) for p in CODE_PREFIXES]
            + [("prose", p) for p in PROSE_PREFIXES])


# ------------------------------------------------------------------------------- measures

@dataclass
class FreeRunning:
    tokens: int             # fp32 tokens over all prompts
    prefix_tokens: int      # sum over prompts of the common-prefix length
    identical: int          # prompts whose int8 completion equals the fp32 one token for token
    prompts: int
    first_divergence: list[int | None]  # per prompt: index of the first differing token

    @property
    def prefix_share(self) -> float:
        return self.prefix_tokens / max(self.tokens, 1)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def free_running(ref: list[list[int]], test: list[list[int]]) -> FreeRunning:
    """Exact-prefix agreement of two models' greedy completions (everything after a divergence counts as disagreeing)."""
    if len(ref) != len(test):
        raise ValueError(f"{len(ref)} reference completions but {len(test)} test completions")
    firsts: list[int | None] = []
    prefix = total = identical = 0
    for a, b in zip(ref, test):
        k = common_prefix(a, b)
        prefix += k
        total += len(a)
        same = k == len(a) == len(b)
        identical += same
        firsts.append(None if same else k)
    return FreeRunning(total, prefix, identical, len(ref), firsts)


@dataclass
class TeacherForced:
    positions: int
    agree: int               # int8 argmax == fp32 argmax, same context
    self_consistent: int     # fp32 forward argmax == the token fp32 generated (decode kernel vs forward)
    mean_kl: float           # mean KL(fp32 || int8) per position, nats
    disagree_margins: list[float]  # fp32 top-1 minus top-2 logit at each disagreement

    @property
    def agreement(self) -> float:
        return self.agree / max(self.positions, 1)


def decoded_logits(model: torch.nn.Module, kernel: kernels.DecodeKernel, inputs: list[list[int]],
                   starts: list[int], pad_id: int) -> torch.Tensor:
    """Logits (B, width, V) of `model` on the right-padded `inputs`, from position starts[b] of
    row b on computed by one-token decode steps through `kernel` (what generation runs), the
    positions before prefilled by the forward; logits before starts[b] are left zero."""
    width = max(len(x) for x in inputs)
    cfg = model.config
    out = torch.zeros(len(inputs), width, cfg.vocab_size)
    cache = KVCache(cfg, len(inputs), width, kernel.cache_dtype)  # what an Engine runs it with
    for r, (x, s) in enumerate(zip(inputs, starts)):
        if s > 0:
            model(torch.tensor([x[:s]]), cache=cache.rows(r, r + 1))
    rows = [x + [pad_id] * (width - len(x)) for x in inputs]
    for t in range(width - min(starts)):
        at = [min(s + t, width - 1) for s in starts]  # a finished row repeats its last position
        logits = model(torch.tensor([[x[i]] for x, i in zip(rows, at)]), cache=cache, starts=at,
                       decode_kernel=kernel)
        for r, i in enumerate(at):
            if i == starts[r] + t:
                out[r, i] = logits[r, 0].float()
    return out


@torch.inference_mode()
def teacher_forced(ref_model: torch.nn.Module, test_model: torch.nn.Module, prompts: list[list[int]],
                   continuations: list[list[int]], pad_id: int, batch_size: int = 8,
                   decode_kernel: kernels.DecodeKernel | None = None) -> TeacherForced:
    """Top-1 agreement of two models on the same token sequences (prompt + the reference's continuation).

    Sequences are right-padded (causal attention keeps the padding out of every real position);
    position t of a row predicts token t+1, so the continuation's n tokens are predicted by the n
    positions ending at the last real input token. With `decode_kernel`, the test model's logits
    at those positions come from decode steps through it (`decoded_logits`).
    """
    positions = agree = consistent = 0
    kl_sum = 0.0
    margins: list[float] = []
    rows = [(p, c) for p, c in zip(prompts, continuations) if c]
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        inputs = [(p + c)[:-1] for p, c in batch]
        width = max(len(x) for x in inputs)
        tokens = torch.tensor([x + [pad_id] * (width - len(x)) for x in inputs], dtype=torch.long)
        ref_logits = ref_model(tokens).float()
        if decode_kernel is None:
            test_logits = test_model(tokens).float()
        else:
            test_logits = decoded_logits(test_model, decode_kernel, inputs, [len(p) - 1 for p, _ in batch], pad_id)
        for r, (p, c) in enumerate(batch):
            span = slice(len(p) - 1, len(p) - 1 + len(c))
            lr, lt = ref_logits[r, span], test_logits[r, span]
            ar, at = lr.argmax(-1), lt.argmax(-1)
            positions += len(c)
            agree += int((ar == at).sum())
            consistent += int((ar == torch.tensor(c)).sum())
            logp_r, logp_t = lr.log_softmax(-1), lt.log_softmax(-1)
            kl_sum += float((logp_r.exp() * (logp_r - logp_t)).sum(-1).double().sum())
            top2 = lr.topk(2, dim=-1).values
            margins += (top2[:, 0] - top2[:, 1])[ar != at].tolist()
    return TeacherForced(positions, agree, consistent, kl_sum / max(positions, 1), margins)


# ------------------------------------------------------------------------------- checkpoint files

def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def model_folder(arg: str) -> Path:
    """The checkpoint folder: `arg` itself, its `final/` (a `smallcoder train` run folder), or a Hub id."""
    folder = resolve(arg)
    if not folder.is_dir():
        raise SmallCoderError(f"--model {arg}: is a file; give the checkpoint folder that holds config.json")
    if not (folder / "config.json").exists() and (folder / "final" / "config.json").exists():
        folder = folder / "final"
    if not (folder / "config.json").exists():
        raise SmallCoderError(f"--model {arg}: no config.json in {folder} (give a checkpoint folder or a "
                              "`smallcoder train` output folder that holds final/)")
    if "quantization_config" in json.loads((folder / "config.json").read_text(encoding="utf-8")):
        raise SmallCoderError(f"--model {folder}: config.json field quantization_config marks an already "
                              "quantized checkpoint; give the float checkpoint it was made from")
    return folder


def quantize_with_cli(src: Path, dst: Path) -> str:
    """Run the `smallcoder quantize` command (its CLI entry point, in this process); returns its output."""
    from smallcoder.cli import main as smallcoder_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = smallcoder_main(["quantize", "--model", str(src), "--out", str(dst)])
    if rc != 0:
        raise SmallCoderError(f"smallcoder quantize --model {src} failed (exit {rc}): "
                              f"{(err.getvalue() or out.getvalue()).strip()[-500:]}")
    return out.getvalue().strip()


@torch.inference_mode()
def saved_matches_on_load(on_load: torch.nn.Module, saved: torch.nn.Module, prompts: list[list[int]],
                          pad_id: int) -> tuple[bool, float, bool]:
    """(logits bit-identical, max |difference|, state dicts identical) for quantize-on-load vs the saved copy."""
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([p + [pad_id] * (width - len(p)) for p in prompts], dtype=torch.long)
    a, b = on_load(tokens), saved(tokens)
    sa, sb = on_load.state_dict(), saved.state_dict()
    same_sd = sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    return torch.equal(a, b), float((a - b).abs().max()), same_sd


# ------------------------------------------------------------------------------- main

def generate_ids(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    return [c.token_ids for c in engine.generate(prompts, params)]


def _wikitext(engine: Engine, text: str, limit: int | None, batch_size: int) -> dict[str, Any]:
    from smallcoder.eval.lm_tasks import run_wikitext2

    r = run_wikitext2(engine, text, limit=limit, batch_size=batch_size)
    return {"word_perplexity": r.metrics["word_perplexity"].value,
            "byte_perplexity": r.metrics["byte_perplexity"].value,
            "loglikelihood": r.settings["loglikelihood"], "documents": r.settings["documents"],
            "documents_total": r.settings["documents_total"], "tokens": r.settings["tokens"],
            "words": r.settings["words"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, as a JSON-ready dict with a `passed` verdict per target."""
    from smallcoder.eval.data import load_task_data

    if args.threads is not None:
        if args.threads < 1:
            raise SmallCoderError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.new_tokens < 1:
        raise SmallCoderError(f"--new-tokens must be >= 1, got {args.new_tokens}")
    if not 0 <= args.num_prompts <= len(prompt_set()):
        raise SmallCoderError(f"--num-prompts must be 0 (all) to {len(prompt_set())}, got {args.num_prompts}")
    if args.wikitext_limit < 0:
        raise SmallCoderError(f"--wikitext-limit must be >= 0 (0 = every article), got {args.wikitext_limit}")
    folder = model_folder(args.model)
    wikitext = None if args.skip_wikitext else load_task_data("wikitext2", args.data_dir)
    t0 = time.perf_counter()
    fp32, tok = load(folder, dtype="float32")
    int8, _ = load(folder, dtype="int8")
    prompts = prompt_set()[:args.num_prompts] if args.num_prompts else prompt_set()
    ids = [tok.encode(text) for _, text in prompts]
    too_long = [i for i, p in enumerate(ids) if len(p) + args.new_tokens > fp32.config.max_position_embeddings]
    if too_long:
        raise SmallCoderError(f"{folder}: context of {fp32.config.max_position_embeddings} tokens is too short for "
                              f"prompt {too_long[0]} ({len(ids[too_long[0]])} tokens) + {args.new_tokens} new tokens")
    pad = tok.eos_id

    t = time.perf_counter()
    out_fp32 = generate_ids(Engine(fp32, tok), ids, args.new_tokens)
    out_int8 = generate_ids(Engine(int8, tok), ids, args.new_tokens)
    fr = free_running(out_fp32, out_int8)
    tf = teacher_forced(fp32, int8, ids, out_fp32, pad)
    kernel = kernels.build(int8)
    tk = None if kernel is None else teacher_forced(fp32, int8, ids, out_fp32, pad, decode_kernel=kernel)
    t_prompts = time.perf_counter() - t
    kinds = sorted({k for k, _ in prompts})
    per_kind = {}
    for kind in kinds:
        sel = [i for i, (k, _) in enumerate(prompts) if k == kind]
        per_kind[kind] = {
            "teacher_forced": asdict(teacher_forced(fp32, int8, [ids[i] for i in sel], [out_fp32[i] for i in sel], pad)),
            "free_running": asdict(free_running([out_fp32[i] for i in sel], [out_int8[i] for i in sel]))}

    with tempfile.TemporaryDirectory(prefix="int8_quality-") as tmp:
        qdir = Path(tmp) / "int8"
        cli_line = quantize_with_cli(folder, qdir)
        saved, _ = load(qdir, dtype="int8")
        identical, max_diff, same_sd = saved_matches_on_load(int8, saved, ids, pad)
        sizes = {"float_folder": folder_bytes(folder), "int8_folder": folder_bytes(qdir),
                 "float_weights": weight_bytes(folder), "int8_weights": weight_bytes(qdir)}
        del saved

    wt = None
    t = time.perf_counter()
    if wikitext is not None:
        limit = args.wikitext_limit or None
        w32 = _wikitext(Engine(fp32, tok), wikitext, limit, args.batch_size)
        w8 = _wikitext(Engine(int8, tok), wikitext, limit, args.batch_size)
        rise = w8["word_perplexity"] / w32["word_perplexity"] - 1
        wt = {"float32": w32, "int8": w8, "word_ppl_rise": rise, "target": args.max_ppl_rise,
              "passed": rise <= args.max_ppl_rise}
    t_wiki = time.perf_counter() - t

    cfg = fp32.config
    hf_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {
        "model": str(folder),
        "config": {"hidden_size": cfg.hidden_size, "layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
                   "parameters": sum(p.numel() for p in fp32.parameters()),
                   "float_dtype": hf_cfg.get("torch_dtype") or hf_cfg.get("dtype") or "?"},
        "prompts": {"count": len(ids), "kinds": {k: sum(1 for kk, _ in prompts if kk == k) for k in kinds},
                    "new_tokens": args.new_tokens, "decoding": "greedy, stop_at_eos=False"},
        "teacher_forced": {**asdict(tf), "agreement": tf.agreement, "target": args.min_agreement,
                           "passed": tf.agreement >= args.min_agreement, "kl_target": args.max_kl,
                           "kl_passed": args.max_kl is None or tf.mean_kl <= args.max_kl},
        "kernel_decode": None if tk is None else {
            **asdict(tk), "agreement": tk.agreement, "target": args.min_kernel_agreement,
            "passed": tk.agreement >= args.min_kernel_agreement, "kl_target": args.max_kl,
            "kl_passed": args.max_kl is None or tk.mean_kl <= args.max_kl, "int8_path": kernels.int8_path(kernel.lib),
            "kv_cache": str(kernel.cache_dtype).removeprefix("torch.")},
        "free_running": {**asdict(fr), "prefix_share": fr.prefix_share},
        "per_kind": per_kind,
        "wikitext2": wt,
        "checkpoint": {**sizes, "quantize_cli": cli_line, "saved_logits_identical": identical,
                       "saved_max_abs_diff": max_diff, "saved_state_dict_identical": same_sd,
                       "passed": identical and same_sd},
        "seconds": {"prompts": t_prompts, "wikitext2": t_wiki, "total": time.perf_counter() - t0},
        "threads": torch.get_num_threads(),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def report(r: dict[str, Any]) -> str:
    """The human-readable table."""
    tf, fr, ck, wt = r["teacher_forced"], r["free_running"], r["checkpoint"], r["wikitext2"]
    c = r["config"]
    kinds = ", ".join(f"{n} {k}" for k, n in r["prompts"]["kinds"].items())
    lines = [(f"model: {r['model']} ({c['parameters']:,} parameters, {c['hidden_size']} hidden x {c['layers']} "
              f"layers, vocab {c['vocab_size']:,}, stored {c['float_dtype']}); int8 = per-output-row symmetric, "
              "quantized on load"),
             (f"prompts: {r['prompts']['count']} ({kinds}), {r['prompts']['decoding']}, "
              f"{r['prompts']['new_tokens']} new tokens; {r['threads']} threads"), ""]
    rows = [("measure", "value", "target", "verdict")]
    rows.append(("teacher-forced top-1 agreement (gated)", f"{tf['agreement']:.2%} ({tf['agree']}/{tf['positions']})",
                 f">= {tf['target']:.0%}", "PASS" if tf["passed"] else "FAIL"))
    if tf["kl_target"] is None:
        rows.append(("  mean KL(fp32 || int8) per token", f"{tf['mean_kl']:.2e} nats", "-", "-"))
    else:
        rows.append(("mean KL(fp32 || int8) per token (gated: --max-kl)", f"{tf['mean_kl']:.2e} nats",
                     f"<= {tf['kl_target']:.1e}", "PASS" if tf["kl_passed"] else "FAIL"))
    rows.append(("  fp32 forward = fp32 greedy token (noise floor)",
                 f"{tf['self_consistent'] / max(tf['positions'], 1):.2%} ({tf['self_consistent']}/{tf['positions']})",
                 "-", "-"))
    tk = r["kernel_decode"]
    if tk is None:
        rows.append(("C++ kernel decode steps", "the kernel does not build here", "-", "SKIP"))
    else:
        rows.append((f"kernel decode steps ({tk['int8_path']}, {tk['kv_cache']} KV cache): teacher-forced top-1 (gated)",
                     f"{tk['agreement']:.2%} ({tk['agree']}/{tk['positions']})", f">= {tk['target']:.0%}",
                     "PASS" if tk["passed"] else "FAIL"))
        rows.append(("  kernel decode mean KL(fp32 || int8)" + (" (gated: --max-kl)" if tk["kl_target"] else ""),
                     f"{tk['mean_kl']:.2e} nats", "-" if tk["kl_target"] is None else f"<= {tk['kl_target']:.1e}",
                     "-" if tk["kl_target"] is None else "PASS" if tk["kl_passed"] else "FAIL"))
    rows.append(("free-running exact-prefix share", f"{fr['prefix_share']:.2%} ({fr['prefix_tokens']}/{fr['tokens']})",
                 "info", "-"))
    rows.append(("free-running identical completions", f"{fr['identical']}/{fr['prompts']}", "info", "-"))
    for kind, m in r["per_kind"].items():
        k_tf, k_fr = m["teacher_forced"], m["free_running"]
        value = (f"{k_tf['agree'] / max(k_tf['positions'], 1):.2%} / "
                 f"{k_fr['prefix_tokens'] / max(k_fr['tokens'], 1):.2%} / {k_fr['identical']}/{k_fr['prompts']}")
        rows.append((f"  {kind}: teacher-forced / prefix share / identical", value, "-", "-"))
    if wt is not None:
        w32, w8 = wt["float32"], wt["int8"]
        docs = f"{w32['documents']}/{w32['documents_total']} articles, {w32['tokens']:,} tokens, {w32['words']:,} words"
        rows.append((f"wikitext-2 word ppl fp32 ({docs})", f"{w32['word_perplexity']:.4f}", "-", "-"))
        rows.append(("wikitext-2 word ppl int8", f"{w8['word_perplexity']:.4f}", "-", "-"))
        rows.append(("wikitext-2 word ppl rise (gated)", f"{wt['word_ppl_rise']:+.3%}", f"<= {wt['target']:.0%}",
                     "PASS" if wt["passed"] else "FAIL"))
        rows.append(("wikitext-2 byte ppl fp32 -> int8",
                     f"{w32['byte_perplexity']:.5f} -> {w8['byte_perplexity']:.5f}", "-", "-"))
    else:
        rows.append(("wikitext-2 word ppl rise (gated)", "skipped (--skip-wikitext)", "-", "SKIP"))
    rows.append(("weights (*.safetensors) float -> int8",
                 f"{_mb(ck['float_weights'])} -> {_mb(ck['int8_weights'])} ({ck['float_weights'] / ck['int8_weights']:.2f}x)",
                 "-", "-"))
    rows.append(("whole folder float -> int8", f"{_mb(ck['float_folder'])} -> {_mb(ck['int8_folder'])}", "-", "-"))
    logits = "bit-identical" if ck["saved_logits_identical"] else f"max |diff| {ck['saved_max_abs_diff']:.3g}"
    state = "identical" if ck["saved_state_dict_identical"] else "DIFFERS"
    rows.append(("`smallcoder quantize` copy == quantize-on-load", f"logits {logits}, state dict {state}",
                 "identical", "PASS" if ck["passed"] else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    margins = sorted(tf["disagree_margins"])
    if margins:
        lines.append(f"\nteacher-forced disagreements: {len(margins)}; fp32 top-1 minus top-2 logit there: "
                     f"median {margins[len(margins) // 2]:.3f}, max {margins[-1]:.3f}")
    div = [d for d in fr["first_divergence"] if d is not None]
    if div:
        lines.append(f"free-running first divergence (token index, {len(div)} prompts): {sorted(div)}")
    s = r["seconds"]
    lines.append(f"time: prompts {s['prompts']:.1f} s, wikitext-2 {s['wikitext2']:.1f} s, total {s['total']:.1f} s")
    lines.append("the >= 95% agreement target applies to teacher-forced top-1 agreement; free-running figures "
                 "are reported, not gated")
    verdict = "PASS" if r["passed"] else "FAIL: " + ", ".join(r["failed"])
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="float checkpoint folder (e.g. runs/tiny/final from `smallcoder train`), a train "
                         "output folder holding final/, or a Hub repo id")
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA),
                    help="benchmark data folder with wikitext-2/wiki.test.raw (default: %(default)s); "
                         "absent: the Hub (Salesforce/wikitext)")
    ap.add_argument("--wikitext-limit", type=int, default=WIKITEXT_LIMIT,
                    help="score the first N Wikitext-2 test articles (0 = all 62; default %(default)s)")
    ap.add_argument("--skip-wikitext", action="store_true", help="skip perplexity (its target then is not checked)")
    ap.add_argument("--num-prompts", type=int, default=0, help="use only the first N of the 40 prompts (0 = all)")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="greedy tokens per prompt (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="Wikitext-2 scoring batch (default %(default)s)")
    ap.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                    help="teacher-forced top-1 agreement target (default %(default)s)")
    ap.add_argument("--min-kernel-agreement", type=float, default=MIN_KERNEL_AGREEMENT,
                    help="the same target for the C++ kernel's decode steps (default %(default)s)")
    ap.add_argument("--max-ppl-rise", type=float, default=MAX_PPL_RISE,
                    help="allowed relative rise of word perplexity (default %(default)s)")
    ap.add_argument("--max-kl", type=float, default=None,
                    help="also gate on mean KL(fp32 || int8) per token, in nats (default: reported, not gated)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write every figure to this JSON file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        r = run(args)
    except SmallCoderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tk = r["kernel_decode"] or {"passed": True, "kl_passed": True}
    failed = [name for name, ok in (("teacher-forced agreement", r["teacher_forced"]["passed"]),
                                    ("mean KL", r["teacher_forced"]["kl_passed"] and tk["kl_passed"]),
                                    ("kernel decode agreement", tk["passed"]),
                                    ("wikitext-2 perplexity rise", r["wikitext2"] is None or r["wikitext2"]["passed"]),
                                    ("saved int8 copy", r["checkpoint"]["passed"])) if not ok]
    r["passed"], r["failed"] = not failed, failed
    print(report(r))
    if args.json:
        from smallcoder.fsutil import atomic_write_text

        atomic_write_text(args.json, json.dumps(r, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

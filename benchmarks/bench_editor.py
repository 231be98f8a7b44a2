"""Editor latency: one-keystroke edits replayed against `smallcoder serve` as llama.vscode sends them.

    python benchmarks/bench_editor.py [--orders psm,spm] [--rounds 2] [--threads 2] [--prefill-chunk 16]

The 303M config with random weights (`smallcoder init`, then `smallcoder quantize`) and the StarCoder
tokenizer of ../shared/data, served in int8 on --threads threads, once per FIM order (`--fim-order`),
the orders alternated --rounds times in one run. The file: ~1,000 tokens of Python; the cursor at
a new line in a function's body two thirds in; the typist types `TYPED` there, one character per
keystroke.

Each keystroke sends llama.vscode's `/infill` request (src/llama-server.ts `createRequestPayload`,
src/completion.ts): the lines before as `input_prefix`, the line up to the cursor as `prompt`, the
rest of the line and the lines after as `input_suffix`, `id_slot: 0` (so each request replaces the
one before: `serve/clients.py`), `n_indent`, `t_max_predict_ms`, its samplers; but `n_predict: 16`
(a single line), `n_cmpl: 1` and `stream: true` (llama.vscode sends 128, 3 and false) so that the
client can time the first token. Two modes, both per order: `typing`, keystrokes --interval ms
apart with a --pause ms pause after each word (a space, `(`, `.`, `,` or a newline), each request
replacing the one before, so only the request at a word's end may finish; and `paced`, each
keystroke sent once the previous completion is done (as llama.vscode waits for it), so every
keystroke's latency is measured, none cut short.

With `--editors continue` the same keystrokes go out as Continue sends them: its StarCoder template
filled in (everything before the cursor as the prefix) to `/completion`, temperature 0.01 and its
stop words (core/llm/llms/LlamaCpp.ts, core/autocomplete/templating/); typing, only after a word
(Continue waits 350 ms after a keystroke), each aborting the one before (it closes the connection).

Measured on the client, per order: time to the first streamed token (TTFT) of every request that got
one, and time to a finished single-line completion (its first newline, or its end: 16 tokens or
EOS) of every request that finished before the next keystroke replaced it; p50 and p99; and the
prompt tokens each request found in the cache (`tokens_cached`) and recomputed (`timings.prompt_n`).
Before the keystrokes, unmeasured: llama.vscode's warm-up request and one request at the start (the
cold prefill of the file). Prints one table; exits 1 if a request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TYPED = "total = sum(item.price * item.count for item in items)\nreturn round(total, 2)"  # auto-indented
WORD_END = set(" (.,\n")
CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                  "</code>", "/src/", "#- coding: utf-8", "```"]  # its StarCoder template's, getStopTokens.ts'


def make_file(n_functions: int) -> str:
    """A Python file of `n_functions` small functions (about 80 StarCoder tokens each)."""
    out = [("import math\nfrom dataclasses import dataclass\n\n\n@dataclass\nclass Item:\n    name: str\n"
            "    price: float\n    count: int\n\n")]
    for i in range(n_functions):
        out.append(f"\ndef metric_{i}(values: list[float], scale: float = {i + 1}.0) -> float:\n"
                   f"    \"\"\"Scaled root mean square of the values, variant {i}.\"\"\"\n"
                   f"    squares = [v * v * scale for v in values if v > {i}]\n"
                   f"    return math.sqrt(sum(squares) / max(len(squares), 1))\n\n")
    return "".join(out)


@dataclass
class Editor:
    """The document and the cursor, turned into llama.vscode's request pieces."""

    before: list[str]  # whole lines above the cursor's line
    line: str  # the cursor's line up to the cursor
    after: list[str]  # the lines below

    def type(self, ch: str) -> None:
        if ch == "\n":
            indent = len(self.line) - len(self.line.lstrip())
            self.before.append(self.line)
            self.line = " " * indent  # the editor keeps the indentation
        else:
            self.line += ch

    def continue_request(self, n_predict: int) -> dict:
        """Continue's autocomplete through its llama.cpp provider (core/llm/llms/LlamaCpp.ts): the
        StarCoder template filled in, everything before the cursor as the prefix (without the
        prompt-size pruning Continue applies to larger files)."""
        prefix = "\n".join(self.before) + "\n" + self.line
        suffix = "\n" + "\n".join(self.after) + "\n"
        return {"prompt": f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>", "stream": True,
                "n_predict": n_predict, "stop": CONTINUE_STOPS, "temperature": 0.01}

    def request(self, n_predict: int) -> dict:
        prompt = "" if not self.line.strip(" \t") else self.line  # src/completion.ts: blank line -> ""
        return {"id_slot": 0, "input_prefix": "\n".join(self.before[-256:]) + "\n",
                "input_suffix": "\n" + "\n".join(self.after[:64]) + "\n", "input_extra": [], "prompt": prompt,
                "n_predict": n_predict, "n_cmpl": 1, "top_k": 40, "top_p": 0.99, "stream": True,
                "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True,
                "n_indent": len(self.line) - len(self.line.lstrip()), "t_max_prompt_ms": 500,
                "t_max_predict_ms": 2500}


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    line: list[float] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    recomputed: list[int] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)
    replaced: int = 0
    late: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one(client: httpx.AsyncClient, url: str, body: dict, res: Result | None, path: str = "/infill") -> None:
    """One streamed request; records TTFT, the single-line time and the final object's counts."""
    t0 = time.perf_counter()
    first = line_done = None
    text = ""
    final = None
    try:
        async with client.stream("POST", f"{url}{path}", json=body) as r:
            if r.status_code != 200:
                if res is not None:
                    res.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for raw in r.aiter_lines():
                if not raw.startswith("data: "):
                    continue
                event = json.loads(raw[6:])
                if "error" in event:
                    if res is not None:
                        res.errors.append(str(event["error"]))
                    return
                now = time.perf_counter() - t0
                if event["stop"]:
                    final = event
                    line_done = line_done if line_done is not None else now
                    break
                if event["content"] and first is None:
                    first = now
                text += event["content"]
                if "\n" in text.lstrip("\n") and line_done is None:
                    line_done = now
    except httpx.HTTPError as e:
        if res is not None:
            res.errors.append(f"{type(e).__name__}: {e}")
        return
    if res is None or final is None:
        return
    res.requests += 1
    if first is not None:
        res.ttft.append(first)
    if final.get("superseded"):
        res.replaced += 1
    elif final["tokens_predicted"] == 0 and final["stop_type"] == "limit":
        res.late += 1
    else:
        res.line.append(line_done)
    res.cached.append(final["tokens_cached"])
    res.recomputed.append(final["timings"]["prompt_n"])
    res.evaluated.append(final["tokens_evaluated"])


async def replay(url: str, args: argparse.Namespace, tok, paced: bool, editor_name: str) -> Result:
    lines = make_file(args.functions).split("\n")
    at = int(len(lines) * 0.66)
    while not lines[at].startswith("    squares"):  # a new line in a function's body, two thirds in
        at += 1
    editor = Editor(lines[:at + 1], "    ", lines[at + 1:])
    res = Result()
    vscode = editor_name == "llama.vscode"
    path = "/infill" if vscode else "/completion"

    def body() -> dict:
        if vscode:
            return {**editor.request(args.n_predict), "t_max_prompt_ms": args.t_max_prompt_ms}
        return editor.continue_request(args.n_predict)

    timeout = httpx.Timeout(120, connect=10)
    async with httpx.AsyncClient(timeout=timeout, headers={"User-Agent": "axios/1.7.9"}) as client:
        if vscode:
            warm = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": [], "prompt": "",
                    "n_predict": 0, "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500,
                    "t_max_predict_ms": 1}
            await client.post(f"{url}/infill", json=warm)
        t0 = time.perf_counter()
        await one(client, url, {**body(), "t_max_prompt_ms": 0}, None, path)  # the file's cold prefill, unmeasured
        print(f"  cold request: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        res.file_tokens = len(tok.encode(body()["prompt"] if not vscode else  # type: ignore[attr-defined]
                                         body()["input_prefix"] + body()["input_suffix"]))
        tasks: list[asyncio.Task] = []
        for ch in TYPED:
            editor.type(ch)
            if paced:  # the next keystroke once this completion is done (llama.vscode waits for it)
                await one(client, url, body(), res, path)
                continue
            gap = (args.pause if ch in WORD_END else args.interval) / 1000
            if not vscode and gap < 0.35:  # Continue waits 350 ms after a keystroke (core/util/parameters.ts)
                await asyncio.sleep(gap)
                continue
            if not vscode and tasks:  # Continue aborts its stale request: the server sees the connection close
                tasks[-1].cancel()
            tasks.append(asyncio.create_task(one(client, url, body(), res, path)))
            await asyncio.sleep(gap)
        await asyncio.gather(*tasks, return_exceptions=True)
    return res


def start_server(model: Path, order: str, args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str]:
    log = work / f"server-{order}.log"
    cmd = [sys.executable, "-m", "smallcoder", "serve", "--model", str(model), "--dtype", "int8", "--host", "127.0.0.1",
           "--port", "0", "--threads", str(args.threads), "--fim-order", order, "--prefill-chunk",
           str(args.prefill_chunk), "--log-level", "warning", "--model-name", "bench"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if m:
            return proc, m.group(1)
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"bench_editor: the server did not come up:\n{log.read_text()[-3000:]}")


def prepare_model(work: Path, tokenizer: Path) -> Path:
    """The 303M config, random weights, quantized to int8 once (as the README's commands); kept in
    a --work folder for the next run."""
    float_dir, int8_dir = work / "303m", work / "303m-int8"
    if (int8_dir / "config.json").exists():
        return int8_dir
    run = [sys.executable, "-m", "smallcoder"]
    subprocess.run(run + ["init", "--preset", "smallcoder-303m", "--tokenizer", str(tokenizer), "--out",
                          str(float_dir), "--seed", "0"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run(run + ["quantize", "--model", str(float_dir), "--out", str(int8_dir)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return int8_dir


def cpu_line() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((x.split(":", 1)[1].strip() for x in info.splitlines() if x.startswith("model name")),
                 platform.processor())
    flags = next((x.split(":", 1)[1].split() for x in info.splitlines() if x.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "fma", "amx", "f16c"))]
    return f"{model}, {os.cpu_count()} cores; {' '.join(keep)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", default="psm,spm")
    ap.add_argument("--rounds", type=int, default=2, help="times each order is served and replayed, alternated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=16)
    ap.add_argument("--functions", type=int, default=12, help="functions in the file (12: ~1,000 tokens)")
    ap.add_argument("--interval", type=float, default=150.0, help="ms between keystrokes within a word")
    ap.add_argument("--pause", type=float, default=700.0, help="ms after each word")
    ap.add_argument("--n-predict", type=int, default=16)
    ap.add_argument("--t-max-prompt-ms", type=float, default=0.0,
                    help="sent with each keystroke (llama.vscode sends 500; 0 = off, so every TTFT is measured)")
    ap.add_argument("--modes", default="typing,paced", help="typing: a request every keystroke, each replacing "
                    "the one before; paced: each keystroke once the previous completion is done")
    ap.add_argument("--editors", default="llama.vscode,continue", help="whose requests: llama.vscode's /infill, "
                    "Continue's /completion with the StarCoder template")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: ../shared/data's StarCoder)")
    ap.add_argument("--work", default=None, help="folder for the model and logs, kept (default: a temporary one)")
    args = ap.parse_args()
    from smallcoder import Tokenizer

    tok_dir = Path(args.tokenizer) if args.tokenizer else Path(
        os.environ.get("SMALLCODER_DATA", REPO.parent / "shared" / "data")) / "tokenizers" / "starcoder"
    tok = Tokenizer.load(tok_dir)
    print(f"machine: {cpu_line()}; load before: {os.getloadavg()[0]:.2f}", flush=True)
    runs_of = [(o, e, m) for o in args.orders.split(",") for e in args.editors.split(",") for m in args.modes.split(",")]
    results: dict[tuple[str, str, str], list[Result]] = {k: [] for k in runs_of}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = prepare_model(work, tok_dir)
        for _ in range(args.rounds):
            for order in args.orders.split(","):
                t0 = time.perf_counter()
                proc, url = start_server(model, order, args, work)
                print(f"{order}: server up in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
                try:
                    for _, editor, mode in [k for k in runs_of if k[0] == order]:
                        r = asyncio.run(replay(url, args, tok, mode == "paced", editor))
                        results[order, editor, mode].append(r)
                        print(f"{order} {editor} {mode}: {r.requests} requests, TTFT p50 "
                              f"{percentile(r.ttft, .5) * 1000:.0f} ms, single line p50 "
                              f"{percentile(r.line, .5) * 1000:.0f} ms, load {os.getloadavg()[0]:.2f}",
                              file=sys.stderr, flush=True)
                finally:
                    proc.terminate()
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    failed = False
    print(f"\n303M int8, {args.threads} threads, prefill chunk {args.prefill_chunk}, {len(TYPED)} keystrokes "
          f"({args.interval:g} ms apart, {args.pause:g} ms after a word), n_predict {args.n_predict}; "
          f"load after: {os.getloadavg()[0]:.2f}")
    print("| order | editor | keystrokes | file tokens | TTFT p50 | TTFT p99 | single line p50 | single line p99 | "
          "cached / prompt tokens (median) | recomputed (median) | requests | replaced | late |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (order, editor, mode), rs in results.items():
        ttft = [x for r in rs for x in r.ttft]
        line = [x for r in rs for x in r.line]
        cached = [x for r in rs for x in r.cached]
        evaluated = [x for r in rs for x in r.evaluated]
        recomputed = [x for r in rs for x in r.recomputed]
        errors = [e for r in rs for e in r.errors]
        failed |= bool(errors)
        print(f"| {order} | {editor} | {mode} | {rs[0].file_tokens} | {percentile(ttft, .5) * 1000:.0f} ms | "  # type: ignore
              f"{percentile(ttft, .99) * 1000:.0f} ms | {percentile(line, .5) * 1000:.0f} ms | "
              f"{percentile(line, .99) * 1000:.0f} ms | {statistics.median(cached):.0f} / "
              f"{statistics.median(evaluated):.0f} | {statistics.median(recomputed):.0f} | "
              f"{sum(r.requests for r in rs)} | {sum(r.replaced for r in rs)} | {sum(r.late for r in rs)} |")
        for e in errors[:5]:
            print(f"  error ({order}): {e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

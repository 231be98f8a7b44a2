"""Load test of `smallcoder serve`: N concurrent streaming clients on loopback against 1 client.

    python benchmarks/bench_serve.py [--model CKPT | --preset tiny] [--clients 32] [--duration 60]

Starts the server in a child process (`python -m smallcoder serve`) on a free 127.0.0.1 port, unless --url names one already running on this machine.
Without --model it serves a freshly initialised --preset model with the StarCoder tokenizer of
../shared/data. Phase 1: one client streams completions back to back for --single-duration
seconds. Phase 2: --clients clients do the same at once for --duration seconds. Every client
stops starting requests at the deadline, and each request is bounded by --max-tokens, so the run
ends by itself. Reports requests, errors, time to first token (p50/p99) and total generated
tok/s per phase, and the peak batch seen on /health. Exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import json\n\n\ndef load_config(path):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "# Merge two sorted lists into one sorted list\ndef merge(a, b):\n",
    "def is_prime(n: int) -> bool:\n",
    "for (int i = 0; i < n; i++) {\n",
    "SELECT name, COUNT(*) FROM users\n",
    "<fim_prefix>def add(a, b):\n    <fim_suffix>\n    return result\n<fim_middle>",
]


@dataclass
class Phase:
    clients: int
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    peak_active: int = 0
    peak_queued: int = 0


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, url: str, body: dict, phase: Phase) -> None:
    """One streamed completion: time to the first text, tokens from the usage chunk, errors kept."""
    t0 = time.perf_counter()
    first: float | None = None
    usage = None
    done = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                phase.errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    phase.errors.append(f"error event: {event['error']}")
                    return
                if event.get("usage"):
                    usage = event["usage"]
                if first is None and any(c.get("text") for c in event.get("choices", [])):
                    first = time.perf_counter() - t0
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        phase.errors.append(f"{type(e).__name__}: {e}")
        return
    if not done or usage is None:
        phase.errors.append(f"stream ended without {'[DONE]' if not done else 'a usage chunk'}")
        return
    phase.requests += 1
    phase.tokens += usage["completion_tokens"]
    if first is not None:
        phase.ttft.append(first)


async def run_phase(url: str, clients: int, seconds: float, args: argparse.Namespace, headers: dict) -> Phase:
    phase = Phase(clients)
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        async def worker(w: int) -> None:
            rng = random.Random(w)
            while time.perf_counter() < deadline:
                body = {"model": "bench", "prompt": rng.choice(PROMPTS), "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "seed": rng.randrange(2**31), "stream": True,
                        "stream_options": {"include_usage": True}, "ignore_eos": not args.eos,
                        "stop": ["\n\n\n"] if args.eos else None}
                await one_request(client, url, body, phase)

        async def watch() -> None:  # the peak batch the server reports while the phase runs
            while time.perf_counter() < deadline:
                try:
                    h = (await client.get(f"{url}/health")).json()
                    phase.peak_active = max(phase.peak_active, h["active"])
                    phase.peak_queued = max(phase.peak_queued, h["queued"])
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                await asyncio.sleep(0.5)

        t0 = time.perf_counter()
        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(worker(w) for w in range(clients)))
        phase.seconds = time.perf_counter() - t0
        watcher.cancel()
    return phase


def start_server(args: argparse.Namespace, work: Path) -> tuple[subprocess.Popen, str]:
    """Launch the server on a free loopback port; return it and its base URL once /health answers."""
    model = args.model
    if model is None:
        from smallcoder import Tokenizer, new_model, preset, save

        tok_dir = Path(args.tokenizer) if args.tokenizer else Path(
            os.environ.get("SMALLCODER_DATA", REPO.parent / "shared" / "data")) / "tokenizers" / "starcoder"
        if not (tok_dir / "tokenizer.json").exists():
            sys.exit(f"bench_serve: no tokenizer at {tok_dir}; pass --tokenizer or --model")
        tok = Tokenizer.load(tok_dir)
        config = preset(args.preset).replace(vocab_size=tok.vocab_size, bos_token_id=tok.eos_id,
                                             eos_token_id=tok.eos_id)
        model = str(work / args.preset)
        save(new_model(config, seed=0), tok, model)
    cmd = [sys.executable, "-m", "smallcoder", "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
           "--max-batch", str(args.max_batch), "--dtype", args.dtype, "--model-name", "bench",
           "--log-level", "warning"] + (["--threads", str(args.threads)] if args.threads else [])
    with open(work / "server.log", "w") as log:  # the child keeps its own handle
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 300
    url = None
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", (work / "server.log").read_text())
        if m:
            url = m.group(1)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"bench_serve: the server did not come up:\n{(work / 'server.log').read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a fresh --preset model)")
    ap.add_argument("--preset", default="tiny", help="config of the fresh model when --model is not given")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: ../shared/data's StarCoder)")
    ap.add_argument("--url", default=None, help="a server already running on this machine (loopback only)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the concurrent phase")
    ap.add_argument("--single-duration", type=float, default=None, help="seconds of the 1-client phase "
                    "(default: min(duration, 15))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--eos", action="store_true", help="let completions stop at EOS (default: fixed length)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: its own)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    args = ap.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("bench_serve: --url must be a loopback address (127.0.0.1, localhost or [::1])")
    single = args.single_duration if args.single_duration is not None else min(args.duration, 15.0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.url:
                url = args.url.rstrip("/").removesuffix("/v1")
            else:
                proc, url = start_server(args, Path(tmp))
            asyncio.run(run_phase(url, 1, min(2.0, single), args, headers))  # warm-up, not reported
            phases = [asyncio.run(run_phase(url, 1, single, args, headers)),
                      asyncio.run(run_phase(url, args.clients, args.duration, args, headers))]
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    print(f"\nserver: {args.model or 'fresh ' + args.preset}, {args.dtype}, max batch {args.max_batch}, "
          f"threads {args.threads or 'default'}; "
          f"{args.max_tokens} tokens per request{' (or to EOS)' if args.eos else ''}, streamed")
    print(f"{'clients':>7} {'seconds':>7} {'requests':>8} {'errors':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'tok/s':>8} {'peak batch':>10}")
    for p in phases:
        print(f"{p.clients:>7} {p.seconds:>7.1f} {p.requests:>8} {len(p.errors):>6} "
              f"{percentile(p.ttft, 0.5) * 1000:>7.0f}ms {percentile(p.ttft, 0.99) * 1000:>7.0f}ms "
              f"{p.tokens / p.seconds:>8.1f} {p.peak_active:>4} (+{p.peak_queued} queued)")
    one, many = phases
    if one.tokens and many.tokens:
        print(f"total tok/s with {many.clients} clients / 1 client: "
              f"{(many.tokens / many.seconds) / (one.tokens / one.seconds):.2f}x")
    errors = one.errors + many.errors
    for e in sorted(set(errors))[:10]:
        print(f"error ({errors.count(e)}x): {e}")
    if errors or not many.requests:
        sys.exit(1)


if __name__ == "__main__":
    main()

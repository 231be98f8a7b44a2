"""`smallcoder serve`: its flags and start-up (no pydantic, FastAPI or torch until it runs)."""

from __future__ import annotations

import argparse
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..checks import integer, require_extra
from ..errors import SmallCoderError
from ..prompts import FIM_ORDERS
from .limits import ServeLimits

if TYPE_CHECKING:
    import socket

log = logging.getLogger("smallcoder.serve")

PREFILL_CHUNK = 16  # an editor's keystroke recomputes ~8 tokens on average (measured: benchmarks/RESULTS.md)


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a SmallCoderError naming both (port 0 = any free port)."""
    import socket

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise SmallCoderError(f"--port must be in [0, 65535] (0 = any free port), got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SmallCoderError(f"--host {host!r}: cannot resolve it ({e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SmallCoderError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace) -> None:
    from ..cli import check_threads

    require_extra("serve", ("fastapi", "uvicorn", "pydantic"), "smallcoder serve")
    integer(args.max_batch, "--max-batch")
    integer(args.prefill_chunk, "--prefill-chunk")
    check_threads(args.threads)  # before the model loads (they are set once torch is imported, below)
    limits = ServeLimits(max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens,
                         max_queue=args.max_queue, header_timeout=args.header_timeout,
                         body_timeout=args.body_timeout, max_connections=args.max_connections,
                         max_connections_per_client=args.max_connections_per_client)
    sock = bind_socket(args.host, args.port)  # fail fast, before the model loads
    try:
        app, engine = _load(args, limits)
    except BaseException:
        sock.close()
        raise
    import uvicorn

    from .app import uvicorn_config

    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    key = " (API key required)" if app.state.server.api_key else ""
    kv = str(engine.kv_dtype).removeprefix("torch.")
    spec = f", speculative {args.speculative}" if engine.speculative is not None else ""
    print(f"serving {args.model_name or args.model} ({args.dtype}, KV cache {kv}{spec}, max batch {args.max_batch}, context "
          f"{engine.context_length}) at http://{shown}:{port}/v1{key}", flush=True)
    config = uvicorn_config(app, limits, log_level=args.log_level, timeout_graceful_shutdown=5,
                            access_log=args.log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])


def _load(args: argparse.Namespace, limits: ServeLimits) -> tuple[Any, Any]:
    # OpenMP threads that spin long between ops starve the event loop and the engine's Python work
    # of the cores they share (measured: 2.9 vs 120 tok/s for one client on 2 busy cores), and
    # threads that sleep at once (OMP_WAIT_POLICY=PASSIVE) pay a wake-up at each of a decode step's
    # ~240 barriers (measured: a 303M int8 step 52 ms instead of 36). So they spin briefly, then
    # sleep. Read when torch loads, so only effective if torch is not imported yet.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s")
    api_key = args.api_key or os.environ.get("SMALLCODER_API_KEY") or None
    if not _is_loopback(args.host):
        log.warning("listening on %s, reachable from other machines%s", args.host,
                    "" if api_key else " WITHOUT an API key (set --api-key or SMALLCODER_API_KEY)")
    from ..checkpoint import load
    from ..cli import kv_dtype, set_threads, speculation
    from ..inference import Engine
    from .app import create_app

    set_threads(args.threads)
    spec = speculation(args)
    model, tokenizer = _on_a_passing_thread(lambda: load(args.model, dtype=args.dtype))
    engine = _on_a_passing_thread(lambda: Engine(model, tokenizer, max_batch=args.max_batch,
                                                 prefill_chunk=args.prefill_chunk, kv_dtype=kv_dtype(args.kv_cache),
                                                 speculative=spec))
    return create_app(engine, model_name=args.model_name or args.model, api_key=api_key, limits=limits,
                      fim_order=args.fim_order), engine


def _on_a_passing_thread(work: Callable[[], Any]) -> Any:
    """Run `work` (the model load) on a thread that then exits, taking its OpenMP thread pool with
    it. Loaded on the main thread, the load's pool would stay beside the engine thread's: 4 OpenMP
    threads on 2 cores, so libgomp throttles its spinning and each of a decode step's ~260 barriers
    sleeps (measured, 303M int8, one process: 33-34 ms a step from a second thread after a load on
    the main one, 16-17 ms when the loading thread had exited)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = work()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            box["error"] = e

    thread = threading.Thread(target=run, name="smallcoder-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def register(subparsers: Any) -> None:
    """Add the `serve` command."""
    from ..cli import add_model_args, add_threads_arg

    d = ServeLimits()
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server (completions, chat, FIM infill, streaming)",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, "
                    "llama.cpp's /completion and /infill (editors), /v1/models, /health. Concurrent requests "
                    "share one batch.")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--api-key", default=None,
                   help="require this key (Authorization: Bearer KEY); default: $SMALLCODER_API_KEY, else none")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    p.add_argument("--fim-order", default="spm", choices=FIM_ORDERS,
                   help="the order of the FIM prompts the server builds (the model must be trained with it): "
                        "spm puts the suffix first, so a prefix growing as the user types keeps the cache (default)")
    p.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                   help="prompt tokens per prefill forward, and the granularity of prefix reuse: an edit "
                        "recomputes from the chunk it falls in (up to 16 runs in the C++ kernel; default "
                        f"{PREFILL_CHUNK}, for editors)")
    add_threads_arg(p)
    p.add_argument("--model-name", default=None, help="id reported by /v1/models (default: --model)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt accepted (default: context length - 1)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: context length)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="engine requests (generation or scoring) waiting before new ones get 503")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection may take to send a request's head (then 408)")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout,
                   help="seconds a request may take to send its body (then 408)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections, all clients together (a newcomer first closes the oldest idle one; "
                        "503 when none is idle)")
    p.add_argument("--max-connections-per-client", type=int, default=d.max_connections_per_client,
                   help="open connections from one client address (a newcomer first closes that client's "
                        "oldest idle one; 429 when none is idle)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=cmd_serve)

"""The server's limits on one request and on connections (plain data: no pydantic, no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import SmallCoderError

MAX_JSON_DEPTH = 64  # nesting of arrays/objects in a request body; our schemas need 4

# the limits that `smallcoder serve` sets from a flag (named in errors so the user knows which)
_FLAGS = ("max_prompt_tokens", "max_tokens", "max_queue", "header_timeout", "body_timeout", "max_connections",
          "max_connections_per_client")


@dataclass
class ServeLimits:
    """Bounds on one request, checked before it reaches the engine (None: from the model), and on
    the connections that clients may hold open."""

    max_prompt_tokens: int | None = None  # default: context length - 1
    max_tokens: int | None = None  # largest max_tokens a request may ask for; default: context length
    max_choices: int = 64  # n x number of prompts in one request
    max_queue: int = 256  # engine requests (generation or scoring) waiting before new ones get 503
    max_stop: int = 64  # stop strings per request (editors send 10+)
    max_stop_chars: int = 512
    max_logprobs: int = 20  # top alternatives per token
    max_body_bytes: int = 4 * 1024 * 1024
    header_timeout: float = 20.0  # seconds a connection may take to send a request's head
    body_timeout: float = 60.0  # seconds a request may take to send its body
    max_connections: int = 1024  # open connections, all clients together
    max_connections_per_client: int = 256  # open connections from one client address

    def __post_init__(self) -> None:
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            flag = f" (--{name.replace('_', '-')})" if name in _FLAGS else ""
            if name.endswith("_timeout"):
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                    raise SmallCoderError(f"serve limit {name}{flag} must be a number of seconds > 0, got {value!r}")
                continue
            low = 0 if name == "max_queue" else 1
            if value is not None and (not isinstance(value, int) or value < low):
                raise SmallCoderError(f"serve limit {name}{flag} must be an integer >= {low}, got {value!r}")

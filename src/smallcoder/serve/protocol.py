"""The HTTP API's request schemas and errors: what a client may send, with its bounds.

Pydantic models at module scope, bounds declared on the fields (a value out of bounds, NaN or
infinite gets a 400 naming the field), and `sampling_params` turning a request into the engine's
`SamplingParams`. Limits that the operator configures (`ServeLimits`) are checked by the methods
that take them. Unknown fields are kept in `model_extra` (the server logs them once).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from ..errors import SmallCoderError
from ..inference.sampling import SEED_RANGE, SamplingParams
from ..prompts import chat_stops
from .limits import MAX_JSON_DEPTH, ServeLimits


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` JSON with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


NonNegative = Annotated[StrictInt, Field(ge=0)]
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Base):
    include_usage: StrictBool | None = False


class _Sampling(_Base):
    """The sampling fields every generating endpoint shares."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: StrictInt | None = None  # vLLM / llama.cpp extension; <= 0 is off
    stop: str | list[str] | None = None
    seed: Seed | None = None
    stream: StrictBool | None = False
    ignore_eos: StrictBool | None = False  # vLLM extension

    def stops(self, limits: ServeLimits) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > limits.max_stop:
            raise APIError(400, f"stop has {len(stops)} strings; this server accepts at most {limits.max_stop}",
                           param="stop")
        for s in stops:
            if len(s) > limits.max_stop_chars:
                raise APIError(400, f"a stop string is {len(s)} characters; this server accepts at most "
                                    f"{limits.max_stop_chars}", param="stop")
        return tuple(s for s in stops if s)  # an empty stop string would end every completion at once

    def sampling_params(self, max_tokens: int, limits: ServeLimits, chat: bool = False) -> SamplingParams:
        """The engine's parameters for this request (temperature defaults to 1, as OpenAI's); a
        `chat` answer also stops where the next turn would start (`prompts.chat_stops`)."""
        stops = self.stops(limits)
        try:
            return SamplingParams(max_new_tokens=max_tokens, temperature=1.0 if self.temperature is None
                                  else self.temperature, top_k=max(0, self.top_k or 0),
                                  top_p=1.0 if self.top_p is None else self.top_p, seed=self.seed,
                                  stop=chat_stops(stops) if chat else stops, stop_at_eos=not self.ignore_eos)
        except SmallCoderError as e:
            raise APIError(400, str(e)) from None


class _OpenAI(_Sampling):
    model: str | None = None
    max_tokens: NonNegative | None = None
    max_completion_tokens: NonNegative | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """(the field that set it, the value): `max_tokens` wins over `max_completion_tokens`."""
        if self.max_tokens is not None:
            return "max_tokens", self.max_tokens
        return "max_completion_tokens", self.max_completion_tokens

    def choices(self, prompts: int, limits: ServeLimits) -> int:
        n = self.n or 1
        if n * prompts > limits.max_choices:
            raise APIError(400, f"n ({n}) x prompts ({prompts}) = {n * prompts} choices; this server returns at "
                                f"most {limits.max_choices} per request", param="n")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_OpenAI):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] | None = None
    suffix: str | None = None
    echo: StrictBool | None = False
    logprobs: NonNegative | None = None

    def top_logprobs(self, limits: ServeLimits) -> int | None:
        if self.logprobs is not None and self.logprobs > limits.max_logprobs:
            raise APIError(400, f"logprobs must be in [0, {limits.max_logprobs}], got {self.logprobs}",
                           param="logprobs")
        if self.stream and self.logprobs is not None:
            raise APIError(400, "logprobs are not available when streaming; send stream: false", param="logprobs")
        return self.logprobs


class ContentPart(_Base):
    type: str
    text: str | None = None


class Message(_Base):
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_OpenAI):
    messages: list[Message]
    logprobs: StrictBool | None = False
    top_logprobs: NonNegative | None = None

    def top(self, limits: ServeLimits) -> int:
        top = self.top_logprobs or 0
        if self.logprobs and top > limits.max_logprobs:
            raise APIError(400, f"top_logprobs must be in [0, {limits.max_logprobs}], got {top}",
                           param="top_logprobs")
        if self.stream and self.logprobs:
            raise APIError(400, "logprobs are not available when streaming; send stream: false", param="logprobs")
        return top


class InputExtra(_Base):
    filename: str | None = None  # llama.cpp's default: "tmp"
    text: str = ""


Milliseconds = Annotated[float, Field(allow_inf_nan=False)]  # <= 0: off, as in llama.cpp
MinP = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Positive = Annotated[StrictInt, Field(ge=1)]


class LlamaRequest(_Sampling):
    """llama.cpp's native `/completion` (and what `/infill` shares with it); `native` reads it."""

    model: str | None = None
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] | None = None
    n_predict: StrictInt | None = None  # -1: until the context is full; above --max-tokens: capped
    max_tokens: StrictInt | None = None  # llama.cpp's alias of n_predict
    n_cmpl: Positive | None = None
    n: Positive | None = None  # llama.cpp's alias of n_cmpl
    min_p: MinP | None = None
    n_indent: NonNegative | None = None
    t_max_predict_ms: Milliseconds | None = None
    t_max_prompt_ms: Milliseconds | None = None
    samplers: list[str] | None = None
    id_slot: StrictInt | None = None
    cache_prompt: StrictBool | None = None
    return_tokens: StrictBool | None = None


class InfillRequest(LlamaRequest):
    """llama.cpp's `/infill`: the prompt is built from these pieces (`fim`)."""

    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[InputExtra] | None = None
    prompt: str = ""  # what is typed of the line so far: it follows <fim_middle>


# Fields that clients commonly send with their default meaning; ignored without a log line.
QUIET_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "best_of": (1, None),
    "logit_bias": (None, {}, []), "cache_prompt": (True, False, None), "samplers": (), "n_indent": (),
    "t_max_prompt_ms": (), "t_max_predict_ms": (), "response_fields": (), "penalty_last_n": (0, 64, None),
    "repeat_last_n": (0, 64, None), "repeat_penalty": (1, 1.0, None), "mirostat": (0, None),
    "typical_p": (1, 1.0, None), "n_probs": (0, None), "n_keep": (0, None), "dry_multiplier": (0, 0.0, None),
    "xtc_probability": (0, 0.0, None), "timings_per_token": (False, None),
}

_UNION_FIELDS = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of text parts",
}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _too_deep(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest deeper than `limit` (iterative: any depth is safe to check)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def parse_request(raw: bytes, schema: type[BaseModel]) -> Any:
    """A request body parsed and validated into `schema`, or a 400 that says what is wrong."""
    deep = APIError(400, f"request body nests arrays/objects more than {MAX_JSON_DEPTH} levels deep; "
                         f"this server accepts at most {MAX_JSON_DEPTH}")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise deep from None
    except ValueError as e:  # not JSON, not UTF-8, or a number past Python's 4,300-digit limit
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    if _too_deep(data, MAX_JSON_DEPTH):
        raise deep
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e, data) from None


def _validation_error(e: ValidationError, data: dict[str, Any]) -> APIError:
    """A 400 naming the field, what it must be and the value given, from pydantic's first error."""
    err = e.errors()[0]
    # drop the union-member tags pydantic adds to the location ("prompt.list[int]" -> "prompt")
    loc = [p for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "float", "bool")
                                                           and not p.startswith("constrained-"))]
    where = ".".join(str(p) for p in loc) or "body"
    value: Any = data
    for p in loc:
        value = value[p] if isinstance(value, (dict, list)) and (isinstance(p, int) or p in value) else None
    shown = json.dumps(value, default=str)[:80]
    field = str(loc[-1]) if loc else ""
    kind = err["type"]
    if field in _UNION_FIELDS and kind != "missing":
        message = f"field '{where}' must be {_UNION_FIELDS[field]} (got {shown})"
    elif kind == "missing":
        message = f"field '{where}' is required"
    elif kind in _BOUNDS:
        op, key = _BOUNDS[kind]
        message = f"{where} must be {op} {err['ctx'][key]}, got {shown}"
    elif kind == "finite_number":
        message = f"{where} must be a finite number, got {shown}"
    else:
        message = f"field '{where}': {err['msg']} (got {shown})"
    return APIError(400, message, param=where)

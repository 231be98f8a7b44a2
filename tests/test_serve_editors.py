"""The editors against `smallcoder serve`: the exact HTTP requests (bodies and headers) that Continue,
llama.vscode and Tabby send, taken from their source, and the fields each of them reads back; then
llama.cpp's native endpoints in detail (the FIM order and the cache, a client's newer request
replacing its stale one, t_max_prompt_ms, the cut, bad input).

The servers run in-process as in test_serve.py, on its micro model whose tokenizer has the FIM
tokens (random weights: completions are byte garbage, so tests compare token ids and fields, or
an engine's greedy output on the same ids). They prefill in 8-token chunks, so the 128-token
context holds several chunks to reuse.

Sources, read at these commits:
- Continue (continuedev/continue d0a3c0b626b5bebc3bef4742eec05a0242be0bab): core/llm/llms/LlamaCpp.ts
  (`_streamComplete`: `POST {apiBase}completion`, headers `Content-Type` and `Authorization: Bearer
  ${apiKey}`, which is "Bearer undefined" without a key; body `{prompt, stream: true, n_predict, stop,
  temperature, ...}` with unset options dropped by JSON.stringify; it yields `value.content` of each
  event); core/llm/llms/OpenAI.ts (`_legacystreamComplete`, `_getHeaders`: `POST {apiBase}completions`,
  `Content-Type`, `Authorization` only with a key, `api-key`; it reads `choices[0].text`) with
  core/llm/openaiTypeConverters.ts (`toChatBody`); core/autocomplete/templating/AutocompleteTemplate.ts
  (`stableCodeFimTemplate`, the StarCoder template and the default, with its stop words),
  core/autocomplete/templating/getStopTokens.ts (three more), core/autocomplete/CompletionProvider.ts
  (temperature 0.01), core/llm/index.ts and core/llm/constants.ts (maxTokens 4096 unless configured).
- llama.vscode (ggml-org/llama.vscode 3938fb3568b98e3ddfcf2ce3dd52d9570552b579): src/llama-server.ts
  (`createRequestPayload`: the completion and, with noPredict, the warm-up sent by `updateExtraContext`;
  `defaultRequestParams`), src/configuration.ts (n_predict 128, t_max_prompt_ms 500, t_max_predict_ms
  2500, max_parallel_completions 3, no api key: no headers of its own), src/completion.ts (the prefix
  lines, the line up to the cursor as `prompt`, the rest as suffix, `nindent`), src/extra-context.ts
  (chunks `{text, time, filename}`), src/statusbar.ts and src/types.ts (what it reads: `content`,
  `tokens_cached`, `generation_settings.n_ctx`, `timings.*`); a reply with `n_cmpl` > 1 is a list
  (`getComplFromContent`).
- Tabby (TabbyML/tabby 131d61a40deab2e992e76ebc683935124d07c479):
  crates/http-api-bindings/src/completion/llama.rs (`POST {api_endpoint}/completion`, reqwest's JSON
  body `{seed, prompt, n_predict, temperature, stream, penalty_last_n: 0, presence_penalty}`, bearer
  auth with a key; every event is parsed as `{content: String, stop: bool}` and unwrapped, so an event
  without them panics; non-streamed it reads `content`); the values are its defaults
  (max_decoding_tokens 64, temperature 0.1, presence_penalty 0) and the StarCoder prompt_template.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")

from test_serve import Running, _events, _start, _stop  # the in-process server of test_serve.py

import smallcoder
from smallcoder import Engine, SamplingParams
from smallcoder.prompts import FIM_TOKENS, SNIPPET_SEP, fim_ids

pytestmark = pytest.mark.usefixtures("one_thread")
engine_mod = importlib.import_module("smallcoder.inference.steps")

CONTINUE_STOPS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>", "<|endoftext|>", "</fim_middle>",
                  "</code>", "/src/", "#- coding: utf-8", "```"]
PREFIX = "import math\n\n\ndef area(r):\n    return math.pi * r * r\n\n\ndef perimeter(r):\n    return "
SUFFIX = "\n\n\nprint(area(2), perimeter(2))\n"


def _server(checkpoint, order: str, delay: float = 0.0) -> tuple[Running, Engine]:
    """A server on its own copy of the FIM model (8-token prefill chunks) and a reference engine."""
    model, tok = smallcoder.load(checkpoint)
    if delay:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    running = _start(Engine(model, tok, max_batch=4, prefill_chunk=8), api_key=None, fim_order=order)
    return running, Engine(*smallcoder.load(checkpoint), prefill_chunk=8)


@pytest.fixture(scope="module")
def spm(fim_checkpoint) -> Iterator[tuple[Running, Engine]]:
    running, ref = _server(fim_checkpoint, "spm")
    yield running, ref
    _stop(running)


@pytest.fixture(scope="module")
def psm(fim_checkpoint) -> Iterator[tuple[Running, Engine]]:
    running, ref = _server(fim_checkpoint, "psm")
    yield running, ref
    _stop(running)


@pytest.fixture(scope="module")
def plain(micro_checkpoint) -> Iterator[Running]:
    """A server whose tokenizer has <fim_prefix> only (conftest's): no FIM."""
    running = _start(Engine(*smallcoder.load(micro_checkpoint)), api_key=None)
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def slow(fim_checkpoint) -> Iterator[tuple[Running, Engine]]:
    """Every forward takes >= 15 ms, so a generation lasts long enough to be replaced or timed out."""
    running, ref = _server(fim_checkpoint, "spm", delay=0.015)
    yield running, ref
    _stop(running)


def _raw(running: Running, path: str, body: dict, headers: dict) -> httpx.Response:
    return httpx.post(f"{running.url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def _sse(running: Running, path: str, body: dict, headers: dict | None = None) -> list:
    with httpx.stream("POST", f"{running.url}{path}", content=json.dumps(body), timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        return _events(r)


def _spm_ids(tok, prefix: str, suffix: str, middle: str = "", head: str = "") -> list[int]:
    sentinels = [tok.token_to_id(t) for t in FIM_TOKENS]
    return tok.encode(head) + fim_ids(tok.encode(prefix), tok.encode(suffix), tok.encode(middle), "spm", sentinels)


def _greedy(ref: Engine, ids: list[int], n: int) -> smallcoder.Completion:
    return ref.generate([ids], SamplingParams(max_new_tokens=n))[0]


# ---- replays ---------------------------------------------------------------------------------------


def test_continue_llama_cpp_provider(spm):
    """Continue's autocomplete through its llama.cpp provider: the StarCoder template filled in, in
    PSM, streamed from /completion. The server rebuilds it in SPM; Continue reads `content`."""
    running, ref = spm
    prompt = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    body = {"prompt": prompt, "stream": True, "n_predict": 4096, "stop": CONTINUE_STOPS, "temperature": 0.01}
    headers = {"Content-Type": "application/json", "Authorization": "Bearer undefined"}
    with httpx.stream("POST", f"{running.url}/completion", content=json.dumps(body), headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert all(isinstance(e["content"], str) and isinstance(e["stop"], bool) for e in events)
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True] and "[DONE]" not in events
    final, text = events[-1], "".join(e["content"] for e in events)
    ids = _spm_ids(ref.tokenizer, PREFIX, SUFFIX)
    assert final["tokens_evaluated"] == len(ids) and final["prompt"] == ref.tokenizer.decode(ids)
    assert final["content"] == "" and final["tokens_predicted"] >= 1 and not any(s in text for s in CONTINUE_STOPS)
    settings = final["generation_settings"]
    assert settings["n_predict"] == 128 and settings["temperature"] == 0.01 and settings["stop"] == CONTINUE_STOPS
    assert final["stop_type"] in ("eos", "word", "limit") and set(final["timings"]) >= {
        "cache_n", "prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"}


def test_continue_openai_provider_with_the_starcoder_template(spm):
    """Continue's OpenAI provider (legacy completions; maxTokens set to fit, as the README says) with
    the StarCoder template: `choices[0].text` streamed, then [DONE]; the prompt is rebuilt in SPM."""
    running, ref = spm
    prompt = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    body = {"model": "smallcoder", "max_tokens": 24, "temperature": 0.01, "stream": True, "stop": CONTINUE_STOPS,
            "prompt": prompt}
    events = _sse(running, "/v1/completions", body, {"api-key": ""})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(len(c["choices"]) == 1 and isinstance(c["choices"][0]["text"], str) for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # the same request at temperature 0 is the greedy completion of the SPM ids
    r = _raw(running, "/v1/completions", {**body, "stream": False, "temperature": 0}, {"api-key": ""})
    assert r.status_code == 200
    ids = _spm_ids(ref.tokenizer, PREFIX, SUFFIX)
    want = ref.generate([ids], SamplingParams(max_new_tokens=24, stop=CONTINUE_STOPS))[0]
    assert r.json()["choices"][0]["text"] == want.text and r.json()["usage"]["prompt_tokens"] == len(ids)


def test_llama_vscode_warm_up_then_completion(spm):
    """llama.vscode's warm-up (n_predict 0, the extra context only) prefills it, and its completion
    request (n_cmpl 3: a list back) reuses it; each reply has what its status bar reads."""
    running, ref = spm
    chunks = [{"text": "def add(a, b):\n    return a + b\n", "time": 1733000000000, "filename": "/w/util.py"},
              {"text": "for i in range(10):\n", "time": 1733000000500, "filename": "/w/loop.py"}]
    warm = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
            "samplers": [], "cache_prompt": True, "t_max_prompt_ms": 500, "t_max_predict_ms": 1}
    r = _raw(running, "/infill", warm, {"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["content"] == "" and r.json()["tokens_predicted"] == 0 and r.json()["stop"] is True
    assert running.idle()
    line = "    print("
    body = {"id_slot": 0, "input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(i)\n",
            "input_extra": chunks, "prompt": line, "n_predict": 128, "n_cmpl": 3, "top_k": 40, "top_p": 0.99,
            "stream": False, "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "n_indent": 4,
            "t_max_prompt_ms": 500, "t_max_predict_ms": 2500}
    r = _raw(running, "/infill", body, {"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    replies = r.json()
    assert isinstance(replies, list) and len(replies) == 3
    head = SNIPPET_SEP + chunks[0]["text"] + SNIPPET_SEP + chunks[1]["text"]
    ids = _spm_ids(ref.tokenizer, body["input_prefix"], body["input_suffix"], line, head)
    shared = (len(ref.tokenizer.encode(head)) + 2) // 8 * 8  # the extra context and <fim_prefix><fim_suffix>
    for reply in replies:
        assert isinstance(reply["content"], str) and reply["generation_settings"]["n_ctx"] == 128
        assert reply["tokens_evaluated"] == len(ids) <= 96 and reply["tokens_cached"] >= shared > 0
        t = reply["timings"]
        assert all(isinstance(t[k], (int, float)) for k in ("prompt_n", "prompt_ms", "prompt_per_second",
                                                             "predicted_n", "predicted_ms", "predicted_per_second"))
        assert t["predicted_n"] == reply["tokens_predicted"] and t["cache_n"] == reply["tokens_cached"]
        assert reply["generation_settings"]["samplers"] == ["top_k", "top_p"]  # "infill" accepted, not applied


def test_tabby_llama_cpp_binding(spm):
    """Tabby's llama.cpp binding: every event must hold `content` and `stop` (it unwraps them), it
    stops at `stop: true`; non-streamed it reads `content`. Its seed makes the draw repeatable."""
    running, _ = spm
    prompt = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
    body = {"seed": 1733000000123, "prompt": prompt, "n_predict": 64, "temperature": 0.1, "stream": True,
            "penalty_last_n": 0, "presence_penalty": 0.0}
    events = _sse(running, "/completion", body)
    assert all(set(e) >= {"content", "stop"} and isinstance(e["content"], str) for e in events)
    assert events[-1]["stop"] is True and not any(e["stop"] for e in events[:-1])
    streamed = "".join(e["content"] for e in events)
    r = _raw(running, "/completion", {**body, "stream": False}, {"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["content"] == streamed


# ---- the FIM order and the cache ---------------------------------------------------------------------


def _infill(running: Running, prefix: str, suffix: str, **kw) -> dict:
    r = running.post("/infill", {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 2, "temperature": 0,
                                 **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_spm_keeps_the_cache_as_the_prefix_grows_psm_keeps_only_what_precedes_the_edit(spm, psm):
    """One keystroke at the end of the prefix: with SPM the suffix and the prefix before the edit
    are reused; with PSM nothing after the edit (the suffix) can be."""
    prefix, suffix = "def volume(r, h):\n    base = ", "\n    return base * h\n\n\nprint(volume(1, 2))\n" * 2
    cached = {}
    for name, (running, ref) in (("spm", spm), ("psm", psm)):
        _infill(running, prefix, suffix)
        cached[name] = _infill(running, prefix + "m", suffix)["tokens_cached"]
    tok = spm[1].tokenizer
    suffix_ids = tok.encode(suffix)
    edit_at = 1 + len(tok.encode(prefix)) - 1  # PSM: <fim_prefix>, then the prefix up to its last token
    assert cached["spm"] >= (2 + len(suffix_ids) + 1 + len(tok.encode(prefix)) - 1) // 8 * 8 > len(suffix_ids)
    assert cached["psm"] <= edit_at < cached["spm"]


def test_the_server_lays_the_prompt_out_in_its_order(spm, psm):
    for running, ref in (spm, psm):
        got = _infill(running, "def f(", "):\n    pass\n", prompt="x")
        order = "spm" if running is spm[0] else "psm"
        tok = ref.tokenizer
        sentinels = [tok.token_to_id(t) for t in FIM_TOKENS]
        ids = fim_ids(tok.encode("def f("), tok.encode("):\n    pass\n"), tok.encode("x"), order, sentinels)
        assert got["prompt"] == tok.decode(ids) and got["content"] == _greedy(ref, ids, 2).text


# ---- the same client's newer request -------------------------------------------------------------------


def _stream_in_background(running: Running, body: dict, headers: dict, out: dict) -> threading.Thread:
    first = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{running.url}/infill", json=body, headers=headers, timeout=60) as r:
            events = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    first.set()
            out["events"] = events
        first.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert first.wait(30)
    return thread


def test_a_newer_request_of_the_same_client_slot_replaces_the_stale_one(slow):
    running, _ = slow
    long = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 90, "ignore_eos": True, "temperature": 0,
            "stream": True, "id_slot": 0}
    ua = {"User-Agent": "axios/1.7.9"}
    out: dict = {}
    thread = _stream_in_background(running, long, ua, out)
    r = httpx.post(f"{running.url}/infill", json={**long, "stream": False, "n_predict": 3}, headers=ua, timeout=60)
    thread.join(60)
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 3 and "superseded" not in r.json()
    final = out["events"][-1]
    assert final["stop"] is True and final["superseded"] is True and final["stop_type"] == "limit"
    assert final["tokens_predicted"] < 90
    assert running.idle()


@pytest.mark.parametrize("other", [{"id_slot": 1}, {"id_slot": -1}, {"no_slot": True}, {"ua": "vscode/2"}],
                         ids=["other slot", "any slot", "no slot", "other user agent"])
def test_other_clients_and_other_slots_replace_nothing(slow, other):
    running, _ = slow
    long = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "n_predict": 30, "ignore_eos": True, "temperature": 0,
            "stream": True, "id_slot": 0}
    out: dict = {}
    thread = _stream_in_background(running, long, {"User-Agent": "axios/1.7.9"}, out)
    body = {**long, "stream": False, "n_predict": 2}
    if "id_slot" in other:
        body["id_slot"] = other["id_slot"]
    if other.get("no_slot"):
        del body["id_slot"]
    r = httpx.post(f"{running.url}/infill", json=body, headers={"User-Agent": other.get("ua", "axios/1.7.9")},
                   timeout=60)
    thread.join(60)
    assert r.status_code == 200
    final = out["events"][-1]
    assert final["tokens_predicted"] == 30 and "superseded" not in final and final["stop_type"] == "limit"


def test_a_prompt_not_processed_within_t_max_prompt_ms_answers_empty_and_stays_cached(slow):
    """The reply does not wait past t_max_prompt_ms for the prompt; the prefill goes on, so the same
    prompt next time is reused (each 8-token chunk takes >= 15 ms here, far past 1 ms)."""
    running, ref = slow
    prefix = "def norm(v):\n    total = 0\n    for x in v:\n        total += x * x\n    return "
    suffix = "\n\n\nprint(norm([3, 4]))\n"
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": 8, "temperature": 0, "t_max_prompt_ms": 1}
    got = running.post("/infill", body).json()
    assert got["content"] == "" and got["tokens_predicted"] == 0 and got["stop_type"] == "limit"
    assert running.idle(within=30)
    again = running.post("/infill", {**body, "t_max_prompt_ms": 0}).json()
    ids = _spm_ids(ref.tokenizer, prefix, suffix)
    assert again["tokens_cached"] == (len(ids) - 1) // 8 * 8 > 0 and again["content"] == _greedy(ref, ids, 8).text


# ---- the cut and bad input ---------------------------------------------------------------------------------


def test_a_fim_prompt_longer_than_the_context_is_cut_not_refused(spm):
    running, _ = spm
    prefix = "".join(f"a{i} = {i}\n" for i in range(80))
    suffix = "".join(f"b{i} = {i}\n" for i in range(80))
    got = _infill(running, prefix, suffix)
    limit = 128 - min(2, 128 // 4)  # n_predict 2 held back
    assert got["truncated"] is True and got["tokens_evaluated"] == limit
    assert "a79 = 79\n" in got["prompt"] and "b0 = 0\n" in got["prompt"] and "a0 = 0\n" not in got["prompt"]
    # the same through /v1/completions' suffix and a filled-in template (each was a 400 before)
    r = running.post("/v1/completions", {"prompt": prefix, "suffix": suffix, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == limit
    r = running.post("/completion", {"prompt": f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>", "n_predict": 2})
    assert r.status_code == 200 and r.json()["truncated"] is True and r.json()["tokens_evaluated"] == limit


def test_fim_requests_on_a_tokenizer_without_fim_tokens_get_400(plain):
    auth = {"Content-Type": "application/json"}
    template = "<fim_prefix>def f(<fim_suffix>)<fim_middle>"
    for path, body, param in (("/completion", {"prompt": template}, "prompt"),
                              ("/v1/completions", {"prompt": template, "max_tokens": 2}, "prompt"),
                              ("/infill", {"input_prefix": "def f(", "input_suffix": ")"}, "input_prefix")):
        r = _raw(plain, path, body, auth)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert "fim_suffix" in err["message"] and err["param"] == param
    r = _raw(plain, "/completion", {"prompt": "def f(", "n_predict": 2, "temperature": 0}, auth)
    assert r.status_code == 200  # a plain prompt is fine


@pytest.mark.parametrize("path", ["/completion", "/infill"])
@pytest.mark.parametrize("value, status, needle", [
    (-2, 400, "n_predict must be -1 (until the context is full) or >= 0, got -2"),
    (-1000, 400, "got -1000"),
    ("many", 400, "'n_predict'"),
    (1.5, 400, "'n_predict'"),
    (10**9, 200, None),  # capped to --max-tokens, as llama.cpp caps it to its -n
])
def test_n_predict_out_of_range(spm, path, value, status, needle):
    running, _ = spm
    body = {"prompt": "def f(", "input_prefix": "def f(", "input_suffix": ")", "n_predict": value, "temperature": 0}
    if path == "/completion":
        del body["input_prefix"], body["input_suffix"]
    r = running.post(path, body)
    assert r.status_code == status, r.text
    if needle:
        assert needle in r.json()["error"]["message"] and r.json()["error"]["param"] == "n_predict"
    else:
        assert r.json()["generation_settings"]["n_predict"] == 128


@pytest.mark.parametrize("body, needle", [
    ({"samplers": ["top_k", "mystery"]}, "unknown sampler 'mystery'"),
    ({"n_cmpl": 0}, "n_cmpl must be >= 1"),
    ({"n_cmpl": 65}, "at most 64 per request"),
    ({"min_p": 2}, "min_p must be <= 1"),
    ({"n_indent": -1}, "n_indent must be >= 0"),
    ({"t_max_predict_ms": "soon"}, "'t_max_predict_ms'"),
    ({"input_extra": [{"filename": "a.py", "text": 3}]}, "input_extra.0.text"),
])
def test_bad_native_fields_get_400_naming_the_field(spm, body, needle):
    running, _ = spm
    r = running.post("/infill", {"input_prefix": "def f(", "input_suffix": ")", **body})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_llama_cpp_defaults_several_prompts_and_a_random_seed(spm):
    running, ref = spm
    r = running.post("/completion", {"prompt": "def f(", "n_predict": 1})
    s = r.json()["generation_settings"]
    assert (s["temperature"], s["top_k"], s["top_p"], s["min_p"]) == (0.8, 40, 0.95, 0.05)
    assert s["samplers"] == ["top_k", "top_p", "min_p", "temperature"] and s["seed"] == -1
    r = running.post("/completion", {"prompt": ["def f(", "for i in"], "n_predict": 3, "temperature": 0,
                                     "return_tokens": True})
    replies = r.json()
    assert [x["index"] for x in replies] == [0, 1]
    for reply, p in zip(replies, ["def f(", "for i in"]):
        assert reply["tokens"] == _greedy(ref, ref.tokenizer.encode(p), 3).token_ids
    assert running.post("/completion", {"prompt": "x", "n_predict": 1, "seed": -1}).status_code == 200


def test_an_error_event_carries_content_and_stop(spm, monkeypatch):
    running, _ = spm
    real = engine_mod.sample

    def picky(logits, params, generator):
        if params.seed == 4243:
            raise RuntimeError("sampler exploded")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "sample", picky)
    events = _sse(running, "/completion", {"prompt": "def f(", "n_predict": 4, "seed": 4243, "stream": True})
    assert events[-1]["content"] == "" and events[-1]["stop"] is True
    assert "sampler exploded" in events[-1]["error"]["message"]


def test_replacing_a_request_cancels_even_the_prefill_it_left_running():
    """A late request's prefill goes on when its reply is sent (warm), but not once the same client
    has sent a newer request; a request of another slot is left alone."""
    from smallcoder.serve.clients import SlotOwners

    class Req:
        def __init__(self, warm: bool) -> None:
            self.warm, self.cancelled = warm, False
            self.done = threading.Event()

        def cancel(self) -> None:
            self.cancelled = True

    class FakeBatch:
        def __init__(self, *reqs: Req) -> None:
            self.requests, self.superseded = list(reqs), False

        def cancel(self, warm: bool = False) -> None:
            from smallcoder.serve.bridge import Batch

            Batch.cancel(self, warm)  # the real rule, on these requests

    owners = SlotOwners()
    old, other = FakeBatch(Req(warm=True), Req(warm=False)), FakeBatch(Req(warm=True))
    owners.take(("127.0.0.1", "", "axios", 0), old)
    owners.take(("127.0.0.1", "", "axios", 1), other)
    old.cancel()  # the reply ended: the warm prefill goes on
    assert [r.cancelled for r in old.requests] == [False, True]
    owners.take(("127.0.0.1", "", "axios", 0), FakeBatch())
    assert old.superseded and all(r.cancelled for r in old.requests)
    assert not other.superseded and not other.requests[0].cancelled

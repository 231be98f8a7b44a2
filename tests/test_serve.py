"""`smallcoder serve`: the OpenAI-compatible server, driven by the real `openai` client and raw HTTP.

Each server runs in-process (uvicorn in a background thread) on a free loopback port, over the
micro model of conftest (random weights, so completions are byte garbage: tests compare them
with `Engine.generate` on the same prompt rather than with fixed text). A second micro model
whose tokenizer has the FIM tokens covers `suffix` and `/infill`; a third server slows each
forward pass down a little so a disconnect can land mid-generation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
httpx = pytest.importorskip("httpx", reason="the test extra (httpx) is not installed")

import uvicorn

import smallcoder
from smallcoder import Engine, SamplingParams, SmallCoderError, format_chat
from smallcoder.prompts import CHAT_STOP, SNIPPET_SEP
from smallcoder.serve.app import create_app
from smallcoder.serve.cli import bind_socket, register
from smallcoder.serve.limits import ServeLimits

KEY = "test-key"
PROMPTS = ["def add(a, b):", "for i in", "The lazy dog", "print(", "User: hello", "return a"]


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Running:
    """A server running in a background thread, with the engine it drives."""

    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def client(self, api_key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30, **kw)

    def post(self, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
        return httpx.post(f"{self.url}{path}", content=data, headers=headers, timeout=30, **kw)

    def idle(self, within: float = 2.0) -> bool:
        """True once no sequence holds a slot and none waits (polled up to `within` seconds)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.engine.num_active == 0 and self.engine.num_queued == 0:
                return True
            time.sleep(0.01)
        return False


def _start(engine: Engine, limits: ServeLimits | None = None, api_key: str | None = KEY,
           guarded: bool = False, fim_order: str = "spm") -> Running:
    from smallcoder.serve.app import uvicorn_config

    app = create_app(engine, model_name="micro", api_key=api_key, limits=limits, fim_order=fim_order)
    sock = bind_socket("127.0.0.1", 0)
    config = (uvicorn_config(app, limits, log_level="warning", timeout_graceful_shutdown=2) if guarded
              else uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    return Running(engine, server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}")


def _stop(running: Running) -> None:
    running.server.should_exit = True
    running.thread.join(timeout=20)
    assert not running.thread.is_alive()


@pytest.fixture(scope="module")
def loaded(micro_checkpoint):
    return smallcoder.load(micro_checkpoint)


@pytest.fixture(scope="module")
def ref(loaded) -> Engine:
    """An engine of its own (run in the calling thread) for reference completions."""
    return Engine(*loaded)


@pytest.fixture(scope="module")
def srv(loaded) -> Iterator[Running]:
    limits = ServeLimits(max_tokens=64, max_body_bytes=64 * 1024, max_choices=8, max_stop=8)
    running = _start(Engine(*loaded, max_batch=4), limits)
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def slow(micro_checkpoint) -> Iterator[Running]:
    """A server whose every forward pass takes >= 15 ms (its own model copy, so the others stay fast),
    so generations last long enough to be interrupted."""
    model, tok = smallcoder.load(micro_checkpoint)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.015))
    running = _start(Engine(model, tok, max_batch=2), api_key=None)
    yield running
    _stop(running)


@pytest.fixture(scope="module")
def fim(fim_checkpoint) -> Iterator[tuple[Running, Engine]]:
    """A server that lays FIM prompts out in PSM (the SPM default is covered in test_serve_editors.py)."""
    model, tok = smallcoder.load(fim_checkpoint)
    running = _start(Engine(model, tok, max_batch=2), api_key=None, fim_order="psm")
    yield running, Engine(model, tok)
    _stop(running)


def _events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent-event stream, JSON-decoded ([DONE] kept as a string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def _greedy(ref: Engine, prompt, **kw) -> smallcoder.Completion:
    return ref.generate([prompt], SamplingParams(**{"max_new_tokens": 24, **kw}))[0]


# ---- completions -------------------------------------------------------------------------------


def test_completion_greedy_equals_engine_generate(srv, ref):
    client = srv.client()
    for prompt in PROMPTS[:3]:
        expected = _greedy(ref, prompt)
        r = client.completions.create(model="micro", prompt=prompt, max_tokens=24, temperature=0)
        assert r.object == "text_completion" and r.model == "micro"
        assert r.choices[0].text == expected.text
        assert r.choices[0].finish_reason == expected.finish_reason
        assert r.usage.prompt_tokens == len(ref.tokenizer.encode(prompt))
        assert r.usage.completion_tokens == len(expected.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_with_openai_client(srv, ref):
    expected = _greedy(ref, PROMPTS[0])
    chunks = list(srv.client().completions.create(model="micro", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == expected.text
    assert [c.choices[0].finish_reason for c in text_chunks[:-1]] == [None] * (len(text_chunks) - 1)
    assert text_chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert len(text_chunks) > 2, "the text must come in pieces, not at the end"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_stream_wire_format_finish_usage_done(srv, ref):
    """finish_reason null until the last choice chunk, then the usage chunk, then [DONE]."""
    body = {"model": "micro", "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    usage, choices = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(e["usage"] is None for e in choices)
    assert [e["choices"][0]["finish_reason"] for e in choices] == [None] * (len(choices) - 1) + ["length"]
    # without include_usage: no usage chunk at all
    body["stream_options"] = None
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        events = _events(r)
    assert events[-1] == "[DONE]" and all(e["choices"] and "usage" not in e for e in events[:-1])


def test_prompt_as_token_ids_and_batch_of_prompts(srv, ref):
    ids = [ref.tokenizer.encode(p) for p in PROMPTS[:3]]
    client = srv.client()
    r = client.completions.create(model="micro", prompt=ids[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == _greedy(ref, PROMPTS[0], max_new_tokens=8).text
    r = client.completions.create(model="micro", prompt=ids[1:], max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [_greedy(ref, p, max_new_tokens=8).text for p in PROMPTS[1:3]]
    r = client.completions.create(model="micro", prompt=PROMPTS[1:3], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI orders them
    assert [c.text for c in r.choices] == [_greedy(ref, p, max_new_tokens=8).text for p in PROMPTS[1:3]
                                           for _ in range(2)]


def test_stop_string_or_list_and_max_completion_tokens(srv, ref):
    full = _greedy(ref, PROMPTS[0]).text
    stop = full[5:7]  # text the model really produces, so the stop really fires
    expected = _greedy(ref, PROMPTS[0], stop=(stop,))
    assert expected.finish_reason == "stop" and len(expected.text) < len(full)
    client = srv.client()
    for value in (stop, [stop, "never-produced"]):
        r = client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=value)
        assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="micro", prompt=PROMPTS[0], temperature=0,
                                  extra_body={"max_completion_tokens": 3})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_seed_n_and_sampling(srv):
    client = srv.client()
    kw = {"model": "micro", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 1.0}
    a = client.completions.create(seed=7, n=3, **kw)
    b = client.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # each of the n samples gets its own seed
    assert a.usage.completion_tokens == 36


def test_echo_logprobs_scoring_matches_engine_loglikelihood(srv, ref):
    """lm-eval's scoring calls: echo + logprobs with max_tokens 0 (and 1, sliced [ctxlen:-1])."""
    context, continuation = ref.tokenizer.encode("def add(a, b):"), ref.tokenizer.encode("\n    return a")
    expected, greedy = ref.loglikelihood_tokens([(context, continuation)])[0]
    client = srv.client()
    r = client.completions.create(model="micro", prompt=context + continuation, max_tokens=0, echo=True,
                                  logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == ref.tokenizer.decode(context + continuation)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(context) + len(continuation)
    assert math.isclose(sum(lp.token_logprobs[len(context):]), expected, rel_tol=1e-4, abs_tol=1e-4)
    is_greedy = all(t == max(top.values()) for t, top in
                    zip(lp.token_logprobs[len(context):], lp.top_logprobs[len(context):]))
    assert is_greedy == greedy
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    r = client.completions.create(model="micro", prompt=context + continuation, max_tokens=1, echo=True,
                                  logprobs=1, temperature=0, seed=1234)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(context) + len(continuation) + 1
    assert math.isclose(sum(lp.token_logprobs[len(context):-1]), expected, rel_tol=1e-4, abs_tol=1e-4)


def test_logprobs_of_generated_tokens(srv, ref):
    expected = _greedy(ref, PROMPTS[1], max_new_tokens=6)
    r = srv.client().completions.create(model="micro", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == expected.text and len(lp.token_logprobs) == 6
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and math.isclose(value, max(top.values()), abs_tol=1e-5)  # greedy picks the best


# ---- FIM: suffix, /infill ------------------------------------------------------------------------


def test_fim_tokens_are_single_tokens_and_suffix_builds_the_fim_prompt(fim):
    running, ref = fim
    tok = ref.tokenizer
    fim_prompt = "<fim_prefix>def add(a, b):<fim_suffix>    return c<fim_middle>"
    assert len(tok.encode(fim_prompt)) == len(tok.encode("def add(a, b):")) + len(tok.encode("    return c")) + 3
    expected = _greedy(ref, fim_prompt, max_new_tokens=10)
    client = running.client(api_key="unused")
    r = client.completions.create(model="micro", prompt="def add(a, b):", suffix="    return c", max_tokens=10,
                                  temperature=0)
    assert r.choices[0].text == expected.text and r.usage.prompt_tokens == len(tok.encode(fim_prompt))
    # an editor that fills the FIM tokens in itself gets the same
    r = client.completions.create(model="micro", prompt=fim_prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == expected.text and r.usage.prompt_tokens == len(tok.encode(fim_prompt))


def test_infill_llama_cpp_style(fim):
    running, ref = fim
    extra = "# util.py\n"  # the chunk follows llama.cpp's separator (this vocabulary has no <file_sep>)
    fim_prompt = f"{SNIPPET_SEP}{extra}<fim_prefix>def add(a, b):<fim_suffix>    return c<fim_middle>"
    expected = _greedy(ref, fim_prompt, max_new_tokens=8)
    body = {"input_prefix": "def add(a, b):", "input_suffix": "    return c", "n_predict": 8, "temperature": 0,
            "input_extra": [{"filename": "util.py", "text": extra}], "cache_prompt": True,
            "samplers": ["top_k", "top_p", "infill"], "t_max_predict_ms": 500}
    r = running.post("/infill", body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["content"] == expected.text and data["stop"] is True
    assert data["tokens_predicted"] == len(expected.token_ids) and data["tokens_evaluated"] == len(
        ref.tokenizer.encode(fim_prompt))
    assert data["stop_type"] == ("limit" if expected.finish_reason == "length" else "eos")
    with httpx.stream("POST", f"{running.url}/infill", json={**body, "stream": True}, timeout=30) as r:
        events = _events(r)
    assert "".join(e["content"] for e in events) == expected.text
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]


def test_suffix_and_infill_without_fim_tokens_get_400(srv):
    """The conftest tokenizer has <fim_prefix> only."""
    with pytest.raises(openai.BadRequestError, match="fim_suffix"):
        srv.client().completions.create(model="micro", prompt="def f(", suffix="pass", max_tokens=4)
    r = srv.post("/infill", {"input_prefix": "def f(", "input_suffix": "pass"})
    assert r.status_code == 400 and "fim_middle" in r.json()["error"]["message"]


# ---- chat --------------------------------------------------------------------------------------


def test_chat_renders_the_card_format(srv, ref):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "add two numbers"}]
    expected = _greedy(ref, format_chat(messages), max_new_tokens=16, stop=(CHAT_STOP,))
    client = srv.client()
    r = client.chat.completions.create(model="micro", messages=messages, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text.lstrip()
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.prompt_tokens == len(ref.tokenizer.encode(format_chat(messages)))
    chunks = list(client.chat.completions.create(model="micro", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected.text.lstrip()
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + [
        expected.finish_reason]
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    # content as a list of text parts, and the "developer" role, as newer clients send them
    r2 = client.chat.completions.create(
        model="micro", max_tokens=16, temperature=0,
        messages=[{"role": "developer", "content": "You write Python."},
                  *[{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages[1:]]])
    assert r2.choices[0].message.content == r.choices[0].message.content


def test_chat_bad_messages_get_400(srv):
    client = srv.client()
    with pytest.raises(openai.BadRequestError, match="unknown role 'wizard'"):
        client.chat.completions.create(model="micro", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model="micro", messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


# ---- models, health, auth --------------------------------------------------------------------------


def test_models_and_health(srv):
    models = srv.client().models.list()
    assert [m.id for m in models.data] == ["micro"]
    health = httpx.get(f"{srv.url}/health", timeout=10)  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["max_batch"] == 4


def test_health_reports_a_stopped_engine(loaded):
    running = _start(Engine(*loaded, max_batch=2))
    try:
        assert httpx.get(f"{running.url}/health", timeout=10).status_code == 200
        running.engine.close()  # as if the engine loop had died
        r = httpx.get(f"{running.url}/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
    finally:
        _stop(running)


def test_api_key_required(srv):
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").completions.create(model="micro", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").models.list()
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"x-api-key": KEY},
                   timeout=10)
    assert r.status_code == 200


def test_unknown_route_gets_json_404(srv):
    r = httpx.get(f"{srv.url}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 404 and "error" in r.json()


# ---- limits and bad input ------------------------------------------------------------------------


def test_limits_get_400_naming_the_limit(srv, ref):
    client = srv.client()
    with pytest.raises(openai.BadRequestError, match=r"max_tokens is 65; this server allows at most 64"):
        client.completions.create(model="micro", prompt="x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match=r"max_completion_tokens is 1000; .* at most 64"):
        client.chat.completions.create(model="micro", messages=[{"role": "user", "content": "x"}],
                                       max_completion_tokens=1000)
    long_prompt = "def add(a, b): " * 100
    n = len(ref.tokenizer.encode(long_prompt))
    with pytest.raises(openai.BadRequestError, match=rf"prompt is {n} tokens; this server accepts at most 127"):
        client.completions.create(model="micro", prompt=long_prompt, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match=r"messages is \d+ tokens; this server accepts at most 127"):
        client.chat.completions.create(model="micro", messages=[{"role": "user", "content": long_prompt}])
    with pytest.raises(openai.BadRequestError, match=r"at most 8 per request"):
        client.completions.create(model="micro", prompt="x", max_tokens=1, n=9)
    with pytest.raises(openai.BadRequestError, match=r"stop has 9 strings; this server accepts at most 8"):
        client.completions.create(model="micro", prompt="x", max_tokens=1, stop=[f"s{i}" for i in range(9)])
    r = srv.post("/v1/completions", {"prompt": "x" * 70_000})
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe garbage", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"", 400, "not valid JSON"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "'max_tokens'"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens must be >= 0"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "seed": 2**70}, 400, "seed"),
    ({"prompt": [5, 10**6]}, 400, "token id 1000000 is outside the vocabulary"),
    ({"prompt": []}, 400, "empty list"),
    ({"max_tokens": 3}, 400, "'prompt' is required"),
    ({"prompt": "x", "stream": True, "logprobs": 1}, 400, "logprobs"),
    ({"prompt": "x", "stop": [1, 2]}, 400, "field 'stop' must be a string or a list of strings (got [1, 2])"),
    ({"prompt": [[1, 2], "mix"]}, 400, "field 'prompt' must be a string, a list of strings"),
    ({"prompt": "x", "logprobs": 1000}, 400, "logprobs must be in [0, 20]"),
])
def test_malformed_requests_get_400(srv, body, status, needle):
    r = srv.post("/v1/completions", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_nan_temperature_and_lone_surrogate_get_400(srv):
    r = srv.post("/v1/completions", b'{"prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = srv.post("/v1/completions", b'{"prompt": "abc \\ud800", "max_tokens": 2}')  # a lone surrogate
    assert r.status_code == 400 and "prompt is not valid text" in r.json()["error"]["message"]
    r = srv.post("/v1/chat/completions", {"messages": "hello"})
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]


def test_unknown_fields_are_accepted_and_logged_once(srv, ref, caplog):
    body = {"model": "someone-else", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0,
            "frobnicate": {"a": 1}, "presence_penalty": 0, "user": "u-1", "logit_bias": {}}
    with caplog.at_level(logging.INFO, logger="smallcoder.serve"):
        for _ in range(2):
            r = srv.post("/v1/completions", body)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == _greedy(ref, PROMPTS[0],
                                                                                      max_new_tokens=5).text
    lines = [rec.getMessage() for rec in caplog.records if "frobnicate" in rec.getMessage()]
    assert len(lines) == 1 and "presence_penalty" not in lines[0]


# ---- disconnects, concurrency, abuse ------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_slot_at_once(slow):
    body = {"prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{slow.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
        assert slow.engine.num_active == 1
        t0 = time.monotonic()
    # the client closed the connection; 100 tokens would take >= 1.5 s more
    assert slow.idle(within=1.0), "the disconnected stream still holds its slot"
    assert time.monotonic() - t0 < 1.0


def test_disconnect_while_waiting_non_streamed_cancels(slow):
    body = {"prompt": PROMPTS[1], "max_tokens": 100, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.3))
    assert slow.idle(within=1.0), "the abandoned request still holds its slot"


def test_queued_requests_wait_for_a_slot_and_all_finish(slow, ref):
    """max_batch 2 and 5 concurrent requests: the rest queue, then fill freed slots."""
    client = slow.client()
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = client.completions.create(model="micro", prompt=PROMPTS[i], max_tokens=8, temperature=0
                                               ).choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    assert slow.engine.num_queued >= 1  # more requests than slots
    for t in threads:
        t.join(timeout=30)
    assert results == {i: _greedy(ref, PROMPTS[i], max_new_tokens=8).text for i in range(5)}
    assert slow.idle()


def test_many_concurrent_requests_all_succeed(srv, ref):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)

        async def one(i: int) -> str:
            prompt = PROMPTS[i % len(PROMPTS)]
            if i % 2:
                stream = await client.completions.create(model="micro", prompt=prompt, max_tokens=12,
                                                         temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])
            r = await client.completions.create(model="micro", prompt=prompt, max_tokens=12, temperature=0)
            return r.choices[0].text

        try:
            return await asyncio.gather(*(one(i) for i in range(24)))
        finally:
            await client.close()

    texts = asyncio.run(main())
    expected = {p: _greedy(ref, p, max_new_tokens=12).text for p in PROMPTS}
    assert texts == [expected[PROMPTS[i % len(PROMPTS)]] for i in range(24)]
    assert srv.idle()


def test_server_still_serves_after_abusive_requests(srv, ref):
    bad = [b"{", b'{"prompt": "x", "max_tokens": 1e999}', b'{"prompt": {"a": 1}}', b"null",
           json.dumps({"prompt": "x", "n": -3}).encode(), json.dumps({"prompt": [[1, 2], "mix"]}).encode(),
           b'{"prompt": "' + b"a" * 70_000 + b'"}']
    for body in bad:
        r = srv.post("/v1/completions", body)
        assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text)
    # a client that sends half the body it announced and disappears
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    r = srv.client().completions.create(model="micro", prompt=PROMPTS[3], max_tokens=8, temperature=0)
    assert r.choices[0].text == _greedy(ref, PROMPTS[3], max_new_tokens=8).text
    assert srv.idle()


def test_engine_failure_is_a_500_and_the_server_recovers(slow, ref, monkeypatch):
    """A forward pass that raises fails the requests in flight (JSON 500, or an error event
    mid-stream), and the next request is served normally."""
    fail = {"left": 0}

    def boom(module, args):
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("boom in forward")

    handle = slow.engine.model.register_forward_pre_hook(boom)
    try:
        client = slow.client()
        fail["left"] = 1
        with pytest.raises(openai.InternalServerError, match="generation failed: boom in forward"):
            client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        fail["left"] = 1
        with pytest.raises(openai.APIError, match="boom in forward"):
            list(client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                           stream=True))
        monkeypatch.setattr(slow.engine, "submit", lambda *a, **k: 1 / 0)
        r = slow.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "ZeroDivisionError" in r.json()["error"]["message"]
        monkeypatch.undo()
        r = client.completions.create(model="micro", prompt=PROMPTS[0], max_tokens=4, temperature=0)
        assert r.choices[0].text == _greedy(ref, PROMPTS[0], max_new_tokens=4).text
        assert slow.idle()
    finally:
        handle.remove()


# ---- CLI -----------------------------------------------------------------------------------------


def test_serve_command_defaults_to_loopback():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", "m"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.dtype) == ("127.0.0.1", 8000, None, 16, "float32")
    args = parser.parse_args(["serve", "--model", "m", "--port", "0", "--api-key", "k", "--max-batch", "4",
                              "--dtype", "int8", "--max-tokens", "32"])
    assert (args.port, args.api_key, args.max_batch, args.dtype, args.max_tokens) == (0, "k", 4, "int8", 32)


def test_serve_command_end_to_end(micro_checkpoint, tmp_path):
    """The command as a user runs it: a free port, the key from $SMALLCODER_API_KEY, SIGTERM to stop."""
    code = ("import argparse, sys\nfrom smallcoder.serve.cli import register\np = argparse.ArgumentParser()\n"
            "register(p.add_subparsers())\na = p.parse_args(sys.argv[1:])\na.func(a)\n")
    log = tmp_path / "server.log"
    env = {**os.environ, "SMALLCODER_API_KEY": "env-key"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--model", str(micro_checkpoint), "--port", "0",
                                 "--max-batch", "2", "--threads", "1", "--log-level", "warning"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1 \(API key required\)", log.read_text())
            url = m and m.group(1)
            time.sleep(0.1)
        assert url, log.read_text()
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="env-key", max_retries=0, timeout=30)
        r = client.completions.create(model=str(micro_checkpoint), prompt="def add(a, b):", max_tokens=3)
        assert r.usage.completion_tokens <= 3 and r.model == str(micro_checkpoint)
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (its design)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), log.read_text()
        assert "Traceback" not in log.read_text()


def test_port_in_use_is_a_clear_error():
    sock = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(SmallCoderError, match=rf"cannot listen on 127.0.0.1:{sock.getsockname()[1]}"):
            bind_socket("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()


@pytest.mark.parametrize("kw", [{"max_tokens": 0}, {"max_prompt_tokens": -5}, {"max_queue": -1}])
def test_bad_limits_are_refused_naming_the_flag(kw):
    name = next(iter(kw))
    with pytest.raises(SmallCoderError, match=f"--{name.replace('_', '-')}"):
        ServeLimits(**kw)


# ---- trust: sampling extremes, isolation, connections, scoring queue, JSON depth, SSE, CLI ---------


def test_extreme_sampling_values_are_valid_and_served(srv, ref):
    """Any temperature > 0 and top_p in (0, 1] is usable: tiny ones act as greedy (README)."""
    expected = _greedy(ref, PROMPTS[0], max_new_tokens=8).text
    for extra in ({"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-320},
                  {"temperature": 1e-300, "top_k": 2**62}):
        r = srv.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "seed": 1, **extra})
        assert r.status_code == 200, (extra, r.text)
        assert r.json()["choices"][0]["text"] == expected
    r = srv.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1e308, "seed": 1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize("field, raw", [("temperature", b"Infinity"), ("temperature", b"-Infinity"),
                                        ("temperature", b"NaN"), ("temperature", b"1e999"), ("top_p", b"NaN"),
                                        ("top_p", b"Infinity"), ("top_p", b"1e999"), ("top_p", b"-0.0"),
                                        ("seed", b"1e999"), ("max_tokens", b"NaN"), ("top_k", b"Infinity")])
def test_non_finite_numbers_get_400_naming_the_field(srv, field, raw):
    for path, body in (("/v1/completions", b'{"prompt": "x", "max_tokens": 2, "%s": %s}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "%s": %s}')):
        r = srv.post(path, body % (field.encode(), raw))
        assert r.status_code == 400, (path, r.text)
        assert field in r.json()["error"]["message"] and r.json()["error"]["param"] == field


def test_one_requests_sampling_failure_fails_that_request_alone(slow, ref, monkeypatch):
    """A request whose sampling raises gets a 500; a stream decoding beside it goes on to the end."""
    import smallcoder.inference.steps as engine_mod

    real = engine_mod.sample

    def picky(logits, params, generator):
        if params.seed == 4242:
            raise RuntimeError("sampler exploded")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_mod, "sample", picky)
    expected = _greedy(ref, PROMPTS[0], max_new_tokens=40, stop_at_eos=False).text
    body = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{slow.url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        r = slow.post("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 5, "temperature": 1.0, "seed": 4242})
        assert r.status_code == 500 and "sampler exploded" in r.json()["error"]["message"]
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(x[6:]) for x in [first, *rest] if x != "data: [DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert slow.idle()


def _start_guarded(engine: Engine, limits: ServeLimits) -> Running:
    """A server started as `smallcoder serve` starts it: with the connection guard in place."""
    return _start(engine, limits, api_key=None, guarded=True)


def _half_requests(running: Running, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    port = int(running.url.rsplit(":", 1)[1])
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
        s.sendall(b"GET /health HTTP/1.1\r\nHo")  # half a request head, then silence
        socks.append(s)
    return socks


def _reply_then_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (60 s bound: never hit by an honest server)."""
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    return data


def _health(running: Running, source: str) -> int:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.get(f"{running.url}/health").status_code


def _busy(running: Running, source: str) -> socket.socket:
    """A connection in the middle of a request: its head is in (the server asked for the body with
    100 Continue), the body never comes."""
    port = int(running.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Expect: 100-continue\r\nContent-Length: 100\r\n\r\n")
    data = b""
    while b"100 Continue" not in data:
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return s


def test_idle_half_requests_cannot_starve_anyone(loaded):
    """Idle half-requests make room for newer connections (the oldest is closed with 408), so even a
    /health probe from the attacker's own address is answered; connections in the middle of a
    request are never evicted, and only when all are busy is a newcomer refused (429 / 503)."""
    limits = ServeLimits(max_connections=6, max_connections_per_client=4, header_timeout=600, body_timeout=600)
    running = _start_guarded(Engine(*loaded, max_batch=2), limits)
    socks = _half_requests(running, 10)
    try:
        for s in socks[:6]:  # the six oldest idle ones were closed to make room for the newer four
            assert _reply_then_closed(s).startswith(b"HTTP/1.1 408")
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):  # the same client's /health too
            assert _health(running, source) == 200
        socks += [_busy(running, "127.0.0.5") for _ in range(4)]  # busy: they evict idle ones, not each other
        extra = socket.create_connection(("127.0.0.1", int(running.url.rsplit(":", 1)[1])), timeout=60,
                                         source_address=("127.0.0.5", 0))
        socks.append(extra)
        assert _reply_then_closed(extra).startswith(b"HTTP/1.1 429")  # four busy: no idle one of its own
        socks += [_busy(running, "127.0.0.6") for _ in range(2)]  # the total (6) is now all busy
        last = socket.create_connection(("127.0.0.1", int(running.url.rsplit(":", 1)[1])), timeout=60,
                                        source_address=("127.0.0.7", 0))
        socks.append(last)
        assert _reply_then_closed(last).startswith(b"HTTP/1.1 503")
    finally:
        for s in socks:
            s.close()
        _stop(running)


def test_half_requests_are_closed_after_the_header_timeout(loaded):
    limits = ServeLimits(max_connections_per_client=4, header_timeout=0.5, body_timeout=0.5)
    running = _start_guarded(Engine(*loaded, max_batch=2), limits)
    try:
        socks = _half_requests(running, 4)
        for s in socks:
            assert _reply_then_closed(s).startswith(b"HTTP/1.1 408")
            s.close()
        assert _health(running, "127.0.0.1") == 200  # the client can connect again
        # a keep-alive connection that starts a second head and stalls is closed the same way
        with socket.create_connection(("127.0.0.1", int(running.url.rsplit(":", 1)[1])), timeout=60) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HT")
            data = _reply_then_closed(s)
            assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data
        # a complete head with a body that never comes: 408 from the body timeout
        with socket.create_connection(("127.0.0.1", int(running.url.rsplit(":", 1)[1])), timeout=60) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            data = _reply_then_closed(s)
            assert data.startswith(b"HTTP/1.1 408") and b"--body-timeout" in data
        r = httpx.post(f"{running.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    finally:
        _stop(running)


@pytest.fixture
def gated(micro_checkpoint) -> Iterator[tuple[Running, threading.Event, list]]:
    """A server whose model waits at each forward until `gate` is set; `calls` records whether
    each forward had a KV cache (generation) or not (scoring)."""
    model, tok = smallcoder.load(micro_checkpoint)
    gate, entered, calls = threading.Event(), threading.Event(), []

    def hook(module, args, kwargs):
        entered.set()
        gate.wait(60)
        calls.append("generate" if kwargs.get("cache") is not None else "score")

    model.register_forward_pre_hook(hook, with_kwargs=True)
    running = _start(Engine(model, tok, max_batch=1), ServeLimits(max_queue=1), api_key=None)
    running.entered = entered
    try:
        yield running, gate, calls
    finally:
        gate.set()
        _stop(running)


def _poll(predicate, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_scoring_is_queued_counted_bounded_and_cancelled(gated, ref):
    running, gate, calls = gated
    results = {}
    blocker = threading.Thread(target=lambda: results.setdefault("a", running.post(
        "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})))
    blocker.start()
    assert running.entered.wait(30)  # the engine is inside request A's prefill
    score = json.dumps({"prompt": ref.tokenizer.encode("def add(a, b): return a"), "max_tokens": 0, "echo": True,
                        "logprobs": 1}).encode()
    port = int(running.url.rsplit(":", 1)[1])
    conn = socket.create_connection(("127.0.0.1", port), timeout=60)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(score) + score)
    assert _poll(lambda: httpx.get(f"{running.url}/health", timeout=10).json()["queued"] == 1), \
        "the scoring request is not in the engine's queue"
    r = running.post("/v1/completions", json.loads(score))  # the queue (max 1) is full
    assert r.status_code == 503 and r.json()["error"]["code"] == "busy"
    conn.close()  # the scoring client leaves before its turn
    assert _poll(lambda: all(job._cancelled for job in list(running.engine._queue)))
    gate.set()
    blocker.join(60)
    assert results["a"].status_code == 200
    assert running.idle(within=30)
    assert "score" not in calls  # the abandoned scoring request was never computed
    r = running.post("/v1/completions", json.loads(score))
    assert r.status_code == 200 and calls[-1] == "score"


def test_lm_eval_local_completions_matches_hf_on_answers_ending_at_eos(micro_checkpoint):
    """lm-eval's `local-completions` loglikelihood, reproduced: the payload of
    `LocalCompletionsAPI._create_payload(generate=False)` (token ids, max_tokens 1, logprobs 1,
    echo, temperature 0, seed 1234) and `parse_logprobs` (sum of token_logprobs[ctxlen:-1], greedy if
    each equals its top alternative). When the one generated token is EOS, the totals must still
    equal lm-eval's `hf` model (our `loglikelihood_tokens`)."""
    model, tok = smallcoder.load(micro_checkpoint)
    eos = tok.eos_id

    def force_eos(module, args, kwargs, out):  # generation ends at EOS right after the prompt
        if kwargs.get("cache") is not None:
            out = out.clone()
            out[..., eos] = out.abs().max() + 100.0
            return out
        return None

    model.register_forward_hook(force_eos, with_kwargs=True)
    running = _start(Engine(model, tok, max_batch=2, use_kernel=False), api_key=None)  # every step a forward
    try:
        hf = Engine(*smallcoder.load(micro_checkpoint))
        pairs = [("def add(a, b):", "\n    return a + b"), ("The lazy", " dog"), ("for i in", " range(10):")]
        encoded = [hf.encode_pair(c, x) for c, x in pairs]
        inputs = [(c + x)[-hf.context_length:] for c, x in encoded]
        ctxlens = [len(c) for c, _ in encoded]
        payload = {"model": "micro", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1,
                   "seed": 1234, "echo": True}
        r = running.post("/v1/completions", payload)
        assert r.status_code == 200, r.text
        got = []
        for choice, ctxlen in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), ctxlens):
            lps = choice["logprobs"]
            assert choice["finish_reason"] == "stop" and lps["tokens"][-1] == tok.eos_token
            token_lps, tops = lps["token_logprobs"][ctxlen:-1], lps["top_logprobs"][ctxlen:-1]
            got.append((sum(token_lps), all(t == max(top.values()) for t, top in zip(token_lps, tops))))
        want = hf.loglikelihood_tokens(encoded)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, want):
            assert math.isclose(ll, ref_ll, rel_tol=1e-4, abs_tol=1e-4) and greedy == ref_greedy
    finally:
        _stop(running)


@pytest.mark.parametrize("depth", [30_000, 2_000, 65])  # 30,000: 60 KB, within the body limit
def test_deeply_nested_json_gets_400(srv, ref, depth):
    r = srv.post("/v1/completions", b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}")
    assert r.status_code == 400 and "more than 64 levels deep" in r.json()["error"]["message"]
    r = srv.post("/v1/chat/completions", b'{"messages": [], "x": ' + b"[" * depth + b"]" * depth + b"}")
    assert r.status_code == 400 and "levels deep" in r.json()["error"]["message"]
    r = srv.post("/v1/completions", b'{"prompt": "x", "top_k": ' + b"9" * 5000 + b"}")  # past int() digit limit
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = srv.client().completions.create(model="micro", prompt=PROMPTS[3], max_tokens=4, temperature=0)
    assert r.choices[0].text == _greedy(ref, PROMPTS[3], max_new_tokens=4).text


STREAMED = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0, "n": 2,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"prompt": ["x", "y"], "max_tokens": 0, "echo": True, "n": 2}),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3, "echo": True, "n": 2,
                         "stream_options": {"include_usage": True}}),
]


@pytest.mark.parametrize("path, body", STREAMED)
def test_stream_true_always_answers_server_sent_events(srv, path, body):
    with httpx.stream("POST", f"{srv.url}{path}", json={**body, "stream": True, "temperature": 0},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert events[-1] == "[DONE]"
    finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    assert len(finishes) == body.get("n", 1) * prompts
    if "stream_options" in body:
        assert events[-2]["choices"] == [] and events[-2]["usage"]["prompt_tokens"] > 0


def test_infill_stream_with_nothing_to_generate_is_sse(fim):
    running, _ = fim
    with httpx.stream("POST", f"{running.url}/infill", json={"input_prefix": "def f(", "input_suffix": "pass",
                                                             "n_predict": 0, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert len(events) == 1 and events[0]["stop"] is True and events[0]["tokens_predicted"] == 0


def _cli(argv, capsys):
    from smallcoder.cli import main

    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("port", ["70000", "65536", "-1"])
def test_port_out_of_range_is_one_line(port, capsys):
    code, out = _cli(["serve", "--model", "nowhere", "--port", port], capsys)
    assert code == 2 and out.err.strip() == f"smallcoder: error: --port must be in [0, 65535] (0 = any free port), " \
                                            f"got {port}"
    with pytest.raises(SmallCoderError, match="--port"):
        bind_socket("127.0.0.1", int(port))


def test_serve_without_the_serve_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    code, out = _cli(["serve", "--model", "nowhere"], capsys)
    assert code == 2 and "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1
    assert "uvicorn is not installed" in out.err and "pip install 'smallcoder[serve]'" in out.err


@pytest.mark.parametrize("flags", [["--temperature", "1e-45"], ["--temperature", "5e-324", "--top-p", "1e-320"],
                                   ["--temperature", "1e308", "--seed", "3"]])
def test_generate_command_takes_extreme_sampling_values(micro_checkpoint, flags, capsys):
    code, out = _cli(["generate", "--model", str(micro_checkpoint), "--prompt", "def", "--max-new-tokens", "4",
                      *flags], capsys)
    assert code == 0, out.err


@pytest.mark.parametrize("flags, field", [(["--temperature", "inf"], "temperature"),
                                          (["--temperature", "nan"], "temperature"),
                                          (["--top-p", "nan"], "top_p"), (["--seed", str(2**70)], "seed")])
def test_generate_command_refuses_meaningless_values_in_one_line(micro_checkpoint, flags, field, capsys):
    code, out = _cli(["generate", "--model", str(micro_checkpoint), "--prompt", "def", *flags], capsys)
    assert code == 2 and out.err.startswith(f"smallcoder: error: {field}") and len(out.err.splitlines()) == 1

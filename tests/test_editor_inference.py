"""What the editors' endpoints need from inference: the samplers' order and min_p, llama.cpp's line
rules (n_indent, t_max_predict_ms), warm requests that only prefill, a prefill that stops between
chunks when cancelled (the chunks stay cached), and short prefill chunks in the C++ kernel.

On the micro model of conftest (random weights, 128-token context).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import smallcoder
from smallcoder import Engine, SamplingParams, SmallCoderError
from smallcoder.inference.detokenize import TextState
from smallcoder.inference.sampling import sample
from smallcoder.kernels import MAX_ROWS, build
from smallcoder.model import KVCache

detok = importlib.import_module("smallcoder.inference.detokenize")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(micro_checkpoint):
    return smallcoder.load(micro_checkpoint)


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


def _support(logits: torch.Tensor, params: SamplingParams, draws: int = 400) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return {int(sample(logits, params, g)[0]) for _ in range(draws)}


# ---- samplers ---------------------------------------------------------------------------------


def test_min_p_drops_tokens_below_its_share_of_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]]))
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.2)) == {0, 1, 2}  # 0.12 >= 0.2 * 0.5
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.7)) == {0}
    assert _support(logits, SamplingParams(temperature=1.0, min_p=0.0)) == {0, 1, 2, 3, 4}


def test_the_samplers_run_in_the_order_given_and_only_those_named():
    """top_p 0.9 at temperature 1 keeps {0, 1, 2}; after a temperature of 5 flattens them it keeps
    all four (llama.cpp's default order puts the temperature last, OpenAI's first)."""
    logits = torch.log(torch.tensor([[0.6, 0.25, 0.1, 0.05]]))
    last = SamplingParams(temperature=5.0, top_p=0.9, samplers=("top_p", "temperature"))
    first = SamplingParams(temperature=5.0, top_p=0.9, samplers=("temperature", "top_p"))
    assert _support(logits, last) == {0, 1, 2}
    assert _support(logits, first) == {0, 1, 2, 3}
    assert _support(logits, SamplingParams(temperature=1.0, top_k=1, samplers=("top_p",))) == {0, 1, 2, 3}
    assert SamplingParams().samplers == ("temperature", "top_k", "top_p", "min_p")  # OpenAI's: unchanged


def test_temperature_zero_is_greedy_whatever_the_order():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    for samplers in [("top_k", "top_p"), ("top_p", "temperature"), ()]:
        assert sample(logits, SamplingParams(temperature=0.0, samplers=samplers), None).tolist() == [1, 0]


@pytest.mark.parametrize("kw, field", [({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
                                        ({"samplers": ("top_k", "dry")}, "unknown sampler 'dry'"),
                                        ({"min_indent": -1}, "min_indent"),
                                        ({"newline_time_limit": float("nan")}, "newline_time_limit"),
                                        ({"newline_time_limit": -1.0}, "newline_time_limit")])
def test_new_sampling_fields_are_checked(kw, field):
    with pytest.raises(SmallCoderError, match=field):
        SamplingParams(**kw)


# ---- llama.cpp's line rules -------------------------------------------------------------------


def _pushed(tok, text: str, **kw) -> TextState:
    state = TextState(tok, SamplingParams(max_new_tokens=500, **kw), 0, 500)
    for t in tok.encode(text):
        if state.finish_reason:
            break
        state.push(t)
    return state


@pytest.mark.parametrize("text, n, want", [
    ("x = 1\n    return x\ny = 2\n", 4, "x = 1\n    return x\n"),
    ("    a\n    b\n  c\n", 4, "    a\n    b\n  "),  # cut before the first character, as llama.cpp
    ("a\n\n    b\n", 2, "a\n"),  # an empty line has indentation 0
    ("a\n\tb\nc", 1, "a\n\tb\n"),  # a tab counts as one
    ("  a\n  b\n  c\n", 2, "  a\n  b\n  c\n"),  # never below: untouched
    ("def f():\nreturn 1", 1, "def f():\n"),  # the first line is never checked
])
def test_min_indent_ends_the_text_at_a_line_indented_less(tok, text, n, want):
    state = _pushed(tok, text, min_indent=n)
    assert state.text == want
    assert state.finish_reason == ("length" if want != text else None)


def test_newline_time_limit_ends_at_the_first_newline_past_the_limit(tok, monkeypatch):
    now = {"t": 100.0}
    monkeypatch.setattr(detok, "clock", lambda: now["t"])
    state = TextState(tok, SamplingParams(max_new_tokens=500, newline_time_limit=1.0), 0, 500)
    ids = tok.encode("a = 1\nb = 2\nc = 3\nd")
    for i, t in enumerate(ids):
        state.push(t)
        if state.finish_reason:
            break
        if tok.decode(ids[:i + 1]).endswith("= 2"):
            now["t"] += 5.0  # past the limit; the next newline ends it
    assert state.text == "a = 1\nb = 2\n" and state.finish_reason == "length"
    state = TextState(tok, SamplingParams(max_new_tokens=500, newline_time_limit=1.0), 0, 500)
    for t in ids:
        state.push(t)
    assert state.finish_reason is None  # within the limit: every newline passes


# ---- the engine ---------------------------------------------------------------------------------


def test_a_warm_request_only_prefills_and_the_next_one_reuses_it(loaded, tok):
    model, _ = loaded
    engine = Engine(model, tok, max_batch=2, prefill_chunk=8)
    prompt = tok.encode("def add(a, b):\n    return a + b\n" * 3)
    warm = engine.submit(prompt, SamplingParams(max_new_tokens=0), warm=True)
    engine.run([warm])
    assert warm.result().token_ids == [] and warm.result().finish_reason == "length"
    assert warm.first_token_at is not None and warm.cached_tokens == 0
    cold = Engine(model, tok, max_batch=2, prefill_chunk=8)
    nothing = cold.submit(prompt, SamplingParams(max_new_tokens=0))  # not warm: no prefill, nothing kept
    cold.run([nothing])
    assert nothing.first_token_at is None
    follow = engine.submit(prompt + tok.encode("x = 1"), SamplingParams(max_new_tokens=4))
    engine.run([follow])
    assert follow.cached_tokens == len(prompt) // 8 * 8 > 0


def test_only_prefill_on_a_queued_request_prefills_and_generates_nothing(loaded, tok):
    engine = Engine(loaded[0], tok, prefill_chunk=8)
    prompt = tok.encode("for i in range(10):\n    print(i)\n" * 2)
    r = engine.submit(prompt, SamplingParams(max_new_tokens=20, stop_at_eos=False))
    r.only_prefill()
    engine.run([r])
    assert r.result().token_ids == [] and r.result().finish_reason == "length"
    again = engine.submit(prompt, SamplingParams(max_new_tokens=2))
    engine.run([again])
    assert again.cached_tokens == (len(prompt) - 1) // 8 * 8 > 0


def test_a_prefill_cancelled_between_chunks_stops_and_keeps_its_chunks(micro_checkpoint):
    """Cancelled after its second chunk: no third forward, and the two chunks done are reused."""
    model, tok = smallcoder.load(micro_checkpoint)
    engine = Engine(model, tok, prefill_chunk=8)
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    assert len(prompt) > 4 * 8
    r = engine.submit(prompt, SamplingParams(max_new_tokens=5))
    widths = []
    orig = model.forward_rows

    def spy(tokens, *a, **kw):  # prefill chunks go through forward_rows
        widths.append(tokens.numel())
        if len(widths) == 2:
            r.cancel()
        return orig(tokens, *a, **kw)

    model.forward_rows = spy
    try:
        engine.run([r])
    finally:
        del model.forward_rows
    assert r.result().finish_reason == "cancelled" and widths == [8, 8]
    again = engine.submit(prompt, SamplingParams(max_new_tokens=1))
    engine.run([again])
    assert again.cached_tokens == 16


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_short_prefill_chunk_runs_in_the_kernel_with_the_forwards_logits(micro_config, dtype, int8_emulation):
    """One row's T <= MAX_ROWS tokens in one kernel call (a row-stride-0 view of the cache) give
    the logits of PyTorch's forward, and write the same keys and values. (int8: the forward of
    the same arithmetic, activations quantized as the kernel does: conftest.int8_emulation.)"""
    from smallcoder.quant import quantize_model

    model = smallcoder.new_model(micro_config, seed=3).eval()
    if dtype == "int8":
        model = quantize_model(model)
    kernel = build(model)
    if kernel is None:
        pytest.skip("the C++ kernel does not build here")
    ref = int8_emulation(model) if dtype == "int8" else model
    ids = torch.randint(1, micro_config.vocab_size, (1, 5 * MAX_ROWS // 2), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want_cache = KVCache(micro_config, 1, 128)
        want = ref(ids, cache=want_cache)
        cache = KVCache(micro_config, 3, 128)
        row = cache.rows(1, 2)
        got = torch.cat([model.forward_rows(ids[0, s:s + MAX_ROWS], row, [0] * len(ids[0, s:s + MAX_ROWS]),
                                            range(s, s + len(ids[0, s:s + MAX_ROWS])),
                                            range(len(ids[0, s:s + MAX_ROWS])), decode_kernel=kernel)
                         for s in range(0, ids.shape[1], MAX_ROWS)])[None]
    # int8: an activation a rounding apart from the emulation's lands on the next int16 step
    # (test_int8_dot.py bounds that the same way)
    tol = 1e-3 * want.abs().max().item() if dtype == "int8" else 1e-4
    assert torch.allclose(got, want, atol=tol, rtol=1e-4)
    with torch.inference_mode():  # the engine's call: the last row's logits only (the head skips the others)
        last = model.forward_rows(ids[0, :MAX_ROWS], KVCache(micro_config, 1, 128), [0] * MAX_ROWS, range(MAX_ROWS),
                                  [MAX_ROWS - 1], decode_kernel=kernel)
    assert last.shape == (1, micro_config.vocab_size)
    assert torch.allclose(last[0], want[0, MAX_ROWS - 1], atol=tol, rtol=1e-4)
    n = ids.shape[1]
    assert torch.allclose(cache.k[0][1, :, :n], want_cache.k[0][0, :, :n], atol=1e-5 if dtype != "int8" else tol)
    assert row.lengths.tolist() == [n] and cache.k[0][0].abs().sum() == 0  # the other rows untouched


def test_a_decode_step_covers_only_the_rows_from_the_first_active_to_the_last(micro_checkpoint):
    """An editor's one request often sits in a later cache row (the one that kept its prefix): its
    decode steps run that row alone, not the idle rows before it too."""
    model, tok = smallcoder.load(micro_checkpoint)
    engine = Engine(model, tok, max_batch=3)
    rows = []
    handle = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        reqs = [engine.submit(p, SamplingParams(max_new_tokens=n, stop_at_eos=False))
                for p, n in (("def", 3), ("for", 3), ("The lazy dog", 10))]
        engine.run(reqs)
    finally:
        handle.remove()
    assert [len(r.result().token_ids) for r in reqs] == [3, 3, 10]
    assert max(rows) == 3  # all three decoded together while they lasted
    assert rows[-7:] == [1] * 7  # then row 2 alone, not rows 0..2

"""The generation engine (`Engine`, `SamplingParams`, `sample`) and the chat format.

Everything runs on the micro model of conftest (random weights, a 342-token byte-level BPE,
a 128-token context). Its completions are mostly byte garbage, so tests that need particular
text either pick it from a completion the model really produced, or script the sampled tokens
by replacing `smallcoder.inference.steps.sample` (the engine's only source of next tokens).
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import re
import time

import pytest
import torch

import smallcoder
from smallcoder import Engine, KVCache, ModelConfig, SamplingParams, SmallCoderError, format_chat
from smallcoder.prompts import CHAT_TEMPLATE, EOS_TOKEN

gen_mod = importlib.import_module("smallcoder.inference.steps")
sample = gen_mod.sample

PROMPTS = ["def add(a, b):", "for i in", "The lazy dog", "print("]
EMOJI = "\U0001F600"  # 4 UTF-8 bytes


# ---- fixtures and helpers -------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(micro_checkpoint):
    return smallcoder.load(micro_checkpoint)


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def tok(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def engine(model, tok):
    return Engine(model, tok)


@pytest.fixture
def fresh(micro_checkpoint):
    """An engine on its own model, for tests that patch the model."""
    m, t = smallcoder.load(micro_checkpoint)
    return Engine(m, t)


@torch.inference_mode()
def reference_greedy(model, ids, n):
    """Argmax of a full forward (no cache) over the growing sequence, n times."""
    seq, out = list(ids), []
    for _ in range(n):
        t = int(model(torch.tensor([seq]))[0, -1].argmax())
        out.append(t)
        seq.append(t)
    return out


def greedy(n=24, **kw):
    return SamplingParams(max_new_tokens=n, stop_at_eos=False, **kw)


def script(monkeypatch, rows, eos):
    """Make the engine 'sample' the given token ids (one list per batch row, then EOS forever).

    Returns a function that rewinds the script, for running the same script again.
    """
    state = {"step": 0}

    def fake_sample(logits, params, generator):
        i = state["step"]
        state["step"] += 1
        assert logits.shape[0] == len(rows)
        return torch.tensor([r[i] if i < len(r) else eos for r in rows], device=logits.device)

    monkeypatch.setattr(gen_mod, "sample", fake_sample)

    def rewind():
        state["step"] = 0

    return rewind


def force_eos(monkeypatch, engine, prompt_len, k):
    """Patch the engine's model so EOS wins from the k-th generated token (0-based) on."""
    model, eos = engine.model, engine.tokenizer.eos_id
    orig = model.forward

    def forward(input_ids, cache=None, **kw):
        out = orig(input_ids, cache=cache, **kw)
        if cache is not None and cache.length >= prompt_len + k:
            out = out.clone()
            out[..., eos] = out.abs().max() + 100.0
        return out

    monkeypatch.setattr(model, "forward", forward)


def clean(piece):
    return bool(piece) and piece.isascii() and piece.isprintable()


def spanning_stop(tok, ids, ntok):
    """A stop string that first occurs in decode(ids) across `ntok` consecutive tokens.

    Returns (i, stop, pos): the stop starts in token i (its last character) and ends in token
    i + ntok - 1 (its first character); pos is where it starts in the text. None if none fits.
    """
    full = tok.decode(ids)
    pieces = [tok.decode([t]) for t in ids]
    for i in range(len(ids) - ntok + 1):
        group = pieces[i:i + ntok]
        if not all(clean(p) for p in group):
            continue
        offset = len(tok.decode(ids[:i]))
        if full[offset:offset + sum(map(len, group))] != "".join(group):
            continue
        stop = group[0][-1] + "".join(group[1:-1]) + group[-1][0]
        pos = offset + len(group[0]) - 1
        if full.find(stop) == pos:
            return i, stop, pos
    return None


def find_spanning_case(engine, ntok, params=None):
    """(prompt, no-stop completion, (i, stop, pos)) for the first prompt that has such a stop."""
    params = params or greedy(40)
    for p in PROMPTS + ["", "x = 1\n", "return a + b", "User: hello"]:
        c = engine.generate([p], params)[0]
        found = spanning_stop(engine.tokenizer, c.token_ids, ntok)
        if found:
            return p, c, found
    raise AssertionError(f"no completion of the micro model has a stop string across {ntok} tokens")


# ---- greedy decoding against a reference ------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_uncached_reference(engine, model, tok, prompt):
    ids = tok.encode(prompt)
    ref = reference_greedy(model, ids, 24)
    c = engine.generate([prompt], greedy(24))[0]
    assert c.token_ids == ref
    assert c.finish_reason == "length"
    assert c.prompt_tokens == len(ids)
    assert c.text == tok.decode(ref)


def test_greedy_with_eos_matches_reference_cut_at_eos(engine, model, tok):
    # whether or not the random model emits EOS here, the engine must agree with the reference
    for prompt in PROMPTS:
        ref = reference_greedy(model, tok.encode(prompt), 30)
        c = engine.generate([prompt], SamplingParams(max_new_tokens=30))[0]
        if tok.eos_id in ref:
            assert c.token_ids == ref[:ref.index(tok.eos_id)]
            assert c.finish_reason == "stop"
        else:
            assert c.token_ids == ref
            assert c.finish_reason == "length"


def test_token_id_prompt_equals_text_prompt(engine, tok):
    p = "def add(a, b):"
    by_text = engine.generate([p], greedy(12))[0]
    by_ids = engine.generate([tok.encode(p)], greedy(12))[0]
    assert by_ids.token_ids == by_text.token_ids
    assert by_ids.text == by_text.text


def test_empty_prompt_starts_from_eos(engine, model, tok):
    a = engine.generate([""], greedy(8))[0]
    b = engine.generate([[tok.eos_id]], greedy(8))[0]
    assert a.prompt_tokens == 1
    assert a.token_ids == b.token_ids == reference_greedy(model, [tok.eos_id], 8)


def test_no_prompts_gives_no_completions(engine):
    assert engine.generate([], greedy(4)) == []


def test_single_string_instead_of_list_is_refused(engine):
    with pytest.raises(TypeError):
        engine.generate("def", greedy(4))


# ---- the KV cache -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model64(model):
    """The micro model in float64: cached and uncached logits then agree far below 1e-5.

    (In float32 the wide-init model's logits reach ~10, and the two attention paths sum in
    different orders, so they differ by ~1e-5 of rounding alone; a cache bug is O(1).)
    """
    return copy.deepcopy(model).double()


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kv_cache_token_by_token_matches_full_forward(model, model64, micro_config, dtype):
    m = model64 if dtype == torch.float64 else model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, micro_config.vocab_size, (2, 40), generator=g)
    full = m(ids)
    cache = KVCache(micro_config, 2, 40, dtype)
    steps = [m(ids[:, t:t + 1], cache=cache) for t in range(40)]
    assert cache.length == 40
    decoded = torch.cat(steps, dim=1)
    assert decoded.shape == full.shape and decoded.dtype == dtype
    if dtype == torch.float64:
        assert (decoded - full).abs().max().item() < 1e-5
    else:  # float32 rounding of logits up to ~10 (the C++ decode step sums in its own order)
        torch.testing.assert_close(decoded, full, rtol=1e-5, atol=5e-5)


@torch.inference_mode()
def test_kv_cache_prefill_then_chunks_matches_full_forward(model, model64, micro_config):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, micro_config.vocab_size, (1, 40), generator=g)
    full = model64(ids)
    cache = KVCache(micro_config, 1, 40, torch.float64)
    outs = []
    for a, b in [(0, 17), (17, 18), (18, 19), (19, 25), (25, 40)]:  # multi-token chunks after a prefill
        outs.append(model64(ids[:, a:b], cache=cache))
    assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-5
    last = model(ids[:, :1], cache=KVCache(micro_config, 1, 4, torch.float32), last_only=True)
    assert last.shape == (1, 1, micro_config.vocab_size)


@torch.inference_mode()
def test_kv_cache_rows_of_different_lengths_match_unbatched_forward(model64, micro_config):
    """Rows prefilled separately (slots of one cache) then decoded together, each at its own
    position, give the logits of each sequence run alone: no padding, no leakage between rows."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, micro_config.vocab_size, (n,), generator=g).tolist() for n in (12, 5, 9)]
    cont = torch.randint(1, micro_config.vocab_size, (3, 6), generator=g)
    cache = KVCache(micro_config, 3, 24, torch.float64)
    got = [[] for _ in prompts]
    for row, prompt in enumerate(prompts):
        got[row].append(model64(torch.tensor([prompt]), cache=cache.rows(row, row + 1), last_only=True)[0, -1])
    assert cache.lengths.tolist() == [12, 5, 9]
    for t in range(6):
        out = model64(cont[:, t:t + 1], cache=cache)[:, -1]
        for row in range(3):
            got[row].append(out[row])
    assert cache.lengths.tolist() == [18, 11, 15]
    for row, prompt in enumerate(prompts):
        full = model64(torch.tensor([prompt + cont[row].tolist()]))[0]
        want = full[len(prompt) - 1:]
        assert (torch.stack(got[row]) - want).abs().max().item() < 1e-5
    # two tokens at once with different starts (the masked, per-row write path)
    extra = torch.randint(1, micro_config.vocab_size, (3, 2), generator=g)
    out = model64(extra, cache=cache)
    for row, prompt in enumerate(prompts):
        seq = prompt + cont[row].tolist() + extra[row].tolist()
        assert (out[row] - model64(torch.tensor([seq]))[0, -2:]).abs().max().item() < 1e-5


@torch.inference_mode()
def test_kv_cache_keeps_no_per_call_state(model, micro_config):
    """The cache is storage (keys, values, each row's length); where a forward writes is that
    forward's argument, so nothing of one call is left on the cache for the next to read."""
    cache = KVCache(micro_config, 2, 16)
    fields = dict(vars(cache))
    model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)  # uniform prefill
    model(torch.tensor([[7], [8]]), cache=cache, starts=[3, 1])  # one token per row, rows apart
    model(torch.tensor([[7, 9], [8, 9]]), cache=cache, starts=[0, 5])  # several, rows apart
    assert set(vars(cache)) == set(fields) == {"k", "v", "lengths", "max_length", "batch_size", "k_scale", "v_scale"}
    assert all(vars(cache)[name] is value for name, value in fields.items())
    assert cache.lengths.tolist() == [2, 7]


@torch.inference_mode()
def test_explicit_starts_rewrite_positions_per_row(model64, micro_config):
    """`starts` puts each row's tokens at given positions: rewriting positions (the engine's idle
    rows, a reused prefix) gives the logits of a sequence that never held the old tokens, and
    keys past a row's new end are never seen, whatever the row held there before."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, micro_config.vocab_size, (2, 12), generator=g)
    cache = KVCache(micro_config, 2, 16, torch.float64)
    model64(ids[:, :6], cache=cache)
    model64(torch.full((2, 3), 5), cache=cache)  # junk at positions 6..8
    assert cache.lengths.tolist() == [9, 9]
    out = model64(ids[:, 6:10], cache=cache, starts=torch.tensor([6, 6]))
    assert cache.lengths.tolist() == [10, 10]
    assert (out - model64(ids[:, :10])[:, 6:10]).abs().max().item() < 1e-5
    # row 0 goes back to position 3, row 1 continues at 10
    extra = torch.stack([ids[0, 3:5], ids[1, 10:12]])
    out = model64(extra, cache=cache, starts=[3, 10])
    assert cache.lengths.tolist() == [5, 12]
    assert (out[0] - model64(ids[:1, :5])[0, 3:5]).abs().max().item() < 1e-5
    assert (out[1] - model64(ids[1:, :12])[0, 10:12]).abs().max().item() < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("call, message", [
    (lambda m, c: m(torch.tensor([[1]]), starts=[0]), "starts= are positions in a KV cache"),
    (lambda m, c: m(torch.tensor([[1], [2]]), cache=c, starts=[0]), r"starts has shape \(1,\); the KV cache has 2"),
    (lambda m, c: m(torch.tensor([[1], [2]]), cache=c, starts=[0, 8]), "KV cache holds 8 positions, asked for 9"),
    (lambda m, c: m(torch.tensor([[1], [2]]), cache=c, starts=[-1, 0]), "starts must be >= 0"),
])
def test_explicit_starts_are_checked(model, micro_config, call, message):
    cache = KVCache(micro_config, 2, 8)
    with pytest.raises(ValueError, match=message):
        call(model, cache)
    assert cache.lengths.tolist() == [0, 0]


def test_engine_leaves_the_callers_model_as_it_was(micro_checkpoint):
    """An Engine keeps what it needs (its decode kernel, its cache) to itself: the model it is
    given, e.g. the trainer's model during its EOS check, is not changed by it."""
    m, t = smallcoder.load(micro_checkpoint)
    m.train()
    attrs = dict(vars(m))
    modes = [x.training for x in m.modules()]
    tensors = {k: v.data_ptr() for k, v in m.state_dict().items()}
    engine = Engine(m, t)
    engine.generate(["def add", "for i in"], greedy(6))
    assert m.decode_kernel is None
    assert set(vars(m)) == set(attrs) and all(vars(m)[k] is v for k, v in attrs.items())
    assert [x.training for x in m.modules()] == modes
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == tensors


# ---- batching ---------------------------------------------------------------------------------


def test_batched_generation_matches_single_prompts(engine, tok):
    prompts = ["def add(a, b):\n    return a + b", "for", "The lazy dog", tok.encode("print(i)")]
    assert len({len(tok.encode(p) if isinstance(p, str) else p) for p in prompts}) == 4
    batch = engine.generate(prompts, greedy(20))
    for p, b in zip(prompts, batch):
        alone = engine.generate([p], greedy(20))[0]
        assert b.token_ids == alone.token_ids
        assert b.text == alone.text
        assert b.prompt_tokens == alone.prompt_tokens
        assert b.finish_reason == alone.finish_reason == "length"


def test_batched_rows_finish_independently(engine, tok):
    """Rows cut by stop strings / EOS at different steps end exactly as they do alone."""
    prompts = PROMPTS + ["x"]
    singles = [engine.generate([p], greedy(30))[0] for p in prompts]
    # a two-character stop from each of the first three completions (a clean spot in each)
    stops = []
    for s in singles[:3]:
        for i in range(1, len(s.text)):
            if clean(s.text[i - 1:i + 1]) and s.text[i - 1:i + 1] not in stops:
                stops.append(s.text[i - 1:i + 1])
                break
    assert stops
    params = SamplingParams(max_new_tokens=30, stop=stops)
    batch = engine.generate(prompts, params)
    alone = [engine.generate([p], params)[0] for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert [c.finish_reason for c in batch] == [c.finish_reason for c in alone]
    assert len({len(c.token_ids) for c in batch}) > 1  # rows really finished at different steps
    assert "stop" in {c.finish_reason for c in batch}


def test_batched_near_context_end_matches_single_prompts(engine, tok, micro_config):
    ctx = micro_config.max_position_embeddings
    g = torch.Generator().manual_seed(3)
    long = torch.randint(1, micro_config.vocab_size, (ctx - 5,), generator=g).tolist()
    short = long[-40:]
    batch = engine.generate([long, short], greedy(12))
    assert len(batch[0].token_ids) == 5 and batch[0].finish_reason == "length"
    assert len(batch[1].token_ids) == 12 and batch[1].finish_reason == "length"
    for p, b in zip([long, short], batch):
        assert b.token_ids == engine.generate([p], greedy(12))[0].token_ids


def test_batched_seeded_sampling_is_reproducible(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=11, stop_at_eos=False)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


# ---- stop strings -----------------------------------------------------------------------------


@pytest.mark.parametrize("ntok", [2, 3])
def test_stop_string_spanning_tokens(engine, ntok):
    prompt, full, (i, stop, pos) = find_spanning_case(engine, ntok)
    assert stop in full.text
    c = engine.generate([prompt], greedy(40, stop=[stop]))[0]
    assert c.finish_reason == "stop"
    assert c.text == full.text[:pos]
    assert stop not in c.text
    # generation ended on the token that completed the stop string, not before nor after
    assert c.token_ids == full.token_ids[:i + ntok]


def test_stop_string_inside_one_token(engine, tok):
    for p in PROMPTS:
        full = engine.generate([p], greedy(40))[0]
        pieces = [tok.decode([t]) for t in full.token_ids]
        multi = [(k, s) for k, s in enumerate(pieces) if clean(s) and len(s) >= 2]
        for k, s in multi:
            stop, pos = s[:2], len(tok.decode(full.token_ids[:k]))
            if pos > 0 and full.text.find(stop) == pos:  # first seen inside token k
                c = engine.generate([p], greedy(40, stop=stop))[0]  # a plain str is one stop
                assert (c.text, c.finish_reason) == (full.text[:pos], "stop")
                assert c.token_ids == full.token_ids[:k + 1]
                return
    pytest.fail("no multi-character token in the micro model's completions")


def test_earliest_stop_string_wins(engine):
    prompt, full, (_i, first, pos) = find_spanning_case(engine, 2)
    later = next(full.text[j:j + 2] for j in range(pos + 2, len(full.text) - 1)
                 if clean(full.text[j:j + 2]) and full.text.find(full.text[j:j + 2]) == j)
    for stops in ([later, first], [first, later]):
        c = engine.generate([prompt], greedy(40, stop=stops))[0]
        assert c.text == full.text[:pos]
        assert c.finish_reason == "stop"


def test_earliest_stop_wins_within_one_piece(monkeypatch, fresh, tok):
    """Several stops completed by the same token: the one that starts first in the text wins."""
    ids = tok.encode("The quick brown fox jumps")
    assert tok.decode(ids[2:3]) == " brown"  # completes all three stops below at once
    script(monkeypatch, [ids], tok.eos_id)
    params = SamplingParams(max_new_tokens=50, stop=["own", "bro", "k b"])
    c = fresh.generate(["x"], params)[0]
    assert c.text == "The quic"
    assert c.finish_reason == "stop"
    assert c.token_ids == ids[:3]


def test_stop_string_in_prompt_does_not_stop(engine):
    prompt = "def add(a, b):"
    full = engine.generate([prompt], greedy(20))[0]
    stop = next(s for s in ("def", "add", "(a", "b):") if s not in full.text)
    c = engine.generate([prompt], greedy(20, stop=[stop]))[0]
    assert c.token_ids == full.token_ids
    assert c.finish_reason == "length"


def test_stop_on_first_token_gives_empty_text(engine, tok):
    for prompt in PROMPTS + [""]:
        full = engine.generate([prompt], greedy(10))[0]
        first = tok.decode(full.token_ids[:1])
        if clean(first):
            break
    else:
        pytest.fail("no completion starts with a printable token")
    params = greedy(10, stop=[first[0]])
    c = engine.generate([prompt], params)[0]
    assert (c.text, c.finish_reason) == ("", "stop")
    assert c.token_ids == full.token_ids[:1]
    assert list(engine.stream(prompt, params)) == []


# ---- streaming --------------------------------------------------------------------------------


def _sampled():
    return SamplingParams(max_new_tokens=40, temperature=1.0, seed=5, stop_at_eos=False)


@pytest.mark.parametrize("make_params", [lambda: greedy(40), _sampled], ids=["greedy", "seeded"])
@pytest.mark.parametrize("with_stop", [False, True], ids=["nostop", "stop"])
def test_stream_equals_generate(engine, tok, make_params, with_stop):
    params = make_params()
    prompt, full, (_i, stop, pos) = find_spanning_case(engine, 2, params)
    if with_stop:
        params.stop = (stop, "\x00never\x00")
    pieces = list(engine.stream(prompt, params))
    done = engine.generate([prompt], params)[0]
    assert "".join(pieces) == done.text
    assert all(pieces)
    if with_stop:
        assert done.text == full.text[:pos] and done.finish_reason == "stop"
    else:
        assert done.text == full.text == tok.decode(full.token_ids)
        assert len(pieces) > 1
    # every streamed prefix is a prefix of the final text: nothing streamed is ever cut later
    acc = ""
    for piece in pieces:
        acc += piece
        assert done.text.startswith(acc)


def test_stream_holds_back_a_partial_stop_string(monkeypatch, fresh, tok):
    """Text that may begin a stop string is withheld until it cannot; then it is streamed."""
    text = "hi User how are you User: bye"
    ids = tok.encode(text)
    rewind = script(monkeypatch, [ids], tok.eos_id)
    params = SamplingParams(max_new_tokens=100, stop=["User:"])
    seen = []
    for piece in fresh.stream("x", params):
        seen.append(piece)
        # what has been streamed never ends with a start of the stop string ('U', 'Us', ...)
        assert not "".join(seen).endswith(("U", "Us", "Use", "User")), seen
    assert "".join(seen) == "hi User how are you "  # the first 'User' was released
    assert len(seen) > 2
    rewind()
    c = fresh.generate(["x"], params)[0]
    assert (c.text, c.finish_reason) == ("hi User how are you ", "stop")


def test_stream_releases_held_back_text_at_length_limit(monkeypatch, fresh, tok):
    ids = tok.encode("hello Us")
    rewind = script(monkeypatch, [ids], tok.eos_id)
    params = SamplingParams(max_new_tokens=len(ids), stop=["User:"])
    assert "".join(fresh.stream("x", params)) == "hello Us"
    rewind()
    c = fresh.generate(["x"], params)[0]
    assert (c.text, c.finish_reason) == ("hello Us", "length")


def test_stream_is_incremental(monkeypatch, fresh, tok):
    """Pieces come out as tokens are decoded, not all at the end."""
    ids = tok.encode("hello there, how are you? " * 4)
    rewind = script(monkeypatch, [ids], tok.eos_id)
    calls = {"n": 0}
    orig = fresh.model.forward

    def counting(*a, **kw):
        calls["n"] += 1
        return orig(*a, **kw)

    monkeypatch.setattr(fresh.model, "forward", counting)
    params = SamplingParams(max_new_tokens=len(ids))
    it = fresh.stream("x", params)
    first = next(it)
    assert first and calls["n"] <= 2  # after the prefill (and at most one step), not after all of them
    rest = list(it)
    assert calls["n"] >= len(ids) - 1 and len(rest) >= len(ids) // 2
    rewind()
    assert first + "".join(rest) == fresh.generate(["x"], params)[0].text == tok.decode(ids)


# ---- EOS and length ---------------------------------------------------------------------------


def test_eos_stops_generation(monkeypatch, fresh, tok):
    prompt = "The lazy dog"
    n = len(tok.encode(prompt))
    base = fresh.generate([prompt], greedy(20))[0]
    assert tok.eos_id not in base.token_ids[:5]
    force_eos(monkeypatch, fresh, n, 5)
    c = fresh.generate([prompt], SamplingParams(max_new_tokens=20))[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == base.token_ids[:5]
    assert tok.eos_id not in c.token_ids
    assert c.text == tok.decode(base.token_ids[:5])
    assert "".join(fresh.stream(prompt, SamplingParams(max_new_tokens=20))) == c.text
    # with stop_at_eos off, EOS is just a token and generation runs to the limit
    c2 = fresh.generate([prompt], SamplingParams(max_new_tokens=9, stop_at_eos=False))[0]
    assert c2.finish_reason == "length"
    assert c2.token_ids == base.token_ids[:5] + [tok.eos_id] * 4
    assert EOS_TOKEN in c2.text


def test_eos_in_one_row_of_a_batch(monkeypatch, fresh, tok):
    prompts = ["The lazy dog", "for i in"]
    base = fresh.generate(prompts, greedy(12))
    L = max(len(tok.encode(p)) for p in prompts)
    force_eos(monkeypatch, fresh, L, 4)  # every row gets EOS from token 4 on
    c = fresh.generate(prompts, SamplingParams(max_new_tokens=12))
    for b, x in zip(base, c):
        assert x.token_ids == b.token_ids[:4]
        assert x.finish_reason == "stop"


@pytest.mark.parametrize("n", [1, 7])
def test_max_new_tokens_is_respected(engine, n):
    c = engine.generate(["def"], greedy(n))[0]
    assert len(c.token_ids) == n
    assert c.finish_reason == "length"


def test_max_new_tokens_zero(engine):
    params = SamplingParams(max_new_tokens=0)
    c = engine.generate(["def add"], params)[0]
    assert (c.text, c.token_ids, c.finish_reason) == ("", [], "length")
    assert list(engine.stream("def add", params)) == []


def test_generation_stops_at_the_context_end(engine, micro_config):
    ctx = micro_config.max_position_embeddings
    ids = [5] * (ctx - 3)
    c = engine.generate([ids], greedy(50))[0]
    assert len(c.token_ids) == 3
    assert c.finish_reason == "length"


# ---- UTF-8 ------------------------------------------------------------------------------------


def _check_utf8_stream(monkeypatch, engine, tok, text):
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids), "the text should split a character"
    rewind = script(monkeypatch, [ids], tok.eos_id)
    pieces = list(engine.stream([tok.eos_id], SamplingParams(max_new_tokens=100)))
    assert not any("\ufffd" in p for p in pieces), pieces
    assert "".join(pieces) == text
    rewind()
    c = engine.generate([[tok.eos_id]], SamplingParams(max_new_tokens=100))[0]
    assert (c.text, c.token_ids, c.finish_reason) == (text, ids, "stop")


def test_utf8_stream_small_tokenizer(monkeypatch, fresh, tok):
    emoji_ids = tok.encode(EMOJI)
    assert len(emoji_ids) == 4  # one byte-level token per byte
    assert all(tok.decode([t]) == "\ufffd" for t in emoji_ids)
    _check_utf8_stream(monkeypatch, fresh, tok, f"a{EMOJI}b é中! {EMOJI}{EMOJI}")


def test_utf8_stream_starcoder_tokenizer(monkeypatch, starcoder_dir):
    sc = smallcoder.Tokenizer.load(starcoder_dir)
    cfg = ModelConfig(vocab_size=sc.vocab_size, hidden_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                      max_position_embeddings=64)
    engine = Engine(smallcoder.new_model(cfg, seed=0), sc)
    _check_utf8_stream(monkeypatch, engine, sc, f"x = '\U0001F917 hi {EMOJI}' # \u4e2d\u6587 ok")


def test_text_keeps_a_cut_character_at_the_length_limit(monkeypatch, fresh, tok):
    ids = tok.encode("ok") + tok.encode(EMOJI)[:2]
    rewind = script(monkeypatch, [ids], tok.eos_id)
    params = SamplingParams(max_new_tokens=len(ids))
    c = fresh.generate(["x"], params)[0]
    assert (c.token_ids, c.finish_reason) == (ids, "length")
    assert c.text == tok.decode(ids) and c.text.startswith("ok") and c.text.endswith("\ufffd")
    rewind()
    assert "".join(fresh.stream("x", params)) == c.text


def test_text_keeps_a_cut_character_before_eos(monkeypatch, fresh, tok):
    """EOS right after half a character: the text still covers every returned token."""
    ids = tok.encode("ok") + tok.encode(EMOJI)[:2]
    rewind = script(monkeypatch, [ids], tok.eos_id)
    c = fresh.generate(["x"], SamplingParams(max_new_tokens=20))[0]
    assert (c.token_ids, c.finish_reason) == (ids, "stop")
    assert c.text == tok.decode(ids)
    rewind()
    assert "".join(fresh.stream("x", SamplingParams(max_new_tokens=20))) == c.text


# ---- seeds and sampling -----------------------------------------------------------------------


def test_same_seed_same_output(engine):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, seed=123, stop_at_eos=False)
    a = engine.generate(["def"], params)[0]
    b = engine.generate(["def"], params)[0]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_different_seeds_differ(engine):
    outs = {tuple(engine.generate(["def"], SamplingParams(max_new_tokens=20, temperature=1.0, seed=s,
                                                          stop_at_eos=False))[0].token_ids)
            for s in range(4)}
    assert len(outs) >= 2


def test_sampling_is_not_greedy(engine):
    g = engine.generate(["def"], greedy(20))[0]
    outs = [engine.generate(["def"], SamplingParams(max_new_tokens=20, temperature=1.0, seed=s,
                                                    stop_at_eos=False))[0].token_ids for s in range(3)]
    assert any(o != g.token_ids for o in outs)


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "tiny top_p"])
def test_restricted_sampling_equals_greedy(engine, extra):
    want = [c.token_ids for c in engine.generate(PROMPTS, greedy(20))]
    for seed in (0, 1):
        params = SamplingParams(max_new_tokens=20, temperature=1.5, seed=seed, stop_at_eos=False, **extra)
        assert [c.token_ids for c in engine.generate(PROMPTS, params)] == want


def _support(logits, params, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([sample(logits, params, g) for _ in range(n)])  # (n, B)
    return draws, [set(draws[:, b].tolist()) for b in range(logits.shape[0])]


def test_sample_greedy_is_argmax_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 4.0], [-3.0, -2.0, -1.0, -1.5]])
    assert sample(logits, SamplingParams(), None).tolist() == [1, 0, 2]


def test_sample_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 1.5],
                           [5.0, 4.0, 0.0, 0.1, 0.2, 0.3, 4.5, 0.4]])
    _, support = _support(logits, SamplingParams(temperature=1.0, top_k=3))
    assert support == [{3, 4, 5}, {0, 1, 6}]
    _, support = _support(logits, SamplingParams(temperature=10.0, top_k=2))  # flat, still only 2
    assert support == [{4, 5}, {0, 6}]
    _, support = _support(logits, SamplingParams(temperature=50.0))  # no top_k: everything
    assert support == [set(range(8)), set(range(8))]


def _full_vocabulary_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the steps define, computed over the whole vocabulary with masks."""
    x = logits.double() - logits.double().max(dim=-1, keepdim=True).values
    for step in params.samplers:
        if step == "temperature":
            x = x / params.temperature
        elif step == "top_k" and params.top_k:
            x = x.masked_fill(x < torch.topk(x, params.top_k, dim=-1).values[:, -1:], float("-inf"))
        elif step == "top_p" and params.top_p < 1:
            sx, order = torch.sort(x, dim=-1, descending=True)
            pr = sx.softmax(-1)
            sx = sx.masked_fill(pr.cumsum(-1) - pr >= params.top_p, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sx)
        elif step == "min_p" and params.min_p:
            x = x.masked_fill(x < math.log(params.min_p), float("-inf"))
    return x.softmax(-1)


@pytest.mark.parametrize("samplers", [("temperature", "top_k", "top_p", "min_p"), ("top_k", "top_p", "temperature"),
                                      ("top_p", "top_k", "temperature"), ("min_p", "top_k")])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_draws_from_its_candidates_with_the_full_vocabulary_distribution(monkeypatch, samplers, ties):
    """After top-k the later steps and the draw run on the k candidates alone (fast on a 49,152-token
    vocabulary); the distribution drawn from is the one the masks define on the whole vocabulary,
    ties with the k-th value included (they all stay), and the drawn index maps back to its token."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 300, generator=g) * 3
    if ties:
        logits[0, :12] = logits.max() - 1.0  # 12 tokens tie for places 2-13
        logits[0, 299] = logits.max() + 1.0
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.01, samplers=samplers)
    seen = {}
    sampling = importlib.import_module("smallcoder.inference.sampling")
    real = sampling.draw

    def draw(probs, generator):
        seen["probs"] = probs
        return real(probs, generator)

    monkeypatch.setattr(sampling, "draw", draw)
    want = _full_vocabulary_probs(logits, params)[0]
    for seed in range(30):
        token = int(sample(logits, params, torch.Generator().manual_seed(seed))[0])
        assert want[token] > 0
    probs = seen["probs"][0]
    got = torch.zeros_like(want)
    if probs.shape[-1] == want.shape[-1]:
        got = probs
    else:  # the candidates' distribution: put it back at their token ids
        _, order = torch.topk(want, probs.shape[-1])
        got[order] = probs[torch.argsort(probs, descending=True)].to(got.dtype)
    assert torch.allclose(got.double(), want, atol=1e-12), (got[want > 0], want[want > 0])


def test_draw_follows_the_distribution_and_never_picks_a_zero(monkeypatch):
    """The inverse-CDF draw: frequencies match the probabilities (a chi-square bound, fixed seed),
    zero-probability indices (first, inner, last) never come up, and a one-hot row always gives its index."""
    sampling = importlib.import_module("smallcoder.inference.sampling")
    p = torch.tensor([[0.0, 0.1, 0.0, 0.25, 0.4, 0.25, 0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    n = 20000
    got = torch.cat([sampling.draw(p.expand(100, -1), g)[:, 0] for _ in range(n // 100)])
    counts = torch.bincount(got, minlength=7).double()
    assert counts[p[0] == 0].sum() == 0
    expected = p[0] * n
    chi2 = ((counts - expected)[p[0] > 0] ** 2 / expected[p[0] > 0]).sum()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    one_hot = torch.zeros(3, 5, dtype=torch.float64)
    one_hot[0, 0] = one_hot[1, 4] = one_hot[2, 2] = 1
    assert sampling.draw(one_hot, g)[:, 0].tolist() == [0, 4, 2]
    assert sampling.draw(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64), None)[0, 0] in (0, 1)
    # a uniform number that rounds up to the total lands on the last index with mass
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.ones(*a[:2], dtype=kw.get("dtype")))
    assert sampling.draw(torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64), None).tolist() == [[1]]


def test_sample_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    _, support = _support(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert support == [{1, 3}]  # 0.5 < 0.7, so the 0.3 token is needed too; then 0.8 >= 0.7
    _, support = _support(logits, SamplingParams(temperature=1.0, top_p=0.4))
    assert support == [{1}]
    _, support = _support(logits, SamplingParams(temperature=1.0, top_p=0.9))
    assert support == [{1, 2, 3}]


def test_sample_temperature_shapes_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.2])
    logits = p.log()[None]
    draws, _ = _support(logits, SamplingParams(temperature=1.0), n=4000)
    freq = torch.bincount(draws[:, 0], minlength=3).float() / 4000
    assert (freq - p).abs().max() < 0.04
    draws, _ = _support(logits, SamplingParams(temperature=0.5), n=4000, seed=1)
    freq = torch.bincount(draws[:, 0], minlength=3).float() / 4000
    sharp = p ** 2 / (p ** 2).sum()  # temperature 0.5 squares the probabilities
    assert (freq - sharp).abs().max() < 0.04


def test_sample_seeded_generator_is_reproducible():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    a = [sample(logits, params, torch.Generator().manual_seed(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("kw", [{"max_new_tokens": -1}, {"max_new_tokens": 1.5}, {"temperature": -0.1},
                                {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}, {"stop": ["ok", ""]},
                                {"stop": ""}])
def test_sampling_params_validation(kw):
    with pytest.raises(SmallCoderError):
        SamplingParams(**kw)


def test_sampling_params_single_stop_string_becomes_a_tuple():
    assert tuple(SamplingParams(stop="User:").stop) == ("User:",)


# ---- prompts longer than the context ----------------------------------------------------------


def test_prompt_too_long_is_refused_with_the_overflow(engine, micro_config):
    ctx = micro_config.max_position_embeddings
    with pytest.raises(SmallCoderError) as err:
        engine.generate([[7] * (ctx + 2)], greedy(5))
    msg = str(err.value)
    assert re.search(r"\b3 token\(s\) too long", msg), msg
    assert str(ctx + 2) in msg and str(ctx) in msg
    with pytest.raises(SmallCoderError, match=r"\b1 token\(s\) too long"):
        engine.generate([[7] * ctx], greedy(5))
    with pytest.raises(SmallCoderError, match="too long"):
        list(engine.stream("def add(a, b): " * 200, greedy(5)))


def test_prompt_one_short_of_the_context_generates_one_token(engine, micro_config):
    c = engine.generate([[7] * (micro_config.max_position_embeddings - 1)], greedy(5))[0]
    assert len(c.token_ids) == 1 and c.finish_reason == "length"


def test_truncate_keeps_the_end_of_the_prompt(engine, micro_config):
    ctx = micro_config.max_position_embeddings
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, micro_config.vocab_size, (ctx + 70,), generator=g).tolist()
    c = engine.generate([ids], greedy(10, truncate=True))[0]
    assert c.prompt_tokens == ctx - 10
    assert len(c.token_ids) == 10 and c.finish_reason == "length"
    assert c.token_ids == engine.generate([ids[-(ctx - 10):]], greedy(10))[0].token_ids
    text = engine.generate(["def add(a, b): " * 200], greedy(4, truncate=True))[0]
    assert len(text.token_ids) == 4


# ---- the chat format --------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "a"},
     {"role": "assistant", "content": "b"}, {"role": "user", "content": "c\nd"}],
]


def test_format_chat_single_request():
    assert format_chat("hi") == "User: hi\nAssistant:"
    assert format_chat([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"


def test_format_chat_multi_turn():
    assert format_chat(CONVERSATIONS[1]) == "User: a\nAssistant: b<|endoftext|>User: c\nAssistant:"


def test_format_chat_system_message_comes_first():
    out = format_chat(CONVERSATIONS[2])
    assert out == "You are terse.\nUser: a\nAssistant: b<|endoftext|>User: c\nd\nAssistant:"
    assert out.startswith("You are terse.\n")


def test_format_chat_without_generation_prompt_and_other_eos():
    msgs = CONVERSATIONS[1][:2]
    assert format_chat(msgs, add_generation_prompt=False) == "User: a\nAssistant: b<|endoftext|>"
    assert format_chat(msgs, add_generation_prompt=False, eos_token="</s>") == "User: a\nAssistant: b</s>"


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "content"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": "ok"}, {"role": "assistant", "content": ["a", "b"]}], "message 1"),
])
def test_format_chat_rejects_bad_messages(messages, pattern):
    with pytest.raises(SmallCoderError, match=pattern):
        format_chat(messages)


def test_format_chat_rejects_a_message_that_is_not_a_dict():
    with pytest.raises(SmallCoderError):
        format_chat(["hi"])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add", [True, False])
def test_chat_template_renders_like_format_chat(messages, add):
    sandbox = pytest.importorskip("jinja2.sandbox")
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers
    out = env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add,
                                                eos_token=EOS_TOKEN)
    assert out == format_chat(messages, add_generation_prompt=add)


def test_saved_checkpoint_carries_the_chat_template(micro_checkpoint):
    cfg = json.loads((micro_checkpoint / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert cfg["eos_token"] == EOS_TOKEN


def test_transformers_apply_chat_template_matches(micro_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(micro_checkpoint))
    for messages in CONVERSATIONS:
        out = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert out == format_chat(messages)


# ---- continuous batching --------------------------------------------------------------------


def test_continuous_batching_refills_slots_and_matches_unbatched(model, tok):
    """More prompts than slots, finishing at different times: each equals its run alone, and
    the cache never grows past max_batch rows."""
    prompts = ["def add(a, b):", "for", "The lazy dog", "x = 1", "print(", "User: hi"]
    budgets = [3, 9, 5, 12, 1, 7]
    small = Engine(model, tok, max_batch=2)
    requests = [small.submit(p, greedy(n)) for p, n in zip(prompts, budgets)]
    assert small.num_queued == 6 and small.num_active == 0
    small.run(requests)
    assert small._cache.batch_size == 2 and small.num_active == 0 and small.num_queued == 0
    alone = Engine(model, tok, max_batch=1)
    for p, n, r in zip(prompts, budgets, requests):
        want = alone.generate([p], greedy(n))[0]
        assert r.result().token_ids == want.token_ids and len(want.token_ids) == n


def test_seeded_sampling_does_not_depend_on_batch_companions(model, tok):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, stop_at_eos=False)
    alone = Engine(model, tok).generate(["def"], params)[0]
    together = Engine(model, tok, max_batch=3).generate(["The lazy dog", "def", "for i in"], params)
    assert together[1].token_ids == alone.token_ids


def test_background_loop_submit_cancel_and_close(model, tok):
    engine = Engine(model, tok, max_batch=2)
    assert not engine.alive
    engine.start()
    assert engine.alive
    try:
        pieces = []
        long = engine.submit("def", greedy(100), on_piece=pieces.append)
        short = engine.submit("for", greedy(4))
        assert short.result().finish_reason == "length" and len(short.result().token_ids) == 4
        while len(long.row.ids) < 3:
            time.sleep(0.01)
        long.cancel()
        assert long.done.wait(10)
        assert long.completion.finish_reason == "cancelled" and pieces[-1] is None
        assert "".join(p for p in pieces if p) == long.completion.text
        assert engine.num_active == 0
        # the loop keeps serving; generate from another thread goes through it
        assert engine.generate(["x = 1"], greedy(3))[0].token_ids == \
            Engine(model, tok).generate(["x = 1"], greedy(3))[0].token_ids
        queued = [engine.submit("y", greedy(50)) for _ in range(3)]
    finally:
        engine.close()
    assert all(r.done.is_set() for r in queued) and not engine.alive
    assert {r.completion.finish_reason for r in queued} <= {"cancelled", "length"}
    with pytest.raises(SmallCoderError, match="closed"):
        engine.submit("z", greedy(2))


def test_stream_closed_early_cancels_and_frees_the_slot(model, tok):
    engine = Engine(model, tok)
    it = engine.stream("def", greedy(200))
    next(it)
    it.close()
    assert engine.num_active == 0 and engine.num_queued == 0
    assert engine.generate(["for"], greedy(3))[0].finish_reason == "length"


def test_a_failing_step_fails_its_requests_and_the_engine_recovers(monkeypatch, fresh, tok):
    engine, model = fresh, fresh.model
    orig = model.forward
    calls = {"n": 0}

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return orig(*a, **kw)

    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(["def"], greedy(10))
    assert engine.num_active == 0
    assert len(engine.generate(["def"], greedy(5))[0].token_ids) == 5


def test_prefix_reuse_recomputes_only_the_new_suffix_and_changes_nothing(model, tok):
    """A prompt that extends a finished one reuses that row's keys/values: same tokens as an
    engine without reuse, and only the new part (from the last chunk boundary) is prefilled."""
    chunk = 8  # reuse stops at a prefill-chunk boundary (see `Engine`); small, so the prefix spans chunks
    fresh = Engine(model, tok, prefix_cache=False, prefill_chunk=chunk)
    engine = Engine(model, tok, max_batch=2, prefill_chunk=chunk)
    seen = []
    orig = model.forward_rows

    def spy(tokens, *a, **kw):  # prefill chunks go through forward_rows: count the tokens computed
        seen.append(tokens.numel())
        return orig(tokens, *a, **kw)

    shared = "def add(a, b):\n    return a + b\n\nThe lazy dog" * 2
    first = engine.generate([shared], greedy(6))[0]
    follow = [shared + " jumps over", shared + first.text, "for i in range(3):"]
    model.forward_rows = spy
    try:
        got = [engine.generate([p], greedy(6))[0] for p in follow]
    finally:
        del model.forward_rows
    want = fresh.generate(follow, greedy(6))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    n_shared = (len(tok.encode(shared)) - 1) // chunk * chunk  # the reusable, chunk-aligned part
    assert n_shared >= 2 * chunk
    assert engine.reused_tokens >= 2 * n_shared
    prefills = [n for n in seen if n > 1]
    assert prefills[0] <= len(tok.encode(follow[0])) - n_shared
    assert fresh.reused_tokens == 0


def test_prefix_copied_from_a_busy_row_changes_nothing(model, tok):
    """Prompts sharing a few-shot prefix, all decoding at once: later ones copy the prefix's
    keys/values from the first one's row instead of recomputing them."""
    shared = "User: hi\nAssistant: hello there\n" * 3
    prompts = [shared + tail for tail in ("def", "for i in", "The lazy dog", "x = 1")]
    chunk = 8
    engine = Engine(model, tok, max_batch=4, prefill_chunk=chunk)
    got = engine.generate(prompts, greedy(8))
    want = Engine(model, tok, prefix_cache=False, prefill_chunk=chunk).generate(prompts, greedy(8))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert engine.reused_tokens >= 3 * ((len(tok.encode(shared)) - 1) // chunk * chunk) >= 3 * 2 * chunk


# ---- trust: parameter extremes, failure isolation, end signal, scoring queue, determinism ----------

EXTREMES = [{"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 1e-320}, {"temperature": 1e308},
            {"temperature": 1.7976931348623157e308}, {"temperature": 1.0, "top_p": 1e-320},
            {"temperature": 1.0, "top_p": 5e-324}, {"temperature": 1e-45, "top_p": 1e-45},
            {"temperature": 1.0, "top_k": 2**62}, {"temperature": 1e-320, "top_k": 1, "top_p": 1e-320}]


@pytest.mark.parametrize("kw", EXTREMES, ids=lambda kw: ",".join(f"{k}={v:g}" for k, v in kw.items()))
def test_sample_is_valid_for_every_valid_parameter_value(kw):
    """Any finite temperature > 0 and any top_p in (0, 1] give a real distribution (no NaN)."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9, float("-inf")], [1e4, -1e4, 0.0, 5.0, 4.0]])
    params = SamplingParams(**kw)
    for seed in range(20):
        ids = sample(logits, params, torch.Generator().manual_seed(seed))
        assert ids.shape == (2,) and all(0 <= i < 5 for i in ids.tolist()) and ids[0] != 4  # -inf: never
        if params.temperature < 1e-30 or params.top_p < 1e-30 or params.top_k == 1:
            assert ids.tolist() == [1, 0]  # as good as greedy


@pytest.mark.parametrize("kw", [{"temperature": float("inf")}, {"temperature": float("nan")},
                                {"temperature": -1e-300}, {"top_p": float("nan")}, {"top_p": float("inf")},
                                {"seed": 2**64}, {"seed": -(2**63) - 1}, {"seed": 1.5}, {"top_k": True},
                                {"stop": [3]}])
def test_sampling_params_refuse_values_without_meaning(kw):
    with pytest.raises(SmallCoderError, match=next(iter(kw))):
        SamplingParams(**kw)


def test_extreme_temperature_generates_greedy_text(engine):
    want = engine.generate(PROMPTS, greedy(12))
    got = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=1e-45, seed=0, stop_at_eos=False))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_a_failing_sample_fails_that_request_alone(monkeypatch, model, tok):
    """One request's sampler raising ends that request with the error; its batch companions
    (greedy and sampled) decode on to exactly the tokens they get alone."""
    real = gen_mod.sample

    def picky(logits, params, generator):
        if params.seed == 666:
            raise RuntimeError("sampler exploded")
        return real(logits, params, generator)

    engine = Engine(model, tok, max_batch=4)
    sampled = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, stop_at_eos=False)
    alone = [engine.generate(["def"], greedy(10))[0], engine.generate(["for i in"], sampled)[0]]
    monkeypatch.setattr(gen_mod, "sample", picky)
    reqs = [engine.submit("def", greedy(10)), engine.submit("The lazy dog", SamplingParams(
        max_new_tokens=10, temperature=1.0, seed=666)), engine.submit("for i in", sampled)]
    engine.run(reqs)
    with pytest.raises(RuntimeError, match="sampler exploded"):
        reqs[1].result()
    assert reqs[1].completion.finish_reason == "error"
    assert [reqs[0].result().token_ids, reqs[2].result().token_ids] == [c.token_ids for c in alone]
    assert engine.num_active == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("everywhere", [True, False])
def test_non_finite_logits_fail_the_request_with_a_clear_error(monkeypatch, fresh, bad, everywhere):
    """NaN or +inf in any one logit fails the request (-inf is a masked token, not an error)."""
    orig = fresh.model.forward

    def spoiled(*a, **kw):
        out = orig(*a, **kw)
        if everywhere:
            return out * bad
        out[..., 7] = bad
        out[..., 9] = -float("inf")
        return out

    monkeypatch.setattr(fresh.model, "forward", spoiled)
    with pytest.raises(SmallCoderError, match="not finite"):
        fresh.generate(["def"], greedy(4))
    monkeypatch.undo()
    assert len(fresh.generate(["def"], greedy(4))[0].token_ids) == 4


def test_the_end_signal_comes_after_the_result(model, tok):
    """on_piece(None) is sent once `done` is set and the result is in place (no polling needed)."""
    engine = Engine(model, tok, max_batch=2)
    seen = []

    def listen(request_box):
        def on_piece(piece):
            if piece is None:
                r = request_box[0]
                seen.append((r.done.is_set(), r.completion is not None and r.completion.finish_reason))
        return on_piece

    boxes = [[], [], []]
    reqs = [engine.submit("def", greedy(5), on_piece=listen(boxes[0])),
            engine.submit("for", SamplingParams(max_new_tokens=0), on_piece=listen(boxes[1])),
            engine.submit("x", greedy(50), on_piece=listen(boxes[2]))]
    for box, r in zip(boxes, reqs):
        box.append(r)
    reqs[2].cancel()
    engine.run(reqs)
    assert sorted(seen) == [(True, "cancelled"), (True, "length"), (True, "length")]


def test_scoring_is_an_engine_request_queued_and_cancellable(model, tok):
    engine = Engine(model, tok)
    ids = tok.encode("def add(a, b):\n    return a + b")
    job = engine.submit_score(ids, top=2)
    assert engine.num_queued == 1  # counted like a generation
    engine.run([job])
    scores = job.result()
    assert scores == engine.token_logprobs(ids, top=2) and len(scores) == len(ids) - 1
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        cancelled = engine.submit_score(ids)
        cancelled.cancel()
        engine.run([cancelled])
    finally:
        model._forward_pre_hooks.clear()
    assert calls == [] and cancelled.done.is_set()
    with pytest.raises(SmallCoderError, match="cancelled"):
        cancelled.result()


def _model_in(dtype, micro_config, init=0.02):
    from smallcoder import new_model
    from smallcoder.quant import quantize_model

    config = micro_config.replace(initializer_range=init)
    if dtype == "int8":
        return quantize_model(new_model(config, seed=3)).eval()
    return new_model(config, seed=3, dtype=dtype).eval()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_greedy_is_bit_identical_with_or_without_prefix_reuse(monkeypatch, dtype, micro_config, tok):
    """Repeats, prompts that extend earlier ones (reusing their cached prefix) and an engine
    without reuse see the same logits bit for bit at every step, so greedy tokens agree in every
    dtype; batch companions do not change a greedy row's tokens either."""
    model = _model_in(dtype, micro_config)
    g = torch.Generator().manual_seed(7)
    base = torch.randint(1, micro_config.vocab_size, (70,), generator=g).tolist()
    prompts = [base[:37], base[:37], base[:53], base[:70], base[:33] + [5, 6, 7], base[:16], base[:17]]
    real, seen = gen_mod.sample, []
    monkeypatch.setattr(gen_mod, "sample", lambda logits, p, gen: seen.append(logits.clone()) or real(logits, p, gen))

    def run(engine, prompt):
        seen.clear()
        ids = engine.generate([prompt], greedy(12))[0].token_ids
        return ids, torch.stack(seen)

    reuse = Engine(model, tok, max_batch=3, prefill_chunk=16)
    plain = Engine(model, tok, max_batch=3, prefill_chunk=16, prefix_cache=False)
    got = [run(reuse, p) for p in prompts]
    assert reuse.reused_tokens >= 16 * 6  # the cached path really ran
    for p, (ids, logits) in zip(prompts, got):
        want_ids, want_logits = run(plain, p)
        assert ids == want_ids
        assert torch.equal(logits, want_logits), (dtype, len(p))
    together = [c.token_ids for c in plain.generate(prompts[2:5], greedy(12))]
    assert together == [ids for ids, _ in got[2:5]]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_requests_end_even_if_the_background_loop_dies(monkeypatch, model, tok):
    """Listeners rely on the end signal alone (no sweep): a loop that dies still ends every request."""

    class Died(BaseException):
        pass

    engine = Engine(model, tok, max_batch=1)
    ended = []
    monkeypatch.setattr(engine, "_step", lambda: (_ for _ in ()).throw(Died()))
    reqs = [engine.submit(p, greedy(5), on_piece=lambda piece, i=i: piece is None and ended.append(i))
            for i, p in enumerate(["def", "for"])]
    engine.start()
    for r in reqs:
        assert r.done.wait(30)
        with pytest.raises(SmallCoderError, match="background loop stopped"):
            r.result()
    assert sorted(ended) == [0, 1]
    engine._thread.join(30)
    assert not engine.alive


def test_queued_prompts_prefill_together_and_change_nothing(model, tok):
    """Prompts queued at once share each prefill round's call (one weight pass for all of them in
    the C++ kernel), with the tokens each gets alone; prompts sharing a whole chunk wait a step so
    the later ones reuse it."""
    prompts = ["def add(a, b):", "The lazy dog", "for i in range(10):", "x = 1"]
    alone = Engine(model, tok, max_batch=1, prefill_chunk=8)
    want = [alone.generate([p], greedy(8))[0].token_ids for p in prompts]
    engine = Engine(model, tok, max_batch=4, prefill_chunk=8)
    calls = []
    orig = model.forward_rows

    def spy(tokens, cache, rows, *a, **kw):
        calls.append(sorted({int(r) for r in rows}))
        return orig(tokens, cache, rows, *a, **kw)

    model.forward_rows = spy
    try:
        got = [c.token_ids for c in engine.generate(prompts, greedy(8))]
    finally:
        del model.forward_rows
    assert got == want
    assert calls[0] == [0, 1, 2, 3]  # the first round: every prompt's first chunk in one call
    shared = "User: hi\nAssistant: hello there\n" * 3
    few_shot = [shared + t for t in ("def", "for i in", "x = 1")]
    fresh = Engine(model, tok, max_batch=4, prefill_chunk=8)
    assert [c.token_ids for c in fresh.generate(few_shot, greedy(5))] == \
        [alone.generate([p], greedy(5))[0].token_ids for p in few_shot]
    assert fresh.reused_tokens >= 2 * ((len(tok.encode(shared)) - 1) // 8 * 8)

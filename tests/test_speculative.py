"""Speculative decoding: drafts verified in one multi-position step, output as without them."""

from __future__ import annotations

import copy

import pytest
import torch

from smallcoder import Engine, SamplingParams, SmallCoderError, new_model
from smallcoder.inference.sampling import probabilities
from smallcoder.inference.speculative import (
    Draft,
    Lookup,
    Planner,
    RowStats,
    Speculation,
    accept,
    check_same_tokenizer,
    parse_speculative,
)

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown",
    "User: hello there\nAssistant: hi",
    "x",
]


@pytest.fixture(scope="module")
def target(micro_config):
    return new_model(micro_config, seed=1).eval()


@pytest.fixture(scope="module")
def other(micro_config):
    """A second random model with the same tokenizer: a draft that is often wrong."""
    return new_model(micro_config, seed=7).eval()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def run(model, tok, prompts, params, spec=None, use_kernel=True, max_batch=4):
    engine = Engine(model, tok, max_batch=max_batch, speculative=spec, use_kernel=use_kernel)
    return engine, engine.generate(prompts, params)


# ---- the parts ---------------------------------------------------------------------------------


def test_parse_speculative_values_and_errors():
    assert parse_speculative("off") is None and parse_speculative(None) is None
    assert parse_speculative("lookup").source == "lookup"
    spec = parse_speculative("draft:runs/small/final")
    assert (spec.source, spec.draft_path) == ("draft", "runs/small/final")
    with pytest.raises(SmallCoderError, match="unknown value 'ngram'.*lookup \\| draft:PATH \\| off"):
        parse_speculative("ngram")
    with pytest.raises(SmallCoderError, match="needs the draft checkpoint"):
        parse_speculative("draft:")
    with pytest.raises(SmallCoderError, match="max_draft"):
        Speculation("lookup", max_draft=0)


def test_lookup_proposes_what_followed_the_latest_longest_match():
    lk = Lookup()
    lk.extend([1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3])
    assert lk.propose(3) == [4, 5, 7]  # "2 3" last seen before 4 (the 3-gram "7 2 3" never occurred)
    lk.extend([1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 2, 3, 9])
    assert lk.propose(2) == [1, 2]  # the 3-gram "2 3 9" occurred once, followed by 1 2
    fresh = Lookup()
    fresh.extend([5, 6, 7])
    assert fresh.propose(4) == []  # the suffix never matches itself
    fresh.extend([5, 6, 7, 5])
    assert fresh.propose(4) == [6, 7, 5]  # up to the end of the sequence


def test_planner_drafts_where_it_pays_and_stops_where_it_does_not():
    planner = Planner(Speculation("lookup", max_draft=8), prior=0.5)
    for m, t in ((1, 0.020), (4, 0.025), (1, 0.020), (8, 0.041)):
        planner.cost.add(m, t)
    good, bad = RowStats(0.9), RowStats(0.05)
    assert planner.lengths([(0, good, 8)])[0] >= 4
    assert planner.lengths([(0, bad, 8)]) == {}
    assert planner.lengths([(0, good, 2)])[0] <= 2  # never past the row's cap
    batch = [(i, RowStats(0.4), 8) for i in range(32)]
    assert sum(planner.lengths(batch).values()) == 0  # a full batch keeps the cores busy already
    for _ in range(200):  # no drafts: the estimate relaxes toward the prior, so the row probes again
        planner.settle(bad, 0, 0)
    assert bad.alpha > 0.45


def test_accept_greedy_keeps_the_argmax_prefix():
    probs = torch.zeros(4, 5, dtype=torch.float64)
    for j, best in enumerate([2, 3, 1, 4]):
        probs[j, best] = 1.0
    params = greedy(8)
    assert accept(Draft([2, 3, 1]), probs, params, None) == [2, 3, 1, 4]  # all kept, plus the bonus
    assert accept(Draft([2, 0, 1]), probs, params, None) == [2, 3]  # the first miss is corrected
    assert accept(Draft([]), probs[:1], params, None) == [2]


@pytest.mark.parametrize("draft_q", ["point", "other"])
def test_speculative_sampling_keeps_the_target_distribution(draft_q):
    """The token emitted at the first position of a drafted span follows p exactly (chi-square over
    20,000 draws, fixed seed), whether the draft is a point mass or drawn from another q."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.5, 0.05, 0.1, 0.05, 0.3], dtype=torch.float64)
    probs = torch.stack([p, p])
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        if draft_q == "point":
            d = Draft([0])  # a lookup draft of the least likely token
        else:
            x = int(torch.multinomial(q, 1, generator=g))
            d = Draft([x], q[None])
        counts[accept(d, probs, params, g)[0]] += 1
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 18.5, (chi2, counts / n)  # 4 degrees of freedom: p = 0.001


def test_a_draft_model_with_another_tokenizer_is_refused(small_tokenizer, fim_checkpoint):
    from smallcoder import load

    _, fim_tok = load(fim_checkpoint)
    with pytest.raises(SmallCoderError, match="draft.*tokenizer.*differs|draft.*tokenizer has"):
        check_same_tokenizer(fim_tok, small_tokenizer, "--speculative draft:x")


# ---- the engine: greedy output as plain decoding ------------------------------------------------


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "pytorch"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_lookup_greedy_equals_plain(target, small_tokenizer, use_kernel, k):
    params = greedy(40)
    _, plain = run(target, small_tokenizer, PROMPTS, params, use_kernel=use_kernel)
    spec = Speculation("lookup", max_draft=k, adaptive=False)
    engine, fast = run(target, small_tokenizer, PROMPTS, params, spec, use_kernel=use_kernel)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    assert [c.text for c in fast] == [c.text for c in plain]
    assert [c.finish_reason for c in fast] == [c.finish_reason for c in plain]
    assert engine.drafted_tokens > 0 and sum(c.drafted_tokens for c in fast) == engine.drafted_tokens


@pytest.mark.parametrize("which", ["self", "other"])
def test_draft_model_greedy_equals_plain(target, other, small_tokenizer, which):
    params = greedy(30)
    _, plain = run(target, small_tokenizer, PROMPTS, params)
    draft = target if which == "self" else other
    spec = Speculation("draft", max_draft=4, adaptive=False, draft_model=(copy.deepcopy(draft), small_tokenizer))
    engine, fast = run(target, small_tokenizer, PROMPTS, params, spec)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    if which == "self":  # the target drafting for itself: every draft is kept
        assert engine.accepted_tokens == engine.drafted_tokens > 0
    else:
        assert engine.accepted_tokens < engine.drafted_tokens


def test_adaptive_lookup_equals_plain_in_a_mixed_batch(target, small_tokenizer):
    params = greedy(48)
    prompts = PROMPTS * 3
    _, plain = run(target, small_tokenizer, prompts, params, max_batch=6)
    _, fast = run(target, small_tokenizer, prompts, params, "lookup", max_batch=6)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]


def test_stop_strings_inside_a_drafted_span(target, small_tokenizer):
    """The target drafting for itself keeps whole spans: a stop string met inside one ends the
    text where plain decoding ends it, and the tokens after it are not emitted."""
    base = run(target, small_tokenizer, PROMPTS[:2], greedy(40))[1]
    stops = []
    for c in base:
        text = c.text
        stops.append(text[len(text) // 2:len(text) // 2 + 3] if len(text) > 8 else "zzz")
    spec = Speculation("draft", max_draft=6, adaptive=False, draft_model=(copy.deepcopy(target), small_tokenizer))
    for prompt, stop in zip(PROMPTS[:2], stops):
        params = greedy(40, stop=[stop])
        _, plain = run(target, small_tokenizer, [prompt], params)
        _, fast = run(target, small_tokenizer, [prompt], params, spec)
        assert (fast[0].text, fast[0].finish_reason, fast[0].stop_reason) == \
            (plain[0].text, plain[0].finish_reason, plain[0].stop_reason)
        assert fast[0].finish_reason == "stop"


def test_eos_inside_a_drafted_span(target, small_tokenizer):
    """A model that says EOS where it would say its favourite token (its lm_head row copied to EOS's,
    so the tie goes to the lower id): drafts carry EOS mid-span and generation stops there."""
    prompt = PROMPTS[0]
    ids = run(target, small_tokenizer, [prompt], greedy(30))[1][0].token_ids
    favourite = max(set(ids[3:]), key=ids.count)
    eosy = copy.deepcopy(target)
    with torch.no_grad():
        eosy.lm_head.weight[small_tokenizer.eos_id] = eosy.lm_head.weight[favourite]
    params = greedy(30)
    _, plain = run(eosy, small_tokenizer, [prompt], params)
    assert plain[0].finish_reason == "stop" and plain[0].stop_reason == small_tokenizer.eos_id
    spec = Speculation("draft", max_draft=8, adaptive=False, draft_model=(copy.deepcopy(eosy), small_tokenizer))
    _, fast = run(eosy, small_tokenizer, [prompt], params, spec)
    assert (fast[0].token_ids, fast[0].finish_reason) == (plain[0].token_ids, "stop")


def test_cancel_mid_draft_stops_where_plain_decoding_stops(target, small_tokenizer):
    """A listener that cancels after the 5th piece: the text ends at that piece, as without drafts
    (the rest of the accepted span is not emitted)."""
    def cancelling(engine):
        pieces = []

        def on_piece(piece):
            if piece:
                pieces.append(piece)
                if len(pieces) == 5:
                    request.cancel()
        request = engine.submit(PROMPTS[1], greedy(40), on_piece=on_piece)
        engine.run([request])
        return request.result(), pieces

    plain, plain_pieces = cancelling(Engine(target, small_tokenizer))
    spec = Speculation("draft", max_draft=8, adaptive=False, draft_model=(copy.deepcopy(target), small_tokenizer))
    fast, fast_pieces = cancelling(Engine(target, small_tokenizer, speculative=spec))
    assert plain.finish_reason == fast.finish_reason == "cancelled"
    assert fast_pieces == plain_pieces and fast.text == plain.text


def test_drafts_never_pass_the_length_budget_or_the_context(target, small_tokenizer, micro_config):
    spec = Speculation("draft", max_draft=8, adaptive=False, draft_model=(copy.deepcopy(target), small_tokenizer))
    for n in (1, 2, 5, 9):
        _, plain = run(target, small_tokenizer, PROMPTS[:2], greedy(n))
        _, fast = run(target, small_tokenizer, PROMPTS[:2], greedy(n), spec)
        assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
        assert all(len(c.token_ids) <= n for c in fast)
    long_prompt = list(range(5, 5 + micro_config.max_position_embeddings - 4))
    _, plain = run(target, small_tokenizer, [long_prompt], greedy(50))
    _, fast = run(target, small_tokenizer, [long_prompt], greedy(50), spec)
    assert fast[0].token_ids == plain[0].token_ids and len(fast[0].token_ids) == 4


# ---- the engine: sampled output keeps the target's distribution --------------------------------


def test_engine_speculative_sampling_matches_the_target_distribution(target, small_tokenizer):
    """Three sampled tokens (top-k 3, so 27 outcomes) over 4,000 seeds, the 2nd and 3rd drafted by
    a perturbed copy of the target (kept, rejected and corrected, or the bonus draw): their frequencies against the
    target's exact joint distribution (chi-square, p = 0.001)."""
    params = SamplingParams(max_new_tokens=3, temperature=1.5, top_k=3, stop_at_eos=False)
    prompt = small_tokenizer.encode(PROMPTS[2])

    def dist(ids):
        return probabilities(target(torch.tensor([ids]))[:, -1], params)[0]

    exact = {}
    with torch.inference_mode():
        p1 = dist(prompt)
        for t1 in p1.nonzero().flatten().tolist():
            p2 = dist(prompt + [t1])
            for t2 in p2.nonzero().flatten().tolist():
                p3 = dist(prompt + [t1, t2])
                for t3 in p3.nonzero().flatten().tolist():
                    exact[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])
    near = copy.deepcopy(target)  # a draft near the target, so drafts are kept and rejected both
    with torch.no_grad():
        near.lm_head.weight.add_(torch.randn(near.lm_head.weight.shape, generator=torch.Generator().manual_seed(3)),
                                 alpha=0.1)
    spec = Speculation("draft", max_draft=1, adaptive=False, draft_model=(near, small_tokenizer))
    engine = Engine(target, small_tokenizer, max_batch=16, speculative=spec)
    n = 4000
    requests = [engine.submit(prompt, SamplingParams(**{**params.__dict__, "seed": s})) for s in range(n)]
    engine.run(requests)
    counts = dict.fromkeys(exact, 0)
    for r in requests:
        counts[tuple(r.result().token_ids)] += 1
    assert 0.2 * engine.drafted_tokens < engine.accepted_tokens < 0.9 * engine.drafted_tokens
    chi2 = sum((counts[c] - n * e) ** 2 / (n * e) for c, e in exact.items())
    assert len(exact) == 27
    assert chi2 < 54.05, (chi2, counts, exact)  # 26 degrees of freedom, p = 0.001


# ---- the commands ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "serve"])
def test_unknown_speculative_value_is_one_line(micro_checkpoint, capsys, command):
    from smallcoder.cli import main

    extra = {"generate": ["--prompt", "x"], "chat": [], "eval": ["--tasks", "wikitext2"], "serve": []}[command]
    assert main([command, "--model", str(micro_checkpoint), *extra, "--speculative", "ngram"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("smallcoder: error: --speculative: unknown value 'ngram'; choose lookup | draft:PATH | off")


def test_draft_with_another_tokenizer_is_one_line(micro_checkpoint, fim_checkpoint, capsys):
    from smallcoder.cli import main

    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "x",
                 "--speculative", f"draft:{fim_checkpoint}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"draft:{fim_checkpoint}" in err and "tokenizer" in err


def test_generate_speculative_prints_the_same_text_and_the_drafts_kept(micro_checkpoint, capsys):
    from smallcoder.cli import main

    prompt = PROMPTS[0]
    args = ["generate", "--model", str(micro_checkpoint), "--prompt", prompt, "--max-new-tokens", "24", "--verbose"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--speculative", f"draft:{micro_checkpoint}"]) == 0
    fast = capsys.readouterr()
    assert fast.out == plain.out
    assert "drafts kept" not in plain.err
    kept = fast.err.split("drafts kept ")[1].split("]")[0]
    done, drafted = map(int, kept.split("/"))
    assert 0 < done == drafted  # the model drafting for itself: every draft kept


def test_planner_counts_what_a_draft_model_costs():
    planner = Planner(Speculation("draft", max_draft=8), prior=0.5)
    for m, t in ((1, 0.020), (4, 0.025)):
        planner.cost.add(m, t)
    row = [(0, RowStats(0.6), 8)]
    free = sum(planner.lengths(row).values())
    planner.draft_cost = 0.01  # a draft token costs half a step: only the likeliest is worth it
    assert 0 < sum(planner.lengths(row).values()) < free
    planner.draft_cost = 0.05
    assert planner.lengths(row) == {}

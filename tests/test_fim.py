"""Fill-in-the-middle training data (smallcoder.data.fim): the split, both orders' token layout,
the rate, short and non-ASCII documents, cut characters at a context's edge, and, through the
mixture loader, the loss on all tokens, unchanged token counts, determinism across a resume and
ranks, and refusing a tokenizer without the FIM tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smallcoder import SmallCoderError
from smallcoder.data.fim import MIN_CHARS, FimTransform, record_rng, split_points
from smallcoder.data.mixture import Component, MixtureLoader
from smallcoder.prompts import FIM_PAD, FIM_TOKENS, fim_prompt

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * 2)\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
        "Grüße aus Köln: 日本語のテキスト ✓ — ça va?\n", "# 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ E⋅da = Q\nx = 'ωσ'\n"]
# a last document that takes the cut back to the record's length, so the ones before it stay whole
FILLER = "# " + "the filler words of a long comment " * 12 + "\n"


@pytest.fixture(scope="module")
def tok():
    """A StarCoder-shaped byte-level BPE (the FIM tokens among its specials), trained here."""
    from smallcoder.tokenizer_train import train_tokenizer

    return train_tokenizer(CODE * 40, 420)


def _sentinels(tok):
    return [tok.token_to_id(t) for t in FIM_TOKENS]


def _context(tok, docs):
    """Documents packed as the store packs them: each followed by EOS."""
    ids = []
    for d in docs:
        ids += tok.encode(d) + [tok.eos_id]
    return np.asarray(ids, dtype=np.uint16)


def _segments(ids, eos):
    """The record split at EOS, as lists (the last one may be empty)."""
    out, cur = [], []
    for t in ids.tolist():
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [*out, cur]


def _parse(tok, seg, psm_only=False):
    """(order, prefix, middle, suffix) of one transformed segment, from its sentinels; None if plain.
    PSM with an empty prefix is laid out as SPM is (`<pre><suf>` first): read as SPM unless `psm_only`."""
    pre, suf, mid = _sentinels(tok)
    if not seg or seg[0] != pre:
        return None
    s, m = seg.index(suf), seg.index(mid)
    if s == 1 and not psm_only:  # SPM: <pre><suf> suffix <mid> prefix+middle
        return "spm", None, tok.decode(seg[m + 1:]), tok.decode(seg[2:m])
    return "psm", tok.decode(seg[1:s]), tok.decode(seg[m + 1:]), tok.decode(seg[s + 1:m])


class Fixed:
    """A stand-in generator for the first segment (its coin, its two split draws, its order coin,
    in that order); every later segment's coin lands at 0.99, not drawn."""

    def __init__(self, coin, a, b, order_coin):
        self.values, self.splits = [coin, order_coin], [a, b]

    def random(self):
        return self.values.pop(0) if self.values else 0.99

    def integers(self, low, high, size):
        assert (low, size) == (0, 2)
        assert all(0 <= x < high for x in self.splits)
        return np.asarray(self.splits)


# ---- the split ------------------------------------------------------------------------------------


def test_split_points_are_in_range_and_uniform():
    rng = np.random.default_rng(0)
    n, draws = 9, 20_000
    pairs = [split_points(n, rng) for _ in range(draws)]
    assert all(0 <= a <= b <= n for a, b in pairs)
    # the two sorted points together are the two uniform draws: each of 0..n as often as the others
    counts = np.bincount([x for p in pairs for x in p], minlength=n + 1)
    expected = 2 * draws / (n + 1)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, counts  # chi-square, 9 degrees of freedom, p = 0.001
    # ... independent: the two land on the same position 1 time in n + 1 (an empty middle)
    same = sum(a == b for a, b in pairs) / draws
    assert abs(same - 1 / (n + 1)) < 4 * np.sqrt(0.1 * 0.9 / draws)
    assert split_points(0, rng) == (0, 0)


def test_split_points_of_transformed_documents_cover_the_document(tok):
    """Every part may be empty, and the three parts always give the document back."""
    doc = "x = 12\n"  # 8 positions: each part is empty often
    fim = FimTransform(tok, 1.0, 0.0)
    seen_empty = {"prefix": 0, "middle": 0, "suffix": 0}
    for i in range(200):
        out = fim.apply([_context(tok, [doc, FILLER])], [record_rng(1, 2, 0, i)])[0]
        _, prefix, middle, suffix = _parse(tok, _segments(out, tok.eos_id)[0], psm_only=True)
        assert prefix + middle + suffix == doc
        for name, part in (("prefix", prefix), ("middle", middle), ("suffix", suffix)):
            seen_empty[name] += part == ""
    assert all(v > 0 for v in seen_empty.values()), seen_empty


# ---- the token layout of both orders --------------------------------------------------------------


@pytest.mark.parametrize("order_coin, order", [(0.9, "psm"), (0.1, "spm")])
def test_both_orders_exact_token_layout(tok, order_coin, order):
    doc, other = "def add(a, b):\n    return a + b\n", "x = 1\n"
    a, b = 4, 15  # "def " | "add(a, b):\n" | "    return a + b\n"
    pre, suf, mid = _sentinels(tok)
    record = _context(tok, [doc, other])
    fim = FimTransform(tok, 0.5, 0.5)
    out = fim.apply([record], [Fixed(0.2, b, a, order_coin)])[0]  # the draws unsorted: sorted by the split
    p, m, s = tok.encode(doc[:a]), tok.encode(doc[a:b]), tok.encode(doc[b:])
    body = [pre, *p, suf, *s, mid, *m] if order == "psm" else [pre, suf, *s, mid, *p, *m]
    want = [*body, tok.eos_id, *tok.encode(other), tok.eos_id]  # then cut to the record's length
    assert out.tolist() == want[:len(record)] + [tok.token_to_id(FIM_PAD)] * (len(record) - len(want))
    # the same text as the protocol's fim_prompt, at the token level
    assert tok.decode(body) == fim_prompt(doc[:a], doc[b:], doc[a:b], order=order)


def test_not_drawn_and_rate_zero_leave_the_record(tok):
    record = _context(tok, CODE[:3])
    assert FimTransform(tok, 0.5, 0.5).apply([record], [Fixed(0.7, 0, 0, 0.7)])[0].tolist() == record.tolist()
    out = FimTransform(tok, 0.0, 0.5).apply([record], [record_rng(0, 0, 0, 0)])[0]
    assert out.tolist() == record.tolist()


# ---- the rate --------------------------------------------------------------------------------------


def test_rate_is_the_share_of_transformed_documents(tok):
    fim = FimTransform(tok, 0.3, 0.25)
    records = [_context(tok, [*CODE[:4], FILLER]) for _ in range(600)]  # 2,400 documents, none cut
    outs = fim.apply(records, [record_rng(5, 9, 0, i) for i in range(len(records))])
    parsed = [_parse(tok, seg) for out in outs for seg in _segments(out, tok.eos_id)[:4]]
    assert len(parsed) == 2400
    done = [(p, len(CODE[j % 4])) for j, p in enumerate(parsed) if p is not None]
    share = len(done) / len(parsed)
    assert abs(share - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 2400), share
    # SPM 1 time in 4; a PSM example whose prefix is empty (n characters: 1 - (n / (n + 1))^2) looks the same
    looks_spm = sum(p[0] == "spm" for p, _ in done) / len(done)
    want = float(np.mean([0.25 + 0.75 * (1 - (n / (n + 1)) ** 2) for _, n in done]))
    assert abs(looks_spm - want) < 4 * np.sqrt(want * (1 - want) / len(done)), (looks_spm, want)


# ---- edge cases ------------------------------------------------------------------------------------


def test_documents_shorter_than_3_characters_are_kept(tok):
    docs = ["ab", "x", "ü", "a longer document, transformed\n", FILLER]
    record = _context(tok, docs)
    for i in range(20):
        out = FimTransform(tok, 1.0, 0.5).apply([record], [record_rng(0, 0, 0, i)])[0]
        segs = _segments(out, tok.eos_id)
        assert [tok.decode(s) for s in segs[:3]] == ["ab", "x", "ü"]
        assert _parse(tok, segs[3]) is not None
    assert MIN_CHARS == 3


def test_non_ascii_text_splits_at_character_boundaries(tok):
    doc = CODE[4] + CODE[3]  # 4-byte, 3-byte and 2-byte characters, several tokens each
    assert len(doc.encode()) > len(doc) + 20
    fim = FimTransform(tok, 1.0, 0.0)
    cuts = set()
    for i in range(200):
        out = fim.apply([_context(tok, [doc, FILLER])], [record_rng(3, 4, 0, i)])[0]
        seg = _segments(out, tok.eos_id)[0]
        _, prefix, middle, suffix = _parse(tok, seg, psm_only=True)
        assert "\ufffd" not in prefix + middle + suffix  # no piece holds part of a character
        assert prefix + middle + suffix == doc
        cuts |= {len(prefix), len(prefix) + len(middle)}
        # each piece is tokenized on its own, exactly as the tokenizer encodes that text
        _, suf, mid = _sentinels(tok)
        s, m = seg.index(suf), seg.index(mid)
        assert seg[1:s] == tok.encode(prefix) and seg[s + 1:m] == tok.encode(suffix)
        assert seg[m + 1:] == tok.encode(middle)
    assert len(cuts) > 40  # the splits fall all over the document, at character positions


def test_a_character_cut_at_the_context_edge_is_left_alone(tok):
    """A record that starts inside a multi-byte character: its first segment does not decode to
    whole characters, so it is kept as it is rather than train a spurious U+FFFD."""
    doc = "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 text\n"
    ids = tok.encode(doc)
    cut = next(k for k in range(1, len(ids)) if "\ufffd" in tok.decode(ids[k:]))
    record = np.asarray([*ids[cut:], tok.eos_id, *_context(tok, [CODE[0], FILLER])], dtype=np.uint16)
    for i in range(10):
        out = FimTransform(tok, 1.0, 0.5).apply([record], [record_rng(0, 0, 0, i)])[0]
        segs = _segments(out, tok.eos_id)
        assert segs[0] == ids[cut:]
        assert _parse(tok, segs[1]) is not None


def test_records_keep_their_length_cut_or_padded(tok):
    record = _context(tok, CODE[:3])
    fim = FimTransform(tok, 1.0, 0.5)
    outs = fim.apply([record] * 50, [record_rng(0, 0, 0, i) for i in range(50)])
    assert all(len(o) == len(record) and o.dtype == record.dtype for o in outs)
    assert all(o[-1] != tok.eos_id for o in outs)  # three sentinels more: the end is cut
    # a record spelled in single bytes re-tokenizes shorter: padded with <fim_pad>
    text = "returnreturnreturnreturnreturn"
    spelled = np.asarray([tok.token_to_id(c) for c in text], dtype=np.uint16)
    out = fim.apply([spelled], [Fixed(0.0, 6, 12, 0.9)])[0]
    pre, suf, mid = _sentinels(tok)
    body = [pre, *tok.encode(text[:6]), suf, *tok.encode(text[12:]), mid, *tok.encode(text[6:12])]
    assert len(body) < len(spelled)
    assert out.tolist() == body + [tok.token_to_id(FIM_PAD)] * (len(spelled) - len(body))


def test_a_tokenizer_without_fim_tokens_is_refused(small_tokenizer):
    assert small_tokenizer.token_to_id("<fim_prefix>") is not None  # one of the three only
    with pytest.raises(SmallCoderError, match=r"^FIM needs <fim_prefix>, <fim_suffix>, <fim_middle> as single "
                                              r"tokens of the tokenizer, which lacks <fim_suffix>, <fim_middle>$"):
        FimTransform(small_tokenizer, 0.5, 0.5)
    with pytest.raises(SmallCoderError, match=r"fim_rate must be a number in \[0, 1\], got 1.5"):
        FimTransform(small_tokenizer, 1.5, 0.5)


# ---- through the mixture loader -------------------------------------------------------------------


class Packed:
    """Packed records cut from one EOS-joined stream, as the store holds them."""

    kind = "packed"

    def __init__(self, tok, seq_len=48, docs=400):
        stream = _context(tok, [CODE[i % len(CODE)] for i in range(docs)])
        self.seq_len = seq_len
        self.records = [(stream[i:i + seq_len], None) for i in range(0, len(stream) - seq_len + 1, seq_len)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


def _loader(tok, fim=None, seed=3, **kw):
    comps = [Component("code", Packed(tok), 0.7), Component("more", Packed(tok, docs=300), 0.3)]
    args = {"seq_len": 48, "global_batch": 8, "micro_batch": 2, "seed": seed, "pad_id": tok.eos_id, "fim": fim}
    return MixtureLoader(comps, **{**args, **kw})


def _ids(step):
    return [mb["input_ids"].tolist() for mb in step.micro_batches]


def test_loader_trains_every_token_and_keeps_the_token_counts(tok):
    plain, fim = _loader(tok), _loader(tok, FimTransform(tok, 1.0, 0.5))
    pre = tok.token_to_id(FIM_TOKENS[0])
    for _ in range(6):
        a, b = plain.next_step(), fim.next_step()
        assert a.records == b.records  # the same records drawn, transformed
        assert (a.tokens, a.num_loss_tokens, a.tokens_seen) == (b.tokens, b.num_loss_tokens, b.tokens_seen)
        assert a.tokens == 8 * 48 and b.num_loss_tokens == 8 * 47
        for mb in b.micro_batches:
            assert mb["input_ids"].shape == (2, 48)
            assert (mb["labels"] == mb["input_ids"]).all()  # nothing masked: the loss shifts the labels
            assert mb["num_loss_tokens"] == 2 * 47
        assert any(pre in row for mb in _ids(b) for row in mb)
    assert plain.state_dict()["components"] == fim.state_dict()["components"]


def test_loader_fim_is_deterministic_across_a_resume_and_ranks(tok):
    fim = FimTransform(tok, 0.5, 0.5)
    k, m = 5, 7
    straight = _loader(tok, fim)
    expected = [_ids(straight.next_step()) for _ in range(k + m)][k:]
    first = _loader(tok, fim)
    for _ in range(k):
        first.next_step()
    state = json.loads(json.dumps(first.state_dict()))
    assert state["fim"] == {"rate": 0.5, "spm_rate": 0.5}
    resumed = _loader(tok, fim)
    resumed.load_state_dict(state)
    assert [_ids(resumed.next_step()) for _ in range(m)] == expected
    # two ranks: each transforms its own records exactly as the single process does
    halves = []
    for rank in range(2):
        r = _loader(tok, fim, rank=rank, world_size=2)
        r.load_state_dict(state)
        halves.append([_ids(r.next_step()) for _ in range(m)])
    assert [a + b for a, b in zip(*halves)] == expected
    # another seed gives other examples; the epoch keys the draw, so a record drawn again is split anew
    other = _loader(tok, fim, seed=4)
    assert [_ids(other.next_step()) for _ in range(k + m)][k:] != expected
    record = Packed(tok).records[0][0]
    always = FimTransform(tok, 1.0, 0.5)
    again = [always.apply([record], [record_rng(3, 1, epoch, 0)])[0].tolist() for epoch in (0, 0, 1)]
    assert again[0] == again[1] != again[2]


def test_loader_refuses_a_state_with_other_fim_settings(tok):
    state = _loader(tok, FimTransform(tok, 0.5, 0.5)).state_dict()
    with pytest.raises(SmallCoderError, match="FIM settings were .*'rate': 0.5.* but this loader has None"):
        _loader(tok).load_state_dict(state)

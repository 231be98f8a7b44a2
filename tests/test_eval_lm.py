"""Log-likelihood scoring (`Engine.loglikelihood*`) and the ARC / HellaSwag / Wikitext-2 tasks.

The engine is checked against a naive per-request forward pass of the micro model of conftest
(128-token context, a 400-token BPE); the task logic against fake engines whose scores are known;
and the whole path end to end on ../shared/data when it is present.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch

import smallcoder
from smallcoder import Engine, SamplingParams, SmallCoderError
from smallcoder.eval.lm_tasks import (
    count_words,
    perplexity_metrics,
    run_multiple_choice,
    run_wikitext2,
    split_wikitext_documents,
    wikitext_detokenizer,
)
from smallcoder.inference import rolling_windows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engine(micro_checkpoint):
    model, tok = smallcoder.load(micro_checkpoint)
    return Engine(model, tok)


REQUESTS = [
    ("def add(a, b):", " return a + b"),
    ("The quick brown fox", " jumps over the lazy dog."),
    ("for i in range(10):\n", "    print(i)\n"),
    ("User: hello there\nAssistant:", " hi"),
    ("x", " y"),
    ("", "The lazy dog"),  # empty context: scored after EOS
    ("Question: how are you?\nAnswer: ", "fine"),  # trailing space moves to the continuation
]


def naive_loglikelihood(engine: Engine, context_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
    """One unpadded forward over context + continuation, log-softmax over the whole row."""
    full = context_ids + cont_ids
    with torch.inference_mode():
        logprobs = engine.model(torch.tensor([full[:-1]])).float().log_softmax(-1)[0]
    rows = logprobs[len(context_ids) - 1:]
    ids = torch.tensor(cont_ids)
    return float(rows.gather(-1, ids[:, None]).double().sum()), bool((rows.argmax(-1) == ids).all())


# ---- the engine's scoring path --------------------------------------------------------------


def test_encode_pair_follows_lm_eval(engine):
    tok = engine.tokenizer
    ctx, cont = engine.encode_pair("def add(a, b):", " return a + b")
    assert ctx == tok.encode("def add(a, b):")
    assert ctx + cont == tok.encode("def add(a, b): return a + b")
    # trailing whitespace of the context belongs to the continuation
    ctx, cont = engine.encode_pair("Answer: ", "fine")
    assert ctx == tok.encode("Answer:")
    assert cont == tok.encode("Answer: fine")[len(ctx):]
    # an empty (or whitespace-only) context is the EOS/BOS token
    assert engine.encode_pair("", "hi") == ([tok.eos_id], tok.encode("hi"))
    assert engine.encode_pair("  ", "hi") == ([tok.eos_id], tok.encode("  hi"))


def test_loglikelihood_equals_naive_forward(engine):
    got = engine.loglikelihood(REQUESTS, batch_size=4)
    for (context, continuation), (ll, greedy) in zip(REQUESTS, got):
        ref_ll, ref_greedy = naive_loglikelihood(engine, *engine.encode_pair(context, continuation))
        assert ll == pytest.approx(ref_ll, abs=1e-5), (context, continuation)
        assert greedy == ref_greedy
        assert ll < 0


def test_batched_equals_unbatched(engine):
    one = engine.loglikelihood(REQUESTS, batch_size=1)
    for batch_size in (3, 16):
        many = engine.loglikelihood(REQUESTS, batch_size=batch_size)
        assert [g for _, g in many] == [g for _, g in one]
        assert [ll for ll, _ in many] == pytest.approx([ll for ll, _ in one], abs=1e-5)
    # order is the caller's, whatever the sorting inside: reversing the input reverses the output
    rev = engine.loglikelihood(REQUESTS[::-1], batch_size=16)
    assert [ll for ll, _ in rev][::-1] == pytest.approx([ll for ll, _ in one], abs=1e-5)


def test_greedy_flag(engine):
    tok = engine.tokenizer
    context = tok.encode("def add(a, b):")
    greedy = engine.generate([context], SamplingParams(max_new_tokens=4, stop_at_eos=False))[0].token_ids
    assert len(greedy) == 4
    [(ll, is_greedy)] = engine.loglikelihood_tokens([(context, greedy)])
    assert is_greedy
    # the same continuation with its last token swapped for any other is not greedy, and less likely
    other = greedy[:-1] + [(greedy[-1] + 1) % tok.vocab_size]
    [(ll_other, other_greedy)] = engine.loglikelihood_tokens([(context, other)])
    assert not other_greedy
    assert ll_other < ll
    # a one-token continuation: greedy exactly when it is the argmax of the next-token logits
    with torch.inference_mode():
        top = int(engine.model(torch.tensor([context]))[0, -1].argmax())
    [(_, top_greedy), (_, next_greedy)] = engine.loglikelihood_tokens(
        [(context, [top]), (context, [(top + 1) % tok.vocab_size])])
    assert top_greedy and not next_greedy


def test_long_context_is_left_truncated(engine):
    tok, L = engine.tokenizer, engine.context_length
    context = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    assert len(context) > 2 * L
    cont = tok.encode(" def add(a, b):")
    keep = L + 1 - len(cont)  # the input is the last L + 1 tokens minus the very last
    [(ll_long, g_long)] = engine.loglikelihood_tokens([(context, cont)])
    ref = naive_loglikelihood(engine, context[-keep:], cont)
    assert ll_long == pytest.approx(ref[0], abs=1e-5) and g_long == ref[1]
    # text requests are truncated the same way, and fit in a batch with short ones
    text = "The quick brown fox jumps over the lazy dog. " * 40
    [(ll_text, _), (ll_short, _)] = engine.loglikelihood([(text, " def add(a, b):"), ("x", " y")], batch_size=2)
    c_ids, t_ids = engine.encode_pair(text, " def add(a, b):")
    assert ll_text == pytest.approx(naive_loglikelihood(engine, c_ids[-(L + 1 - len(t_ids)):], t_ids)[0], abs=1e-5)
    assert ll_short == pytest.approx(naive_loglikelihood(engine, *engine.encode_pair("x", " y"))[0], abs=1e-5)
    # a continuation of exactly the context length is scored whole; one token more cannot be
    full = context[:L]
    [(ll_full, _)] = engine.loglikelihood_tokens([(context[L:L + 5], full)])
    assert ll_full == pytest.approx(naive_loglikelihood(engine, context[L + 4:L + 5], full)[0], abs=1e-5)
    with pytest.raises(SmallCoderError, match="continuation is 129 tokens"):
        engine.loglikelihood_tokens([(context[:3], context[:L + 1])])


def test_scoring_rejects_bad_requests(engine):
    with pytest.raises(SmallCoderError, match="no tokens"):
        engine.loglikelihood([("abc", "")])
    with pytest.raises(SmallCoderError, match="batch_size must be a positive integer, got 0"):
        engine.loglikelihood([("abc", " d")], batch_size=0)
    with pytest.raises(SmallCoderError, match="must be strings"):
        engine.loglikelihood([("abc", 5)])
    assert engine.loglikelihood([]) == []


def test_rolling_windows_match_lm_eval_example():
    # the example in lm-eval's LM.loglikelihood_rolling docstring (prefix BOS, max length 4)
    windows = rolling_windows(list(range(10)), -1, 4)
    assert windows == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    assert rolling_windows([], -1, 4) == []
    assert rolling_windows([7, 8], -1, 4) == [([-1], [7, 8])]
    for n in (1, 4, 5, 8, 9, 13):
        for max_len in (1, 2, 4):
            ws = rolling_windows(list(range(n)), -1, max_len)
            assert [t for _, cont in ws for t in cont] == list(range(n))  # each token once, in order
            for ctx, cont in ws:  # every input (context + continuation minus the last) fits
                assert len((ctx + cont)[:-1]) <= max_len and len(cont) <= max_len
                assert len(ctx) >= 1


def test_loglikelihood_rolling_equals_naive_windows(engine):
    tok, L = engine.tokenizer, engine.context_length
    doc = "def add(a, b):\n    return a + b\n" * 25
    ids = tok.encode(doc)
    assert 2 * L < len(ids) < 3 * L  # three windows, the last one partial
    expected = 0.0
    for start in range(0, len(ids), L):
        target = ids[start:start + L]
        if start == 0:
            context = [tok.eos_id]
        else:  # the last window is given a full context of earlier tokens
            context = ids[start + len(target) - L - 1:start]
        expected += naive_loglikelihood(engine, context, target)[0]
    [total, short] = engine.loglikelihood_rolling([doc, "hi"], batch_size=2)
    assert total == pytest.approx(expected, abs=1e-4)
    assert short == pytest.approx(naive_loglikelihood(engine, [tok.eos_id], tok.encode("hi"))[0], abs=1e-5)
    assert engine.loglikelihood_rolling([ids], batch_size=1) == pytest.approx([total], abs=1e-4)
    assert engine.loglikelihood_rolling([""]) == [0.0]


# ---- multiple choice --------------------------------------------------------------------------


class FakeEngine:
    """Scores each continuation from a table; records the requests it was asked."""

    context_length = 1024

    def __init__(self, table: dict[str, float]) -> None:
        self.table = table
        self.requests: list[tuple[str, str]] = []

    def loglikelihood(self, requests, batch_size=16, desc=""):
        self.requests.extend(requests)
        return [(self.table[cont], False) for _, cont in requests]


ARC_ITEMS = [
    {"id": "q1", "question": "Which is largest?", "choices": ["sun", "moon", "pebble"],
     "labels": ["A", "B", "C"], "answer_index": 0},
    # raw sums pick "a much longer answer" (-6 > -9), and so does acc_norm (-6/20 > -9/4)
    {"id": "q2", "question": "Pick the long one.", "choices": ["tiny", "a much longer answer"],
     "labels": ["A", "B"], "answer_index": 1},
    # raw sums pick "ab" (-4 > -10); per character "abcdefghijklmnopqrst" wins (-0.5 > -2):
    # acc wrong, acc_norm right
    {"id": "q3", "question": "Normalization?", "choices": ["ab", "abcdefghijklmnopqrst"],
     "labels": ["1", "2"], "answer_index": 1},
    # all equal: argmax takes the first (as numpy), which is wrong here
    {"id": "q4", "question": "Ties?", "choices": ["x", "y"], "labels": ["A", "B"], "answer_index": 1},
]
ARC_TABLE = {" sun": -1.0, " moon": -3.0, " pebble": -5.0, " tiny": -9.0, " a much longer answer": -6.0,
             " ab": -4.0, " abcdefghijklmnopqrst": -10.0, " x": -2.0, " y": -2.0}


def test_multiple_choice_acc_and_acc_norm():
    fake = FakeEngine(ARC_TABLE)
    result = run_multiple_choice(fake, "arc_easy", ARC_ITEMS)
    assert result.task == "arc_easy"
    # item by item: acc 1, 1, 0, 0 ; acc_norm 1, 1, 1, 0
    assert [s["acc"] for s in result.samples] == [1, 1, 0, 0]
    assert [s["acc_norm"] for s in result.samples] == [1, 1, 1, 0]
    acc, norm = result.metrics["acc"], result.metrics["acc_norm"]
    assert (acc.value, acc.correct, acc.total, acc.count) == (0.5, 2, 4, "2/4")
    assert (norm.value, norm.correct, norm.total) == (0.75, 3, 4)
    assert acc.stderr == pytest.approx(math.sqrt(0.5 * 0.5 / 3))
    assert norm.stderr == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    # the requests: lm-eval's ARC context and " " + choice, every choice in order
    assert fake.requests[:3] == [("Question: Which is largest?\nAnswer:", " sun"),
                                 ("Question: Which is largest?\nAnswer:", " moon"),
                                 ("Question: Which is largest?\nAnswer:", " pebble")]
    assert len(fake.requests) == 9
    s3 = result.samples[2]
    assert (s3["pred"], s3["pred_norm"], s3["gold"], s3["id"]) == (0, 1, 1, "q3")
    assert result.settings["split"] == "test" and result.settings["items"] == 4


def test_length_normalization_uses_characters_without_the_space():
    # sums -3.0 for "abc" and -3.9 for "abcd": per character without the leading space
    # (lm-eval) -1.0 vs -0.975 picks "abcd"; with the space it would be -0.75 vs -0.78 ("abc").
    item = {"id": "n", "question": "q", "choices": ["abc", "abcd"], "labels": ["A", "B"], "answer_index": 1}
    result = run_multiple_choice(FakeEngine({" abc": -3.0, " abcd": -3.9}), "arc_challenge", [item])
    assert result.samples[0]["pred"] == 0
    assert result.samples[0]["pred_norm"] == 1
    assert (result.metrics["acc"].value, result.metrics["acc_norm"].value) == (0.0, 1.0)


def test_hellaswag_context_and_limit():
    items = [{"ctx": "Roof shingle removal: A man is sitting on a roof. he", "label": 3,
              "endings": ["is using wrap.", "is ripping tiles off.", "holds a cube.", "starts pulling up roofing."]},
             {"ctx": "Second: never scored", "label": 0, "endings": ["a", "b", "c", "d"]}]
    table = {" " + e: -float(i + 1) for i, e in enumerate(items[0]["endings"])}
    fake = FakeEngine(table)
    result = run_multiple_choice(fake, "hellaswag", items, limit=1)
    assert fake.requests == [(items[0]["ctx"], " " + e) for e in items[0]["endings"]]
    assert result.metrics["acc"].count == "0/1" and result.settings["split"] == "validation"


@pytest.mark.parametrize("task, items, limit, message", [
    ("piqa", ARC_ITEMS, None, "unknown multiple-choice task 'piqa'"),
    ("arc_easy", [], None, "arc_easy: no items"),
    ("arc_easy", ARC_ITEMS, 0, "limit must be a positive integer or None, got 0"),
    ("arc_easy", [{"id": "z", "question": "q", "choices": ["a"]}], None,
     "arc_easy item 0 \\(id 'z'\\): missing field\\(s\\) answer_index"),
    ("arc_easy", [{"id": "z", "question": "q", "choices": ["a", "b"], "answer_index": 2}], None,
     "field 'answer_index' must be an index into the 2 choices, got 2"),
    ("hellaswag", [{"ctx": "c", "endings": ["a", ""], "label": 0}], None,
     "hellaswag item 0: field 'endings' must be a list of non-empty strings"),
    ("hellaswag", [{"ctx": "", "endings": ["a"], "label": 0}], None, "field 'ctx' must be a non-empty string"),
])
def test_multiple_choice_bad_input(task, items, limit, message):
    with pytest.raises(SmallCoderError, match=message):
        run_multiple_choice(FakeEngine(ARC_TABLE), task, items, limit=limit)


# ---- Wikitext-2 -------------------------------------------------------------------------------


RAW = (" \n = Alpha = \n \n Alpha is a letter @-@ like thing , and 1 @,@ 000 of them ( see below ) "
       "are \" quoted \" . \n \n = = Usage = = \n \n It 's used . \n \n"
       " = Beta = \n \n Beta 's page : short ; done ! \n \n")


def test_wikitext_documents_split_at_titles_only():
    docs = split_wikitext_documents(RAW)
    assert len(docs) == 2
    assert docs[0].startswith(" = Alpha = \n") and " = = Usage = = " in docs[0]  # sections stay inside
    assert docs[1] == " = Beta = \n \n Beta 's page : short ; done ! \n \n"
    assert split_wikitext_documents(" \n \n") == []


def test_wikitext_detokenizer_rules():
    docs = split_wikitext_documents(RAW)
    assert wikitext_detokenizer(docs[0]) == (
        " = Alpha =\n\nAlpha is a letter-like thing, and 1,000 of them (see below) are \"quoted\".\n\n"
        "== Usage ==\n\nIt's used.\n")
    assert wikitext_detokenizer(docs[1]) == " = Beta =\n\nBeta's page: short; done!\n\n"
    assert wikitext_detokenizer("3 @.@ 5 ° C , N items") == "3.5°C, 1 items"  # " N " is lm-eval's <unk>
    assert wikitext_detokenizer("N a N") == "N a N"  # only a spaced N is replaced
    assert wikitext_detokenizer("the dogs ' toys") == "the dogs' toys"


def test_word_counts_follow_lm_eval():
    # re.split on whitespace: leading/trailing whitespace give empty pieces, which count
    assert count_words("a b  c") == 3
    assert count_words(" = Beta = \n") == 5  # '', '=', 'Beta', '=', ''
    assert count_words(RAW) == len(re.split(r"\s+", RAW))


class FakeRollingEngine:
    """Scores every detokenized document as -0.5 per token of a whitespace 'tokenizer'."""

    context_length = 8

    tokenizer = SimpleNamespace(encode=lambda text: [1] * len(text.split()))

    def __init__(self):
        self.documents = []

    def loglikelihood_rolling(self, documents, batch_size=8, desc=""):
        self.documents.extend(documents)
        return [-0.5 * len(d) for d in documents]


def test_perplexity_formulas():
    fake = FakeRollingEngine()
    docs = split_wikitext_documents(RAW)
    result = run_wikitext2(fake, RAW)
    lls = [-0.5 * len(wikitext_detokenizer(d).split()) for d in docs]
    words = sum(len(re.split(r"\s+", d)) for d in docs)  # on the original text
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    m = result.metrics
    assert m["word_perplexity"].value == pytest.approx(math.exp(-sum(lls) / words))
    assert m["byte_perplexity"].value == pytest.approx(math.exp(-sum(lls) / n_bytes))
    assert m["bits_per_byte"].value == pytest.approx(-sum(lls) / n_bytes / math.log(2))
    assert m["word_perplexity"].count is None  # corpus ratios carry no count
    assert result.settings["words"] == words and result.settings["documents"] == 2
    assert [s["title"] for s in result.samples] == ["Alpha", "Beta"]
    # limit takes the first K articles
    one = run_wikitext2(FakeRollingEngine(), RAW, limit=1)
    assert one.settings["documents"] == 1 and one.settings["documents_total"] == 2
    # a hand-made case: log-likelihood -10 over 5 words and 20 bytes
    hand = perplexity_metrics(-10.0, 5, 20)
    assert hand["word_perplexity"].value == pytest.approx(math.exp(2.0))
    assert hand["byte_perplexity"].value == pytest.approx(math.exp(0.5))
    assert hand["bits_per_byte"].value == pytest.approx(0.5 / math.log(2))


def test_wikitext_bad_input():
    with pytest.raises(SmallCoderError, match="no article"):
        run_wikitext2(FakeRollingEngine(), " \n \n")
    with pytest.raises(SmallCoderError, match="limit must be a positive integer or None, got -1"):
        run_wikitext2(FakeRollingEngine(), RAW, limit=-1)
    with pytest.raises(SmallCoderError, match="expected the raw test text as a str, got list"):
        run_wikitext2(FakeRollingEngine(), [RAW])


# ---- end to end on the shared data ----------------------------------------------------------


def test_end_to_end_on_shared_data(engine, shared_data):
    data = pytest.importorskip("smallcoder.eval.data", reason="smallcoder.eval.data is not there yet")
    for task in ("arc_easy", "hellaswag"):
        items = data.load_task_data(task, shared_data)
        result = run_multiple_choice(engine, task, items, limit=3)
        for name in ("acc", "acc_norm"):
            score = result.metrics[name]
            assert 0.0 <= score.value <= 1.0 and score.total == 3
        assert all(ll < 0 for s in result.samples for ll in s["loglikelihoods"])
        assert len(result.samples) == 3
    text = data.load_task_data("wikitext2", shared_data)
    result = run_wikitext2(engine, text, limit=1)
    assert result.samples[0]["title"] == "Robert Boulter"
    assert result.settings["documents"] == 1 and result.settings["documents_total"] == 62
    m = result.metrics
    assert m["word_perplexity"].value > m["byte_perplexity"].value > 1.0
    assert m["bits_per_byte"].value == pytest.approx(math.log2(m["byte_perplexity"].value))

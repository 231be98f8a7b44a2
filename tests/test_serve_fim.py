"""How the server builds fill-in-the-middle prompts (`serve.fim`, `prompts`): the order, an editor's
extra context as llama.cpp formats it, a prompt the editor filled in itself, and the cut that makes
a prompt fit the context (the prefix's end and the suffix's start kept).
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")

import smallcoder
from smallcoder.prompts import FIM_TOKENS, SNIPPET_SEP, extra_context, fim_ids, fim_prompt, fim_split, repo_tokens
from smallcoder.prompts import fim_keep as fit
from smallcoder.serve.fim import FimBuilder
from smallcoder.serve.protocol import APIError

CODE = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
        "class Stack:\n    def push(self, item):\n        self.items.append(item)\n"] * 20


def _tokenizer(tmp_path_factory, specials: list[str]) -> smallcoder.Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CODE, trainer)
    folder = tmp_path_factory.mktemp("tok")
    backend.save(str(folder / "tokenizer.json"))
    return smallcoder.Tokenizer.load(folder)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """StarCoder's FIM tokens and `<reponame>`, but no file separator (as the StarCoder vocabulary)."""
    return _tokenizer(tmp_path_factory, ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>",
                                         "<reponame>", "<filename>"])


@pytest.fixture(scope="module")
def repo_tok(tmp_path_factory):
    """A StarCoder2-style vocabulary: FIM tokens, `<repo_name>` and `<file_sep>`."""
    return _tokenizer(tmp_path_factory, ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>",
                                         "<repo_name>", "<file_sep>"])


def _build(tok, order, prefix, suffix, middle="", head="", limit=1000):
    return asyncio.run(FimBuilder(tok, order).build(prefix, suffix, middle, head, limit, "input_prefix"))


# ---- the pieces an editor sends ------------------------------------------------------------------


def test_fim_split_reads_the_starcoder_template_and_nothing_else():
    assert fim_split("# a.py\n<fim_prefix>def f(<fim_suffix>)\n<fim_middle>x") == ("# a.py\n", "def f(", ")\n", "x")
    spm = fim_prompt("def f(", ")\n", "x", order="spm")  # reads as a PSM prompt with an empty prefix
    assert fim_split(spm) == ("", "", ")\n", "def f(x")
    for not_fim in ["def f(", "<fim_prefix>a<fim_middle>b<fim_suffix>c", "<fim_prefix>a<fim_suffix>b",
                    "<fim_prefix>a<fim_suffix>b<fim_middle>c<fim_middle>"]:
        assert fim_split(not_fim) is None


def test_extra_context_as_llama_cpp_formats_it(tok, repo_tok):
    chunks = [("src/util.py", "def helper():\n    pass\n"), ("tmp", "x = 1\n")]
    assert repo_tokens(tok) is None  # <reponame> alone is not the repository pattern
    assert extra_context(chunks, repo_tokens(tok)) == f"{SNIPPET_SEP}def helper():\n    pass\n{SNIPPET_SEP}x = 1\n"
    assert repo_tokens(repo_tok) == ("<repo_name>", "<file_sep>")
    assert extra_context(chunks, repo_tokens(repo_tok)) == (
        "<repo_name>myproject\n<file_sep>src/util.py\ndef helper():\n    pass\n<file_sep>tmp\nx = 1\n"
        "<file_sep>filename\n")
    assert extra_context([], repo_tokens(repo_tok)) == "<repo_name>myproject\n<file_sep>filename\n"
    assert extra_context([], None) == ""


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_each_piece_is_tokenized_on_its_own_and_laid_out_in_the_order(tok, order):
    prefix, suffix, middle, head = "def add(a, b):\n    ret", "\n\nprint(add(1, 2))\n", "urn a", SNIPPET_SEP + "x = 1\n"
    got = _build(tok, order, prefix, suffix, middle, head)
    sentinels = [tok.token_to_id(t) for t in FIM_TOKENS]
    want = tok.encode(head) + fim_ids(tok.encode(prefix), tok.encode(suffix), tok.encode(middle), order, sentinels)
    assert got.ids == want and not got.truncated
    if order == "psm":  # the sentinels split the text, so this is also the whole text tokenized
        assert got.ids == tok.encode(head + fim_prompt(prefix, suffix, middle, order))
    else:
        assert got.ids[len(tok.encode(head)):][:2] == sentinels[:2]  # <fim_prefix><fim_suffix> first


# ---- the cut -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths, limit, kept", [
    ((0, 10, 10), 100, (0, 10, 10)),  # fits: nothing cut
    ((50, 30, 10), 60, (20, 30, 10)),  # only the extra context is cut, its end kept
    ((0, 900, 300), 1000, (0, 750, 250)),  # both too long: the suffix gets a quarter
    ((0, 100, 1500), 1000, (0, 100, 900)),  # a short prefix leaves the rest to the suffix
    ((0, 1500, 100), 1000, (0, 900, 100)),  # a short suffix leaves the rest to the prefix
    ((5, 0, 0), 3, (3, 0, 0)),
    ((0, 7, 7), 0, (0, 0, 0)),
])
def test_fit_keeps_the_prefix_end_and_the_suffix_start_three_to_one(lengths, limit, kept):
    assert fit(*lengths, limit) == kept


@pytest.mark.parametrize("order", ["psm", "spm"])
def test_a_prompt_longer_than_the_limit_is_cut_keeping_the_prefix_end_and_the_suffix_start(tok, order):
    prefix = "".join(f"x{i} = {i}\n" for i in range(60))
    suffix = "".join(f"y{i} = {i}\n" for i in range(60))
    middle, head = "z = ", SNIPPET_SEP + "def helper():\n    pass\n" * 5
    pre, suf, mid, hd = (tok.encode(t) for t in (prefix, suffix, middle, head))
    limit = 120
    got = _build(tok, order, prefix, suffix, middle, head, limit)
    room = limit - 3 - len(mid)
    keep_s = room // 4
    keep_p = room - keep_s
    assert len(pre) > keep_p and len(suf) > keep_s  # both really are cut
    assert len(got.ids) == limit and got.truncated
    assert got.cut == {"extra": len(hd), "prefix": len(pre) - keep_p, "suffix": len(suf) - keep_s}
    sentinels = [tok.token_to_id(t) for t in FIM_TOKENS]
    assert got.ids == fim_ids(pre[-keep_p:], suf[:keep_s], mid, order, sentinels)
    text = tok.decode(got.ids)
    assert "x59 = 59\n" in text and "y0 = 0\n" in text  # the prefix's end, the suffix's start
    assert "x0 = 0\n" not in text and "y59 = 59\n" not in text


def test_a_middle_that_alone_does_not_fit_is_a_400_naming_it(tok):
    with pytest.raises(APIError) as e:
        _build(tok, "spm", "a", "b", "x = 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8", limit=6)
    assert e.value.status == 400 and e.value.param == "prompt" and "the middle typed so far" in e.value.message
    with pytest.raises(APIError, match="not valid text"):
        _build(tok, "spm", "a \ud800", "b")

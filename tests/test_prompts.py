"""The one chat/FIM protocol (`smallcoder.prompts`) and every user of it agreeing on it: the chat
commands, the server, the evaluation and the GGUF export.

The chat commands' answers are scripted: `smallcoder.inference.steps.sample` (the engine's only
source of next tokens) is replaced so the model "writes" a chosen text, here one that misses EOS
and starts the next `User:` turn, the case that `CHAT_STOP` exists for.
"""

from __future__ import annotations

import builtins
import importlib

import pytest
import torch

from smallcoder import Engine, prompts
from smallcoder.cli import main
from smallcoder.errors import SmallCoderError
from smallcoder.prompts import (
    CHAT_STOP,
    FIM_TOKENS,
    AnswerStream,
    answer_text,
    chat_stops,
    fim_ids,
    fim_prompt,
    has_fim,
)

gen_mod = importlib.import_module("smallcoder.inference.steps")


def write(monkeypatch, tokenizer, text: str) -> None:
    """Make every generation 'sample' the tokens of `text`, then EOS; each call starts over."""
    ids = tokenizer.encode(text)
    state = {"step": 0}
    real_stream = Engine.stream

    def stream(self, prompt, params=None):
        state["step"] = 0
        return real_stream(self, prompt, params)

    def fake_sample(logits, params, generator):
        i = state["step"]
        state["step"] += 1
        token = ids[i] if i < len(ids) else tokenizer.eos_id
        return torch.full((logits.shape[0],), token, dtype=torch.long, device=logits.device)

    monkeypatch.setattr(gen_mod, "sample", fake_sample)
    monkeypatch.setattr(Engine, "stream", stream)


# a model that misses its EOS and writes the user's next turn itself (several turns, so a stop
# string that only cut the first one would still leave text behind)
RUNAWAY = " Sure, here it is.\nUser: thanks\nAssistant: you are welcome\nUser: bye"


def test_generate_chat_stops_at_the_next_user_turn(micro_checkpoint, small_tokenizer, monkeypatch, capsys):
    write(monkeypatch, small_tokenizer, RUNAWAY)
    code = main(["generate", "--model", str(micro_checkpoint), "--prompt", "hi", "--chat", "--max-new-tokens", "60"])
    assert code == 0
    assert capsys.readouterr().out == "Sure, here it is.\n"


def test_generate_chat_keeps_the_callers_stops(micro_checkpoint, small_tokenizer, monkeypatch, capsys):
    write(monkeypatch, small_tokenizer, RUNAWAY)
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "hi", "--chat", "--stop", "here",
                 "--max-new-tokens", "60"]) == 0
    assert capsys.readouterr().out == "Sure, \n"


def test_generate_without_chat_does_not_stop_at_user(micro_checkpoint, small_tokenizer, monkeypatch, capsys):
    """Plain completion is not a chat: the turn marker is text like any other there."""
    write(monkeypatch, small_tokenizer, RUNAWAY)
    assert main(["generate", "--model", str(micro_checkpoint), "--prompt", "hi", "--max-new-tokens", "60"]) == 0
    assert capsys.readouterr().out == RUNAWAY + "\n"


def test_chat_stops_at_the_next_user_turn_and_keeps_only_the_answer(micro_checkpoint, small_tokenizer,
                                                                    monkeypatch, capsys):
    write(monkeypatch, small_tokenizer, RUNAWAY)
    lines = iter(["hello", "again"])
    prompts_seen = []
    real_stream = Engine.stream

    def recording_stream(self, prompt, params=None):
        prompts_seen.append(prompt)
        return real_stream(self, prompt, params)

    monkeypatch.setattr(Engine, "stream", recording_stream)

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat", "--model", str(micro_checkpoint), "--max-new-tokens", "60"]) == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: Sure, here it is.\n") == 2
    assert "thanks" not in out and "welcome" not in out
    # the history holds the answer only, not the turns the model made up
    assert prompts_seen[1] == prompts.format_chat([
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "Sure, here it is."},
        {"role": "user", "content": "again"}])


def test_chat_stops_add_the_turn_marker_once():
    assert chat_stops() == (CHAT_STOP,) == ("\nUser:",)
    assert chat_stops(["x", "y"]) == ("x", "y", CHAT_STOP)
    assert chat_stops((CHAT_STOP, "x")) == (CHAT_STOP, "x")


def test_answer_start_is_stripped_once_whole_or_streamed():
    assert answer_text(" \n def f(): pass\n") == "def f(): pass\n"
    shown = AnswerStream()
    assert [shown(p) for p in [" ", "\n", " def", " f", " \n"]] == ["", "", "def", " f", " \n"]
    assert "".join(AnswerStream()(p) for p in []) == ""


def test_fim_prompt_and_tokens():
    assert FIM_TOKENS == ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")
    assert fim_prompt("a(", ")", "x") == "<fim_prefix>a(<fim_suffix>)<fim_middle>x"
    assert fim_prompt("a(", ")", "x", order="spm") == "<fim_prefix><fim_suffix>)<fim_middle>a(x"
    # SPM: a prefix that grows as the user types only appends to the prompt
    assert fim_prompt("a(b", ")", order="spm").startswith(fim_prompt("a(", ")", order="spm"))
    with pytest.raises(SmallCoderError, match="unknown FIM order 'mps'; choose one of: psm, spm"):
        fim_prompt("a", "b", order="mps")

    class Vocab:
        def __init__(self, tokens):
            self.tokens = tokens

        def token_to_id(self, t):
            return self.tokens.get(t)

    assert has_fim(Vocab({t: i for i, t in enumerate(FIM_TOKENS)}))
    assert not has_fim(Vocab({"<fim_prefix>": 1}))


def test_every_user_takes_the_protocol_from_one_place():
    """Same names mean one thing: the server, the evaluation, the tokenizer and the export use
    the protocol module's objects, not copies of them."""
    from smallcoder import tokenizer
    from smallcoder.eval import humaneval
    from smallcoder.serve import completions, fim, native, server  # every server FIM prompt: serve/fim.py

    assert not hasattr(humaneval, "CHAT_STOP")
    assert fim.FIM_TOKENS is FIM_TOKENS and fim.fim_ids is prompts.fim_ids and server.fim_split is prompts.fim_split
    assert not any(hasattr(m, n) for m in (completions, native) for n in ("FIM_TOKENS", "fim_prompt", "fim_ids"))
    assert not hasattr(server, "FIM_TOKENS") and not hasattr(server, "fim_prompt")
    assert tokenizer.CHAT_TEMPLATE is prompts.CHAT_TEMPLATE and not hasattr(tokenizer, "format_chat")
    import smallcoder

    assert smallcoder.format_chat is prompts.format_chat


def test_fim_ids_is_fim_prompt_in_tokens(starcoder_dir):
    """Training data lays FIM examples out in token ids (`fim_ids`), the server and the evaluation
    in text (`fim_prompt`): the same layout, each piece tokenized on its own."""
    from smallcoder import Tokenizer

    tok = Tokenizer.load(starcoder_dir)
    sentinels = [tok.token_to_id(t) for t in FIM_TOKENS]
    prefix, middle, suffix = "def add(a, b):\n    ret", "urn a + b", "\n\nprint(add(1, 2))\n"
    for order in ("psm", "spm"):
        ids = fim_ids(tok.encode(prefix), tok.encode(suffix), tok.encode(middle), order, sentinels)
        assert tok.decode(ids) == fim_prompt(prefix, suffix, middle, order=order)
        assert [i for i in ids if i in sentinels] == sentinels  # single tokens, in this order in both
    spm = fim_ids(tok.encode(prefix), tok.encode(suffix), tok.encode(middle), "spm", sentinels)
    assert spm[-len(tok.encode(middle)):] == tok.encode(middle)  # the middle starts at a token boundary
    assert fim_ids([5], [6], [7], "psm", [1, 2, 3]) == [1, 5, 2, 6, 3, 7]
    assert fim_ids([5], [6], [7], "spm", [1, 2, 3]) == [1, 2, 6, 3, 5, 7]
    with pytest.raises(SmallCoderError, match="unknown FIM order 'pms'"):
        fim_ids([], [], [], "pms", [1, 2, 3])


def test_export_names_llama_cpps_fim_keys_with_the_protocols_tokens():
    export = pytest.importorskip("smallcoder.export")
    assert not hasattr(export, "FIM_TOKENS")
    assert set(FIM_TOKENS) <= set(export.GGUF_FIM_KEYS.values())


def test_humaneval_instruct_stops_at_the_next_turn(monkeypatch):
    """HumanEval's instruct generation uses the same stops as chat (recorded in its settings)."""
    from smallcoder.eval import humaneval

    seen = {}

    def fake_generate_samples(engine, prompts_, **kw):
        seen["stop"] = kw["stop"]
        raise RuntimeError("stop here")

    monkeypatch.setattr("smallcoder.eval.generation.generate_samples", fake_generate_samples)
    problem = {"task_id": "HumanEval/0", "prompt": "def f():\n", "entry_point": "f", "test": "def check(c):\n  pass\n",
               "canonical_solution": "    pass\n"}
    with pytest.raises(RuntimeError, match="stop here"):
        humaneval.run_humaneval(None, [problem], progress=False)
    assert tuple(seen["stop"]) == chat_stops()

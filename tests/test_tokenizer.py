"""The StarCoder tokenizer conforms to its 104 known text/ids pairs and survives a save."""

from __future__ import annotations

import json

import pytest

from smallcoder import Tokenizer


def _pairs(starcoder_dir):
    lines = (starcoder_dir / "known_ids.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_known_ids_all_pass(starcoder_dir):
    tok = Tokenizer.load(starcoder_dir)
    pairs = _pairs(starcoder_dir)
    assert len(pairs) == 104
    failures = []
    for p in pairs:
        if p["check"] == "encode":
            ok = tok.encode(p["text"]) == p["ids"]
        elif p["check"] == "decode":
            ok = tok.decode(p["ids"]) == p["text"]
        else:
            pytest.fail(f"unknown check {p['check']!r}")
        if not ok:
            failures.append(p["text"][:40])
    assert not failures, f"{len(failures)}/104 pairs fail: {failures[:5]}"


def test_starcoder_specials(starcoder_dir):
    tok = Tokenizer.load(starcoder_dir)
    assert tok.vocab_size == 49152
    assert (tok.eos_token, tok.eos_id) == ("<|endoftext|>", 0)
    assert len(tok.special_ids) == 19
    assert tok.encode("<fim_prefix>x<fim_suffix>") == [1, tok.encode("x")[0], 3]
    assert tok.encode("12345") == tok.encode("1") + tok.encode("2") + tok.encode("3") + tok.encode("4") + tok.encode("5")


def test_save_round_trip_and_transformers(starcoder_dir, tmp_path):
    tok = Tokenizer.load(starcoder_dir)
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "def f(x):\n    return x ** 2  # ünïcødé 🚀\n<|endoftext|>"
    assert again.encode(text) == tok.encode(text)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text)["input_ids"] == tok.encode(text)
    assert hf.eos_token_id == 0
    ids = tok.encode(text)
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)

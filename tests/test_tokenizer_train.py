"""Tokenizer training: StarCoder's shape (specials, digits, byte level) on a corpus made here."""

from __future__ import annotations

import functools
import json
import random
import sysconfig
from pathlib import Path

import pytest

from smallcoder import SmallCoderError, Tokenizer
from smallcoder.tokenizer_train import MIN_VOCAB_SIZE, SPECIAL_TOKENS, train_tokenizer

PROSE = ["Grüße aus Köln! Ça va? 你好，世界。 Привет, мир. こんにちは 🎉🚀 naïve café",
         "The year 2024 had 366 days; π ≈ 3.14159 and e ≈ 2.71828.\n\tTabs\tand\r\nCRLF lines.\n"]
VOCAB = 700


@functools.cache
def _corpus() -> list[str]:
    """Read-only standard-library sources (stable, unlike this repo's files) plus unicode prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8") for pkg in ("json", "email") for p in sorted((root / pkg).glob("*.py"))]
    assert sum(map(len, texts)) > 50_000, "the stdlib sources should be a big enough corpus"
    return texts + PROSE * 5


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_tokenizer(_corpus(), VOCAB)


def _random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over ASCII, Latin, CJK, emoji, control characters and special-token text."""
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0x24F), (0x370, 0x4FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
             (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 40)):
            if rng.random() < 0.05:
                parts.append(rng.choice(SPECIAL_TOKENS))
                continue
            lo, hi = rng.choice(pools)
            c = rng.randint(lo, hi)
            if 0xD800 <= c <= 0xDFFF:  # lone surrogates are not valid text
                c = 0x41
            parts.append(chr(c))
        out.append("".join(parts))
    return out


def test_specials_are_ids_0_to_18_in_starcoder_order(trained):
    assert len(SPECIAL_TOKENS) == 19
    assert [trained.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(19))
    assert (trained.eos_token, trained.eos_id) == ("<|endoftext|>", 0)
    assert trained.special_ids == set(range(19))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert trained.encode(t) == [i], t
    ids = trained.encode("a<|endoftext|>b<fim_middle>")
    assert ids[ids.index(0) + 2] == 2 and ids.count(0) == 1


def test_special_list_matches_starcoder_files(starcoder_dir):
    """The list written in code is StarCoder's own (its config and its tokenizer.json ids)."""
    cfg = json.loads((starcoder_dir / "tokenizer_config.json").read_text())
    assert list(SPECIAL_TOKENS) == cfg["additional_special_tokens"]
    ref = Tokenizer.load(starcoder_dir)
    assert [ref.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(19))


def test_round_trips_arbitrary_unicode(trained):
    texts = _random_texts(300) + PROSE + ["", " ", "\n\n\n", "\x00\x7f", "  leading and trailing  ",
                                          "<fim_prefix><fim_suffix>", "<|endoftext", "</s><unk>"]
    bad = [t for t in texts if trained.decode(trained.encode(t)) != t]
    assert not bad, f"{len(bad)} texts do not round-trip, e.g. {bad[0]!r}"


def test_digits_are_split_one_per_token(trained):
    vocab = trained.backend.get_vocab()
    merged_digits = [t for t in vocab if len(t) > 1 and any(c.isdigit() for c in t) and t not in SPECIAL_TOKENS]
    assert not merged_digits, merged_digits[:10]
    ids = trained.encode("x = 1234567890")
    digits = [trained.decode([i]) for i in ids][-10:]
    assert digits == list("1234567890")


def test_pretokenizer_and_decoder_are_starcoders(trained, starcoder_dir):
    ours = json.loads(trained.backend.to_str())
    ref = json.loads((starcoder_dir / "tokenizer.json").read_text())
    assert ours["pre_tokenizer"] == ref["pre_tokenizer"]
    assert ours["decoder"]["type"] == ref["decoder"]["type"] == "ByteLevel"
    assert ours["normalizer"] is None and ours["model"]["type"] == "BPE"
    assert {k: v for k, v in ours["added_tokens"][0].items()} == ref["added_tokens"][0]


def test_vocab_size_is_honoured(trained):
    assert trained.vocab_size == VOCAB
    bigger = train_tokenizer(_corpus(), 900)
    assert bigger.vocab_size == 900
    # a tiny corpus cannot reach a large size: the trainer stops, never exceeds it
    small = train_tokenizer(["abc abc abd"] * 3, 2000)
    assert MIN_VOCAB_SIZE - 1 <= small.vocab_size < 2000


@pytest.mark.parametrize("size", [0, 19, 275, MIN_VOCAB_SIZE - 1, "1000"])
def test_bad_vocab_size_is_refused(size):
    with pytest.raises(SmallCoderError, match=f"vocab_size {size!r}"):
        train_tokenizer(["x"], size)


def test_non_string_text_is_refused():
    with pytest.raises(SmallCoderError, match="text 1: expected a string, got int"):
        train_tokenizer(["fine", 3], 400)


def test_training_is_deterministic(trained):
    again = train_tokenizer(_corpus(), VOCAB)
    assert again.backend.to_str() == trained.backend.to_str()


def test_saved_folder_loads_in_smallcoder_and_transformers(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    trained.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"tokenizer.json", "tokenizer_config.json",
                                                    "special_tokens_map.json"}
    loaded = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.eos_id == 0 and hf.eos_token_id == 0 and hf.bos_token_id == 0
    assert len(hf) == VOCAB
    for text in PROSE + _random_texts(50, seed=1) + ["def f(x):\n    return x  # 42<fim_middle>"]:
        ids = trained.encode(text)
        assert loaded.encode(text) == ids
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf.decode(ids) == text


def test_cli_train(tmp_path, capsys):
    from smallcoder.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in _corpus()))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"q": "What is 2+2?", "a": "4"}) + "\n")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--input", str(corpus), "--field", "body", "--vocab-size", "600",
            "--out", str(out), "--limit-docs", "10"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: vocab size 600 (asked 600), 10 documents read ({corpus}: 10)" in text
    assert "sample: 'def add(a, b):\\n    return a + 12' -> " in text
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600 and tok.eos_id == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    before = (out / "tokenizer.json").read_bytes()
    assert main(argv[:-2]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smallcoder: error: ") and "not empty (use --force" in err and "\n" not in err
    assert (out / "tokenizer.json").read_bytes() == before
    # --force replaces it; conversation fields turn a Q/A file into chat-formatted text
    assert main(argv[:-2] + ["--force"]) == 0
    assert Tokenizer.load(out).backend.to_str() != before.decode()
    assert main(["tokenizer", "train", "--input", str(chat), "--prompt-field", "q", "--response-field", "a",
                 "--vocab-size", "300", "--out", str(tmp_path / "chat_tok")]) == 0
    assert "1 documents read" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "100", "--out",
                 str(tmp_path / "t2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smallcoder: error: ") and "vocab_size 100 is too small" in err
    assert not (tmp_path / "t2").exists()

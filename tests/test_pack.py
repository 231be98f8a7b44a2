"""The token store: packing round trips, determinism, crash safety, validation on open."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from smallcoder import SmallCoderError, Tokenizer
from smallcoder.data import pack
from smallcoder.data.pack import TokenDataset, pack_examples, pack_texts, tokenizer_hash

DOCS = ["def add(a, b):\n    return a + b\n", "User: hello there\nAssistant: hi, how are you?",
        "The quick brown fox jumps over the lazy dog. ", "for i in range(10):\n    print(i)\n",
        "naïve café 你好 🎉", "x"]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(DOCS) for _ in range(rng.randint(1, 4))) for _ in range(n)]


def _stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [i for d in docs for i in tok.encode(d) + [tok.eos_id]]


def _records(ds: TokenDataset) -> list[np.ndarray]:
    return [ds[i][0] for i in range(len(ds))]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _examples(tok: Tokenizer, n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = tok.encode(rng.choice(DOCS)) + [tok.eos_id]
        cut = rng.randint(0, len(ids) - 1)
        out.append((ids, [0] * cut + [1] * (len(ids) - cut)))
    return out


@pytest.fixture(scope="module")
def packed(small_tokenizer, tmp_path_factory) -> tuple[Path, list[str]]:
    docs = _docs(60)
    out = tmp_path_factory.mktemp("packs") / "packed"
    pack_texts(docs, small_tokenizer, out, seq_len=16, shard_records=7, batch_docs=8, progress=False)
    return out, docs


# ---- packed ------------------------------------------------------------------------------------


def test_packed_round_trip_is_exact(packed, small_tokenizer):
    out, docs = packed
    tok = small_tokenizer
    ds = TokenDataset(out, tok, verify=True)
    stream = _stream(tok, docs)
    kept = len(ds) * 16
    assert len(ds) == len(stream) // 16 and ds.num_tokens == kept
    assert len(ds.index["shards"]) == -(-len(ds) // 7) > 2
    records = _records(ds)
    assert all(r.dtype == np.uint16 and r.shape == (16,) for r in records)
    assert np.concatenate(records).tolist() == stream[:kept]
    assert ds[0][1] is None and ds.kind == "packed" and ds.seq_len == 16
    t = ds.totals
    assert (t["documents"], t["document_tokens"], t["tokens"]) == (60, len(stream), kept)
    assert t["dropped_tail_tokens"] == len(stream) - kept < 16
    # as text: the kept tokens are the documents joined by EOS, each whole document exactly
    text = tok.decode(np.concatenate(records).tolist())
    pieces = text.split(tok.eos_token)
    assert pieces[:-1] == docs[:len(pieces) - 1]
    assert docs[len(pieces) - 1].startswith(pieces[-1][:-1])  # the cut document's kept start
    assert tok.decode(stream) == "".join(d + tok.eos_token for d in docs)


def test_index_records_what_a_reader_needs(packed, small_tokenizer):
    out, _ = packed
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "smallcoder-tokens" and index["version"] == 1
    assert (index["kind"], index["seq_len"], index["dtype"], index["eos_id"]) == ("packed", 16, "uint16", 0)
    assert index["vocab_size"] == small_tokenizer.vocab_size
    assert index["tokenizer_hash"] == tokenizer_hash(small_tokenizer)
    assert index["sources"] == [{"label": "texts", "documents": 60}]
    assert index["created_by"].startswith("smallcoder ")
    s0 = index["shards"][0]
    assert s0["files"] == {"tokens": "tokens-00000.bin"} and s0["records"] == 7 and s0["num_tokens"] == 112
    assert len(s0["sha256"]["tokens"]) == 64
    assert {p.name for p in out.iterdir()} == {"index.json"} | {s["files"]["tokens"] for s in index["shards"]}
    assert np.fromfile(out / "tokens-00000.bin", dtype="<u2").tolist() == TokenDataset(out)[0][0].tolist() + \
        np.concatenate([TokenDataset(out)[i][0] for i in range(1, 7)]).tolist()


def test_packing_is_deterministic(packed, small_tokenizer, tmp_path):
    out, docs = packed
    again = tmp_path / "again"
    pack_texts(iter(docs), small_tokenizer, again, seq_len=16, shard_records=7, batch_docs=5, progress=False)
    assert _files(again) == _files(out)  # batch size changes nothing


def test_sources_and_empty_documents_are_counted(small_tokenizer, tmp_path):
    tok = small_tokenizer
    a, b = _docs(10, seed=1), ["", "def f():\n    pass\n", ""] * 3
    index = pack_texts([a, iter(b)], tok, tmp_path / "p", seq_len=8, source_labels=["code", "more"], progress=False)
    assert index["sources"] == [{"label": "code", "documents": 10}, {"label": "more", "documents": 3}]
    assert index["totals"]["empty_documents"] == 6
    ds = TokenDataset(tmp_path / "p")
    assert ds.sources == index["sources"]
    assert np.concatenate(_records(ds)).tolist() == _stream(tok, a + [d for d in b if d])[:len(ds) * 8]


def test_bad_pack_arguments(small_tokenizer, tmp_path):
    tok = small_tokenizer
    with pytest.raises(SmallCoderError, match="seq_len must be a positive integer, got 0"):
        pack_texts(DOCS, tok, tmp_path / "a", seq_len=0)
    with pytest.raises(SmallCoderError, match="source 'texts', document 1: expected a string, got bytes"):
        pack_texts(["ok", b"raw"], tok, tmp_path / "b", seq_len=4, progress=False)
    with pytest.raises(SmallCoderError, match="fewer than seq_len 1024"):
        pack_texts(DOCS, tok, tmp_path / "c", progress=False)
    with pytest.raises(SmallCoderError, match="one iterable per source"):
        pack_texts(iter(DOCS), tok, tmp_path / "d", source_labels=["x"], progress=False)
    assert not list(tmp_path.iterdir())  # nothing left behind by any failure


def test_existing_folder_needs_overwrite(packed, small_tokenizer, tmp_path):
    out = tmp_path / "p"
    pack_texts(DOCS * 4, small_tokenizer, out, seq_len=8, progress=False)
    before = _files(out)
    with pytest.raises(SmallCoderError, match="not empty"):
        pack_texts(DOCS, small_tokenizer, out, seq_len=4, progress=False)
    assert _files(out) == before
    pack_texts(DOCS, small_tokenizer, out, seq_len=4, overwrite=True, progress=False)
    assert TokenDataset(out).seq_len == 4


def test_vocab_over_uint16_is_refused(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    def tokenizer(size: int) -> Tokenizer:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        vocab = {c: i for i, c in enumerate(sorted(alphabet))}
        vocab.update({f"filler{i}": i for i in range(len(vocab), size - 1)})
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(["<|endoftext|>"])
        return Tokenizer(backend)

    big = tokenizer(65537)
    assert big.vocab_size == 65537
    with pytest.raises(SmallCoderError, match="vocab_size 65,537 does not fit uint16"):
        pack_texts(DOCS, big, tmp_path / "big", seq_len=4, progress=False)
    with pytest.raises(SmallCoderError, match="vocab_size 65,537 does not fit uint16"):
        pack_examples([([1], [1])], big, tmp_path / "big", progress=False)
    assert not (tmp_path / "big").exists()
    edge = tokenizer(65536)  # ids 0..65535 all fit: EOS is 65535 here
    pack_texts(["ab", "c"], edge, tmp_path / "edge", seq_len=2, progress=False)
    ids = np.concatenate(_records(TokenDataset(tmp_path / "edge", edge)))
    assert edge.eos_id == 65535 and ids.tolist() == _stream(edge, ["ab", "c"])[:4]


# ---- crash safety and validation on open -------------------------------------------------------


def test_crash_mid_write_keeps_the_previous_pack(packed, small_tokenizer, tmp_path, monkeypatch):
    src, docs = packed
    out = tmp_path / "pack"
    shutil.copytree(src, out)
    before = _files(out)
    opened = []
    real_open = pack._ShardWriter._open

    def failing_open(self):
        opened.append(1)
        if len(opened) % 3 == 0:
            raise OSError("disk full (simulated)")
        real_open(self)

    monkeypatch.setattr(pack._ShardWriter, "_open", failing_open)
    with pytest.raises(OSError, match="simulated"):
        pack_texts(_docs(80, seed=5), small_tokenizer, out, seq_len=16, shard_records=7, overwrite=True,
                   progress=False)
    assert len(opened) == 3  # it failed midway, after two shards were written
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]  # no temp folder left over
    with pytest.raises(OSError, match="simulated"):
        pack_texts(_docs(80, seed=5), small_tokenizer, tmp_path / "new", seq_len=16, shard_records=7,
                   progress=False)
    assert not (tmp_path / "new").exists() and len(opened) == 6
    assert np.concatenate(_records(TokenDataset(out, verify=True))).tolist() == \
        _stream(small_tokenizer, docs)[:TokenDataset(out).num_tokens]


def test_folder_without_index_is_refused(packed, tmp_path):
    """What a killed writer leaves (shards, no index) is never read as data."""
    out = tmp_path / "killed"
    shutil.copytree(packed[0], out)
    (out / "index.json").unlink()
    with pytest.raises(SmallCoderError, match="incomplete pack: no index.json"):
        TokenDataset(out)
    with pytest.raises(SmallCoderError, match="no such pack folder"):
        TokenDataset(tmp_path / "missing")


def test_truncated_or_missing_shard_is_detected(packed, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(packed[0], out)
    shard = out / "tokens-00001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(SmallCoderError, match=r"tokens-00001.bin: 222 bytes, but index.json says 224 .*truncated"):
        TokenDataset(out)
    shard.unlink()
    with pytest.raises(SmallCoderError, match="tokens-00001.bin: shard file is missing"):
        TokenDataset(out)
    corrupt = bytearray(data)
    corrupt[5] ^= 0xFF
    shard.write_bytes(bytes(corrupt))
    TokenDataset(out)  # same size: only the hashes can tell
    with pytest.raises(SmallCoderError, match=r"tokens-00001.bin: sha256 \w+ does not match"):
        TokenDataset(out, verify=True)


def test_tokenizer_hash_mismatch_is_detected(packed, small_tokenizer, tmp_path):
    from smallcoder.tokenizer_train import train_tokenizer

    small_tokenizer.save(tmp_path)
    assert tokenizer_hash(Tokenizer.load(tmp_path)) == tokenizer_hash(small_tokenizer)  # survives a save
    other = train_tokenizer(DOCS * 5, 300)
    mine, theirs = tokenizer_hash(small_tokenizer), tokenizer_hash(other)
    assert mine != theirs
    with pytest.raises(SmallCoderError, match=f"made with tokenizer {mine}, but the given tokenizer is {theirs}"):
        TokenDataset(packed[0], other)
    assert len(TokenDataset(packed[0], small_tokenizer)) > 0


@pytest.mark.parametrize("field,value,message", [
    ("version", 2, "field 'version' is 2"),
    ("kind", "images", "field 'kind' is 'images'"),
    ("dtype", "uint32", "field 'dtype' is 'uint32'"),
    ("seq_len", "16", "field 'seq_len' is '16', expected a int"),
    ("format", None, "field 'format' is None"),
])
def test_bad_index_fields_are_named(packed, tmp_path, field, value, message):
    out = tmp_path / "p"
    shutil.copytree(packed[0], out)
    index = json.loads((out / "index.json").read_text())
    index[field] = value
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(SmallCoderError, match=f"index.json: {message}"):
        TokenDataset(out)


def test_indexing(packed):
    ds = TokenDataset(packed[0])
    assert np.array_equal(ds[-1][0], ds[len(ds) - 1][0])
    assert np.array_equal(ds[np.int64(3)][0], ds[3][0])
    with pytest.raises(IndexError):
        ds[len(ds)]
    assert len(list(ds)) == len(ds)  # iteration stops cleanly
    assert not ds[0][0].flags.writeable


# ---- SFT ---------------------------------------------------------------------------------------


def test_sft_round_trip(small_tokenizer, tmp_path):
    tok = small_tokenizer
    examples = _examples(tok, 40)
    long_ids = tok.encode(" ".join(DOCS * 3)) + [0]
    examples.insert(5, (long_ids, [1] * len(long_ids)))
    examples.insert(9, ([], []))
    max_len = 60
    kept = [e for e in examples if 0 < len(e[0]) <= max_len]
    assert len(long_ids) > max_len and len(kept) == 40
    index = pack_examples(iter(examples), tok, tmp_path / "sft", max_len=max_len, shard_records=6, progress=False)
    ds = TokenDataset(tmp_path / "sft", tok, verify=True)
    assert (ds.kind, ds.seq_len, len(ds)) == ("sft", max_len, 40)
    assert len(index["shards"]) == 7
    for i, (ids, mask) in enumerate(kept):
        got_ids, got_mask = ds[i]
        assert got_ids.dtype == np.uint16 and got_mask.dtype == np.uint8
        assert got_ids.tolist() == ids and got_mask.tolist() == mask
    t = index["totals"]
    assert (t["documents"], t["records"], t["dropped_over_long"], t["dropped_empty"]) == (42, 40, 1, 1)
    assert index["sources"] == [{"label": "texts", "documents": 42, "records": 40}]
    assert t["dropped_over_long_tokens"] == len(long_ids)
    assert t["loss_tokens"] == sum(sum(m) for _, m in kept) and t["tokens"] == sum(len(i) for i, _ in kept)
    files = {p.name for p in (tmp_path / "sft").iterdir()}
    assert {"mask-00006.bin", "offsets-00006.bin", "tokens-00006.bin", "index.json"} <= files
    offsets = np.fromfile(tmp_path / "sft" / "offsets-00000.bin", dtype="<i8")
    assert offsets.tolist() == [0] + np.cumsum([len(i) for i, _ in kept[:6]]).tolist()
    pack_examples(examples, tok, tmp_path / "again", max_len=max_len, shard_records=6, progress=False)
    assert _files(tmp_path / "again") == _files(tmp_path / "sft")


def test_sft_truncated_mask_is_detected(small_tokenizer, tmp_path):
    out = tmp_path / "sft"
    pack_examples(_examples(small_tokenizer, 10), small_tokenizer, out, progress=False)
    mask = out / "mask-00000.bin"
    mask.write_bytes(mask.read_bytes()[:-1])
    with pytest.raises(SmallCoderError, match="mask-00000.bin: .* bytes, but index.json says"):
        TokenDataset(out)


@pytest.mark.parametrize("example,message", [
    (([1, 2, 3], [0, 1]), r"example 1: ids and loss mask differ in length"),
    (([1, 2], [0, 2]), "example 1: loss mask value 2 is not 0 or 1"),
    (([1, 99999], [0, 1]), "example 1: token id 99999 is outside the tokenizer's vocabulary"),
    (([1, -1], [0, 1]), "example 1: token id -1 is outside"),
    ("not a pair", r"example 1: expected \(token ids, loss mask\)"),
])
def test_sft_bad_examples(small_tokenizer, tmp_path, example, message):
    with pytest.raises(SmallCoderError, match=message):
        pack_examples([([5, 6], [0, 1]), example], small_tokenizer, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_sft_all_dropped_is_an_error(small_tokenizer, tmp_path):
    with pytest.raises(SmallCoderError, match="no records: of 2 examples, 2 were longer than max_len 3"):
        pack_examples([([1] * 5, [1] * 5)] * 2, small_tokenizer, tmp_path / "x", max_len=3, progress=False)


# ---- CLI ---------------------------------------------------------------------------------------


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("smallcoder: error: "), err
    return lines[0]


@pytest.fixture()
def corpus(tmp_path, small_tokenizer) -> dict[str, Path]:
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    small_tokenizer.save(tok_dir)
    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(_docs(30))))
    notes = tmp_path / "notes.txt"
    notes.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"add {i} and {i}"},
                                                     {"role": "assistant", "content": f"{2 * i}"}]}) + "\n"
                            for i in range(12)))
    return {"tok": tok_dir, "code": code, "notes": notes, "chat": chat, "root": tmp_path}


def test_cli_pack_texts(corpus, small_tokenizer, capsys):
    from smallcoder.cli import main

    out = corpus["root"] / "packed"
    argv = ["data", "pack", "--input", str(corpus["code"]), "--input", str(corpus["notes"]),
            "--tokenizer", str(corpus["tok"]), "--out", str(out), "--seq-len", "32"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    ds = TokenDataset(out, small_tokenizer, verify=True)
    docs = _docs(30) + ["The quick brown fox jumps over the lazy dog. " * 10]
    assert np.concatenate(_records(ds)).tolist() == _stream(small_tokenizer, docs)[:len(ds) * 32]
    assert f"31 documents -> {len(ds) * 32:,} tokens in {len(ds):,} records of 32 tokens, 1 shard(s)" in text
    assert f"  {corpus['code']}: 30 documents" in text and f"  {corpus['notes']}: 1 documents" in text
    assert "tokens/s" in text
    assert main(argv) == 2
    assert "not empty (use --force" in _error_line(capsys.readouterr().err)
    assert main(argv + ["--force", "--seq-len", "16"]) == 0
    assert TokenDataset(out).seq_len == 16


def test_cli_pack_sft(corpus, small_tokenizer, capsys):
    from smallcoder.cli import main
    from smallcoder.data.sft import encode_conversations

    out = corpus["root"] / "sft"
    base = ["data", "pack", "--tokenizer", str(corpus["tok"]), "--out", str(out)]
    assert main(base + ["--input", str(corpus["chat"]), "--sft", "--max-len", "64"]) == 0
    text = capsys.readouterr().out
    ds = TokenDataset(out, small_tokenizer)
    assert ds.kind == "sft" and len(ds) == 12
    ids, mask = encode_conversations([[{"role": "user", "content": "add 3 and 3"},
                                       {"role": "assistant", "content": "6"}]], small_tokenizer)[0]
    assert ds[3][0].tolist() == ids and ds[3][1].tolist() == mask and ds[3][0][-1] == 0 and ds[3][1][-1] == 1
    assert "12 documents" in text and "loss tokens" in text
    # a text source with --sft, and a conversation source without it, are refused
    assert main(base + ["--input", str(corpus["code"]), "--sft", "--force"]) == 2
    assert "field 'messages' is missing" in _error_line(capsys.readouterr().err)
    assert main(base + ["--input", str(corpus["chat"]), "--messages-field", "messages", "--force"]) == 2
    assert "a conversation source; pack it with --sft" in _error_line(capsys.readouterr().err)
    assert len(TokenDataset(out)) == 12  # the failed runs left the pack alone


def test_cli_pack_bad_inputs(corpus, capsys):
    from smallcoder.cli import main

    base = ["data", "pack", "--tokenizer", str(corpus["tok"]), "--out", str(corpus["root"] / "x")]
    assert main(base + ["--input", str(corpus["root"] / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such file or folder" in _error_line(capsys.readouterr().err)
    assert main(base + ["--input", str(corpus["code"]), "--input", str(corpus["code"])]) == 2
    assert "the same source is given twice" in _error_line(capsys.readouterr().err)
    assert main(base + ["--input", str(corpus["code"]), "--field", "body"]) == 2
    assert "line 1: field 'body' is missing" in _error_line(capsys.readouterr().err)
    assert main(base + ["--input", str(corpus["code"]), "--seq-len", "0"]) == 2
    assert "seq_len must be a positive integer, got 0" in _error_line(capsys.readouterr().err)
    assert not (corpus["root"] / "x").exists()


def test_tokenizer_hash_ignores_the_merges_format(starcoder_dir, tmp_path):
    """StarCoder's file writes merges as "a b" strings; `tokenizers` re-saves them as pairs."""
    ref = Tokenizer.load(starcoder_dir)
    ref.save(tmp_path)
    raw = json.loads((starcoder_dir / "tokenizer.json").read_text())["model"]["merges"][0]
    saved = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"][0]
    assert isinstance(raw, str) and isinstance(saved, list)
    assert tokenizer_hash(Tokenizer.load(tmp_path)) == tokenizer_hash(ref)


# ---- verification before training reads ------------------------------------------------------------


def _repair_sha(folder: Path, shard: int, key: str = "tokens") -> None:
    """Make index.json agree with a file changed on purpose (a pack written by another tool)."""
    import hashlib

    index = json.loads((folder / pack.INDEX_FILE).read_text())
    name = index["shards"][shard]["files"][key]
    index["shards"][shard]["sha256"][key] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / pack.INDEX_FILE).write_text(json.dumps(index))


def test_verify_records_its_result_and_catches_an_in_place_overwrite(packed, small_tokenizer, tmp_path, monkeypatch):
    """verify(record=True) hashes each file once and records its stat signature; an unchanged pack
    is not read again, and a shard overwritten in place (same size, mtime put back) is caught."""
    import hashlib
    import os

    out = tmp_path / "p"
    shutil.copytree(packed[0], out)
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(pack.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    ds = TokenDataset(out, small_tokenizer)
    hashed.clear()  # (opening hashes the tokenizer)
    ds.verify(record=True)
    n_files = sum(len(s["files"]) for s in json.loads((out / pack.INDEX_FILE).read_text())["shards"])
    assert len(hashed) == n_files and (out / pack.VERIFIED_FILE).is_file()
    ds = TokenDataset(out, small_tokenizer)
    hashed.clear()
    ds.verify(record=True)
    assert hashed == []  # recorded: nothing read again
    shard = out / "tokens-00001.bin"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    with open(shard, "r+b") as f:  # in place: same inode, same size
        f.write(data)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    ds = TokenDataset(out, small_tokenizer)
    hashed.clear()
    with pytest.raises(SmallCoderError, match=r"tokens-00001.bin: sha256 \w+ does not match index.json shards\[1\]"):
        ds.verify(record=True)
    assert hashed == [1]  # only the changed file was hashed again


def test_out_of_vocabulary_ids_are_named_at_read_time(packed, small_tokenizer, tmp_path):
    """Token ids past the vocabulary (with a checksum that agrees) fail where they are read, naming
    the shard, the record and the id, in the dataset, the mixture loader and verify()."""
    from smallcoder.data.mixture import Component, MixtureLoader

    out = tmp_path / "p"
    shutil.copytree(packed[0], out)
    shard = out / "tokens-00002.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    vocab = small_tokenizer.vocab_size
    ids[16 + 3] = vocab + 7  # record 1 of shard 2
    ids.tofile(shard)
    _repair_sha(out, 2)
    ds = TokenDataset(out, small_tokenizer)
    with pytest.raises(SmallCoderError, match=rf"tokens-00002.bin: record 1 holds token id {vocab + 7}, outside the "
                                              rf"vocabulary of {vocab} tokens"):
        ds[7 * 2 + 1]
    ds[7 * 2]  # its neighbours read fine
    loader = MixtureLoader([Component("p", ds, 1.0)], seq_len=16, global_batch=len(ds), micro_batch=len(ds),
                           seed=0, pad_id=0)
    with pytest.raises(SmallCoderError, match=f"token id {vocab + 7}"):
        loader.next_step()
    with pytest.raises(SmallCoderError, match=rf"tokens-00002.bin: holds token id {vocab + 7}, outside the vocabulary"):
        ds.verify()


def test_sft_out_of_vocabulary_ids_are_named(small_tokenizer, tmp_path):
    out = tmp_path / "sft"
    pack_examples(_examples(small_tokenizer, 20), small_tokenizer, out, 64, progress=False)
    shard = out / "tokens-00000.bin"
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[-1] = 65535
    ids.tofile(shard)
    _repair_sha(out, 0)
    ds = TokenDataset(out, small_tokenizer)
    with pytest.raises(SmallCoderError, match=r"tokens-00000.bin: record 19 holds token id 65535"):
        ds[19]

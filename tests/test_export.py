"""GGUF export: metadata, tensors, the q/k permutation (through a llama.cpp-convention forward),
the tokenizer round trip, CLI errors and, when llama-cpp-python is installed, llama.cpp itself."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs the 'gguf' package (pip install 'smallcoder[export]')")

from smallcoder import Engine, SamplingParams, SmallCoderError, Tokenizer, export, load, new_model, save
from smallcoder.cli import main
from smallcoder.prompts import CHAT_TEMPLATE

QT = gguf.GGMLQuantizationType
OUTTYPES = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32), "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
            "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}

# HF name -> llama.cpp name, as convert_hf_to_gguf.py writes them for the `llama` architecture.
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def field(reader, key: str):
    assert key in reader.fields, f"{key} missing from the GGUF metadata"
    return reader.fields[key].contents()


def tensors_f32(reader) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, in PyTorch's (rows, cols) layout."""
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type not in (QT.F32, QT.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = data.astype(np.float32).reshape([int(n) for n in reversed(t.shape)])
    return out


# ---- a forward pass written from llama.cpp's conventions (not from our model code) -------------

def llama_cpp_reference_logits(reader, ids: list[int]) -> np.ndarray:
    """Logits of the `llama` architecture as llama.cpp computes them, from the GGUF alone.

    RoPE is llama.cpp's mode 0 (NORM) for LLM_ARCH_LLAMA: dimensions (2i, 2i+1) of each head
    rotate together by pos * freq_base^(-2i/n_rot). GQA maps query head h to kv head
    h // (n_head / n_head_kv), as ggml's broadcasting mul_mat does. Float64 throughout.
    """
    W = {k: v.astype(np.float64) for k, v in tensors_f32(reader).items()}
    n_layer = int(field(reader, "llama.block_count"))
    n_head = int(field(reader, "llama.attention.head_count"))
    n_kv = int(field(reader, "llama.attention.head_count_kv"))
    n_rot = int(field(reader, "llama.rope.dimension_count"))
    base = float(field(reader, "llama.rope.freq_base"))
    eps = float(field(reader, "llama.attention.layer_norm_rms_epsilon"))
    hd = int(field(reader, "llama.attention.key_length"))
    n = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    pos = np.arange(n, dtype=np.float64)[:, None]
    theta = pos * base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)  # (n, n_rot/2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]

    def rope(x):  # x (n, heads, hd): rotate adjacent pairs
        x0, x1 = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
        y = x.copy()
        y[..., 0:n_rot:2] = x0 * cos - x1 * sin
        y[..., 1:n_rot:2] = x0 * sin + x1 * cos
        return y

    x = W["token_embd.weight"][ids]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(n_layer):
        p = f"blk.{i}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).reshape(n, n_head, hd))
        k = rope((h @ W[p + "attn_k.weight"].T).reshape(n, n_kv, hd))
        v = (h @ W[p + "attn_v.weight"].T).reshape(n, n_kv, hd)
        heads = []
        for hh in range(n_head):
            kv = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            heads.append((s / s.sum(-1, keepdims=True)) @ v[:, kv])
        x = x + np.concatenate(heads, -1) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    out = W.get("output.weight", W["token_embd.weight"])  # no `output` tensor: tied to the embedding
    return rms(x, W["output_norm.weight"]) @ out.T


def our_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model, _ = load(folder)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double().numpy()


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(micro_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    return {t: export.export_gguf(micro_checkpoint, out / f"micro-{t}.gguf", t) for t in OUTTYPES}


@pytest.fixture(scope="module")
def tied_checkpoint(micro_config, small_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tied") / "micro-tied"
    save(new_model(micro_config.replace(tie_word_embeddings=True), seed=3), small_tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def starcoder_gguf(starcoder_dir, micro_config, tmp_path_factory) -> tuple[Path, Path]:
    """A micro model with the real StarCoder vocabulary (49,152 tokens, 48,891 merges), exported."""
    tok = Tokenizer.load(starcoder_dir)
    folder = tmp_path_factory.mktemp("sc") / "micro-starcoder"
    save(new_model(micro_config.replace(vocab_size=tok.vocab_size), seed=2), tok, folder)
    return folder, export.export_gguf(folder, folder.parent / "micro-starcoder.gguf", "f32")


@pytest.fixture(scope="module")
def starcoder_reader(starcoder_gguf):
    return gguf.GGUFReader(starcoder_gguf[1])  # parsing 100k strings takes ~2 s: read once


def run_cli(argv: list[str]) -> None:
    """Parse and run `smallcoder export ...` through the module's own `register`."""
    parser = argparse.ArgumentParser(prog="smallcoder")
    export.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    args.func(args)


# ---- metadata and tensors ----------------------------------------------------------------------

@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_metadata(exported, micro_config, small_tokenizer, outtype):
    r = gguf.GGUFReader(exported[outtype])
    c = micro_config
    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.type") == "model"
    assert field(r, "general.name") == "micro"
    assert field(r, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    assert field(r, "general.file_type") == OUTTYPES[outtype][1]
    expected = {
        "llama.context_length": c.max_position_embeddings, "llama.embedding_length": c.hidden_size,
        "llama.block_count": c.num_hidden_layers, "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.head_dim, "llama.attention.key_length": c.head_dim,
        "llama.attention.value_length": c.head_dim, "llama.vocab_size": c.vocab_size,
    }
    for key, value in expected.items():
        assert field(r, key) == value, key
    assert field(r, "llama.rope.freq_base") == pytest.approx(c.rope_theta)
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(c.rms_norm_eps, rel=1e-6)
    # tokenizer: the small fixture tokenizer is plain ByteLevel (no digit split) -> llama.cpp's gpt-2
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens == [small_tokenizer.backend.id_to_token(i) for i in range(small_tokenizer.vocab_size)]
    types = field(r, "tokenizer.ggml.token_type")
    assert types[:2] == [gguf.TokenType.CONTROL] * 2 and set(types[2:]) == {gguf.TokenType.NORMAL}
    assert field(r, "tokenizer.ggml.bos_token_id") == 0
    assert field(r, "tokenizer.ggml.eos_token_id") == 0
    assert field(r, "tokenizer.ggml.unknown_token_id") == 0
    assert field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.ggml.fim_pre_token_id") == 1  # the fixture vocab has <fim_prefix> only
    for key in ("suf", "mid", "pad", "rep", "sep"):
        assert f"tokenizer.ggml.fim_{key}_token_id" not in r.fields
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


@pytest.mark.parametrize("outtype", list(OUTTYPES))
def test_tensors_names_shapes_types_and_values(exported, micro_checkpoint, micro_config, outtype):
    r = gguf.GGUFReader(exported[outtype])
    model, _ = load(micro_checkpoint)
    sd = model.state_dict()
    c = micro_config
    by_name = {t.name: t for t in r.tensors}
    assert sorted(by_name) == sorted(gguf_name(k) for k in sd)
    assert "output.weight" in by_name  # untied
    values = tensors_f32(r)
    for hf, w in sd.items():
        t = by_name[gguf_name(hf)]
        assert [int(n) for n in t.shape] == list(reversed(w.shape)), hf  # ggml order: ne0 = columns
        want = w.numpy()
        if hf.endswith("q_proj.weight"):
            want = export.permute_qk(want, c.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            want = export.permute_qk(want, c.num_key_value_heads)
        got = values[t.name]
        if w.ndim == 1:
            assert t.tensor_type == QT.F32, hf  # norms stay F32 in every outtype
            np.testing.assert_array_equal(got, want)
        elif outtype == "f32":
            assert t.tensor_type == QT.F32
            np.testing.assert_array_equal(got, want)
        elif outtype == "f16":
            assert t.tensor_type == QT.F16
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        else:
            assert t.tensor_type == QT.Q8_0
            # Q8_0: blocks of 32 along a row, scale d = amax/127 stored as f16, values round(x/d)
            blocks = want.reshape(-1, 32)
            bound = np.abs(blocks).max(-1, keepdims=True) / 127 * (0.5 + 127 * 2.0 ** -11) + 1e-12
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= bound).all(), hf
            assert err.max() > 0  # really quantized


def test_permute_qk_pairs_the_two_halves():
    """Row i of a head's first half and row i of its second half become rows 2i and 2i+1."""
    n_head, hd, cols = 3, 8, 2
    w = np.arange(n_head * hd * cols, dtype=np.float32).reshape(n_head * hd, cols)
    p = export.permute_qk(w, n_head)
    for h in range(n_head):
        for i in range(hd // 2):
            np.testing.assert_array_equal(p[h * hd + 2 * i], w[h * hd + i])
            np.testing.assert_array_equal(p[h * hd + 2 * i + 1], w[h * hd + hd // 2 + i])


def test_llama_cpp_reference_forward_matches_our_model(exported, micro_checkpoint, small_tokenizer):
    """The proof of the q/k permutation: llama.cpp's maths on the GGUF gives our logits."""
    ids = small_tokenizer.encode("def add(a, b):\n    return a + b\nfor i in range(10):")
    assert len(ids) > 8
    ours = our_logits(micro_checkpoint, ids)
    ref = llama_cpp_reference_logits(gguf.GGUFReader(exported["f32"]), ids)
    assert np.abs(ref - ours).max() < 1e-4
    scale = np.abs(ours).max()
    assert scale > 1  # logits are not trivially small, so the 1e-4 means something
    for outtype, tol in (("f16", 1e-2), ("q8_0", 0.1)):  # measured: 0.2%, 4%
        approx = llama_cpp_reference_logits(gguf.GGUFReader(exported[outtype]), ids)
        assert np.abs(approx - ours).max() < tol * scale, outtype
        assert (approx.argmax(-1) == ours.argmax(-1)).mean() > 0.9, outtype


def test_without_the_permutation_llama_cpp_would_compute_something_else(
        micro_checkpoint, small_tokenizer, tmp_path, monkeypatch):
    """The check above can fail: skipping the permutation changes llama.cpp's logits."""
    monkeypatch.setattr(export, "permute_qk", lambda w, n_head: w)
    path = export.export_gguf(micro_checkpoint, tmp_path / "unpermuted.gguf", "f32")
    ids = small_tokenizer.encode("def add(a, b):\n    return a + b")
    wrong = llama_cpp_reference_logits(gguf.GGUFReader(path), ids)
    assert np.abs(wrong - our_logits(micro_checkpoint, ids)).max() > 1e-2


def test_tied_embeddings_have_no_output_tensor(tied_checkpoint, small_tokenizer, tmp_path):
    path = export.export_gguf(tied_checkpoint, tmp_path / "tied.gguf", "f32")
    r = gguf.GGUFReader(path)
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    ids = small_tokenizer.encode("print(i)\n")
    assert np.abs(llama_cpp_reference_logits(r, ids) - our_logits(tied_checkpoint, ids)).max() < 1e-4


# ---- tokenizer ---------------------------------------------------------------------------------

def rebuild_tokenizer(reader):
    """A `tokenizers` BPE made only from the GGUF's tokens, merges, types and pre-tokenizer name."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = field(reader, "tokenizer.ggml.pre")
    backend.pre_tokenizer = {
        "starcoder": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "gpt-2": byte_level,
    }[pre]
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([t for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL])
    return backend


TEXTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nprint(fib(12345))\n",
    "<fim_prefix>def add(a, b):\n    <fim_suffix>\n    return c<fim_middle>",
    "User: Write hello world in C.\nAssistant: #include <stdio.h>\nint main() { puts(\"héllo ✓\"); }<|endoftext|>",
    "<reponame>me/repo<filename>src/x.py\n\t\tx = [1,2,3]  # naïve 日本語 🚀\r\n",
]


def test_tokenizer_round_trip_starcoder(starcoder_gguf, starcoder_reader):
    r = starcoder_reader
    ours = Tokenizer.load(starcoder_gguf[0])
    assert field(r, "tokenizer.ggml.pre") == "starcoder"
    assert len(field(r, "tokenizer.ggml.merges")) == 48891
    rebuilt = rebuild_tokenizer(r)
    for text in TEXTS:
        want = ours.encode(text)
        assert rebuilt.encode(text, add_special_tokens=False).ids == want, text
        assert rebuilt.decode(want, skip_special_tokens=False) == text
    fim_ids = ours.encode(TEXTS[1])
    assert fim_ids[0] == 1 and 3 in fim_ids and fim_ids[-1] == 2  # single special tokens
    # every FIM key that the StarCoder vocabulary supports, with StarCoder's ids
    assert field(r, "tokenizer.ggml.fim_pre_token_id") == 1
    assert field(r, "tokenizer.ggml.fim_mid_token_id") == 2
    assert field(r, "tokenizer.ggml.fim_suf_token_id") == 3
    assert field(r, "tokenizer.ggml.fim_pad_token_id") == 4
    assert field(r, "tokenizer.ggml.fim_rep_token_id") == 18
    assert "tokenizer.ggml.fim_sep_token_id" not in r.fields  # StarCoder has <filename>, not <file_sep>
    types = field(r, "tokenizer.ggml.token_type")
    assert types[:19] == [gguf.TokenType.CONTROL] * 19 and set(types[19:]) == {gguf.TokenType.NORMAL}


def test_vocabulary_equals_llama_cpps_own_starcoder_gguf(starcoder_reader, starcoder_dir):
    """Tokens, types and merges as in llama.cpp's ggml-vocab-starcoder.gguf (converted by llama.cpp)."""
    reference = starcoder_dir / "source" / "ggml-vocab-starcoder.gguf"
    if not reference.exists():
        pytest.skip(f"{reference} is absent")
    ref, ours = gguf.GGUFReader(reference), starcoder_reader
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id"):
        assert field(ours, key) == field(ref, key), key


def test_unsupported_pre_tokenizer_is_refused(micro_config, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tok")
    save(new_model(micro_config.replace(vocab_size=64)), tok, tmp_path / "ckpt")
    with pytest.raises(SmallCoderError, match=r"tokenizer\.json: field pre_tokenizer .*Whitespace"):
        export.export_gguf(tmp_path / "ckpt", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_a_tokenizer_without_merges_is_refused_before_anything_is_written(micro_config, tmp_path, capsys):
    """llama.cpp refuses a GGUF whose BPE tokenizer has no merges ("cannot find tokenizer merges"):
    the export says so in one line and writes nothing."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    backend = Backend(models.BPE(vocab={"<|endoftext|>": 0, "a": 1, "b": 2}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    (tmp_path / "tok").mkdir()
    backend.save(str(tmp_path / "tok" / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tok")
    save(new_model(micro_config.replace(vocab_size=64)), tok, tmp_path / "ckpt")
    assert main(["export", "--model", str(tmp_path / "ckpt"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "the BPE tokenizer has no merges" in err and "cannot find tokenizer merges" in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


# ---- CLI and files -----------------------------------------------------------------------------

def test_cli_export_and_overwrite(micro_checkpoint, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    run_cli(["export", "--model", str(micro_checkpoint), "--format", "gguf", "--out", str(out)])  # default q8_0
    assert "wrote" in capsys.readouterr().out
    r = gguf.GGUFReader(out)
    assert field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    before = out.read_bytes()
    with pytest.raises(SmallCoderError, match=rf"{out}: file exists .*--force"):
        run_cli(["export", "--model", str(micro_checkpoint), "--format", "gguf", "--outtype", "f16",
                 "--out", str(out)])
    assert out.read_bytes() == before
    run_cli(["export", "--model", str(micro_checkpoint), "--format", "gguf", "--outtype", "F16",
             "--out", str(out), "--force"])
    assert field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temp files left


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx"], r"unknown --format 'onnx'; choose one of: gguf"),
    (["--format", "gguf", "--outtype", "q4_0"], r"unknown --outtype 'q4_0'; choose one of: f32, f16, q8_0"),
])
def test_cli_bad_options(micro_checkpoint, tmp_path, argv, message):
    with pytest.raises(SmallCoderError, match=message):
        run_cli(["export", "--model", str(micro_checkpoint), "--out", str(tmp_path / "x.gguf"), *argv])
    assert not (tmp_path / "x.gguf").exists()


def test_missing_and_non_checkpoint_folders(tmp_path):
    with pytest.raises(SmallCoderError, match=r"no such file or folder"):
        export.export_gguf(tmp_path / "nope" / "x", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SmallCoderError, match=r"empty: no config\.json"):
        export.export_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    (tmp_path / "out.gguf").mkdir()
    with pytest.raises(SmallCoderError, match=r"out\.gguf: is a folder"):
        export.export_gguf(tmp_path / "empty", tmp_path / "out.gguf")


def test_quantized_folders_are_refused(micro_checkpoint, tmp_path):
    int8 = tmp_path / "int8"  # a real int8 checkpoint (int8 *.weight + *.weight_scale)
    save(*load(micro_checkpoint, dtype="int8"), int8)
    other = tmp_path / "gptq"  # any other quantization_config too
    shutil.copytree(micro_checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(cfg))
    for folder, method in ((int8, "smallcoder-int8"), (other, "gptq")):
        message = rf"{folder}/config\.json: field quantization_config \('{method}'\).*export from the float checkpoint"
        with pytest.raises(SmallCoderError, match=message):
            run_cli(["export", "--model", str(folder), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert not (tmp_path / "x.gguf").exists()


def test_a_failed_write_leaves_the_previous_file(micro_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous")

    def boom(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export.export_gguf(micro_checkpoint, out, "f32", overwrite=True)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---- llama.cpp itself --------------------------------------------------------------------------

def need_llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (optional; pip install llama-cpp-python)")


def test_llama_cpp_loads_the_file_and_generates_our_tokens(exported, micro_checkpoint, small_tokenizer):
    llama_cpp = need_llama_cpp()
    prompt = "def add(a, b):\n    return"
    ids = small_tokenizer.encode(prompt)
    model, tok = load(micro_checkpoint)
    want = Engine(model, tok).generate([ids], SamplingParams(max_new_tokens=16, temperature=0.0,
                                                             stop_at_eos=False))[0].token_ids
    assert len(want) == 16
    f32 = 0  # GGML_TYPE_F32: a float32 KV cache (llama.cpp's default F16 cache moves logits by ~3e-3)
    llm = llama_cpp.Llama(model_path=str(exported["f32"]), n_ctx=128, n_threads=1, n_batch=64,
                          logits_all=True, type_k=f32, type_v=f32, verbose=False)
    try:
        # llama.cpp's own tokenizer reads our vocabulary, merges and pre-tokenizer the same way
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        assert llm.tokenize(b"<fim_prefix>x = 1<|endoftext|>", add_bos=False, special=True) == \
            small_tokenizer.encode("<fim_prefix>x = 1<|endoftext|>")
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        assert np.abs(logits - our_logits(micro_checkpoint, ids)).max() < 1e-4  # measured 4e-6
        llm.reset()
        got = []
        for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(t)
            if len(got) == len(want):
                break
        assert got == want
    finally:
        llm.close()


def test_llama_cpp_tokenizes_the_starcoder_export_like_starcoder(starcoder_gguf, starcoder_dir):
    """llama.cpp's tokenizer on the exported vocabulary ('starcoder' pre-tokenizer, merges, control
    tokens) gives bigcode/starcoder's ids for the known pairs and our ids for code and FIM prompts."""
    llama_cpp = need_llama_cpp()
    ours = Tokenizer.load(starcoder_gguf[0])
    known = [json.loads(line) for line in (starcoder_dir / "known_ids.jsonl").read_text().splitlines() if line]
    pairs = [(k["text"], k["ids"]) for k in known if k["check"] == "encode"]
    pairs += [(text, ours.encode(text)) for text in TEXTS]
    assert len(pairs) > 100
    llm = llama_cpp.Llama(model_path=str(starcoder_gguf[1]), vocab_only=True, verbose=False)
    try:
        for text, ids in pairs:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert llm.token_eos() == 0 and llm.token_bos() == 0
    finally:
        llm.close()


def test_the_gguf_name_is_the_runs_name_not_final(tmp_path):
    """llama.cpp and LM Studio show general.name: a training run's folders are named after the run."""
    run = tmp_path / "tiny"
    for sub in ("final", "stage-code", "checkpoints/step-0000120", "other"):
        (run / sub).mkdir(parents=True)
    assert export.model_name(run / "final") == "tiny"
    assert export.model_name(run / "stage-code") == "tiny-stage-code"
    assert export.model_name(run / "checkpoints" / "step-0000120") == "tiny-step-0000120"
    assert export.model_name(run / "other") == "other"
    assert export.model_name("Beebey/smallcoder-303m") == "Beebey/smallcoder-303m"

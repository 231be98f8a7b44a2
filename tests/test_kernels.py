"""The C++ decode step against the PyTorch forward it replaces, and int8 checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import smallcoder
from smallcoder import Engine, KVCache, ModelConfig, SamplingParams, SmallCoderError, kernels, new_model, save
from smallcoder.quant import Int8Linear, quantize_model, quantize_rows

pytestmark = pytest.mark.skipif(kernels.load_library() is None,
                                reason="the C++ decode kernel does not build here (no compiler?)")

# GQA, a head_dim of 12 and an FFN of 132 (not multiples of 8: the kernel's tail loops run)
CFG = ModelConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=132, max_position_embeddings=64,
                  initializer_range=0.2)
# int8 weights: the kernel also quantizes activations (int16, one scale a row; the bound on that
# error, test_int8_dot.py's, is 0.3% of rms(logits) here, measured up to 0.1%) and, with an int8
# cache, may round a stored key or value to the neighbouring int8 step where PyTorch does not (a
# step of that vector's max / 127, a few % of the values' rms), which moves the logits further
# (measured: up to 0.63% of their rms). Logits are held to 3% of their rms; stored keys and values
# to 0.2% of theirs (measured: 0.05%) plus one step of the cache's rounding.
INT8_TOL = 0.03
INT8_KV_TOL = 2e-3


def _model(kind: str) -> smallcoder.SmallCoder:
    return _model_for(CFG, kind)


def _stored(cache: KVCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's keys and values as the cache holds them, in fp32 (int8 rows times their scales)."""
    if cache.k_scale is None:
        return cache.k[layer].float(), cache.v[layer].float()
    return (cache.k[layer].float() * cache.k_scale[layer][..., None],
            cache.v[layer].float() * cache.v_scale[layer][..., None])


def _reference(m: smallcoder.SmallCoder) -> smallcoder.SmallCoder:
    """The same weights in the PyTorch path, in fp32 (bf16 weights upcast exactly)."""
    import copy

    ref = copy.deepcopy(m)
    return (ref.float() if not any(isinstance(x, Int8Linear) for x in ref.modules()) else ref).eval()


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_kernel_decode_equals_pytorch_forward(kind, rows, kv):
    """Rows at different positions (prefilled separately), several steps: same logits as the
    PyTorch forward on the same weights, and the same cache contents, with an fp32, fp16 or int8
    cache (both sides store what they compute in it and attend over the stored values). int8
    differs by design (the kernel quantizes activations too): it is held to the bounds above
    (test_int8_dot.py derives the activations' part and holds the kernel to an exact emulation)."""
    m = _model(kind)
    ref = _reference(m)
    assert kernels.attach(m) and ref.decode_kernel is None
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(0, CFG.vocab_size, (rows, 30), generator=g)
    ca, cb = KVCache(CFG, rows, 40, kv), KVCache(CFG, rows, 40, kv)
    for r in range(rows):
        n = 3 + 5 * r
        ref(ids[r:r + 1, :n], cache=ca.rows(r, r + 1))
        ref(ids[r:r + 1, :n], cache=cb.rows(r, r + 1))
    for t in range(4):
        tok = ids[:, 20 + t:21 + t]
        got = m(tok, cache=ca)
        want = ref(tok, cache=cb)
        assert got.shape == want.shape == (rows, 1, CFG.vocab_size)
        if kind == "int8":
            rms = want.float().pow(2).mean(-1).sqrt()
            assert ((got.float() - want.float()).abs().amax(-1) <= INT8_TOL * rms).all()
        else:
            assert (got.float() - want.float()).abs().max().item() < 2e-4 * want.abs().max().item()
    assert ca.lengths.tolist() == cb.lengths.tolist()
    for layer in range(CFG.num_hidden_layers):
        # values apart by fp32 rounding (or int8 activations' error) may round to neighbouring fp16
        # or int8 values: one step apart
        for a, b in zip(_stored(ca, layer), _stored(cb, layer)):
            step = {torch.float32: 0, torch.float16: 2 ** -10 * b.abs(),
                    torch.int8: b.abs().amax(-1, keepdim=True) / 127}[kv]
            tol = INT8_KV_TOL * b.pow(2).mean().sqrt() if kind == "int8" else 1e-4
            assert ((a - b).abs() <= tol + step * 1.01).all()
        if kind != "int8" and kv == torch.int8:  # most positions' int8 rows are bit-identical, not just close
            assert (ca.k[layer] == cb.k[layer]).float().mean() > 0.95


def _int8_builds() -> list[str]:
    """Extra flags of the int8 paths to check: this CPU's own, and on x86 the AVX2 path (where this
    CPU's own is another) and the portable one."""
    import platform

    flags = [""]
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = kernels._cpu_id().split()
        if "avx2" in cpu and "fma" in cpu and kernels.int8_path(kernels.load_library()) != "avx2":
            flags.append("-march=haswell")
        flags.append("-march=x86-64")
    return flags


@torch.inference_mode()
@pytest.mark.parametrize("extra", _int8_builds())
def test_int8_rows_are_bitwise_independent_of_the_step_they_run_in(extra):
    """A row's logits and the keys and values it stores are bit for bit the same whatever M is (M
    rows per step: 1, 3, 4, 5, 16, 17 and 64 cover a register tile's full and partial row blocks,
    the widened-weights path and, from 48 rows on 512-bit builds, q8gemm.h's panels) and however
    the build tiles the work: a build with another register tile (3 rows x 2 weight rows), 1 KiB
    row tiles (so 64 rows run as several) and no panels, and one with panels from 2 rows and 64
    values of K a block (so the 132-wide input takes three), give the same bits (csrc/q8dot.h: a
    row's integer sums are exact, its fp32 epilogue fixed)."""
    m = _model("int8")
    g = torch.Generator().manual_seed(11)
    base = KVCache(CFG, 64, 48, torch.int8)
    for t in base.k + base.v:
        t.copy_(torch.randint(-127, 128, t.shape, generator=g))
    for t in base.k_scale + base.v_scale:
        t.copy_(torch.rand(t.shape, generator=g) * 0.02)
    x = m.model.embed_tokens(torch.randint(0, CFG.vocab_size, (64,), generator=g)).float()
    starts = torch.randint(0, 40, (64,), generator=g)
    flags = kernels.build_flags() + extra.split()
    variants = [["-DQ8_R=3", "-DQ8_NW=2", "-DQ8_TILE_BYTES=1024", "-DQ8G_MIN_ROWS=1000"],
                ["-DQ8G_MIN_ROWS=2", "-DQ8G_KC=64"]] if not extra else []  # this CPU's own path only
    libs = [kernels.compile_library(flags + v) for v in [[], *variants]]
    want = None
    for lib in libs:
        kernel = kernels.DecodeKernel(m, lib)
        for M in (64, 1, 3, 4, 5, 16, 17):
            cache = KVCache(None, 0, 0, _views=([t.clone() for t in base.k], [t.clone() for t in base.v],
                                                base.lengths.clone(), [t.clone() for t in base.k_scale],
                                                [t.clone() for t in base.v_scale]))
            got = kernel(x[:M], cache.rows(0, M), starts[:M])
            if want is None:
                want = got, cache
            assert torch.equal(got, want[0][:M]), f"M={M}"
            for a, b in zip(cache.k + cache.v + cache.k_scale + cache.v_scale,
                            want[1].k + want[1].v + want[1].k_scale + want[1].v_scale):
                assert torch.equal(a[:M], b[:M]), f"M={M}"


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.float16, torch.int8])
@pytest.mark.parametrize("head_dim", [64, 96, 104, 200])
def test_kernel_attention_at_long_contexts_and_common_head_sizes(head_dim, kv):
    """Head sizes whose value sums stay in registers (64, 96: 8 and 12 vectors), one past them
    (104: a second pass) and one with a tail past 8 lanes (200), at contexts up to 300: past the
    rows the kernel prefetches and not a multiple of its 4-key blocks."""
    cfg = ModelConfig(vocab_size=64, hidden_size=2 * head_dim, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=40, max_position_embeddings=320,
                      initializer_range=0.2)
    m = new_model(cfg, seed=1).eval()
    ref = _reference(m)
    assert kernels.attach(m)
    ids = torch.randint(0, 64, (2, 300), generator=torch.Generator().manual_seed(head_dim))
    ca, cb = KVCache(cfg, 2, 310, kv), KVCache(cfg, 2, 310, kv)
    for r, n in enumerate((290, 157)):
        ref(ids[r:r + 1, :n], cache=ca.rows(r, r + 1))
        ref(ids[r:r + 1, :n], cache=cb.rows(r, r + 1))
    for t in range(3):
        tok = ids[:, 295 + t:296 + t]
        got, want = m(tok, cache=ca), ref(tok, cache=cb)
        assert (got - want).abs().max().item() < 2e-4 * want.abs().max().item()


def test_engine_kv_cache_follows_the_weights_precision(small_tokenizer):
    """The kernel's cache: fp32 where the weights are fp32 (the logits stay PyTorch's), fp16 for
    bf16 and int8 for int8 weights (fewer bytes for a long-context step); `kv_dtype` chooses."""
    assert Engine(_model("fp32"), small_tokenizer).kv_dtype == torch.float32
    assert Engine(_model("bf16"), small_tokenizer).kv_dtype == torch.float16
    assert Engine(_model("int8"), small_tokenizer).kv_dtype == torch.int8
    assert Engine(_model("int8"), small_tokenizer, kv_dtype=torch.float16).kv_dtype == torch.float16
    assert Engine(_model("bf16"), small_tokenizer, use_kernel=False).kv_dtype == torch.bfloat16
    params = SamplingParams(max_new_tokens=12, stop_at_eos=False)
    for kv in (torch.int8, torch.float16):
        engine = Engine(_model("fp32"), small_tokenizer, kv_dtype=kv)
        out = engine.generate([[5, 6, 7, 8], [9] * 20], params)
        assert engine._cache.k[0].dtype == kv and [len(c.token_ids) for c in out] == [12, 12]


@torch.inference_mode()
def test_int8_kv_cache_in_pytorch_alone_matches_a_float_cache_closely():
    """Without the kernel (a GPU, or no compiler) an int8 cache works the same: the forward
    quantizes what it stores and attends over the dequantized rows."""
    m = _model("fp32")
    ids = torch.randint(0, CFG.vocab_size, (2, 30), generator=torch.Generator().manual_seed(5))
    out = {}
    for kv in (torch.float32, torch.int8):
        cache = KVCache(CFG, 2, 40, kv)
        m(ids[:, :20], cache=cache)
        out[kv] = torch.cat([m(ids[:, t:t + 1], cache=cache) for t in range(20, 30)], dim=1)
    rms = out[torch.float32].pow(2).mean().sqrt()  # measured: mean error 1% of it, the largest 10%
    err = (out[torch.int8] - out[torch.float32]).abs()
    assert 0 < err.mean() < 0.03 * rms and err.max() < 0.3 * rms
    assert out[torch.int8].argmax(-1).eq(out[torch.float32].argmax(-1)).float().mean() > 0.9


F16_EDGES = [0.0, -0.0, 1.0, -2.5, 65504.0, 65519.0, 65520.0, 1e6, float("inf"), -float("inf"),
             2 ** -14, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25, 2 ** -26, 3 * 2 ** -25, 6.1e-5, 1e-8,
             1 + 2 ** -11, 1 + 3 * 2 ** -11, 2049.0, 2051.0, -1e-7, 3.0e-6]


@pytest.mark.parametrize("flags", [[], ["-mno-f16c"]], ids=["native", "portable"])
def test_fp16_cache_holds_what_torch_stores(flags):
    """The kernel writes its fp16 cache with the bits torch's .to(float16) makes (round to nearest
    even, subnormals, overflow to inf, NaN kept) and reads them back exactly, on the F16C path
    and on the portable one (built without F16C), so the kernel and a PyTorch prefill agree on
    what a cache row holds."""
    lib = kernels.compile_library(kernels.build_flags() + flags)
    x = torch.cat([torch.tensor(F16_EDGES + [-v for v in F16_EDGES] + [float("nan")]),
                   torch.randn(5000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-9, 5, 5000)])
    h = torch.empty(x.numel(), dtype=torch.float16)
    back = torch.empty(x.numel())
    lib.sc_f16(x.data_ptr(), h.data_ptr(), back.data_ptr(), x.numel())
    want = x.to(torch.float16)
    assert torch.equal(h.view(torch.int16)[~x.isnan()], want.view(torch.int16)[~x.isnan()])
    assert h[x.isnan()].isnan().all()
    torch.testing.assert_close(back, want.float(), rtol=0, atol=0, equal_nan=True)


@torch.inference_mode()
def test_kernel_is_dropped_when_the_weights_are_replaced():
    m = _model("fp32")
    assert kernels.attach(m)
    m.to(torch.float64)  # new tensors: the kernel must not read the old addresses
    cache = KVCache(CFG, 1, 8, torch.float32)
    m(torch.tensor([[1, 2]]), cache=cache)
    out = m(torch.tensor([[3]]), cache=cache)
    assert m.decode_kernel is None and out.dtype == torch.float64


def test_kernel_validity_check_changes_nothing():
    """`valid` answers whether the model still holds the kernel's tensors; dropping a stale kernel
    is the forward's decision, not a side effect of asking."""
    m = _model("fp32")
    assert kernels.attach(m)
    kernel = m.decode_kernel
    assert kernel.valid(m)
    m.to(torch.float64)
    assert not kernel.valid(m) and not kernel.valid(m)
    assert m.decode_kernel is kernel


def test_engine_kernel_is_never_run_on_replaced_weights(small_tokenizer, monkeypatch):
    m = _model("fp32")
    engine = Engine(m, small_tokenizer)
    calls = []
    real = kernels.DecodeKernel.__call__

    def counting(self, *args):
        calls.append(self)
        return real(self, *args)

    monkeypatch.setattr(kernels.DecodeKernel, "__call__", counting)
    params = SamplingParams(max_new_tokens=6, stop_at_eos=False)
    engine.generate([[5, 6, 7]], params)
    assert calls and all(k is engine.decode_kernel for k in calls)  # the engine's own kernel decoded
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)  # new tensors
    calls.clear()
    got = engine.generate([[5, 6, 7]], params)
    assert not calls
    want = Engine(m, small_tokenizer, use_kernel=False).generate([[5, 6, 7]], params)
    assert got[0].token_ids == want[0].token_ids


def test_engine_greedy_tokens_equal_with_and_without_kernel(small_tokenizer):
    m = _model("fp32")
    params = SamplingParams(max_new_tokens=20, stop_at_eos=False)
    prompts = [[5, 6, 7], [8] * 11, [9, 10]]
    fast = Engine(m, small_tokenizer, max_batch=2)
    assert fast.decode_kernel is not None  # the engine's own kernel (it no longer attaches one to m)
    slow = Engine(_reference(m), small_tokenizer, use_kernel=False)
    assert slow.model.decode_kernel is None
    a, b = fast.generate(prompts, params), slow.generate(prompts, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_quantize_rows_error_is_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3, 64)[:, None]
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses the full range


def test_int8_checkpoint_round_trip_and_errors(tmp_path, small_tokenizer):
    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                      tie_word_embeddings=True)
    src = save(new_model(cfg, seed=0), small_tokenizer, tmp_path / "float")
    on_load, _ = smallcoder.load(src, dtype="int8")
    dst = save(on_load, small_tokenizer, tmp_path / "int8")
    meta = json.loads((dst / "config.json").read_text())
    assert meta["quantization_config"]["quant_method"] == "smallcoder-int8"
    saved, _ = smallcoder.load(dst, dtype="int8")
    assert saved.lm_head.weight.dtype == torch.int8  # tied models keep their own int8 head
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(on_load(ids), saved(ids))
    with pytest.raises(SmallCoderError, match="int8-quantized.*--dtype int8"):
        smallcoder.load(dst)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(dst / "model.safetensors"))  # -128: outside the symmetric range we write
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name][0, 0] = -128
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SmallCoderError, match=f"int8 tensor {name} holds -128"):
        smallcoder.load(dst, dtype="int8")
    meta["quantization_config"]["quant_method"] = "gptq"
    (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(SmallCoderError, match="quant_method 'gptq' is not supported"):
        smallcoder.load(dst, dtype="int8")


def test_quantize_command(tmp_path, micro_checkpoint, capsys):
    from smallcoder.cli import main

    assert main(["quantize", "--model", str(micro_checkpoint), "--out", str(tmp_path / "q")]) == 0
    assert "int8 weights" in capsys.readouterr().out
    assert main(["quantize", "--model", str(micro_checkpoint), "--out", str(tmp_path / "q")]) == 2
    assert "--force" in capsys.readouterr().err or (tmp_path / "q").exists()
    assert main(["generate", "--model", str(tmp_path / "q"), "--dtype", "int8", "--prompt", "def",
                 "--max-new-tokens", "5", "--ignore-eos"]) == 0


def test_no_compiler_falls_back_to_pytorch(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("SMALLCODER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="decode kernel is unavailable"):
        assert kernels.load_library() is None
    m = _model("fp32")
    assert not kernels.attach(m)


def test_the_kernel_source_states_the_row_limit_kernels_py_uses():
    """decode.cpp's header comment names the most rows kernels.py hands it; they must agree
    (it once said 8 while the kernel took 16)."""
    import re

    header = kernels.SOURCE.read_text().split("\n\n", 1)[0]
    stated = {int(n) for n in re.findall(r"MAX_ROWS \((\d+)\)", header)}
    assert stated == {kernels.MAX_ROWS}
    assert not re.search(r"batch\s*(<=|≤)\s*\d+", header)


# Ragged steps (DecodeKernel.rows, SmallCoder.forward_rows): tokens of several cache rows in one
# call. ODD: every size off the kernel's vector widths (hidden 44, head_dim 22, FFN 70, vocab 97).
ODD = ModelConfig(vocab_size=97, hidden_size=44, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, intermediate_size=70, max_position_embeddings=64,
                  initializer_range=0.2)
KINDS = ["fp32", "bf16", "int8"]
KVS = [torch.float32, torch.float16, torch.int8]
# (cache row, tokens) in call order: decode rows of rows 2 and 3 around spans of rows 0 and 1
SCHEDULE = [(2, 1), (0, 5), (3, 1), (1, 3)]
PROMPTS = [4, 9, 2, 6]  # the tokens each cache row holds before the call


def _model_for(cfg: ModelConfig, kind: str) -> smallcoder.SmallCoder:
    m = new_model(cfg, seed=3)
    if kind == "bf16":
        m = m.to(torch.bfloat16)
    elif kind == "int8":
        quantize_model(m)
    return m.eval()


def _prefilled(ref: smallcoder.SmallCoder, cfg: ModelConfig, kv: torch.dtype, ids: torch.Tensor) -> KVCache:
    """A cache whose row r holds PROMPTS[r] tokens of ids[r], written by the PyTorch forward."""
    cache = KVCache(cfg, len(PROMPTS), 40, kv)
    for r, n in enumerate(PROMPTS):
        ref(ids[r:r + 1, :n], cache=cache.rows(r, r + 1))
    return cache


def _schedule(ids: torch.Tensor, schedule=SCHEDULE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, rows, positions of a ragged call: each row's next tokens after its prompt."""
    tokens, rows, positions = [], [], []
    for r, t in schedule:
        p0 = PROMPTS[r] + sum(n for rr, n in schedule[:schedule.index((r, t))] if rr == r)
        tokens += ids[r, p0:p0 + t].tolist()
        rows += [r] * t
        positions += list(range(p0, p0 + t))
    return torch.tensor(tokens), torch.tensor(rows), torch.tensor(positions)


def _close(got: torch.Tensor, want: torch.Tensor, kind: str) -> None:
    """The tolerances of test_kernel_decode_equals_pytorch_forward, per row of logits."""
    got, want = got.float(), want.float()
    if kind == "int8":
        rms = want.pow(2).mean(-1).sqrt()
        assert ((got - want).abs().amax(-1) <= INT8_TOL * rms).all()
    else:
        assert (got - want).abs().max().item() < 2e-4 * want.abs().max().item()


def _caches_close(ca: KVCache, cb: KVCache, kind: str, kv: torch.dtype) -> None:
    """As test_kernel_decode_equals_pytorch_forward compares them."""
    for layer in range(len(ca.k)):
        for a, b in zip(_stored(ca, layer), _stored(cb, layer)):
            # values apart by rounding (int8 weights: by their activations' error) may round to
            # neighbouring fp16 or int8 cache values: one step apart
            step = {torch.float32: 0, torch.float16: 2 ** -10 * b.abs(),
                    torch.int8: b.abs().amax(-1, keepdim=True) / 127}[kv]
            tol = INT8_TOL * b.pow(2).mean().sqrt() if kind == "int8" else 1e-4
            assert ((a - b).abs() <= tol + step * 1.01).all()


def _caches_equal(ca: KVCache, cb: KVCache) -> None:
    for pa, pb in zip(ca.planes(), cb.planes()):
        for a, b in zip(pa, pb):
            assert torch.equal(a, b)


@torch.inference_mode()
@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [CFG, ODD], ids=["gqa", "odd"])
def test_ragged_kernel_step_equals_the_pytorch_forward_of_each_span(cfg, kind, kv):
    """One kernel call of decode rows of two cache rows and spans of 5 and 3 positions of two
    others: each token's logits are the PyTorch forward's of its row's span, and the caches hold
    what that forward stores."""
    m = _model_for(cfg, kind)
    ref = _reference(m)
    kernel = kernels.build(m)
    ids = torch.randint(0, cfg.vocab_size, (len(PROMPTS), 20), generator=torch.Generator().manual_seed(11))
    ca, cb = _prefilled(ref, cfg, kv, ids), _prefilled(ref, cfg, kv, ids)
    tokens, rows, positions = _schedule(ids)
    got = kernel.rows(m.model.embed_tokens(tokens), ca, rows, positions, torch.arange(len(tokens)))
    assert got.shape == (len(tokens), cfg.vocab_size) and got.dtype == torch.float32
    i = 0
    for r, t in SCHEDULE:
        want = ref(tokens[i:i + t][None], cache=cb.rows(r, r + 1), starts=[int(positions[i])])[0]
        _close(got[i:i + t], want, kind)
        i += t
    _caches_close(ca, cb, kind, kv)
    # only some logits: the same rows' values, in the order asked
    pick = torch.tensor([6, 0, 9, 6])
    again = kernel.rows(m.model.embed_tokens(tokens), _prefilled(ref, cfg, kv, ids), rows, positions, pick)
    assert torch.equal(again, got[pick])


def _groupings(tokens, rows, positions):
    """The same tokens in other calls: one token per call, each row's span alone, the rows in
    reverse order, and two rows' spans per call."""
    spans, i = [], 0
    for r, t in SCHEDULE:
        spans.append(list(range(i, i + t)))
        i += t
    yield [[n] for n in range(len(tokens))]
    yield spans
    yield [[n for s in reversed(spans) for n in s]]
    yield [spans[0] + spans[1], spans[2] + spans[3]]


@torch.inference_mode()
@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", [CFG, ODD], ids=["gqa", "odd"])
def test_a_tokens_kernel_logits_do_not_depend_on_the_tokens_beside_it(cfg, kind, kv):
    """Bit for bit: each token's logits (and the keys and values stored) from one mixed ragged call
    equal those of the same tokens one position per call and in other groupings (a speculative
    verify step must give plain decoding's tokens)."""
    m = _model_for(cfg, kind)
    ref = _reference(m)
    kernel = kernels.build(m)
    ids = torch.randint(0, cfg.vocab_size, (len(PROMPTS), 20), generator=torch.Generator().manual_seed(12))
    tokens, rows, positions = _schedule(ids)
    x = m.model.embed_tokens(tokens)
    mixed = _prefilled(ref, cfg, kv, ids)
    want = kernel.rows(x, mixed, rows, positions, torch.arange(len(tokens)))
    for calls in _groupings(tokens, rows, positions):
        cache = _prefilled(ref, cfg, kv, ids)
        got = torch.empty_like(want)
        for call in calls:
            idx = torch.tensor(call)
            got[idx] = kernel.rows(x[idx], cache, rows[idx], positions[idx], torch.arange(len(call)))
        assert torch.equal(got, want), calls
        _caches_equal(cache, mixed)


@torch.inference_mode()
@pytest.mark.parametrize("flags", [["-march=haswell"], ["-march=x86-64"]], ids=["avx2", "portable"])
@pytest.mark.parametrize("kind", KINDS)
def test_other_instruction_paths_are_row_independent_and_match_pytorch(kind, flags):
    """The AVX2 and portable builds (gemm.h's other paths, q8dot.h's): a ragged step matches the
    PyTorch forward and each token's logits equal those of one token per call."""
    lib = kernels.compile_library(kernels.build_flags() + flags)
    assert kernels.gemm_path(lib) == ("avx2" if "haswell" in flags[0] else "portable")
    m = _model_for(ODD, kind)
    ref = _reference(m)
    kernel = kernels.DecodeKernel(m, lib)
    ids = torch.randint(0, ODD.vocab_size, (len(PROMPTS), 20), generator=torch.Generator().manual_seed(13))
    tokens, rows, positions = _schedule(ids)
    x = m.model.embed_tokens(tokens)
    ca, cb, cc = (_prefilled(ref, ODD, torch.float32, ids) for _ in range(3))
    got = kernel.rows(x, ca, rows, positions, torch.arange(len(tokens)))
    one = torch.cat([kernel.rows(x[n:n + 1], cc, rows[n:n + 1], positions[n:n + 1], torch.tensor([0]))
                     for n in range(len(tokens))])
    assert torch.equal(got, one)
    i = 0
    for r, t in SCHEDULE:
        _close(got[i:i + t], ref(tokens[i:i + t][None], cache=cb.rows(r, r + 1), starts=[int(positions[i])])[0], kind)
        i += t


@torch.inference_mode()
@pytest.mark.parametrize("kv", KVS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_rows_without_the_kernel_equals_the_kernel_path(kind, kv, monkeypatch):
    """forward_rows through the kernel (it runs: counted) and through PyTorch alone (no kernel;
    and with one, where the size policy says PyTorch) agree within the tolerances above, and
    leave every touched row's length at its last position + 1 (row 0 rewrites positions it held
    past them, as a rejected speculation's), the others' as they were."""
    m = _model_for(CFG, kind)
    ref = _reference(m)
    assert kernels.attach(m)
    ids = torch.randint(0, CFG.vocab_size, (len(PROMPTS), 20), generator=torch.Generator().manual_seed(14))
    schedule = [(2, 1), (0, 5), (1, 3)]  # row 3 untouched
    tokens, rows, positions = _schedule(ids, schedule)
    positions[1:6] -= 2  # row 0 rewrites 2 of its 4 prompt positions and adds 3
    logit_rows = [5, 0, 3, 8]
    calls = []
    real = kernels.DecodeKernel.rows
    monkeypatch.setattr(kernels.DecodeKernel, "rows", lambda self, *a: calls.append(1) or real(self, *a))
    fast = _prefilled(ref, CFG, kv, ids)
    got = m.forward_rows(tokens, fast, rows, positions, logit_rows)
    assert calls == [1] and got.shape == (4, CFG.vocab_size) and got.dtype == torch.float32
    for model, decode_kernel in ((ref, None), (m, m.decode_kernel)):
        if model is m:
            monkeypatch.setattr(kernels, "kernel_faster", lambda *a: False)
        slow = _prefilled(ref, CFG, kv, ids)
        want = model.forward_rows(tokens, slow, rows.tolist(), positions.tolist(), torch.tensor(logit_rows),
                                  decode_kernel=decode_kernel)
        # with the policy saying PyTorch, every span runs there: the one-token span too, since an
        # ordinary forward's decode step asks the same policy
        assert len(calls) == 1 and want.dtype == torch.float32
        if kind == "bf16" and model is m:  # PyTorch's own bf16 forward: bf16 activations, ~1% apart
            assert (got - want).abs().max().item() < 5e-2 * want.abs().max().item()
        else:
            _close(got, want, kind)
            _caches_close(fast, slow, kind, kv)
        assert slow.lengths.tolist() == fast.lengths.tolist() == [7, 12, 3, 6]


@torch.inference_mode()
def test_forward_rows_states_what_breaks_its_contract():
    m = _model_for(CFG, "fp32")
    assert kernels.attach(m)
    cache = KVCache(CFG, 3, 16)
    tok = torch.tensor([5, 6, 7, 8])

    def call(rows, positions, logit_rows=(0,), tokens=tok):
        return m.forward_rows(tokens, cache, rows, positions, logit_rows)

    cases = [
        (([0, 1, 0, 2], [0, 0, 1, 0]), "cache row 0's tokens must form one contiguous group"),
        (([0, 0, 1, 1], [0, 2, 0, 1]), "cache row 0's tokens must take consecutive ascending positions"),
        (([0, 0, 1, 1], [1, 0, 0, 1]), "consecutive ascending positions: token 1 is at 0 after 1"),
        (([0, 0, 1, 1], [14, 15, 15, 16]), r"positions must lie in 0\.\.15"),
        (([0, 0, 1, 1], [-1, 0, 0, 1]), r"positions must lie in 0\.\.15"),
        (([0, 0, 3, 3], [0, 1, 0, 1]), r"rows must lie in 0\.\.2"),
        (([0, 0, -1, -1], [0, 1, 0, 1]), r"rows must lie in 0\.\.2"),
        (([0, 0, 1, 1], [0, 1, 0, 1], [4]), r"logit_rows must lie in 0\.\.3"),
        (([0, 0, 1, 1], [0, 1, 0, 1], [[0]]), "logit_rows must be 1-D"),
        (([0, 0, 1], [0, 1, 0]), "must have one entry per token"),
        (([0], [0], [0], tok[None]), "tokens must be a non-empty 1-D tensor"),
        (([], [], [], tok[:0]), "tokens must be a non-empty 1-D tensor"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            call(*args)
    assert cache.lengths.tolist() == [0, 0, 0] and cache.k[0].abs().sum() == 0  # nothing written
    x = m.model.embed_tokens(tok)
    for rows, positions, logit_rows, message in (([0, 0, 3, 3], [0, 1, 0, 1], [0], r"rows must lie in 0\.\.2"),
                                                 ([0, 0, 1, 1], [0, -1, 0, 1], [0], "positions must be >= 0"),
                                                 ([0, 0, 1, 1], [0, 1, 0, 1], [-1], r"logit_rows must lie in 0\.\.3"),
                                                 ([0, 0, 1, 1], [0, 1, 0, 16], [0], "KV cache holds 16 positions")):
        with pytest.raises(ValueError, match=message):
            m.decode_kernel.rows(x, cache, torch.tensor(rows), torch.tensor(positions), torch.tensor(logit_rows))


@torch.inference_mode()
@pytest.mark.parametrize("flags", [[], ["-march=haswell"], ["-march=x86-64"]], ids=["native", "avx2", "portable"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_long_step_splits_and_tiles_its_products_without_changing_a_bit(kind, flags):
    """An FFN of 1,300 (its down product split over k, gemm.h's GEMM_KC) and 121 tokens (the rows
    tiled, GEMM_TILE), on each instruction path: each token's logits equal those of one token per
    call, and the PyTorch forward's within the tolerances above."""
    cfg = ModelConfig(vocab_size=128, hidden_size=40, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=1300, max_position_embeddings=160,
                      initializer_range=0.2)
    m = _model_for(cfg, kind)
    ref = _reference(m)
    kernel = kernels.DecodeKernel(m, kernels.compile_library(kernels.build_flags() + flags))
    ids = torch.randint(0, cfg.vocab_size, (2, 130), generator=torch.Generator().manual_seed(15))
    tokens = torch.cat([ids[0, 3:123], ids[1, 7:8]])
    rows = torch.tensor([0] * 120 + [1])
    positions = torch.cat([torch.arange(3, 123), torch.tensor([7])])
    caches = []
    for _ in range(3):
        cache = KVCache(cfg, 2, 130)
        ref(ids[0:1, :3], cache=cache.rows(0, 1))
        ref(ids[1:2, :7], cache=cache.rows(1, 2))
        caches.append(cache)
    x = m.model.embed_tokens(tokens)
    got = kernel.rows(x, caches[0], rows, positions, torch.arange(121))
    one = torch.cat([kernel.rows(x[n:n + 1], caches[1], rows[n:n + 1], positions[n:n + 1], torch.tensor([0]))
                     for n in range(121)])
    assert torch.equal(got, one)
    _caches_equal(caches[0], caches[1])
    _close(got[:120], ref(tokens[None, :120], cache=caches[2].rows(0, 1), starts=[3])[0], kind)
    _close(got[120:], ref(tokens[None, 120:], cache=caches[2].rows(1, 2), starts=[7])[0], kind)

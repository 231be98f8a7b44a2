"""The C++ kernel's int8 path (csrc/q8dot.h): int8 weights times int16 activations, each row
quantized on the fly with one scale. Held tightly to a PyTorch emulation of that arithmetic, and
within the error of that quantization to the PyTorch weight-only int8 forward; a row's logits never
depend on the rows it runs with."""

from __future__ import annotations

import copy
import math
import platform

import pytest
import torch
from conftest import q8_range

from smallcoder import KVCache, ModelConfig, kernels, new_model
from smallcoder.quant import quantize_model

pytestmark = pytest.mark.skipif(kernels.load_library() is None,
                                reason="the C++ decode kernel does not build here (no compiler?)")

# hidden 48, FFN 132 and head_dim 12: no input width is a multiple of the kernel's vectors (its
# masked tails run); GQA
CFG = ModelConfig(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=132, max_position_embeddings=64,
                  initializer_range=0.2)
WIDEST = max(CFG.hidden_size, CFG.intermediate_size)  # the widest matmul input (emulation: conftest.int8_emulation)


def _models(emulate, seed: int = 3):
    """(int8 model with the kernel attached, its PyTorch weight-only twin, its emulation twin)."""
    m = quantize_model(new_model(CFG, seed=seed)).eval()
    weight_only, emulated = copy.deepcopy(m), emulate(m)
    assert kernels.attach(m) and weight_only.decode_kernel is None and emulated.decode_kernel is None
    return m, weight_only, emulated


def _rows_at_different_positions(model, rows: int, seed: int, *caches: KVCache) -> torch.Tensor:
    ids = torch.randint(0, CFG.vocab_size, (rows, 60), generator=torch.Generator().manual_seed(seed))
    for r in range(rows):
        for cache in caches:
            model(ids[r:r + 1, :3 + 5 * r], cache=cache.rows(r, r + 1))
    return ids


def _builds() -> list[str]:
    """Extra compiler flags of the builds to check: this CPU's own path, and the AVX2 and portable
    paths where this CPU runs them."""
    flags = [""]
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = kernels._cpu_id().split()
        if "avx2" in cpu and "fma" in cpu and kernels.int8_path(kernels.load_library()) != "avx2":
            flags.append("-march=haswell")
        flags.append("-march=x86-64")
    return flags


@torch.inference_mode()
@pytest.mark.parametrize("extra", _builds())
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_int8_kernel_equals_the_per_row_emulation(rows, extra, int8_emulation):
    """Each step starts from the same cache on both sides, so steps are independent trials. The
    two agree to fp32 rounding except where a value lands within rounding of a .5 tie and the two
    round it differently: one activation off by one of its Q = 32767 steps, ~3e-5 of the logits'
    range. An activation x * Q / max|x| near Q is only 2^-9 from its fp32 neighbour, so inputs
    1 ulp apart (the kernel's and PyTorch's RMSNorm sum in different orders) flip a rounding in
    about one row-step of three (measured: median error 2e-7, largest 1.7e-4): half the row-steps
    must agree to 1e-5 and every one to 1e-3 (some 30 flips)."""
    m, _, emulated = _models(int8_emulation)
    if extra:
        lib = kernels.compile_library(kernels.FLAGS + extra.split())
        m.decode_kernel = kernels.DecodeKernel(m, lib)
        assert kernels.int8_path(lib) == {"-march=haswell": "avx2", "-march=x86-64": "portable"}[extra]
    ca, cb = KVCache(CFG, rows, 48, torch.float32), KVCache(CFG, rows, 48, torch.float32)
    ids = _rows_at_different_positions(emulated, rows, rows, ca, cb)
    close = total = 0
    for t in range(8):
        for a, b in zip(ca.k + ca.v, cb.k + cb.v):
            b.copy_(a)
        tok = ids[:, 30 + t:31 + t]
        got, want = m(tok, cache=ca)[:, 0], emulated(tok, cache=cb)[:, 0]
        err = (got - want).abs().amax(-1) / want.abs().amax(-1)
        close += int((err <= 1e-5).sum())
        total += rows
        assert err.max().item() <= 1e-3
        for a, b in zip(ca.k + ca.v, cb.k + cb.v):  # the keys and values this step wrote
            assert (a - b).abs().max().item() <= 1e-3 * b.abs().max().item()
    assert ca.lengths.tolist() == cb.lengths.tolist()
    assert close >= 0.5 * total, f"{close}/{total} row-steps within fp32 rounding of the emulation"


# The error of quantizing activations, against the weight-only forward. A row's rounding errors are
# uniform on +-d/2 with d = max|x| / Q (Q = 32767 at these widths), so a dot product's error relative
# to its size is about eps = (max|x| / rms(x)) / (Q * sqrt(12)) <= sqrt(K) / (Q * sqrt(12)) = 1.0e-4
# for the widest input, K = 132 (a row's max is at most sqrt(K) times its rms). The logits collect
# such errors from the 4L + 1 quantized stages (q/k/v, o, gate/up, down per layer; the head), roughly
# independent: sigma <= sqrt(4L + 1) * eps * rms(logits). A test's largest error over ~10^4-10^5
# logits is about 5 sigma, and these random 0.2-scale layers amplify errors made early by up to ~2x,
# so the bound is 10 sigma.
ACT_EPS = math.sqrt(WIDEST) / (q8_range(WIDEST) * math.sqrt(12))
WEIGHT_ONLY_TOL = 10 * math.sqrt(4 * CFG.num_hidden_layers + 1) * ACT_EPS


@torch.inference_mode()
@pytest.mark.parametrize("seed", [3, 4])
def test_int8_kernel_stays_within_the_8bit_activation_error_of_the_weight_only_forward(seed, int8_emulation):
    """4 rows at different positions decode 40 steps, each side on its own cache: every logit
    within the bound above; greedy choices agree on at least 95% of the positions (measured: 97-99%
    on seeds 3-6), and where they differ the weight-only forward's top two were nearly tied (less
    than half the bound apart: measured at most 0.09 rms)."""
    m, weight_only, _ = _models(int8_emulation, seed)
    rows, steps = 4, 40
    ca, cb = KVCache(CFG, rows, 64, torch.float32), KVCache(CFG, rows, 64, torch.float32)
    ids = _rows_at_different_positions(weight_only, rows, seed, ca, cb)
    agree = 0
    for t in range(steps):
        tok = ids[:, 16 + t:17 + t]
        got, want = m(tok, cache=ca)[:, 0], weight_only(tok, cache=cb)[:, 0]
        rms = want.pow(2).mean(-1).sqrt()
        assert ((got - want).abs().amax(-1) <= WEIGHT_ONLY_TOL * rms).all()
        same = got.argmax(-1) == want.argmax(-1)
        top2 = want.topk(2, dim=-1).values
        assert ((top2[:, 0] - top2[:, 1])[~same] < WEIGHT_ONLY_TOL / 2 * rms[~same]).all()
        agree += int(same.sum())
    assert agree >= 0.95 * rows * steps


@torch.inference_mode()
def test_an_int8_row_gets_the_same_logits_alone_in_a_batch_and_in_a_prefill_chunk(int8_emulation):
    """The engine's determinism: a position's logits are bit for bit the same whichever rows it
    runs with (one row alone, inside a batch of 5 at other positions, as a prefill chunk)."""
    m, weight_only, _ = _models(int8_emulation)
    alone, batch = KVCache(CFG, 1, 48, torch.float32), KVCache(CFG, 5, 48, torch.float32)
    ids = _rows_at_different_positions(weight_only, 5, 7, batch)
    weight_only(ids[2:3, :13], cache=alone)  # row 2's prompt, as the batch has it
    chunk = KVCache(CFG, 1, 48, torch.float32)
    weight_only(ids[2:3, :13], cache=chunk)
    steps = []
    for t in range(6):
        a = m(ids[2:3, 13 + t:14 + t], cache=alone)
        b = m(torch.stack([ids[r, 13 + t:14 + t] if r == 2 else ids[r, 40 + t:41 + t] for r in range(5)]),
              cache=batch)
        assert torch.equal(a[0], b[2])
        steps.append(a[0, 0])
    for layer in range(CFG.num_hidden_layers):
        assert torch.equal(alone.k[layer][0], batch.k[layer][2]) and torch.equal(alone.v[layer][0], batch.v[layer][2])
    got = m.forward_rows(ids[2, 13:19], chunk, [0] * 6, range(13, 19), range(6))  # the same 6 tokens as one chunk
    assert torch.equal(got, torch.stack(steps))
    for layer in range(CFG.num_hidden_layers):
        assert torch.equal(chunk.k[layer], alone.k[layer]) and torch.equal(chunk.v[layer], alone.v[layer])

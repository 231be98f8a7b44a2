"""The CPU decode kernel: builds `csrc/decode.cpp` once per machine and runs decode steps with it.

A decode step at batch 1 reads every weight once, so its speed is the memory bandwidth; PyTorch
reaches ~40% of it here (a one-thread GEMV plus per-op dispatch). The C++ step keeps every core
streaming weights in one OpenMP region. It is an implementation of `SmallCoder.forward` for one
new token per row with a KV cache and nothing else: prefill, scoring and training stay in PyTorch,
and tests hold the two to the same logits. It takes any number of rows; the forward hands it at
most `MAX_ROWS`, where it was measured faster than PyTorch. The same step also prefills a few
tokens of one sequence (`DecodeKernel.prefill`): an editor's keystroke recomputes only a short
tail, and there one pass over the weights beats PyTorch's (int8: dequantizing every weight).

`build(model)` makes one for a model's weights without touching the model (what an `Engine` does:
it keeps its own and passes it to the forward); `attach(model)` sets `model.decode_kernel`, which
the model's forward then uses by default.

The library is compiled with the system C++ compiler (`$CXX`, else `g++`/`c++`) with
`-O3 -march=native -fopenmp` into `$SMALLCODER_CACHE` (default `~/.cache/smallcoder`), keyed by the
source, the flags and the CPU, and loaded with ctypes. Without a compiler (or with
`SMALLCODER_KERNELS=0`), decoding falls back to PyTorch with a one-time warning.
`SMALLCODER_KERNEL_FLAGS` appends compiler flags (for measurements and tests of another build:
`-DSC_INT8_WIDEN` for the former int8 path, `-march=haswell` for the AVX2 instruction path).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "decode.cpp"
HEADERS = tuple(Path(__file__).parent / "csrc" / h for h in ("q8dot.h", "q8gemm.h", "attend.h", "gemm.h"))  # what SOURCE includes: part of the cache key
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
MAX_ROWS = 16  # measured faster than the PyTorch path up to 16 rows (any dtype); beyond, MKL
WTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.int8: 2}  # the KV cache dtypes the kernel reads and writes

# The longest one-row span (tokens in one forward) for which a kernel step measured faster than
# PyTorch's forward of it, per weight dtype (benchmarks/kernel_rows.py --policy); retune it there
# after either side changes (an integer int8 GEMM will move int8's).
KERNEL_SPAN = {torch.float32: 16, torch.bfloat16: 16, torch.int8: 16}


def kernel_faster(weight_dtype: torch.dtype, tokens: int, spans: int = 1) -> bool:
    """Whether one kernel step of `tokens` tokens over `spans` cache rows beats PyTorch's path for
    them (one forward per span): where the spans' mean length is within KERNEL_SPAN. A kernel step
    costs no more per token as it grows, so the one-span measurement bounds the rest."""
    limit = KERNEL_SPAN.get(weight_dtype, 0)
    return tokens <= spans * limit


_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
        model = next((line for line in info.splitlines() if line.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def build_flags() -> list[str]:
    """The compiler flags: FLAGS, then any from `SMALLCODER_KERNEL_FLAGS` (later ones win)."""
    return FLAGS + os.environ.get("SMALLCODER_KERNEL_FLAGS", "").split()


def library_path(flags: list[str] | None = None, source: Path = SOURCE) -> Path:
    """Where the build of `source` (and the HEADERS beside it) with `flags` is cached."""
    source = source.read_bytes() + b"".join((source.parent / h.name).read_bytes() for h in HEADERS)
    flags = build_flags() if flags is None else flags
    key = hashlib.sha256(source + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    from .fsutil import cache_root

    return cache_root() / f"decode-{key}.so"


def compile_library(flags: list[str], source: Path = SOURCE) -> ctypes.CDLL:
    """The kernel built with `flags` (cached), loaded; raises RuntimeError or OSError where it cannot be.
    `source`: another copy of csrc/decode.cpp, its headers beside it (a benchmark's other build)."""
    path = library_path(flags, source)
    if not path.exists():
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX or install g++)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        proc = subprocess.run([compiler, *flags, "-o", str(tmp), str(source)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.sc_decode.argtypes = [i, i, p, p, p, p, p, p, i, i, i, i, i, i, i, i64, i64, i, i, f, p, p, i, p]
    lib.sc_decode.restype = i
    lib.sc_f16.argtypes = [p, p, p, i64]
    lib.sc_f16.restype = None
    lib.sc_int8_path.argtypes = []
    lib.sc_int8_path.restype = ctypes.c_char_p
    lib.sc_gemm_path.argtypes = []
    lib.sc_gemm_path.restype = ctypes.c_char_p
    return lib


def int8_path(lib: ctypes.CDLL) -> str:
    """The int8 instruction path a built kernel uses: avx512-vnni, avx-vnni, avx2, portable (or
    widen-to-fp32 for the former path)."""
    return lib.sc_int8_path().decode()


def gemm_path(lib: ctypes.CDLL) -> str:
    """The fp32/bf16 product path a built kernel uses: avx512, avx2 or portable (csrc/gemm.h)."""
    return lib.sc_gemm_path().decode()


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, building it on first use; None (with a warning) where it cannot be."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("SMALLCODER_KERNELS", "1") == "0":
        return None
    try:
        _lib = compile_library(build_flags())
    except (OSError, RuntimeError) as e:
        warnings.warn(f"smallcoder: the C++ decode kernel is unavailable ({e}); decoding runs in "
                      "PyTorch (slower)", RuntimeWarning, stacklevel=2)
        return None
    return _lib


class DecodeKernel:
    """Pointers to one model's weights, laid out for `sc_decode`; call it with a KV cache.

    Holds references to every tensor whose address it passes, so none can be freed under it.
    """

    def __init__(self, model: torch.nn.Module, lib: ctypes.CDLL) -> None:
        from .quant import Int8Linear

        cfg = model.config
        self.lib, self.config = lib, cfg
        layers = model.model.layers

        def weight(lin: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            if isinstance(lin, Int8Linear):
                return lin.weight, lin.weight_scale
            return lin.weight.detach(), None

        # (module, attribute, address) of everything passed by address: checked before each step,
        # so a model whose tensors were replaced (.to(), load_state_dict) is never read stale
        self._sources = [(d, name, d[name].data_ptr()) for m in model.modules()
                         for d in (m._parameters, m._buffers) for name in ("weight", "weight_scale")
                         if isinstance(d.get(name), torch.Tensor)]
        first, _ = weight(layers[0].self_attn.q_proj)
        self.weight_dtype = first.dtype
        self.wtype = WTYPES.get(first.dtype)
        if self.wtype is None:
            raise ValueError(f"no decode kernel for {first.dtype} weights")
        keep, layer_ptrs, scale_ptrs = [], [], []
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            norms = [layer.input_layernorm.weight.detach().float().contiguous(),
                     layer.post_attention_layernorm.weight.detach().float().contiguous()]
            lins = [weight(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                        mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
            for w, _ in lins:
                if w.dtype != first.dtype or not w.is_contiguous():
                    raise ValueError("decode kernel needs contiguous weights of one dtype")
            keep += norms + [t for pair in lins for t in pair if t is not None]
            w = [t.data_ptr() for t, _ in lins]
            layer_ptrs += [norms[0].data_ptr(), w[0], w[1], w[2], w[3], norms[1].data_ptr(), w[4], w[5], w[6], 0, 0, 0, 0]
            scale_ptrs += [s.data_ptr() if s is not None else 0 for _, s in lins]
        head_w, head_s = weight(model.lm_head)
        final = model.model.norm.weight.detach().float().contiguous()
        keep += [final, head_w] + ([head_s] if head_s is not None else [])
        self._keep = keep
        self.layer_ptrs = torch.tensor(layer_ptrs, dtype=torch.int64)
        self.scale_ptrs = torch.tensor(scale_ptrs, dtype=torch.int64) if self.wtype == 2 else None
        self.head_ptrs = torch.tensor([final.data_ptr(), head_w.data_ptr(),
                                       head_s.data_ptr() if head_s is not None else 0], dtype=torch.int64)
        self.inv_freq = model.inv_freq(torch.device("cpu")).float().contiguous()

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copied model has its own tensors: it attaches its own kernel

    def __reduce__(self):
        return type(None), ()

    def valid(self, model: torch.nn.Module) -> bool:
        """Whether `model` still holds the tensors this kernel reads (a pure check: callers decide)."""
        return all(d.get(name) is not None and d[name].data_ptr() == ptr for d, name, ptr in self._sources)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache dtype to run this kernel with, the weights' precision: fp32 for fp32
        weights (their logits match PyTorch's), fp16 for bf16 (llama.cpp's default cache type),
        int8 for int8 weights (each head's key and value vector at a position with one scale, as
        llama.cpp's q8_0 cache). At a 1,000-token context a 303M int8 step reads 265 MB of
        weights and 147 MB of fp32 keys and values, 74 MB in fp16, 38 MB in int8 (measured: the
        attention part of the step 6.3, 3.4 and 2.1 ms here). It runs with any of the three."""
        return {WTYPES[torch.float32]: torch.float32, WTYPES[torch.bfloat16]: torch.float16}.get(self.wtype, torch.int8)

    def supports(self, cache) -> bool:
        """Whether this kernel reads and writes `cache`: on the CPU, of a dtype it knows (KV_TYPES),
        each row's heads, positions and values dense (any row stride: a `rows` view will do)."""
        k = cache.k[0]
        if cache.k_scale is not None:
            s = cache.k_scale[0]
            if s.stride(2) != 1 or s.stride(1) != s.shape[2] or s.stride(0) * k.shape[3] != k.stride(0):
                return False
        return (k.dtype in KV_TYPES and k.device.type == "cpu"
                and k.stride(3) == 1 and k.stride(2) == k.shape[3] and k.stride(1) == k.shape[2] * k.shape[3])

    def __call__(self, x: torch.Tensor, cache, starts: torch.Tensor) -> torch.Tensor:
        """Logits (M, V) for embeddings x (M, hidden) of one new token per cache row, row m's at
        position starts[m] (written into the cache there; the caller records the lengths)."""
        every = torch.arange(x.shape[0])
        return self.rows(x, cache, every, starts, every)

    def prefill(self, x: torch.Tensor, cache, start: int, last_only: bool = False) -> torch.Tensor:
        """Logits (T, V) for embeddings x (T, hidden) of T consecutive tokens of cache row 0 at
        positions start.., written into that row (with `last_only`, (1, V): the last token's):
        causal attention in one weight pass (`rows`)."""
        T = x.shape[0]
        return self.rows(x, cache, torch.zeros(T, dtype=torch.int64), torch.arange(start, start + T),
                         torch.tensor([T - 1]) if last_only else torch.arange(T))

    def rows(self, x: torch.Tensor, cache, rows: torch.Tensor, positions: torch.Tensor,
             logit_rows: torch.Tensor) -> torch.Tensor:
        """Logits (len(logit_rows), V) float32 for N new tokens in one weight pass: embeddings x
        (N, hidden); token n is written into cache row rows[n] at position positions[n] and
        attends to positions 0..positions[n] of that row. Every token's keys and values are stored
        before any token attends, so tokens of one row at consecutive positions are causal
        attention over each other (a prefill chunk, a speculative verify) and tokens of different
        rows a batched decode step. logit_rows: the indices (into 0..N-1) whose logits to compute.
        A token's logits do not depend on the other tokens of the step, bit for bit. The caller
        records the lengths and never gives two tokens the same (row, position)."""
        N = x.shape[0]
        rows = torch.as_tensor(rows, dtype=torch.int64).contiguous()
        pos = torch.as_tensor(positions, dtype=torch.int64).contiguous()
        head = torch.as_tensor(logit_rows, dtype=torch.int64).contiguous()
        if x.dim() != 2 or rows.shape != (N,) or pos.shape != (N,) or head.dim() != 1:
            raise ValueError(f"x {tuple(x.shape)}, rows {tuple(rows.shape)}, positions {tuple(pos.shape)} "
                             f"and logit_rows {tuple(head.shape)}: want (N, hidden), (N,), (N,), (L,)")
        if N and (int(rows.min()) < 0 or int(rows.max()) >= cache.batch_size):
            raise ValueError(f"rows must lie in 0..{cache.batch_size - 1} (the KV cache's rows), got {rows.tolist()}")
        if N and int(pos.min()) < 0:
            raise ValueError(f"positions must be >= 0, got {pos.tolist()}")
        if head.numel() and (int(head.min()) < 0 or int(head.max()) >= N):
            raise ValueError(f"logit_rows must lie in 0..{N - 1}, got {head.tolist()}")
        return self._run(x, cache.planes(), rows, pos, head)

    def _run(self, x: torch.Tensor, planes: list[list[torch.Tensor]], rows: torch.Tensor, pos: torch.Tensor,
             head: torch.Tensor) -> torch.Tensor:
        """planes: per layer keys, values and (int8 caches) their scales, as KVCache.planes()."""
        cfg = self.config
        M = x.shape[0]
        x = x.float().contiguous()
        ptrs = self.layer_ptrs.view(cfg.num_hidden_layers, 13)
        ptrs[:, 9:] = torch.tensor([[t.data_ptr() for t in layer] + [0] * (4 - len(planes)) for layer in zip(*planes)])
        logits = torch.empty(head.numel(), cfg.vocab_size, dtype=torch.float32)
        if M == 0:
            return logits
        k = planes[0][0]
        rc = self.lib.sc_decode(
            M, torch.get_num_threads(), x.data_ptr(), rows.data_ptr(), pos.data_ptr(), self.layer_ptrs.data_ptr(),
            self.scale_ptrs.data_ptr() if self.scale_ptrs is not None else None, self.head_ptrs.data_ptr(),
            cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, k.stride(0), k.shape[2],
            self.wtype, KV_TYPES[k.dtype], cfg.rms_norm_eps, self.inv_freq.data_ptr(), head.data_ptr(),
            head.numel(), logits.data_ptr())
        if rc != 0:
            raise ValueError(f"KV cache holds {k.shape[2]} positions, asked for {int(pos.max()) + 1}")
        return logits


def build(model: torch.nn.Module) -> DecodeKernel | None:
    """A C++ decode step for `model`'s weights when the kernel builds here, else None; `model` is
    not changed (an Engine keeps the kernel it builds)."""
    if model.lm_head.weight.device.type != "cpu":
        return None
    lib = load_library()
    if lib is None:
        return None
    try:
        return DecodeKernel(model, lib)
    except ValueError as e:
        print(f"smallcoder: decode kernel not used: {e}", file=sys.stderr)
        return None


def attach(model: torch.nn.Module) -> bool:
    """Give `model` its own C++ decode step (`model.decode_kernel`, used by its forward); returns
    whether it did."""
    kernel = build(model)
    if kernel is not None:
        model.decode_kernel = kernel
    return kernel is not None

"""What the machine can do: the device's peak FLOP/s for MFU, native bf16, and glibc malloc tuning.

Peak: --peak-tflops, else a table of published dense bf16 peaks for known GPUs, else (CPU) the
matmul peak measured at the start of each stage (a shared CPU's speed drifts with other users'
load, so MFU there is only indicative). FLOPs per trained token: `ModelConfig.flops_per_token`.
"""

from __future__ import annotations

import os
import time

import torch

# Dense bf16 peak FLOP/s from the vendors' data sheets (no sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there a bf16 autocast
    step of the 303M model ran 1.45x faster than fp32 (122 vs 84 tok/s); without it ~20x slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast pays on `device`: CUDA with bf16 support, or a CPU with native bf16."""
    return (device.type == "cuda" and torch.cuda.is_bf16_supported()) or \
        (device.type == "cpu" and cpu_has_native_bf16())


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the kernel.

    A training step frees and reallocates the same large tensors every time (activations, a chunk of
    logits, the head and embedding gradients). By default glibc serves blocks over 32 MB with a fresh
    mmap and gives freed heap tops back, so each step page-faults ~1 GB of zeroed memory in again:
    6-11% of a 303M CPU step here (benchmarks/bench_train_ab.py --change malloc). Serving every
    block from the heap and trimming only above 1 GB removes that; the process keeps its peak
    footprint, which a training run reaches every step anyway. `enable=False` puts back glibc's
    default values (as fixed values: its self-adjusting mmap threshold stays off; benchmarks use
    it). Returns whether the setting applied (glibc only; SMALLCODER_MALLOC_TUNING=0 turns it off).
    """
    import ctypes
    import ctypes.util

    if enable and os.environ.get("SMALLCODER_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl): nothing to tune
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    if enable:
        return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))
    ok = bool(mallopt(m_mmap_max, 65536)) and bool(mallopt(m_trim_threshold, 128 * 1024))
    trim(0)
    return ok


def measure_cpu_peak(n: int = 1024, reps: int = 8, dtype: torch.dtype = torch.float32) -> float:
    """Best matmul FLOP/s of this CPU over a few n x n products (torch's thread count)."""
    g = torch.Generator().manual_seed(0)  # not the global RNG, whose state the checkpoints carry
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def device_peak_flops(device: torch.device, autocast_bf16: bool) -> tuple[float | None, str]:
    """(peak FLOP/s, where the number comes from) for MFU; None when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                if autocast_bf16:
                    return tflops * 1e12, f"{name}: published dense bf16 peak {tflops:g} TFLOP/s"
                return None, f"{name}: fp32 peak unknown (pass --peak-tflops)"
        return None, f"{name}: peak unknown (pass --peak-tflops)"
    if device.type == "cpu":
        dtype = torch.bfloat16 if autocast_bf16 else torch.float32
        peak = measure_cpu_peak(dtype=dtype)
        return peak, (f"measured {'bf16' if autocast_bf16 else 'fp32'} matmul peak {peak / 1e9:.1f} GFLOP/s "
                      f"({torch.get_num_threads()} threads)")
    return None, f"{device}: peak unknown"

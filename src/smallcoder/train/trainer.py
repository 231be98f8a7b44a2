"""The curriculum trainer: data preparation, the stage loop, checkpoints and exact resume.

Output folder (OUT)::

    run.json                      the recipe as run (after --set) and --max-steps; a resume must match it
    tokenizer-<hash>/             the trained tokenizer (when the recipe trains one), reused by reruns
    data/<stage>/<source>-<hash>/ packed train/ and val/ token stores, reused when the spec,
                                  tokenizer and sequence length are unchanged
    checkpoints/step-0000120/     resume points: HF folder + optimizer.safetensors + trainer_state.json
                                  + COMPLETE (sizes and sha256 of every file, written last)
    stage-<name>/                 the model at the end of each stage (HF folder, tokenizer included)
    final/                        the model at the end (chat-ready HF folder)
    metrics.jsonl, loss.png, eos_check.json

Exact resume: everything that decides the next step is in the checkpoint (fp32 weights, AdamW
moments and step counts, the loader's cursors, the stage and step, every RNG); the LR is a pure
function of the step and data order a pure function of (seed, step, cursor). Checkpoints are
taken at optimizer-step boundaries only and written with `atomic_folder`, so a SIGKILL at any
moment leaves the previous ones intact, and a resumed run computes exactly what the
uninterrupted one would have (CPU, same thread count).

Loss: each micro-batch adds `model(ids, labels=labels) / num_loss_tokens_of_the_whole_global_step * world_size`
(DDP averages gradients over ranks), so a step's gradient is that of its mean loss per trained
token whatever the micro-batch split (see smallcoder.data.mixture and .distributed).

MFU: FLOPs per trained token = 6 * N_matmul + 12 * layers * hidden * seq_len, where N_matmul is
the parameters that take part in matmuls (every Linear incl. lm_head; not the embedding lookup
or norms) and the second term is attention's QK^T and AV (forward 4 * seq * hidden per layer,
x3 for backward), the PaLM paper's (Chowdhery et al. 2022, appendix B) accounting; 1.81 GFLOP
per token for the 303M model at seq 1024. Peak: --peak-tflops, else a table of published dense
bf16 peaks for known GPUs, else (CPU) the fp32 matmul peak measured at the start of each stage (a
shared CPU's speed drifts with other users' load, so MFU there is only indicative).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SmallCoderError
from ..fsutil import LOCK_FILE, atomic_folder, atomic_write_text, folder_lock, write_error
from .recipe import Recipe, StageSpec
from .schedule import lr_at

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
CKPT_PREFIX = "step-"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.safetensors"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
EOS_FILE = "eos_check.json"
STATE_VERSION = 1
DATA_FORMAT = 1
MIN_VAL_CONVERSATIONS = 32   # held out of each SFT source, for validation and the EOS check
EOS_CHECK_PROMPTS = 20
EOS_CHECK_MAX_NEW = 256
SFT_PAD_MULTIPLE = 64        # SFT batches are padded to their longest record, rounded up to this
HUB_CHARS_PER_TOKEN = 5      # Hub sources are read until this many characters per needed token
# Dense bf16 peak FLOP/s from the vendors' data sheets (no sparsity).
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0,
                   "RTX 4090": 165.0, "RTX 3090": 71.0}


# ---- small helpers -------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _stage_seed(seed: int, stage: StageSpec) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage.name}".encode()).digest()[:4], "little")


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * layers * hidden * seq_len (see the module docstring)."""
    h, d, L = config.hidden_size, config.head_dim, config.num_hidden_layers
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * h * config.intermediate_size
    n_matmul = L * (attn + mlp) + config.vocab_size * h  # lm_head is a matmul even when tied
    return 6.0 * n_matmul + 12.0 * L * h * seq_len


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): there a bf16 autocast
    step of the 303M model ran 1.45x faster than fp32 (122 vs 84 tok/s); without it ~20x slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


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


# ---- RNG state -----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG as JSON: python `random`, numpy's global, torch CPU and CUDA (base64 byte tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


# ---- checkpoints ---------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def verify_checkpoint(folder: Path) -> str | None:
    """None when `folder` is a complete checkpoint (marker present, every file's size and sha256 match), else why not."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"unreadable {COMPLETE} marker ({e})"
    for name in (STATE_FILE, OPTIM_FILE, "config.json"):
        if name not in listed:
            return f"{COMPLETE} does not list {name}"
    for name, info in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != info.get("bytes"):
            return f"{name} is {size} bytes, {COMPLETE} says {info.get('bytes')}"
        if _sha256_file(path) != info.get("sha256"):
            return f"{name} does not match its sha256 in {COMPLETE}"
    return None


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder under OUT/checkpoints, oldest first."""
    root = out / CKPT_DIR
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(CKPT_PREFIX) and p.name[len(CKPT_PREFIX):].isdigit():
                found.append((int(p.name[len(CKPT_PREFIX):]), p))
    return sorted(found)


def find_resume_checkpoint(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest valid checkpoint, and the (folder, reason) of newer ones that are not valid."""
    bad = []
    for _, folder in reversed(list_checkpoints(out)):
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder, bad
        bad.append((folder, reason))
    return None, bad


def _write_complete(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE}
    (folder / COMPLETE).write_text(json.dumps({"files": files}, indent=1) + "\n")


def read_run_record(path: Path) -> dict[str, Any]:
    """OUT/run.json: {"recipe": the recipe as run, "max_steps": int or null}; one line if it is not."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise SmallCoderError(f"{path}: unreadable or not valid JSON ({e}); it records the recipe this run "
                              "used: restore it, or start over with --force") from None
    steps = saved.get("max_steps", "missing") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("recipe"), dict) \
            or not (steps is None or (isinstance(steps, int) and not isinstance(steps, bool))):
        raise SmallCoderError(f"{path}: expected an object with 'recipe' (an object) and 'max_steps' (an integer "
                              f"or null), got {json.dumps(saved)[:80]}; restore it, or start over with --force")
    return saved


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class SourceData:
    name: str
    weight: float
    folder: Path
    train: Any  # TokenDataset
    val: Any    # TokenDataset
    heldout: list[list[dict[str, str]]] = field(default_factory=list)  # SFT: held-out conversations


@dataclass
class StageData:
    spec: StageSpec
    sources: list[SourceData]
    steps: int
    tokens_per_step: float  # expected real tokens per optimizer step


def _split(items: Iterator[Any], size_of, val_fraction: float, val_docs: int, min_val: float, seed: str,
           val_out: list[Any]) -> Iterator[Any]:
    """Yield the training items; divert a held-out share into `val_out`.

    Item i goes to validation while fewer than `val_docs` are held out and either the held-out
    part is still below `min_val` (in `size_of` units, so every source gets a usable slice) or a
    seeded coin lands below `val_fraction`. Deterministic for a given seed and item order.
    """
    rng = random.Random(seed)
    held = 0.0
    for item in items:
        coin = rng.random()
        if len(val_out) < val_docs and (held < min_val or coin < val_fraction):
            val_out.append(item)
            held += size_of(item)
        else:
            yield item


def _capped(texts: Iterator[Any], size_of, cap: float | None) -> Iterator[Any]:
    total = 0.0
    for t in texts:
        if cap is not None and total >= cap:
            return
        total += size_of(t)
        yield t


class _Decontam:
    """The benchmark n-gram index, built on first use (it reads the benchmark files)."""

    def __init__(self) -> None:
        self._deco = None

    def get(self) -> Any:
        if self._deco is None:
            from ..cli import default_data_dir
            from ..data.decontam import Decontaminator

            try:
                self._deco = Decontaminator.from_benchmarks(default_data_dir())
            except SmallCoderError as e:
                raise SmallCoderError(f"decontamination needs the benchmark test sets ({e}); set "
                                      "SMALLCODER_DATA to a folder holding them, or decontaminate = false") from None
        return self._deco


def _open_packed(folder: Path, tokenizer: Any, sft: bool) -> tuple[Any, Any, list[Any]]:
    """The train and val packs of a cached source folder, verified against their index.json
    (sizes, sha256, token ids; once, then recorded in verified.json), and its held-out conversations."""
    from ..data.pack import TokenDataset

    if not (folder / "info.json").is_file():
        raise SmallCoderError(f"{folder}: no info.json (an interrupted write?)")
    train_ds = TokenDataset(folder / "train", tokenizer)
    val_ds = TokenDataset(folder / "val", tokenizer)
    train_ds.verify(record=True)
    val_ds.verify(record=True)
    heldout = []
    if sft:
        path = folder / "heldout.jsonl"
        try:
            with open(path, encoding="utf-8") as f:
                heldout = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as e:
            raise SmallCoderError(f"{path}: unreadable ({e})") from None
        if not heldout or not all(isinstance(c, list) for c in heldout):
            raise SmallCoderError(f"{path}: expected one conversation (a list of messages) per line")
    return train_ds, val_ds, heldout


def prepare_source(stage: StageSpec, src: Any, tokenizer: Any, tok_hash: str, out: Path, run: Any,
                   deco: _Decontam, progress: bool, may_repack: bool = True) -> SourceData:
    """Pack one stage source into OUT/data/<stage>/<source>-<hash>/{train,val}, or reuse that folder.

    A reused folder is verified first (see `_open_packed`); a damaged one is packed again where
    `may_repack` (rank 0; the other ranks, which prepare after it, report the damage instead).
    """
    from ..data.pack import pack_examples, pack_texts
    from ..data.sft import encode_conversations
    from ..data.sources import iter_conversations, iter_texts
    from ..prompts import format_chat

    cap = None
    if src.spec.kind == "hub":
        cap = float(stage.tokens) * src.weight * 1.1 * HUB_CHARS_PER_TOKEN
    key = _key({"format": DATA_FORMAT, "spec": dataclasses.asdict(src.spec), "tokenizer": tok_hash,
                "seq_len": stage.seq_len, "sft": stage.sft, "decontaminate": stage.decontaminate,
                "val_fraction": run.val_fraction, "val_docs": run.val_docs, "cap": cap, "seed": run.seed})
    folder = out / "data" / stage.name / f"{src.name}-{key[:12]}"
    packed = None
    if (folder / "info.json").is_file():
        try:
            packed = _open_packed(folder, tokenizer, stage.sft)
        except SmallCoderError as e:
            if not may_repack:
                raise
            print(f"warning: the packed data in {folder} is damaged ({e}); packing it again", file=sys.stderr)
    if packed is None:
        what = "conversations" if stage.sft else "documents"
        print(f"packing stage {stage.name}: {src.name} ({src.spec.display_label}) -> {folder}", file=sys.stderr)
        split_seed = f"{run.seed}:{stage.name}:{src.name}"
        with atomic_folder(folder, overwrite=True) as tmp:
            held: list[Any] = []
            if stage.sft:
                def render(conv: Any) -> str:
                    return format_chat(conv, add_generation_prompt=False)

                convs: Iterator[Any] = _capped(iter_conversations(src.spec), lambda c: len(render(c)), cap)
                if stage.decontaminate:
                    convs = (c for c in convs if deco.get().find(render(c)) is None)
                train = _split(convs, lambda c: 1, run.val_fraction, max(run.val_docs, MIN_VAL_CONVERSATIONS),
                               MIN_VAL_CONVERSATIONS, split_seed, held)

                def encoded(items: Iterator[Any]) -> Iterator[tuple[list[int], list[int]]]:
                    while chunk := [c for _, c in zip(range(1024), items)]:
                        yield from encode_conversations(chunk, tokenizer)

                index = pack_examples(encoded(train), tokenizer, tmp / "train", stage.seq_len, progress=progress)
                if not held:
                    raise SmallCoderError(f"source {src.spec.display_label}: no conversations left for validation")
                pack_examples(encoded(iter(held)), tokenizer, tmp / "val", stage.seq_len, progress=False)
                with open(tmp / "heldout.jsonl", "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(conv, ensure_ascii=False) + "\n" for conv in held)
            else:
                texts: Iterator[str] = _capped(iter_texts(src.spec), len, cap)
                if stage.decontaminate:
                    texts = deco.get().filter(texts)
                # enough held-out text for a few full records at ~4 characters per token
                train = _split(texts, len, run.val_fraction, run.val_docs, 16.0 * stage.seq_len, split_seed, held)
                index = pack_texts(train, tokenizer, tmp / "train", stage.seq_len, progress=progress)
                try:
                    pack_texts(iter(held), tokenizer, tmp / "val", stage.seq_len, progress=False)
                except SmallCoderError as e:
                    raise SmallCoderError(f"source {src.spec.display_label}: the held-out documents are too "
                                          f"short for one validation record of {stage.seq_len} tokens ({e})") from None
            info = {"source": src.spec.display_label, what: index["totals"].get("documents"),
                    "heldout": len(held), "records": index["totals"]["records"], "tokens": index["totals"]["tokens"]}
            (tmp / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        packed = _open_packed(folder, tokenizer, stage.sft)
    return SourceData(src.name, src.weight, folder, *packed)


def prepare_stage(stage: StageSpec, tokenizer: Any, tok_hash: str, out: Path, run: Any, deco: _Decontam,
                  max_steps: int | None, progress: bool, may_repack: bool = True) -> StageData:
    """Every source of the stage packed, and the stage's step count.

    Steps = ceil(tokens / expected real tokens per step): global_batch_tokens for packed data; for
    SFT, global batch x the mixture's mean record length (records are shorter than seq_len and
    padding is not counted). `max_steps` caps it (debug runs), the schedule spanning the capped run.
    """
    sources = [prepare_source(stage, s, tokenizer, tok_hash, out, run, deco, progress, may_repack)
               for s in stage.sources]
    if stage.sft:
        mean = sum(s.weight * s.train.num_tokens / max(len(s.train), 1) for s in sources)
        per_step = stage.global_batch * mean
    else:
        per_step = float(stage.global_batch_tokens)
    steps = max(1, math.ceil(stage.tokens / per_step))
    if max_steps is not None:
        steps = min(steps, max_steps)
    return StageData(stage, sources, steps, per_step)


def prepare_tokenizer(recipe: Recipe, out: Path, progress: bool) -> Any:
    """Load the recipe's tokenizer, or train it on its sources once (cached in OUT/tokenizer-<hash>/)."""
    from ..tokenizer import Tokenizer

    spec = recipe.model.tokenizer
    if spec.path is not None:
        return Tokenizer.load(spec.path)
    from ..tokenizer_train import iter_inputs, train_tokenizer

    key = _key({"train_on": [dataclasses.asdict(s) for s in spec.train_on], "vocab_size": spec.vocab_size,
                "limit": spec.limit})
    folder = out / f"tokenizer-{key[:12]}"
    if not (folder / "tokenizer.json").is_file():
        print(f"training a {spec.vocab_size}-token BPE tokenizer on "
              f"{', '.join(s.display_label for s in spec.train_on)} -> {folder}", file=sys.stderr)

        def texts() -> Iterator[str]:
            for s in spec.train_on:
                yield from iter_inputs([s], spec.limit, {})

        tok = train_tokenizer(texts(), spec.vocab_size, show_progress=progress and sys.stderr.isatty())
        with atomic_folder(folder, overwrite=True) as tmp:
            tok.save(tmp)
    return Tokenizer.load(folder)


# ---- the trainer ---------------------------------------------------------------------------------


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    train_loss: float | None
    val_loss: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    out: Path
    final: Path
    stages: list[StageResult]
    wall_s: float
    eos_share: float | None
    steps: int


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices; none on norms (1-D) and embeddings (embed_tokens, and lm_head only when tied)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def accumulate_gradients(model: torch.nn.Module, forward: Any, step: Any, info: Any,
                         autocast: Any = contextlib.nullcontext) -> float:
    """Forward and backward every micro-batch of a loader `Step`; returns this rank's summed loss.

    Each micro-batch adds the gradient of `model(ids, labels) / step.num_loss_tokens * world_size`, so the
    accumulated gradient is that of the whole global step's mean loss per trained token, however
    the step is split into micro-batches and ranks (DDP averages over ranks; `no_sync` skips the
    all-reduce until the last micro-batch).
    """
    from .distributed import no_sync

    n_mb = len(step.micro_batches)
    scale = info.world_size / max(step.num_loss_tokens, 1)
    local = torch.zeros((), dtype=torch.float64, device=info.device)
    for m, mb in enumerate(step.micro_batches):
        with no_sync(model, enabled=m < n_mb - 1):
            with autocast():
                ls = forward(mb["input_ids"].to(info.device, non_blocking=True),
                             labels=mb["labels"].to(info.device, non_blocking=True))
            (ls * scale).backward()
        local += ls.detach().double()
    return float(local)


class Trainer:
    """Runs a recipe into OUT; `run()` trains every stage (resuming when asked) and returns a TrainResult."""

    def __init__(self, recipe: Recipe, out: str | Path, *, resume: bool = False, force: bool = False,
                 max_steps: int | None = None, peak_tflops: float | None = None,
                 progress: bool | None = None) -> None:
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int)
                                      or max_steps < 1):
            raise SmallCoderError(f"--max-steps must be a positive integer, got {max_steps!r}")
        if peak_tflops is not None and not peak_tflops > 0:
            raise SmallCoderError(f"--peak-tflops must be positive, got {peak_tflops!r}")
        self.recipe = recipe
        self.out = Path(out)
        self.resume = resume
        self.force = force
        self.max_steps = max_steps
        self.peak_tflops = peak_tflops
        self.progress = (sys.stderr.isatty() if progress is None else progress)

    # -- set-up ------------------------------------------------------------------------------------

    def _run_record(self) -> dict[str, Any]:
        return json.loads(json.dumps({"recipe": self.recipe.raw, "max_steps": self.max_steps}, default=str))

    def _check_out(self) -> None:
        """Refuse a fresh run into a used OUT, or a resume with another recipe; changes nothing
        (with --force the old outputs are only deleted by `_claim_out`, once everything is ready)."""
        out = self.out
        used = out.is_dir() and any(p.name != LOCK_FILE for p in out.iterdir())
        if self.resume and used and (out / RUN_FILE).exists():
            saved = read_run_record(out / RUN_FILE)
            if _key(saved) != _key(self._run_record()):
                diff = _first_difference(saved, self._run_record())
                raise SmallCoderError(f"{out / RUN_FILE}: the run in {out} used a different recipe or --max-steps "
                                      f"({diff}); resume with the same recipe and --set options, or use a new --out")
            return
        if used and not self.resume and not self.force:
            raise SmallCoderError(f"{out}: folder exists and is not empty; pass --resume to continue the run in "
                                  "it, or --force to start over (checkpoints there are then deleted)")
        if used and self.resume and not list_checkpoints(out) and not self.force:
            raise SmallCoderError(f"{out}: --resume, but the folder holds no run ({RUN_FILE} is missing)")

    def _claim_out(self, start_over: bool) -> None:
        """Write run.json; with --force first delete the previous run's outputs (not the data and
        tokenizer caches). Runs on rank 0 after the data, the tokenizer and the model are ready, so a
        run that cannot start never deletes anything."""
        out = self.out
        if start_over:
            for name in (CKPT_DIR, "final"):
                shutil.rmtree(out / name, ignore_errors=True)
            for p in out.glob("stage-*"):
                shutil.rmtree(p, ignore_errors=True)
            for name in (METRICS_FILE, PLOT_FILE, EOS_FILE, RUN_FILE):
                with contextlib.suppress(FileNotFoundError):
                    (out / name).unlink()
        atomic_write_text(out / RUN_FILE, json.dumps(self._run_record(), indent=1) + "\n")

    def _build_optimizer(self, model: torch.nn.Module, stage: StageSpec) -> torch.optim.Optimizer:
        from .distributed import unwrap

        # the fused kernel (one pass over each tensor; transformers' default since torch 2.8) took
        # the 303M step's optimizer from 1.31 s to 0.28 s on 2 CPU cores; FSDP2's DTensor
        # parameters keep the multi-tensor path
        kind = {"foreach": None} if self._fsdp else {"fused": True}
        return torch.optim.AdamW(_param_groups(unwrap(model), stage.weight_decay), lr=stage.lr,
                                 betas=(0.9, 0.95), eps=1e-8, **kind)

    # -- checkpoint I/O ------------------------------------------------------------------------------

    def _optimizer_tensors(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        from .distributed import unwrap

        tensors: dict[str, torch.Tensor] = {}
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            sd = get_optimizer_state_dict(model, optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            for name, st in sd.get("state", {}).items():
                for k, v in st.items():
                    tensors[f"{name}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
            return tensors
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                st = optimizer.state.get(p)
                if not st:
                    continue
                for k, v in st.items():
                    tensors[f"{names[id(p)]}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
        return tensors

    def _load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .distributed import unwrap

        try:
            tensors = load_file(str(folder / OPTIM_FILE))
        except (SafetensorError, OSError) as e:
            raise SmallCoderError(f"{folder / OPTIM_FILE}: unreadable ({e})") from None
        if self._fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            state: dict[str, dict[str, torch.Tensor]] = {}
            for key, t in tensors.items():
                name, _, k = key.rpartition(".")
                state.setdefault(name, {})[k] = t
            full = {"state": state, "param_groups": [
                {**{k: v for k, v in g.items() if k != "params"},
                 "params": [n for n, p in unwrap(model).named_parameters() if any(p is q for q in g["params"])]}
                for g in optimizer.param_groups]}
            set_optimizer_state_dict(model, optimizer, full,
                                     options=StateDictOptions(full_state_dict=True))
            return
        for name, p in unwrap(model).named_parameters():
            if f"{name}.exp_avg" not in tensors:
                continue
            st = {}
            for k in ("step", "exp_avg", "exp_avg_sq"):
                t = tensors.get(f"{name}.{k}")
                if t is None:
                    raise SmallCoderError(f"{folder / OPTIM_FILE}: tensor {name}.{k} is missing")
                st[k] = t if k == "step" else t.to(p.device)
            optimizer.state[p] = st

    def _save_checkpoint(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Write OUT/checkpoints/step-N atomically (COMPLETE marker last), then prune to keep_last."""
        from safetensors.torch import save_file

        from ..checkpoint import load_model_weights, save
        from ..model import SmallCoder
        from .distributed import barrier, full_state_dict

        sd = full_state_dict(model, self.info)
        optim = self._optimizer_tensors(model, optimizer)
        if self.info.is_main:
            folder = self.out / CKPT_DIR / checkpoint_name(state["global_step"])
            self._check_finite(sd, folder)
            if folder.exists():  # a resumed run reached an existing checkpoint again: keep the old one
                log.warning("%s exists already; not overwriting it", folder)
            else:
                with torch.device("meta"):
                    shell = SmallCoder(self.config)
                load_model_weights(shell, sd, torch.float32, source="training state")
                with atomic_folder(folder) as tmp:
                    save(shell, self.tokenizer, tmp, overwrite=True)
                    save_file(optim, str(tmp / OPTIM_FILE), metadata={"format": "pt"})
                    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
                    _write_complete(tmp)
                self._prune()
        barrier(self.info)

    def _prune(self) -> None:
        """Delete valid checkpoints older than the newest keep_last (invalid ones are never deleted)."""
        keep = self.recipe.run.keep_last
        ckpts = [(s, p) for s, p in list_checkpoints(self.out) if (p / COMPLETE).is_file()]
        for _, p in ckpts[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    def _save_model_folder(self, model: torch.nn.Module, folder: Path) -> None:
        from ..checkpoint import load_model_weights, save
        from ..model import SmallCoder
        from .distributed import barrier, full_state_dict

        sd = full_state_dict(model, self.info)
        if self.info.is_main and not (folder / "config.json").exists():
            self._check_finite(sd, folder)
            with torch.device("meta"):
                shell = SmallCoder(self.config)
            load_model_weights(shell, sd, torch.float32, source="training state")
            save(shell, self.tokenizer, folder, overwrite=True)
        barrier(self.info)

    # -- metrics -------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl: strict JSON, a non-finite number written as null."""
        if not self.info.is_main:
            return
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        path = self.out / METRICS_FILE
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")
                f.flush()
        except OSError as e:
            raise SmallCoderError(f"{path}: could not write it ({write_error(e) or e})") from None

    def _diverged(self, si: int, k: int, data: StageData, loss: float, grad_norm: float, times: int,
                  stage_end: bool, what: str = "loss") -> str:
        """The one-line error of a run whose loss (or gradient norm) stopped being finite."""
        patience = self.recipe.run.nonfinite_patience
        ckpts = list_checkpoints(self.out)
        why = (f"{times} step(s) in a row, more than run.nonfinite_patience = {patience}" if times > patience
               else "and a stage may not end on a skipped step")
        if what != "loss":
            why = "after the update"
        return (f"training diverged at step {k + 1} of stage {data.spec.name!r} ({data.steps} steps): {what} "
                f"{loss:g}, gradient norm {grad_norm:g}, not finite ({why}); nothing was saved from the diverged "
                f"state (newest checkpoint: {ckpts[-1][1] if ckpts else 'none'}); lower stages.{si}.lr "
                f"(now {data.spec.lr:g}) or raise run.nonfinite_patience")

    @staticmethod
    def _check_finite(sd: dict[str, torch.Tensor], folder: Path) -> None:
        """Never write non-finite weights as a checkpoint or model folder."""
        bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:
            raise SmallCoderError(f"{folder}: not written: weight {bad} holds non-finite values (the training "
                                  "diverged); lower the learning rate")

    # -- evaluation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def _val_loss(self, model: torch.nn.Module, data: StageData) -> float:
        """Mean loss per trained token on eval_batches x micro_batch held-out records, round-robin over sources."""
        from ..data.sft import collate

        st = data.spec
        want = self.recipe.run.eval_batches * st.micro_batch
        records, i = [], 0
        while len(records) < want and i < want * len(data.sources):
            src = data.sources[i % len(data.sources)]
            j = i // len(data.sources)
            if len(src.val):
                records.append(src.val[j % len(src.val)])
            i += 1
        total = count = 0.0
        model.eval()
        for s in range(0, len(records), st.micro_batch):
            mb = collate(records[s:s + st.micro_batch], st.seq_len, self.tokenizer.eos_id)
            with self._autocast():
                total += float(self.forward(mb["input_ids"].to(self.info.device),
                                            labels=mb["labels"].to(self.info.device)))
            count += mb["num_loss_tokens"]
        model.train()
        return total / max(count, 1.0)

    def _autocast(self) -> Any:
        if self.autocast_bf16:
            return torch.autocast(self.info.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eos_check(self, model: torch.nn.Module, data: StageData) -> dict[str, Any]:
        """Share of greedy answers to held-out SFT prompts that end with EOS within 256 new tokens."""
        from ..inference import Engine, SamplingParams
        from ..prompts import format_chat
        from .distributed import unwrap

        convs = [c for s in data.sources for c in s.heldout]
        prompts, refs = [], []
        for conv in convs:
            last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
            prompt = format_chat(conv[:last], add_generation_prompt=True)
            if len(self.tokenizer.encode(prompt)) + EOS_CHECK_MAX_NEW <= self.config.max_position_embeddings:
                prompts.append(prompt)
                refs.append(conv[last]["content"])
            if len(prompts) == EOS_CHECK_PROMPTS:
                break
        core = unwrap(model)
        engine = Engine(core, self.tokenizer)
        done = engine.generate(prompts, SamplingParams(max_new_tokens=EOS_CHECK_MAX_NEW, temperature=0.0))
        core.train()
        ended = sum(c.finish_reason == "stop" for c in done)
        return {"prompts": len(prompts), "ended_with_eos": ended, "share": ended / max(len(prompts), 1),
                "max_new_tokens": EOS_CHECK_MAX_NEW,
                "examples": [{"prompt": p, "answer": c.text, "finish_reason": c.finish_reason, "reference": r}
                             for p, c, r in zip(prompts[:5], done[:5], refs[:5])]}

    # -- the run -------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from ..checkpoint import load as load_checkpoint
        from ..checkpoint import load_model_weights, new_model, read_weights
        from ..data.mixture import Component, MixtureLoader
        from ..data.pack import tokenizer_hash
        from .distributed import all_reduce_sum, broadcast_object, init_distributed, shutdown, unwrap, wrap_model

        t_start = time.perf_counter()
        recipe, run = self.recipe, self.recipe.run
        self.info = info = init_distributed(run.device)
        if info.device.type == "cpu":
            keep_freed_memory()
        held = contextlib.ExitStack()  # the run lock on OUT, released however the run ends
        try:
            # rank 0 alone locks and checks OUT (the run, not each rank, excludes other runs); the
            # others learn the verdict
            error = None
            if info.is_main:
                try:
                    held.enter_context(folder_lock(self.out, "training run"))
                    self._check_out()
                except SmallCoderError as e:
                    error = str(e)
            error = broadcast_object(error, info)
            if error:
                raise SmallCoderError(error)
            start_over = self.force and not (self.resume and (self.out / RUN_FILE).exists())
            torch.manual_seed(run.seed)
            random.seed(run.seed)
            np.random.seed(run.seed % 2**32)

            # data and tokenizer (rank 0 first, so the other ranks find the caches)
            from .distributed import barrier

            if not info.is_main:
                barrier(info)
            self.tokenizer = prepare_tokenizer(recipe, self.out, self.progress and info.is_main)
            tok_hash = tokenizer_hash(self.tokenizer)
            deco = _Decontam()
            stages = [prepare_stage(s, self.tokenizer, tok_hash, self.out, run, deco, self.max_steps,
                                    self.progress and info.is_main, may_repack=info.is_main) for s in recipe.stages]
            if info.is_main:
                barrier(info)
                print(f"tokenizer and data ready in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

            self.config = recipe.model.config(self.tokenizer.vocab_size, self.tokenizer.eos_id, recipe.max_seq_len)
            if recipe.model.init:  # the init checkpoint decides the architecture
                model, _ = load_checkpoint(recipe.model.init, with_tokenizer=False)
                cfg = model.config
                if cfg.vocab_size < self.tokenizer.vocab_size:
                    raise SmallCoderError(f"model.init {recipe.model.init}: vocab_size {cfg.vocab_size} is smaller "
                                          f"than the tokenizer's {self.tokenizer.vocab_size}")
                self.config = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings,
                                                                      recipe.max_seq_len))
                model.config = self.config
                model = model.float()
            else:
                model = new_model(self.config, seed=run.seed, dtype=torch.float32)
            # resume point
            state: dict[str, Any] = {"version": STATE_VERSION, "stage": 0, "step_in_stage": 0, "global_step": 0,
                                     "tokens": 0, "loader": None, "rng": None, "stage_results": []}
            resume_from = None
            if self.resume and not start_over:
                chosen = None
                if info.is_main:  # rank 0 picks the checkpoint and moves damaged ones aside
                    found, bad = find_resume_checkpoint(self.out)
                    for folder, reason in bad:
                        aside = self.out / CKPT_DIR / "corrupt" / folder.name
                        aside.parent.mkdir(parents=True, exist_ok=True)
                        n = 0
                        while aside.exists():
                            n += 1
                            aside = aside.with_name(f"{folder.name}.{n}")
                        os.rename(folder, aside)
                        print(f"warning: checkpoint {folder} is not usable ({reason}); moved it to {aside} and "
                              "falling back to the previous one", file=sys.stderr)
                    chosen = None if found is None else str(found)
                chosen = broadcast_object(chosen, info)
                resume_from = None if chosen is None else Path(chosen)
                if resume_from is not None:
                    state = json.loads((resume_from / STATE_FILE).read_text(encoding="utf-8"))
                    if state.get("version") != STATE_VERSION:
                        raise SmallCoderError(f"{resume_from / STATE_FILE}: version {state.get('version')!r} is not "
                                              f"{STATE_VERSION}")
                    load_model_weights(model, read_weights(resume_from), torch.float32, source=str(resume_from))
                    if info.is_main:
                        print(f"resuming from {resume_from} (stage {state['stage'] + 1}/{len(stages)}, "
                              f"step {state['global_step']})", file=sys.stderr)
                elif info.is_main:
                    print(f"no checkpoint in {self.out / CKPT_DIR}; starting from the beginning", file=sys.stderr)

            self.autocast_bf16 = run.dtype == "bfloat16" and (
                (info.device.type == "cuda" and torch.cuda.is_bf16_supported())
                or (info.device.type == "cpu" and cpu_has_native_bf16()))
            if run.dtype == "bfloat16" and not self.autocast_bf16 and info.is_main:
                print(f"note: training in float32 on {info.device}: bf16 is only fast with native support "
                      "(CUDA, or a CPU with AVX512-BF16/AMX); without it a bf16 step is many times slower",
                      file=sys.stderr)
            self._fsdp = run.strategy == "fsdp2" and info.backend is not None
            model = wrap_model(model, info, run.strategy)
            self.forward = torch.compile(model) if run.compile else model
            model.train()

            first_stage = stages[min(state["stage"], len(stages) - 1)].spec
            optimizer = self._build_optimizer(model, first_stage)
            if resume_from is not None:
                self._load_optimizer(model, optimizer, resume_from)
                if state.get("rng"):
                    set_rng_state(state["rng"])
            # everything that can refuse this run has run: only now may --force delete the old outputs
            error = None
            if info.is_main:
                try:
                    self._claim_out(start_over)
                except SmallCoderError as e:
                    error = str(e)
            error = broadcast_object(error, info)
            if error:
                raise SmallCoderError(error)

            if self.peak_tflops is not None:
                peak, peak_src = self.peak_tflops * 1e12, f"--peak-tflops {self.peak_tflops:g}"
            else:
                peak, peak_src = device_peak_flops(info.device, self.autocast_bf16)
            total_steps = sum(d.steps for d in stages)
            if info.is_main:
                print(f"model: {unwrap(model).num_parameters():,} parameters "
                      f"({self.config.hidden_size} hidden x {self.config.num_hidden_layers} layers, vocab "
                      f"{self.config.vocab_size:,}); {len(stages)} stage(s), {total_steps:,} steps; "
                      f"{info.device}, {info.world_size} process(es), "
                      f"{'bf16 autocast' if self.autocast_bf16 else 'float32'}; MFU peak: {peak_src}",
                      file=sys.stderr)
            from tqdm import tqdm

            bar = tqdm(total=total_steps, initial=state["global_step"], unit="step", file=sys.stderr,
                       disable=not (self.progress and info.is_main), dynamic_ncols=True)
            results = [StageResult(**r) for r in state["stage_results"]]
            # a kill between a stage's end checkpoint and its stage-<name>/ folder: write it now
            if state["stage"] > 0 and state["step_in_stage"] == 0:
                self._save_model_folder(model, self.out / f"stage-{stages[state['stage'] - 1].spec.name}")

            for si in range(state["stage"], len(stages)):
                data = stages[si]
                st = data.spec
                if state["step_in_stage"] == 0:
                    state["stage_start_tokens"] = state["tokens"]
                    if si > 0 and not st.carry_optimizer:
                        optimizer = self._build_optimizer(model, st)
                for g in optimizer.param_groups:
                    g["weight_decay"] = st.weight_decay if g.get("name") == "decay" else 0.0
                loader = MixtureLoader([Component(s.name, s.train, s.weight) for s in data.sources],
                                       seq_len=st.seq_len, global_batch=st.global_batch, micro_batch=st.micro_batch,
                                       seed=_stage_seed(run.seed, st), pad_id=self.tokenizer.eos_id,
                                       rank=info.rank, world_size=info.world_size,
                                       pad_to_multiple_of=SFT_PAD_MULTIPLE if st.sft else None)
                if state["step_in_stage"] > 0:
                    loader.load_state_dict(state["loader"])
                fpt = flops_per_token(self.config, st.seq_len)
                if state["step_in_stage"] == 0 and self.peak_tflops is None and info.device.type == "cpu":
                    peak = measure_cpu_peak()  # a shared CPU's speed drifts: re-measure per stage
                win_loss = win_count = win_tokens = 0.0
                win_steps, win_t0 = 0, time.perf_counter()
                last_train = last_val = None
                nonfinite = 0  # steps in a row whose loss or gradient norm was not finite (their updates skipped)
                while state["step_in_stage"] < data.steps:
                    k = state["step_in_stage"]
                    lr = lr_at(k, data.steps, peak=st.lr, min_lr=st.min_lr, schedule=st.schedule,
                               warmup=st.warmup, decay=st.decay)
                    for g in optimizer.param_groups:
                        g["lr"] = lr
                    step = loader.next_step()
                    denom = max(step.num_loss_tokens, 1)
                    local = accumulate_gradients(model, self.forward, step, info, self._autocast)
                    clip = st.grad_clip if st.grad_clip > 0 else float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
                    step_loss = all_reduce_sum(local, info) / denom  # the same on every rank, as grad_norm
                    finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
                    if finite:
                        optimizer.step()
                        nonfinite = 0
                    else:  # no update: the weights stay those of the last finite step
                        nonfinite += 1
                    optimizer.zero_grad(set_to_none=True)
                    state["step_in_stage"] += 1
                    state["global_step"] += 1
                    state["tokens"] += step.tokens
                    if finite:
                        win_loss += step_loss * step.num_loss_tokens
                        win_count += step.num_loss_tokens
                    win_tokens += step.tokens
                    win_steps += 1
                    bar.update(1)
                    stage_end = state["step_in_stage"] == data.steps
                    g_step = state["global_step"]
                    if not finite:
                        self._log({"step": g_step, "stage": st.name, "event": "nonfinite", "loss": step_loss,
                                   "grad_norm": grad_norm})
                        if nonfinite > run.nonfinite_patience or stage_end:
                            raise SmallCoderError(self._diverged(si, k, data, step_loss, grad_norm, nonfinite,
                                                                 stage_end))
                        if info.is_main:
                            bar.write(f"warning: step {g_step}: loss {step_loss:g}, gradient norm {grad_norm:g}; "
                                      f"skipped its update ({nonfinite} in a row, run.nonfinite_patience = "
                                      f"{run.nonfinite_patience})", file=sys.stderr)
                    val = None
                    if stage_end or (run.eval_every and g_step % run.eval_every == 0):
                        val = last_val = self._val_loss(model, data)
                        if not math.isfinite(val):
                            raise SmallCoderError(self._diverged(si, k, data, val, grad_norm, 1, stage_end,
                                                                 what="validation loss"))
                    if stage_end or (run.log_every and g_step % run.log_every == 0) or val is not None:
                        dt = time.perf_counter() - win_t0
                        tps = win_tokens / dt if dt > 0 else 0.0
                        last_train = win_loss / win_count if win_count else last_train
                        rec = {"step": g_step, "stage": st.name, "stage_step": state["step_in_stage"],
                               "tokens": state["tokens"], "loss": None if not win_count else round(last_train, 6),
                               "lr": lr,
                               "grad_norm": round(grad_norm, 6), "tokens_per_s": round(tps, 1)}
                        if val is not None:
                            rec["val_loss"] = round(val, 6)
                        if peak:
                            rec["mfu"] = round(tps * fpt / peak, 5)
                        self._log(rec)
                        shown = "-" if last_train is None else f"{last_train:.3f}"
                        bar.set_postfix_str(f"{st.name} loss {shown} lr {lr:.2e} {tps:,.0f} tok/s", refresh=False)
                        win_loss = win_count = win_tokens = 0.0
                        win_steps, win_t0 = 0, time.perf_counter()
                    if stage_end:
                        results.append(StageResult(st.name, data.steps, state["tokens"] - state["stage_start_tokens"],
                                                   last_train, last_val))
                        state.update(stage=si + 1, step_in_stage=0, loader=None,
                                     stage_results=[r.to_dict() for r in results])
                        self._save_checkpoint(model, optimizer, {**state, "rng": rng_state()})
                        self._save_model_folder(model, self.out / f"stage-{st.name}")
                        if info.is_main:
                            self._plot()
                            bar.write(f"stage {st.name} done: {data.steps} steps, train loss {last_train:.4f}, "
                                      f"val loss {last_val:.4f}", file=sys.stderr)
                        break
                    elif run.checkpoint_every and g_step % run.checkpoint_every == 0 and nonfinite == 0:
                        self._save_checkpoint(model, optimizer, {**state, "loader": loader.state_dict(),
                                                                 "rng": rng_state()})
            bar.close()

            final = self.out / "final"
            self._save_model_folder(model, final)
            eos_share = None
            if info.is_main:
                sft = [d for d in stages if d.spec.sft]
                if sft:
                    check = self._eos_check(model, sft[-1])
                    eos_share = check["share"]
                    atomic_write_text(self.out / EOS_FILE, json.dumps(check, indent=1, ensure_ascii=False) + "\n")
                    self._log({"step": state["global_step"], "event": "eos_check", "eos_share": eos_share,
                               "prompts": check["prompts"]})
                self._plot()
            return TrainResult(self.out, final, results, time.perf_counter() - t_start, eos_share,
                               state["global_step"])
        finally:
            held.close()
            shutdown(info)

    def _plot(self) -> None:
        try:
            from .plot import plot_metrics
        except ImportError:  # matplotlib missing
            return
        try:
            plot_metrics(self.out / METRICS_FILE, self.out / PLOT_FILE)
        except ImportError as e:
            print(f"note: no loss plot ({e}); pip install matplotlib", file=sys.stderr)
        except (OSError, SmallCoderError) as e:  # the plot is a convenience: a full disk fails elsewhere
            print(f"note: no loss plot ({write_error(e) or e})", file=sys.stderr)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path + '.' if path else ''}{k} is only in {'the saved run' if k in a else 'this one'}"
            if _key(a[k]) != _key(b[k]):
                return _first_difference(a[k], b[k], f"{path + '.' if path else ''}{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if _key(x) != _key(y):
                return _first_difference(x, y, f"{path}.{i}")
    return f"{path or 'run'}: {json.dumps(a, default=str)[:80]} then, {json.dumps(b, default=str)[:80]} now"


def train(recipe: Recipe, out: str | Path, **kw: Any) -> TrainResult:
    """Run `recipe` into `out` (see Trainer for the keyword options)."""
    return Trainer(recipe, out, **kw).run()

"""Decode and prefill speed of the 303M model: ours vs transformers (and llama.cpp when installed).

    python benchmarks/decode.py [--table main|batched|speculative] [--rounds 3] [--dtypes ...]

Seeded random weights of the `smallcoder-303m` preset; every engine runs once per round,
alternated (the machine may be shared: all engines see the same load), and medians over rounds are
reported. llama.cpp runs through `llama-cpp-python` on our own GGUF export (f32, f16, q8_0) when
installed, else its rows are skipped with a message.

--table main (default): a 32-token prompt then 128 new tokens at batch 1 (decode tok/s = 127 /
(time for 128 tokens - time for 1), i.e. without the prefill) and at batch 16 (total tok/s, prefill
included); prefill of 512 tokens; ratios to transformers (and to llama.cpp) and the fraction of this
machine's ceiling: memory bandwidth for decode (bytes of weights read per step), fp32 matmul
throughput for prefill.

--table batched: llama.cpp's `llama-batched-bench` shape, per dtype: batch (`--batches`) x prompt
length (`--prompts`), `--new` tokens per sequence; prompt processing, decode and total tok/s, and
fractions of the fp32 matmul ceiling. Ours (continuous batching) alternated with transformers
(batched `generate`, left-padded) and llama.cpp (batch 1 only: llama-cpp-python decodes one sequence).

--table speculative: decode speed with speculative decoding on HumanEval workloads (code editing:
a function restated with its locals renamed; nothing to copy: a solution from its prompt), the
target's greedy output pinned to the real answer (spec_workload.py says why and how).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from smallcoder import Engine, SamplingParams, new_model, save
from smallcoder.config import preset
from smallcoder.quant import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is loaded
import spec_workload as sw
from kernel_step import cpu_flags

PROMPT, NEW, BATCH, PREFILL = 32, 128, 16, 512


def measure_ceilings() -> tuple[float, float]:
    """(read GB/s, fp32 matmul GFLOP/s) on this machine, now, with torch's threads."""
    x = torch.ones(256 * 1024 * 1024)  # 1 GiB
    x.sum()
    t = min(_time(lambda: x.sum()) for _ in range(5))
    bw = x.numel() * 4 / t / 1e9
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t = min(_time(lambda: a @ b) for _ in range(5))
    return bw, 2 * 2048 ** 3 / t / 1e9


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every linear weight (and int8 scales); embeddings read one row."""
    total = 0
    for name, t in model.state_dict().items():
        if "embed_tokens" in name or "norm" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def _model(cfg, dtype: str, base: torch.nn.Module) -> torch.nn.Module:
    """The seed-0 model in `dtype` (float32 is `base` itself)."""
    if dtype == "float32":
        return base
    if dtype == "bfloat16":
        return new_model(cfg, seed=0).to(torch.bfloat16).eval()
    if dtype == "int8":
        return quantize_model(new_model(cfg, seed=0)).eval()
    raise SystemExit(f"unknown dtype {dtype}")


GGUF_TYPES = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}


def _llama_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp rows skipped")
        return False
    return True


class Ours:
    """Our Engine. prefix_cache=False: the rounds repeat the same prompts, and prefix reuse would
    skip most of a repeated prompt's prefill (a 512-token prompt recomputes only its last chunk)."""

    max_rows = 10 ** 9  # any batch

    def __init__(self, model, tok, label, max_batch: int = BATCH):
        self.engine = Engine(model, tok, max_batch=max_batch, prefix_cache=False)
        self.label = label
        self.kernel = self.engine.decode_kernel is not None or model.decode_kernel is not None

    def generate(self, prompts: list[list[int]], n: int) -> None:
        out = self.engine.generate(prompts, SamplingParams(max_new_tokens=n, stop_at_eos=False))
        assert all(len(c.token_ids) == n for c in out)

    def prefill(self, ids: list[int]) -> None:
        self.generate([ids], 1)

    def batched(self, prompts: list[list[int]], n: int) -> tuple[float, float]:
        """(seconds to the first token of the last prompt, seconds in all) for all prompts at once."""
        params = SamplingParams(max_new_tokens=n, stop_at_eos=False)
        requests = [self.engine.submit(p, params) for p in prompts]
        t0 = time.perf_counter()
        self.engine.run(requests)
        t1 = time.perf_counter()
        assert all(len(r.result().token_ids) == n for r in requests)
        return max(r.first_token_at for r in requests) - t0, t1 - t0


def _first_forward(model: torch.nn.Module) -> tuple[list[float], object]:
    """A list that gets the time the model's first forward ends (prefill), and the hook's handle."""
    first: list[float] = []

    def hook(*_) -> None:  # returns None: the output is left as it is
        if not first:
            first.append(time.perf_counter())
    return first, model.register_forward_hook(hook)


class Transformers:
    max_rows = 10 ** 9

    def __init__(self, folder: Path, dtype: torch.dtype, label: str):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()  # generation-flag notices, once per call
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.label = label

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int, **kw) -> torch.Tensor:
        """Greedy `generate` of exactly n tokens (unless `kw` sets an EOS), prompts left-padded."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        kw = {"min_new_tokens": n, "pad_token_id": 0, **kw}
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kw)
        if "eos_token_id" not in kw:
            assert out.shape[1] == width + n
        return out[:, width:]

    def prefill(self, ids: list[int]) -> None:
        self.generate([ids], 1)

    def batched(self, prompts: list[list[int]], n: int) -> tuple[float, float]:
        first, hook = _first_forward(self.model)
        t0 = time.perf_counter()
        try:
            self.generate(prompts, n)
        finally:
            hook.remove()
        return first[0] - t0, time.perf_counter() - t0


_EXTRA_BUFTS: dict[Path, bool] = {}


def llama_extra_bufts(gguf: Path) -> bool:
    """Whether llama.cpp's extra buffer types (AMX, repacked weights) work with this GGUF here; a
    child process loads it and decodes a few tokens, since a failure is a crash. Why: with
    GGML_NATIVE on an AMX machine, llama-cpp-python 0.3.36 segfaults in the first decode of our
    q8_0 exports (cf. ggml-org/llama.cpp#11115, a tensor in the AMX buffer cannot be read back);
    without them it runs. The rows then load without them, and say so."""
    if gguf not in _EXTRA_BUFTS:
        code = ("import sys\nfrom llama_cpp import Llama\n"
                "llm = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, verbose=False)\n"
                "llm.eval(list(range(1, 17)))\nllm.eval([1])\nprint('ok', flush=True)\n")
        r = subprocess.run([sys.executable, "-c", code, str(gguf)], check=False, capture_output=True, text=True)
        _EXTRA_BUFTS[gguf] = r.returncode == 0 and r.stdout.startswith("ok")
        if not _EXTRA_BUFTS[gguf]:
            print(f"note: llama.cpp crashes on {gguf.name} with its extra buffer types (AMX / repacked "
                  f"weights; exit {r.returncode}): its rows run without them (use_extra_bufts=False)")
    return _EXTRA_BUFTS[gguf]


class LlamaCpp:
    max_rows = 1  # llama-cpp-python decodes one sequence

    def __init__(self, gguf: Path, threads: int, label: str, draft=None):
        import llama_cpp.llama_cpp as api
        from llama_cpp import Llama

        defaults = api.llama_model_default_params
        if not llama_extra_bufts(gguf):  # Llama() takes no such argument: its defaults, with that one changed
            def without():
                params = defaults()
                params.use_extra_bufts = False
                return params
            api.llama_model_default_params = without
        try:
            self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=threads,
                             n_threads_batch=threads, verbose=False, draft_model=draft)
        finally:
            api.llama_model_default_params = defaults
        atexit.register(self.llm.close)  # before interpreter teardown, where Llama.__del__ fails noisily
        self.label = label

    def generate(self, prompts: list[list[int]], n: int) -> None:
        assert len(prompts) == 1, "llama-cpp-python decodes one sequence"
        self.llm.reset()
        self.llm.eval(prompts[0])
        for _ in range(n - 1):
            tok = int(self.llm.scores[self.llm.n_tokens - 1].argmax())
            self.llm.eval([tok])

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def batched(self, prompts: list[list[int]], n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.llm.reset()
        self.llm.eval(prompts[0])
        t_first = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([int(self.llm.scores[self.llm.n_tokens - 1].argmax())])
        return t_first - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", choices=("main", "batched", "speculative"), default="main")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default=None,
                    help="main: float32,bfloat16,int8 (default); batched: int8,float32 (default); speculative: int8 only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-batch", action="store_true", help="main: skip the batch-16 case")
    ap.add_argument("--preset", default="smallcoder-303m",
                    help="the model's shape (`tiny` for a quick check of the script)")
    ap.add_argument("--batches", default="1,2,4,8,16,32", help="batched: batch sizes")
    ap.add_argument("--prompts", default="32,512", help="batched: prompt lengths (tokens)")
    ap.add_argument("--new", type=int, default=128, help="batched: new tokens per sequence")
    ap.add_argument("--items", type=int, default=8, help="speculative: HumanEval items per batch-1 workload")
    ap.add_argument("--spec-batch", type=int, default=16,
                    help="speculative: code-editing items decoded at once in the batched rows (0: none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"main": main_table, "batched": batched_table, "speculative": speculative_table}[args.table](args)


def _setup(cfg):
    """(tmp folder, tokenizer, seed-0 fp32 model, its saved folder for transformers and GGUF)."""
    base = new_model(cfg, seed=0).eval()
    tmp = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the checkpoint and GGUFs: GBs at 303M
    tok = _tokenizer(tmp, cfg.vocab_size)
    return tmp, tok, base, save(base, tok, tmp / "fp32")


def main_table(args) -> None:
    dtypes = (args.dtypes or "float32,bfloat16,int8").split(",")
    cfg = preset(args.preset)
    name = "303M" if args.preset == "smallcoder-303m" else args.preset

    bw, peak = measure_ceilings()
    print(f"machine: {args.threads} threads, read {bw:.1f} GB/s, fp32 matmul {peak:.0f} GFLOP/s")
    tmp, tok, base, folder = _setup(cfg)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, cfg.vocab_size, (BATCH, PROMPT), generator=g).tolist()
    long = torch.randint(1, cfg.vocab_size, (PREFILL,), generator=g).tolist()

    engines, nbytes = [], {}
    for dt in dtypes:
        m = _model(cfg, dt, base)
        ours = Ours(m, tok, f"ours {dt}")
        nbytes[dt] = weight_bytes(m)
        engines.append((dt, ours))
        if not ours.kernel:
            print(f"note: {dt}: the C++ decode kernel is not in use")
        if not args.no_transformers and dt in ("float32", "bfloat16"):
            engines.append((dt, Transformers(folder, getattr(torch, dt), f"transformers {dt}")))
    if not args.no_llama and _llama_available():
        from smallcoder.export import export_gguf
        for dt, outtype in GGUF_TYPES.items():
            if dt in dtypes:
                path = export_gguf(folder, tmp / f"m-{outtype}.gguf", outtype)
                engines.append((dt, LlamaCpp(path, args.threads, f"llama.cpp {outtype}")))

    for _, e in engines:  # warm-up, untimed: first calls build kernels, caches and allocator state
        e.generate(prompt[:1], NEW)
        e.prefill(long)
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for dt, e in engines:
            times[e.label, "t1"].append(_time(lambda e=e: e.generate(prompt[:1], 1)))
            times[e.label, "t128"].append(_time(lambda e=e: e.generate(prompt[:1], NEW)))
            times[e.label, "prefill"].append(_time(lambda e=e: e.prefill(long)))
            if not args.no_batch and not isinstance(e, LlamaCpp):
                times[e.label, "batch"].append(_time(lambda e=e: e.generate(prompt, NEW)))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    flops = 2.0 * cfg.matmul_parameters(head=False)  # the layers' matmuls per decoded token
    rows = []
    for dt, e in engines:
        decode = decode_rate(times[e.label, "t1"], times[e.label, "t128"], NEW)
        prefill = PREFILL / med[e.label, "prefill"]
        batch = BATCH * NEW / med[e.label, "batch"] if (e.label, "batch") in med else None
        gbs = None if decode is None else decode * nbytes[dt] / 1e9
        rows.append((dt, e.label, decode, gbs, None if gbs is None else gbs / bw, batch, prefill,
                     prefill * flops / 1e9 / peak))
    print()
    print(f"{name}, prompt {PROMPT} -> {NEW} new tokens; batch {BATCH}; prefill {PREFILL}; "
          f"medians of {args.rounds} rounds; ceiling: read {bw:.1f} GB/s, matmul {peak:.0f} GFLOP/s")
    print(f"{'engine':24s} {'decode tok/s':>12s} {'GB/s':>6s} {'of bw':>6s} {'vs tf':>6s} {'vs llama':>8s} "
          f"{'batch16 tok/s':>13s} {'vs tf':>6s} {'prefill tok/s':>13s} {'of peak':>7s} {'vs tf':>6s}")
    by = {label: (dt, d, b, p) for dt, label, d, _, _, b, p, _ in rows}
    for dt, label, d, gbs, frac, b, p, pf in rows:
        tf = by.get(f"transformers {dt}") or by.get("transformers float32")
        ll = next((v for k, v in by.items() if k.startswith("llama.cpp") and v[0] == dt), None)
        vs_tf = f"{d / tf[1]:.2f}x" if d and tf and tf[1] and not label.startswith("transformers") else ""
        vs_ll = f"{d / ll[1]:.2f}x" if d and ll and ll[1] and label.startswith("ours") else ""
        bt = f"{b:.1f}" if b else "-"
        bvs = f"{b / tf[2]:.2f}x" if b and tf and tf[2] and not label.startswith("transformers") else ""
        pvs = f"{p / tf[3]:.2f}x" if tf and not label.startswith("transformers") else ""
        shown = (f"{d:12.1f} {gbs:6.1f} {frac:6.0%}" if d is not None
                 else f"{'-':>12s} {'-':>6s} {'-':>6s}")  # every round's t(128) - t(1) was <= 0: no rate
        print(f"{label:24s} {shown} {vs_tf:>6s} {vs_ll:>8s} {bt:>13s} {bvs:>6s} "
              f"{p:13.1f} {pf:7.0%} {pvs:>6s}")
    print("\nweights read per decode step: " + ", ".join(f"{dt} {n / 1e6:.0f} MB" for dt, n in nbytes.items())
          + "; batch-1 ceilings: " + ", ".join(f"{dt} {bw * 1e9 / n:.0f} tok/s" for dt, n in nbytes.items()))


# ---- --table batched ---------------------------------------------------------------------------

def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def batched_table(args) -> None:
    """llama-batched-bench's table: for each batch B and prompt length P, B prompts of P tokens
    (distinct random ids) then `--new` tokens each. PP tok/s = B * P / (time to the first token of
    the last prompt); decode tok/s = B * (new - 1) / (the time after it: each row's first token
    comes from its prefill, the decode steps make the other new - 1); total tok/s = B * (P + new) /
    all the time. Fractions of the fp32 matmul ceiling count 2 x matmul parameters FLOPs per
    token (decode: with the head; prompt: without, only the last position's logits are computed;
    attention's FLOPs not counted)."""
    dtypes = (args.dtypes or "int8,float32").split(",")
    batches, prompts, new = _ints(args.batches), _ints(args.prompts), args.new
    cfg = preset(args.preset)
    if max(prompts) + new > cfg.max_position_embeddings:
        raise SystemExit(f"prompt {max(prompts)} + {new} new tokens exceed the context ({cfg.max_position_embeddings})")
    bw, peak = measure_ceilings()
    print(f"machine: cpu flags {cpu_flags()}; {args.threads} threads; read {bw:.1f} GB/s, "
          f"fp32 matmul {peak:.0f} GFLOP/s")
    tmp, tok, base, folder = _setup(cfg)
    engines = []
    for dt in dtypes:
        ours = Ours(_model(cfg, dt, base), tok, f"ours {dt}", max_batch=max(batches))
        engines.append(ours)
        if not ours.kernel:
            print(f"note: {dt}: the C++ decode kernel is not in use")
        if not args.no_transformers and dt in ("float32", "bfloat16"):
            engines.append(Transformers(folder, getattr(torch, dt), f"transformers {dt}"))
    if not args.no_llama and 1 in batches and _llama_available():
        from smallcoder.export import export_gguf
        for dt in dtypes:
            path = export_gguf(folder, tmp / f"m-{GGUF_TYPES[dt]}.gguf", GGUF_TYPES[dt])
            engines.append(LlamaCpp(path, args.threads, f"llama.cpp {GGUF_TYPES[dt]}"))
    g = torch.Generator().manual_seed(0)
    ids = {p: torch.randint(1, cfg.vocab_size, (max(batches), p), generator=g).tolist() for p in prompts}
    cases = [(b, p) for p in prompts for b in batches]

    for e in engines:  # warm-up, untimed, at the largest case: kernels, caches at full size, allocator
        b = min(max(batches), e.max_rows)
        e.batched(ids[max(prompts)][:b], new)
    times: dict[tuple[str, int, int], list[tuple[float, float]]] = defaultdict(list)
    for r in range(args.rounds):
        for b, p in cases:
            for e in engines:
                if b <= e.max_rows:
                    times[e.label, b, p].append(e.batched(ids[p][:b], new))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    flop_tg, flop_pp = 2.0 * cfg.matmul_parameters(head=True), 2.0 * cfg.matmul_parameters(head=False)
    print(f"\n{args.preset}, batched (llama-batched-bench's columns), {new} new tokens per sequence; medians "
          f"of {args.rounds} rounds; cpu flags {cpu_flags()}; {args.threads} threads; fp32 matmul ceiling "
          f"{peak:.0f} GFLOP/s ({flop_tg / 1e9:.2f} GFLOP per decoded token, {flop_pp / 1e9:.2f} per prompt token)")
    print(f"{'engine':20s} {'B':>3s} {'PP':>4s} {'TG':>4s} {'T_PP s':>7s} {'PP tok/s':>9s} {'of peak':>7s} "
          f"{'T_TG s':>7s} {'TG tok/s':>9s} {'of peak':>7s} {'T s':>7s} {'tok/s':>8s} {'PP vs tf':>8s} {'TG vs tf':>8s}")
    result = {}
    for b, p in cases:
        for e in engines:
            if (e.label, b, p) not in times:
                continue
            ts = times[e.label, b, p]
            t_pp = statistics.median(t for t, _ in ts)
            t_tg = statistics.median(total - t for t, total in ts)
            t_all = statistics.median(total for _, total in ts)
            result[e.label, b, p] = (t_pp, b * p / t_pp, t_tg, b * (new - 1) / t_tg if t_tg > 0 else None,
                                     t_all, b * (p + new) / t_all)
        for e in engines:
            if (e.label, b, p) not in result:
                continue
            t_pp, pp, t_tg, tg, t_all, tot = result[e.label, b, p]
            dt = e.label.split()[-1]
            tf = result.get((f"transformers {dt}", b, p)) or result.get(("transformers float32", b, p))
            ours = e.label.startswith("ours")
            pvs = f"{pp / tf[1]:.2f}x" if ours and tf else ""
            tvs = f"{tg / tf[3]:.2f}x" if ours and tf and tg and tf[3] else ""
            tg_s = f"{tg:9.1f} {tg * flop_tg / 1e9 / peak:7.1%}" if tg else f"{'-':>9s} {'-':>7s}"
            print(f"{e.label:20s} {b:3d} {p:4d} {new:4d} {t_pp:7.3f} {pp:9.1f} {pp * flop_pp / 1e9 / peak:7.1%} "
                  f"{t_tg:7.3f} {tg_s} {t_all:7.3f} {tot:8.1f} {pvs:>8s} {tvs:>8s}")


# ---- --table speculative -----------------------------------------------------------------------

@dataclass
class Run:
    """One timed run of a workload: tokens produced (EOS included), sequences, and the seconds
    after each sequence's first token (decode) and in all; drafts verified and kept (ours)."""

    tokens: int = 0
    seqs: int = 0
    decode_s: float = 0.0
    total_s: float = 0.0
    drafted: int | None = None
    accepted: int | None = None

    @property
    def decode_rate(self) -> float:
        return (self.tokens - self.seqs) / self.decode_s

    @property
    def rate(self) -> float:
        return self.tokens / self.total_s


class OursSpec:
    """Our int8 engine on a workload: a fresh Engine per run (prefix_cache=False, prompts in
    order, so `spec_workload.Pins` can bind cache rows to items), `batch` requests at a time."""

    def __init__(self, model, tok, label: str, speculative=None, batch: int = 1):
        self.model, self.tok, self.label, self.speculative, self.batch = model, tok, label, speculative, batch

    def run(self, items: list[sw.Item]) -> Run:
        self.model.pins = sw.Pins(items, self.tok.eos_id)
        engine = Engine(self.model, self.tok, max_batch=self.batch, prefix_cache=False, speculative=self.speculative)
        run = Run(drafted=0, accepted=0)
        try:
            for at in range(0, len(items), self.batch):
                group = items[at:at + self.batch]
                requests = [engine.submit(it.prompt_ids, SamplingParams(max_new_tokens=len(it.answer_ids) + 1))
                            for it in group]
                t0 = time.perf_counter()
                engine.run(requests)
                t1 = time.perf_counter()
                for it, r in zip(group, requests):
                    c = r.result()
                    sw.check_completion(it, c.token_ids, c.text, self.label)
                    if c.finish_reason != "stop":
                        raise sw.PinError(f"{self.label}: {it.task_id}: ended by {c.finish_reason!r}, not the pinned EOS")
                    run.tokens += len(c.token_ids) + 1
                run.seqs += len(group)
                run.decode_s += t1 - max(r.first_token_at for r in requests)
                run.total_s += t1 - t0
        finally:
            self.model.pins = None
        run.drafted, run.accepted = engine.drafted_tokens, engine.accepted_tokens
        return run


class TransformersSpec:
    """transformers fp32 `generate`, pinned by `spec_workload.PinLogits`; `lookup`: its prompt
    lookup (`prompt_lookup_num_tokens=10`, batch 1 only)."""

    batch = 1

    def __init__(self, tf: Transformers, tok, label: str, lookup: bool):
        self.tf, self.tok, self.eos_id, self.label, self.lookup = tf, tok, tok.eos_id, label, lookup

    def run(self, items: list[sw.Item]) -> Run:
        from transformers import LogitsProcessorList

        run = Run()
        for it in items:
            pin = LogitsProcessorList([sw.PinLogits(len(it.prompt_ids), [it.answer_ids], self.eos_id)])
            kw = {"prompt_lookup_num_tokens": 10} if self.lookup else {}
            first, hook = _first_forward(self.tf.model)
            t0 = time.perf_counter()
            try:
                out = self.tf.generate([it.prompt_ids], len(it.answer_ids) + 1, eos_token_id=self.eos_id,
                                       min_new_tokens=0, logits_processor=pin, **kw)[0].tolist()
            finally:
                hook.remove()
            t1 = time.perf_counter()
            if out[-1:] != [self.eos_id]:
                raise sw.PinError(f"{self.label}: {it.task_id}: no pinned EOS at the end")
            sw.check_completion(it, out[:-1], self.tok.decode(out[:-1]), self.label)
            run.tokens += len(out)
            run.seqs += 1
            run.decode_s += t1 - first[0]
            run.total_s += t1 - t0
        return run


class LlamaSpec:
    """llama.cpp q8_0 through llama-cpp-python, pinned by `spec_workload.llama_pin`; with
    `lookup`, its `LlamaPromptLookupDecoding(num_pred_tokens=10)` as the draft model."""

    batch = 1

    def __init__(self, gguf: Path, threads: int, tok, label: str, lookup: bool):
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if lookup else None
        self.llama = LlamaCpp(gguf, threads, label, draft=draft)
        self.tok, self.label = tok, label

    def run(self, items: list[sw.Item]) -> Run:
        from llama_cpp import LogitsProcessorList

        llm, eos, run = self.llama.llm, self.tok.eos_id, Run()
        for it in items:
            pin = LogitsProcessorList([sw.llama_pin(it.answer_ids, eos)])
            out: list[int] = []
            t0 = time.perf_counter()
            llm.reset()  # no reuse of the previous sequence's matching prefix
            first = None
            for token in llm.generate(it.prompt_ids, temp=0.0, repeat_penalty=1.0, logits_processor=pin, reset=True):
                first = first or time.perf_counter()
                if token == eos or len(out) > len(it.answer_ids):
                    break
                out.append(token)
            t1 = time.perf_counter()
            sw.check_completion(it, out, self.tok.decode(out), self.label)
            run.tokens += len(out) + 1
            run.seqs += 1
            run.decode_s += t1 - first
            run.total_s += t1 - t0
        return run


def speculative_table(args) -> None:
    """Decode tok/s with and without speculation on HumanEval workloads, target pinned
    (spec_workload.py). Rows: ours int8 plain / prompt lookup (adaptive, `Speculation("lookup")`) /
    a random tiny draft model; transformers fp32 plain / prompt lookup; llama.cpp q8_0 plain /
    prompt lookup; and `--spec-batch` code-editing items at once, ours plain and with lookup."""
    from smallcoder.eval.data import TASK_FILES, load_task_data
    from smallcoder.inference.speculative import Speculation
    from smallcoder.paths import default_data_dir

    data = default_data_dir()
    if data is None or not (data / TASK_FILES["humaneval"]).is_file():
        where = data / TASK_FILES["humaneval"] if data is not None else "../shared/data (absent)"
        print(f"HumanEval is not at {where} (set SMALLCODER_DATA to a folder with "
              f"{TASK_FILES['humaneval']}): speculative table skipped")
        return
    problems = load_task_data("humaneval", data)
    cfg = preset(args.preset)
    bw, peak = measure_ceilings()
    print(f"machine: cpu flags {cpu_flags()}; {args.threads} threads; read {bw:.1f} GB/s, "
          f"fp32 matmul {peak:.0f} GFLOP/s")
    tmp, tok, _, folder = _setup(cfg)
    if not (data / "tokenizers" / "starcoder" / "tokenizer.json").exists():
        print("note: no StarCoder tokenizer in the data folder: a byte-level stand-in (one token per byte)")
    ctx = cfg.max_position_embeddings
    editing = sw.editing_items(problems, tok, max(args.items, args.spec_batch), ctx)
    workloads = {"code-editing": editing[:args.items],
                 "nothing-to-copy": sw.completion_items(problems, tok, args.items, ctx)}
    batch_items = editing[:args.spec_batch]

    target = sw.pin_model(quantize_model(new_model(cfg, seed=0)).eval())
    draft_cfg = preset("tiny").replace(vocab_size=cfg.vocab_size, max_position_embeddings=ctx)
    draft = new_model(draft_cfg, seed=1).eval()
    lookup = Speculation("lookup")
    rows = [OursSpec(target, tok, "ours int8"), OursSpec(target, tok, "ours int8 lookup", lookup),
            OursSpec(target, tok, "ours int8 draft:tiny", Speculation("draft", draft_model=(draft, tok)))]
    if not args.no_transformers:
        tf = Transformers(folder, torch.float32, "transformers float32")
        rows += [TransformersSpec(tf, tok, "transformers fp32", False),
                 TransformersSpec(tf, tok, "transformers fp32 lookup", True)]
    if not args.no_llama and _llama_available():
        from smallcoder.export import export_gguf
        path = export_gguf(folder, tmp / "m-q8_0.gguf", "q8_0")
        rows += [LlamaSpec(path, args.threads, tok, "llama.cpp q8_0", False),
                 LlamaSpec(path, args.threads, tok, "llama.cpp q8_0 lookup", True)]
    batched = []
    if args.spec_batch > 1 and len(batch_items) == args.spec_batch:
        batched = [OursSpec(target, tok, "ours int8", batch=args.spec_batch),
                   OursSpec(target, tok, "ours int8 lookup", lookup, batch=args.spec_batch)]
    plan = [(w, e, items) for w, items in workloads.items() for e in rows]
    plan += [("code-editing", e, batch_items) for e in batched]

    for w, e, items in plan:  # warm-up, untimed: one item each (the batched rows: two)
        e.run(items[:2 if e.batch > 1 else 1])
    runs: dict[tuple[str, str, int], list[Run]] = defaultdict(list)
    for r in range(args.rounds):
        for w, e, items in plan:
            runs[w, e.label, e.batch].append(e.run(items))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    print(f"\n{args.preset} target (random weights), greedy; medians of {args.rounds} rounds; cpu flags {cpu_flags()}; "
          f"{args.threads} threads")
    print("Acceptance comes from pinning: every forward of the target (ours, transformers, llama.cpp) runs the "
          f"whole model, then its logits get +{sw.PIN_BIAS:g} on the workload's next answer token, so the greedy "
          "output is the real answer (checked, token for token, on every run); drafts are judged against it.")
    sizes = ", ".join(f"{w}: {len(items)} items, prompt ~{_mean(i.prompt_ids for i in items):.0f} / answer "
                      f"~{_mean(i.answer_ids for i in items):.0f} tokens" for w, items in workloads.items())
    print(f"workloads: {sizes}; batch rows: {len(batch_items) if batched else 0} code-editing items at once")
    print("decode tok/s: tokens after each sequence's first / time after it; e2e: all tokens / all time "
          "(prefill included); ratios on decode tok/s. The draft row's draft is a random `tiny` model: expect "
          "its drafts rejected and the planner to stop drafting (ratio >= 0.95x).")
    print(f"{'workload':16s} {'engine':26s} {'batch':>5s} {'decode tok/s':>12s} {'e2e tok/s':>9s} "
          f"{'accepted':>16s} {'vs ours plain':>13s} {'vs llama plain':>14s}")
    med = {}
    for key, rs in runs.items():
        med[key] = (statistics.median(r.decode_rate for r in rs), statistics.median(r.rate for r in rs))
    for key, rs in runs.items():
        w, label, b = key
        d, e2e = med[key]
        acc = ""
        if rs[0].drafted is not None:
            drafted, accepted = sum(r.drafted for r in rs), sum(r.accepted for r in rs)
            acc = f"{accepted}/{drafted} {accepted / drafted:.0%}" if drafted else "0 drafted"
        plain = med.get((w, "ours int8", b))
        llama = med.get((w, "llama.cpp q8_0", 1))
        vs_plain = f"{d / plain[0]:.2f}x" if plain and label != "ours int8" else ""
        vs_llama = f"{d / llama[0]:.2f}x" if llama and label != "llama.cpp q8_0" else ""
        print(f"{w:16s} {label:26s} {b:5d} {d:12.1f} {e2e:9.1f} {acc:>16s} {vs_plain:>13s} {vs_llama:>14s}")
    for w in workloads:  # the draft row's expectation, stated where it fails
        d, plain = med.get((w, "ours int8 draft:tiny", 1)), med.get((w, "ours int8", 1))
        if d and plain and d[0] < 0.95 * plain[0]:
            print(f"check: {w}: the random draft's row is {d[0] / plain[0]:.2f}x plain, below 0.95x: the planner "
                  "did not switch drafting off soon enough (or the machine was noisy: more rounds)")


def _mean(seqs) -> float:
    lens = [len(s) for s in seqs]
    return sum(lens) / max(len(lens), 1)


def decode_rate(t1: list[float], t_new: list[float], new: int) -> float | None:
    """Decode tok/s from paired rounds: (new - 1) over the median of the rounds' t(new) - t(1),
    counting only positive differences (a noisy round can make one non-positive); None when no
    round gives one, never a rate from a non-positive difference."""
    diffs = [b - a for a, b in zip(t1, t_new) if b - a > 0]
    return (new - 1) / statistics.median(diffs) if diffs else None


def _tokenizer(tmp: Path, vocab: int):
    """The StarCoder tokenizer from ../shared/data when present, else a byte-level stand-in with
    `vocab` ids (the prompts are random ids, so only the vocabulary size matters)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from smallcoder.paths import default_data_dir
    from smallcoder.tokenizer import Tokenizer

    data = default_data_dir()
    if data is not None and (data / "tokenizers" / "starcoder" / "tokenizer.json").exists():
        return Tokenizer.load(data / "tokenizers" / "starcoder")

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    names = ["<|endoftext|>"] + sorted(alphabet)
    names += [f"t{i}" for i in range(vocab - len(names))]
    backend = Backend(models.BPE(vocab={n: i for i, n in enumerate(names)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    (tmp / "tok").mkdir()
    backend.save(str(tmp / "tok" / "tokenizer.json"))
    return Tokenizer.load(tmp / "tok")


if __name__ == "__main__":
    main()

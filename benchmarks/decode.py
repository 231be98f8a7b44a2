"""Decode and prefill speed of the 303M model: ours vs transformers (and llama.cpp when installed).

    python benchmarks/decode.py [--rounds 3] [--dtypes float32,bfloat16,int8] [--no-transformers]

Seeded random weights of the `smallcoder-303m` preset. Cases (the issue's): a 32-token prompt then
128 new tokens at batch 1 (decode tok/s = 127 / (time for 128 tokens - time for 1), i.e. without
the prefill) and at batch 16 (total tok/s, prefill included); prefill of 512 tokens. Every engine
and dtype runs once per round, alternated, and medians over rounds are reported with the ratio
to transformers (and to llama.cpp) and the fraction of this machine's ceiling: memory bandwidth
for decode (measured here: bytes of weights read per step), fp32 matmul throughput for prefill.
llama.cpp runs through `llama-cpp-python` on our own GGUF export (f32, f16, q8_0) when installed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from smallcoder import Engine, SamplingParams, new_model, save
from smallcoder.config import preset
from smallcoder.quant import quantize_model

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


class Ours:
    def __init__(self, model, tok, label):
        self.engine = Engine(model, tok, max_batch=BATCH)
        self.label = label
        self.kernel = self.engine.decode_kernel is not None or model.decode_kernel is not None

    def generate(self, prompts: list[list[int]], n: int) -> None:
        out = self.engine.generate(prompts, SamplingParams(max_new_tokens=n, stop_at_eos=False))
        assert all(len(c.token_ids) == n for c in out)

    def prefill(self, ids: list[int]) -> None:
        self.generate([ids], 1)


class Transformers:
    def __init__(self, folder: Path, dtype: torch.dtype, label: str):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.label = label

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], n: int) -> None:
        ids = torch.tensor(prompts)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n

    def prefill(self, ids: list[int]) -> None:
        self.generate([ids], 1)


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int, label: str):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16,int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--no-batch", action="store_true", help="skip the batch-16 case")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")

    cfg = preset("smallcoder-303m")

    bw, peak = measure_ceilings()
    print(f"machine: {args.threads} threads, read {bw:.1f} GB/s, fp32 matmul {peak:.0f} GFLOP/s")
    base = new_model(cfg, seed=0).eval()
    tmp = Path(tempfile.mkdtemp(prefix="decode-bench-"))
    tok = _tokenizer(tmp, cfg.vocab_size)
    folder = save(base, tok, tmp / "fp32")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, cfg.vocab_size, (BATCH, PROMPT), generator=g).tolist()
    long = torch.randint(1, cfg.vocab_size, (PREFILL,), generator=g).tolist()

    engines, nbytes = [], {}
    for dt in dtypes:
        if dt == "float32":
            m = base
        elif dt == "bfloat16":
            m = new_model(cfg, seed=0).to(torch.bfloat16).eval()
        elif dt == "int8":
            m = quantize_model(new_model(cfg, seed=0)).eval()
        else:
            raise SystemExit(f"unknown dtype {dt}")
        ours = Ours(m, tok, f"ours {dt}")
        nbytes[dt] = weight_bytes(m)
        engines.append((dt, ours))
        if not ours.kernel:
            print(f"note: {dt}: the C++ decode kernel is not in use")
        if not args.no_transformers and dt in ("float32", "bfloat16"):
            engines.append((dt, Transformers(folder, getattr(torch, dt), f"transformers {dt}")))
    if not args.no_llama:
        try:
            import llama_cpp  # noqa: F401

            from smallcoder.export import export_gguf
            for dt, outtype in (("float32", "f32"), ("bfloat16", "f16"), ("int8", "q8_0")):
                if dt in dtypes:
                    path = export_gguf(folder, tmp / f"m-{outtype}.gguf", outtype)
                    engines.append((dt, LlamaCpp(path, args.threads, f"llama.cpp {outtype}")))
        except ImportError:
            print("llama-cpp-python is not installed: llama.cpp rows skipped")

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
    print(f"303M, prompt {PROMPT} -> {NEW} new tokens; batch {BATCH}; prefill {PREFILL}; "
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

"""Generating code-task samples and their records, shared by every generative benchmark.

Round j (sample j of each prompt) uses seed `seed + j`; each request has its own generator, so a
sample does not depend on what it was batched with. Prompts are queued longest first so the
largest KV cache is allocated at the start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import SmallCoderError

if TYPE_CHECKING:
    from ..inference import Completion, Engine
    from .sandbox import Check


def generate_samples(engine: Engine, prompts: Sequence[str], *, n_samples: int, temperature: float,
                     max_new_tokens: int, seed: int, stop: Sequence[str], batch_size: int = 8,
                     top_p: float = 1.0, progress: bool = True, desc: str = "generate"
                     ) -> tuple[list[list[Completion]], dict[str, Any]]:
    """n completions per prompt through the engine's continuous batching; returns them and stats.

    Used by every generative task. Round j (sample j of each prompt) uses seed `seed + j`; each
    request has its own generator, so a sample does not depend on what it was batched with.
    `batch_size` is the number of sequences decoded together. Prompts are queued longest first
    so the largest KV cache is allocated at the start. A prompt longer than the context keeps
    its end (counted in the stats as `truncated_prompts`).
    """
    from tqdm.auto import tqdm

    from ..inference import SamplingParams

    if n_samples < 1:
        raise SmallCoderError(f"--n-samples must be >= 1, got {n_samples}")
    if batch_size < 1:
        raise SmallCoderError(f"--batch-size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in engine.tokenizer.encode_batch(list(prompts))]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    ctx = engine.context_length
    out: list[list[Any]] = [[None] * n_samples for _ in prompts]
    times: list[list[float]] = [[0.0] * n_samples for _ in prompts]
    seeds = [seed + j for j in range(n_samples)]
    start, new_tokens = time.perf_counter(), 0
    bar = tqdm(total=len(prompts) * n_samples, desc=desc, unit="sample", disable=None if progress else True)
    engine.max_batch = batch_size
    for j, s in enumerate(seeds):
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=s, stop=tuple(stop), truncate=True)
        t0 = time.perf_counter()
        completions = engine.generate([prompts[i] for i in order], params, on_complete=lambda _: bar.update(1))
        dt = (time.perf_counter() - t0) / max(1, len(order))
        for i, c in zip(order, completions):
            out[i][j], times[i][j] = c, dt
            new_tokens += len(c.token_ids)
    bar.close()
    wall = time.perf_counter() - start
    stats = {"generation_seconds": round(wall, 3), "generated_tokens": new_tokens,
             "seconds_per_token": round(wall / new_tokens, 6) if new_tokens else None,
             "truncated_prompts": sum(1 for n in lengths if n >= ctx), "seeds": seeds,
             "sample_seconds": times}
    return out, stats


def sample_records(items: Sequence[dict[str, Any]], prompts: Sequence[str], completions: list[list[Completion]],
                   stats: dict[str, Any], to_code: Callable[[dict[str, Any], str], str],
                   to_check: Callable[[dict[str, Any]], Check]) -> tuple[list[dict[str, Any]], list[tuple[str, Check]]]:
    """One samples-file record and one (code, check) run per generated sample (code tasks).

    Takes `sample_seconds` out of `stats` (it goes into the records, not the settings)."""
    records, runs = [], []
    for item, prompt, comps, secs in zip(items, prompts, completions, stats.pop("sample_seconds")):
        for j, c in enumerate(comps):
            code = to_code(item, c.text)
            records.append({"task_id": item["task_id"], "sample": j, "seed": stats["seeds"][j], "prompt": prompt,
                            "completion": c.text, "code": code, "finish_reason": c.finish_reason,
                            "completion_tokens": len(c.token_ids), "gen_time": round(secs[j], 4)})
            runs.append((code, to_check(item)))
    return records, runs


def generation_notes(temperature: float, n_samples: int, stats: dict[str, Any]) -> list[str]:
    """What a reader of the scores should know about how the samples were drawn."""
    notes = []
    if temperature == 0 and n_samples > 1:
        notes.append(f"greedy decoding (temperature 0) with n={n_samples}: the samples of a task are "
                     "identical, so pass@k equals pass@1")
    if stats.get("truncated_prompts"):
        notes.append(f"{stats['truncated_prompts']} prompt(s) were longer than the context and kept only their end")
    return notes

"""In-training evaluation: a stage's validation loss on its held-out records, and the end-of-run
EOS check (does the SFT model end its answers?), written to OUT/eos_check.json."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import torch

from ..fsutil import atomic_write_text

if TYPE_CHECKING:
    from .context import RunContext
    from .stagedata import StageData

EOS_FILE = "eos_check.json"
EOS_CHECK_PROMPTS = 20
EOS_CHECK_MAX_NEW = 256


@torch.no_grad()
def validation_loss(ctx: RunContext, data: StageData) -> float:
    """Mean loss per trained token on eval_batches x micro_batch held-out records, round-robin over sources."""
    from ..data.sft import collate

    st = data.spec
    want = ctx.recipe.run.eval_batches * st.micro_batch
    records, i = [], 0
    while len(records) < want and i < want * len(data.sources):
        src = data.sources[i % len(data.sources)]
        j = i // len(data.sources)
        if len(src.val):
            records.append(src.val[j % len(src.val)])
        i += 1
    total = count = 0.0
    ctx.model.eval()
    for s in range(0, len(records), st.micro_batch):
        mb = collate(records[s:s + st.micro_batch], st.seq_len, ctx.tokenizer.eos_id)
        with ctx.autocast():
            total += float(ctx.forward(mb["input_ids"].to(ctx.info.device),
                                       labels=mb["labels"].to(ctx.info.device)))
        count += mb["num_loss_tokens"]
    ctx.model.train()
    return total / max(count, 1.0)


def eos_check(ctx: RunContext, data: StageData) -> dict[str, Any]:
    """Share of greedy answers to held-out SFT prompts that end with EOS within 256 new tokens."""
    from ..inference import Engine, SamplingParams
    from ..prompts import format_chat
    from .distributed import unwrap

    convs = [c for s in data.sources for c in s.heldout]
    prompts, refs = [], []
    for conv in convs:
        last = max(i for i, m in enumerate(conv) if m["role"] == "assistant")
        prompt = format_chat(conv[:last], add_generation_prompt=True)
        if len(ctx.tokenizer.encode(prompt)) + EOS_CHECK_MAX_NEW <= ctx.config.max_position_embeddings:
            prompts.append(prompt)
            refs.append(conv[last]["content"])
        if len(prompts) == EOS_CHECK_PROMPTS:
            break
    from tqdm import tqdm

    core = unwrap(ctx.model)
    engine = Engine(core, ctx.tokenizer)
    print(f"EOS check: {len(prompts)} held-out SFT prompts, greedy, <= {EOS_CHECK_MAX_NEW} new tokens each",
          file=sys.stderr, flush=True)
    with tqdm(total=len(prompts), unit="answer", file=sys.stderr, disable=not ctx.progress, leave=False) as bar:
        done = engine.generate(prompts, SamplingParams(max_new_tokens=EOS_CHECK_MAX_NEW, temperature=0.0),
                               on_complete=lambda i: bar.update(1))
    core.train()
    ended = sum(c.finish_reason == "stop" for c in done)
    return {"prompts": len(prompts), "ended_with_eos": ended, "share": ended / max(len(prompts), 1),
            "max_new_tokens": EOS_CHECK_MAX_NEW,
            "examples": [{"prompt": p, "answer": c.text, "finish_reason": c.finish_reason, "reference": r}
                         for p, c, r in zip(prompts[:5], done[:5], refs[:5])]}


def run_eos_check(ctx: RunContext) -> float | None:
    """The EOS check on the last SFT stage's held-out prompts, written to OUT/eos_check.json and
    logged; its share, or None when the recipe has no SFT stage. Rank 0."""
    sft = [d for d in ctx.stages if d.spec.sft]
    if not sft:
        return None
    check = eos_check(ctx, sft[-1])
    atomic_write_text(ctx.out / EOS_FILE, json.dumps(check, indent=1, ensure_ascii=False) + "\n")
    ctx.metrics.write({"step": ctx.state.global_step, "event": "eos_check", "eos_share": check["share"],
                       "prompts": check["prompts"]})
    return check["share"]

"""In-training evaluation: the mean loss on a stage's held-out records (its validation loss, and
the learning report's loss per stage, train/report.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .context import RunContext
    from .stagedata import StageData


def held_out_records(data: StageData, want: int) -> list[Any]:
    """Up to `want` held-out records of the stage, round-robin over its sources."""
    records, i = [], 0
    while len(records) < want and i < want * len(data.sources):
        src = data.sources[i % len(data.sources)]
        j = i // len(data.sources)
        if len(src.val):
            records.append(src.val[j % len(src.val)])
        i += 1
    return records


@torch.no_grad()
def mean_loss(forward: Callable[..., Any], model: torch.nn.Module, records: list[Any], micro_batch: int,
              seq_len: int, pad_id: int, device: torch.device,
              autocast: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Mean loss per trained token of `records`, in micro-batches; `model` is put back in train mode."""
    from ..data.sft import collate

    total = count = 0.0
    model.eval()
    for s in range(0, len(records), micro_batch):
        mb = collate(records[s:s + micro_batch], seq_len, pad_id)
        with autocast():
            total += float(forward(mb["input_ids"].to(device), labels=mb["labels"].to(device)))
        count += mb["num_loss_tokens"]
    model.train()
    return total / max(count, 1.0)


def validation_loss(ctx: RunContext, data: StageData) -> float:
    """Mean loss per trained token on eval_batches x micro_batch held-out records of the stage."""
    st = data.spec
    records = held_out_records(data, ctx.recipe.run.eval_batches * st.micro_batch)
    return mean_loss(ctx.forward, ctx.model, records, st.micro_batch, st.seq_len, ctx.tokenizer.eos_id,
                     ctx.info.device, ctx.autocast)

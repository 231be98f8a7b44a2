"""The optimizer of a stage: AdamW (decay on matrices only), or Muon on the hidden matrices with
AdamW on the rest (train/muon.py); rebuilt or carried over at a stage boundary."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .recipe import StageSpec


def param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices; none on norms (1-D) and embeddings (embed_tokens, and lm_head only when tied)."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def _adamw(named: Iterable[tuple[str, torch.Tensor]], stage: StageSpec, fsdp: bool) -> torch.optim.Optimizer:
    # the fused kernel (one pass over each tensor; transformers' default since torch 2.8) took
    # the 303M step's optimizer from 1.31 s to 0.28 s on 2 CPU cores; FSDP2's DTensor
    # parameters keep the multi-tensor path
    kind = {"foreach": None} if fsdp else {"fused": True}
    return torch.optim.AdamW(param_groups(named, stage.weight_decay), lr=stage.lr, betas=(0.9, 0.95), eps=1e-8,
                             **kind)


def build_optimizer(model: torch.nn.Module, stage: StageSpec, fsdp: bool) -> Any:
    """The stage's optimizer over the wrapped `model`'s parameters at the stage's LR: AdamW (betas
    0.9 / 0.95, eps 1e-8), or for `optimizer = "muon"` a MuonAdamW whose Muon group's LR is
    `muon_lr` / `lr` times the schedule's."""
    from .distributed import unwrap

    if stage.optimizer == "adamw":
        return _adamw(unwrap(model).named_parameters(), stage, fsdp)
    from .muon import Muon, MuonAdamW, named_split

    matrices, rest = named_split(unwrap(model))
    lr, weight_decay, momentum = stage.muon_settings
    muon = Muon([{"params": [p for _, p in matrices], "name": "muon", "lr_scale": lr / stage.lr}],
                lr=lr, weight_decay=weight_decay, momentum=momentum)
    return MuonAdamW(muon, _adamw(rest, stage, fsdp))


def apply_stage(optimizer: Any, stage: StageSpec) -> None:
    """The stage's weight decays (and Muon's LR scale and momentum) on a carried-over optimizer,
    which keeps its moments."""
    for g in optimizer.param_groups:
        if g.get("name") == "muon":
            lr, g["weight_decay"], g["momentum"] = stage.muon_settings
            g["lr_scale"] = lr / stage.lr
        else:
            g["weight_decay"] = stage.weight_decay if g.get("name") == "decay" else 0.0


def set_lr(optimizer: Any, lr: float) -> None:
    """The schedule's LR on every group (Muon's scaled by its `lr_scale`)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def kind(optimizer: Any) -> str:
    """"muon" or "adamw": what build_optimizer made."""
    return "muon" if hasattr(optimizer, "muon") else "adamw"

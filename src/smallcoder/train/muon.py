"""Muon (Jordan et al. 2024) for the hidden matrices, AdamW for the rest, as one optimizer.

Why: Muon orthogonalizes each matrix's momentum (a Newton–Schulz iteration) before the step, which
reached modded-nanogpt's target loss in ~1.56x fewer steps than AdamW at a fixed architecture and
batch. It applies to the 2-D weights inside the blocks (attention and MLP projections); the
embedding, the output head and the norms keep AdamW, as the Muon papers do. The LR follows Liu et
al. 2025 ("Muon is Scalable for LLM Training"): each matrix's update is scaled by 0.2 x sqrt(max(rows,
cols)), so its RMS matches AdamW's and the AdamW schedule (lr, warmup, decay) carries over.

Checkpoints stay plain Llama: only the optimizer differs. The state is the usual per-parameter
dict (`momentum_buffer` for Muon; AdamW's own), saved and restored by runstate like AdamW's.
Under DDP every rank holds whole gradients, so each rank computes the same update. Under FSDP2 a
rank holds a row shard of each matrix: the momentum stays sharded, the matrix to orthogonalize is
gathered whole (one all-gather per matrix, every rank in the same order), and each rank keeps its
own shard of the result, so 2 ranks step as 1 does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al.'s quintic (torch.optim.Muon's default)


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """The hidden matrices: 2-D weights inside the decoder layers (not embed_tokens, lm_head, norms)."""
    return p.ndim == 2 and ".layers." in f".{name}"


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """An approximate U V^T of g = U S V^T by Newton–Schulz. fp32 on the CPU (whose bf16 matmuls are
    4x slower than fp32 here), bf16 on accelerators, as torch.optim.Muon does."""
    a, b, c = NS_COEFFICIENTS
    x = g.float() if g.device.type == "cpu" else g.bfloat16()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(g.dtype)


def _orthogonalized(g: torch.Tensor, steps: int) -> torch.Tensor:
    """`orthogonalize(g)`; for an FSDP2 DTensor, of the gathered whole matrix, returned as this
    rank's shard (computed from the local copy, no scatter)."""
    if not hasattr(g, "full_tensor"):
        return orthogonalize(g, steps)
    from torch.distributed.tensor import distribute_tensor

    whole = orthogonalize(g.full_tensor(), steps)
    return distribute_tensor(whole, g.device_mesh, g.placements, src_data_rank=None)


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters: nesterov momentum, orthogonalized, decoupled weight decay."""

    def __init__(self, params: Any, lr: float, weight_decay: float, momentum: float = 0.95,
                 ns_steps: int = 5) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "ns_steps": ns_steps})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            lr, wd, m = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - m)
                update = _orthogonalized(p.grad.lerp(buf, m), group["ns_steps"])
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))  # Liu et al.: AdamW's RMS


class MuonAdamW:
    """Muon on the hidden matrices and AdamW on the other parameters, stepped together. Looks like
    one torch optimizer to the trainer: `param_groups` (both, each named: its `lr_scale` relative to
    the schedule's LR), `state`, `step`, `zero_grad`."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw

    @property
    def parts(self) -> tuple[torch.optim.Optimizer, ...]:
        return self.muon, self.adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict[torch.Tensor, dict[str, Any]]:
        """Both parts' per-parameter state, read-only (a merged copy; each part's own is a
        defaultdict, so a chained lookup would answer {} for the other part's parameters)."""
        return {**self.muon.state, **self.adamw.state}

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)


def named_split(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, torch.Tensor]]]:
    """(Muon's, AdamW's) trainable (name, parameter) pairs."""
    muon, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if is_muon_param(name, p) else rest).append((name, p))
    return muon, rest


def _kinds(pairs: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Parameter names with layer numbers as *, each once, in order."""
    return list(dict.fromkeys(".".join("*" if p.isdigit() else p for p in n.split(".")) for n, _ in pairs))


def grouping(model: torch.nn.Module, optimizer: str) -> dict[str, list[str]]:
    """Which tensors (layer numbers as *) each optimizer of a stage steps: run.json records it."""
    muon, rest = named_split(model)
    if optimizer != "muon":
        return {"adamw": _kinds(muon + rest)}
    return {"muon": _kinds(muon), "adamw": _kinds(rest)}


def describe(model: torch.nn.Module) -> str:
    """Which tensors get Muon, in a line: printed at a Muon stage's start."""
    muon, rest = named_split(model)
    n_muon = sum(p.numel() for _, p in muon)
    n_rest = sum(p.numel() for _, p in rest)
    return (f"muon on {len(muon)} matrices ({n_muon:,} weights: {', '.join(_kinds(muon))}); "
            f"adamw on {len(rest)} tensors ({n_rest:,}: {', '.join(_kinds(rest))})")

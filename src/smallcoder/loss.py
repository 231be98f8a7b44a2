"""The training loss: summed next-token cross-entropy, computed from the final hidden states in chunks.

A (tokens, vocab) logits tensor is the largest of a training step: 200 MB in fp32 for one 1,024-token
row of the 49,152-token vocabulary, 3.2 GB for a 16-row GPU micro-batch, and the plain
`cross_entropy(lm_head(h))` keeps it, its log-softmax and their gradients alive across forward
and backward. Here the head runs `chunk` rows at a time and each chunk's gradient,
softmax - onehot, is turned into the hidden-state and head-weight gradients at once (the same
three matmuls as autograd would run, in the same dtype), so no more than one chunk of logits
exists at any moment. Backward then only scales the stored gradients by the incoming one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .labels import IGNORE_INDEX

# Logits rows per chunk. CPU: 512 (100 MB in fp32 at a 49,152 vocabulary; on the head alone 128 rows
# ran 8% slower than one whole-batch head, 512 and 1,024 ~5% faster). GPU: 4,096 (800 MB), so that a
# chunk's matmuls, not its launches and elementwise passes, set the time.
CPU_CHUNK_ROWS = 512
GPU_CHUNK_ROWS = 4096


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                dtype: torch.dtype, chunk: int, need_grad: bool) -> torch.Tensor:
        h, w = hidden.to(dtype), weight.to(dtype)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_grad else None
        grad_w = None
        for s in range(0, h.shape[0], chunk):
            x, t = h[s:s + chunk], targets[s:s + chunk]
            z = (x @ w.t()).float()
            lse = torch.logsumexp(z, dim=1)
            valid = t != IGNORE_INDEX
            t = t.masked_fill(~valid, 0)
            loss += (lse - z.gather(1, t[:, None])[:, 0]).masked_fill_(~valid, 0.0).sum()
            if need_grad:  # d(sum of losses)/d(logits) = softmax - onehot on the trained rows, 0 elsewhere
                z.sub_(lse[:, None]).exp_().mul_(valid[:, None])
                z.scatter_add_(1, t[:, None], -valid[:, None].to(z.dtype))
                g = z.to(dtype)
                grad_h[s:s + chunk] = g @ w
                if grad_w is None:
                    grad_w = (g.t() @ x).to(weight.dtype)
                elif dtype == weight.dtype:
                    grad_w.addmm_(g.t(), x)  # accumulate in place: no second (V, H) tensor
                else:
                    grad_w += g.t() @ x
        if need_grad and grad_w is None:  # no rows at all
            grad_w = torch.zeros_like(weight)
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.grads
        if grad_h is None:
            raise RuntimeError("the chunked head loss was computed without gradients (under no_grad or on "
                               "tensors that do not require them), or its backward already ran once")
        ctx.grads = (None, None)  # the stored gradients are scaled in place: one backward only
        return grad_h.mul_(grad_loss), grad_w.mul_(grad_loss), None, None, None, None


@torch.compiler.disable  # a Python loop over a few big matmuls: nothing for the compiler to fuse
def next_token_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of predicting `labels[:, t + 1]` from `hidden[:, t]` (fp32 scalar).

    `hidden` is (B, T, H), the final-normed states; `weight` is the head's (V, H); `labels` is
    (B, T) with IGNORE_INDEX where nothing is trained. Labels are shifted here, so a batch's
    `input_ids` can serve as its own labels. Divide by the trained-label count of the whole step
    (see `data.sft.collate`) for the mean. Under autocast the matmuls run in the autocast dtype
    and the softmax in fp32, as `cross_entropy(lm_head(hidden).float())` would.
    """
    if labels.shape != hidden.shape[:2]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, hidden states {tuple(hidden.shape[:2])}")
    device = hidden.device.type
    chunk = chunk or (CPU_CHUNK_ROWS if device == "cpu" else GPU_CHUNK_ROWS)
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(device, enabled=False):
        return _ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, dtype, chunk,
                                      need_grad)

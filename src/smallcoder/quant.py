"""int8 weight-only quantization: one int8 per weight and one fp32 scale per output row.

Why per row (per output channel): the decode kernel applies the scale once per dot product, so
dequantization costs nothing in the inner loop, and 1 byte per weight is the bandwidth floor for
a batch-1 decode step (3.7× fewer bytes than fp32). Activations stay fp32 here; the C++ decode
kernel also quantizes them, to int16 per row (csrc/q8dot.h), to use integer dot products. The
embedding and the norms stay in float: the embedding is read one row per token, the norms are tiny.

A quantized checkpoint is a normal HF folder whose linear weights are int8 `*.weight` tensors with
`*.weight_scale` beside them and `quantization_config` in config.json, so quantizing happens once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

QUANT_METHOD = "smallcoder-int8"
QUANT_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "granularity": "per-output-channel",
                "symmetric": True, "modules": "all linear layers and lm_head"}


def declared_method(config_json: Mapping[str, Any]) -> Any:
    """The quantization that a config.json dict declares: None when it declares none (no
    `quantization_config`, or null); else its `quant_method`, or the field itself when that is
    not an object naming one (shown as is in errors)."""
    qc = config_json.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else qc
    return qc if method is None else method


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights (out, in) and fp32 scales (out,)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8Linear:
        q, scale = quantize_rows(weight)
        m = cls(weight.shape[1], weight.shape[0])
        m.weight, m.weight_scale = q, scale
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # many rows (prefill, scoring): dequantize and let the float matmul run; one-token
        # decode steps go through the C++ kernel instead (kernels.py)
        w = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, w)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 along the last dimension: scale = max|w| / 127, q = round(w / scale). Weight
    rows here; the int8 KV cache's key and value vectors (model.KVCache, and the decode kernel
    with the same arithmetic) too."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_model(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) with an Int8Linear; returns the model."""
    return _replace_linears(model, lambda lin: Int8Linear.from_float(lin.weight))


def int8_skeleton(model: nn.Module) -> nn.Module:
    """Swap nn.Linear for empty Int8Linear modules, to load a quantized state dict into."""
    return _replace_linears(model, lambda lin: Int8Linear(lin.in_features, lin.out_features))


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, make(child))
        else:
            _replace_linears(child, make)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())

"""SmallCoder: train, evaluate and run small Llama-style code models.

Exports load lazily (PEP 562) so `smallcoder --help` and data commands don't pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SmallCoderError

__version__ = "0.1.0"

_EXPORTS = {
    "load": "checkpoint", "save": "checkpoint", "new_model": "checkpoint",
    "ModelConfig": "config", "preset": "config",
    "Engine": "inference", "SamplingParams": "inference", "Completion": "inference",
    "SmallCoder": "model", "KVCache": "model",
    "Tokenizer": "tokenizer", "format_chat": "prompts",
}
__all__ = [
    "Completion",
    "Engine",
    "KVCache",
    "ModelConfig",
    "SamplingParams",
    "SmallCoder",
    "SmallCoderError",
    "Tokenizer",
    "format_chat",
    "load",
    "new_model",
    "preset",
    "save",
]  # SmallCoderError + _EXPORTS


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'smallcoder' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""SmallCoder: train, evaluate and run small Llama-style code models."""

from .checkpoint import load, new_model, save
from .config import ModelConfig, preset
from .errors import SmallCoderError
from .generate import Completion, Engine, SamplingParams
from .model import KVCache, SmallCoder
from .tokenizer import Tokenizer, format_chat

__version__ = "0.1.0"
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
]

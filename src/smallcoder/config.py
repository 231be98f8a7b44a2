"""Model configuration: presets, and reading/writing Hugging Face Llama `config.json`.

One dataclass describes every model we run. It reads both config forms that transformers
writes (v4: top-level `rope_theta`; v5: `rope_parameters`) and writes a form both load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import known
from .errors import SmallCoderError

# Architectures whose weights and maths are exactly the Llama decoder we implement.
# An int8 folder (`smallcoder quantize`) names a model type of its own: transformers and other
# Llama readers then refuse it at once, instead of loading int8 tensors as floats and
# generating garbage with only a warning.
INT8_MODEL_TYPE, INT8_ARCHITECTURE = "smallcoder_int8", "SmallCoderInt8ForCausalLM"
LLAMA_MODEL_TYPES = {"llama", INT8_MODEL_TYPE}
LLAMA_ARCHITECTURES = {"LlamaForCausalLM", INT8_ARCHITECTURE}
_INT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "max_position_embeddings", "head_dim")
_FLOAT_FIELDS = {"rms_norm_eps": True, "rope_theta": True, "initializer_range": False}  # name: must be > 0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 49152
    hidden_size: int = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    intermediate_size: int = 3072
    max_position_embeddings: int = 1024
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0

    def __post_init__(self) -> None:
        """Check every field's type and range, so a bad config.json or recipe value is one line
        naming the field (not a TypeError deep in the model)."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if name == "head_dim" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SmallCoderError(f"model config field {name!r} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
            if self.head_dim <= 0:
                raise SmallCoderError(f"model config field 'head_dim': hidden_size {self.hidden_size} // "
                                      f"num_attention_heads {self.num_attention_heads} is 0")
        for name, positive in _FLOAT_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                kind = "a positive" if positive else "a non-negative"
                raise SmallCoderError(f"model config field {name!r} must be {kind} finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.tie_word_embeddings, bool):
            raise SmallCoderError(f"model config field 'tie_word_embeddings' must be true or false, "
                                  f"got {self.tie_word_embeddings!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise SmallCoderError(f"model config field {name!r} must be a token id (an integer >= 0) or "
                                      f"null, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SmallCoderError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise SmallCoderError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # ---- sizes and costs: the one place these formulas live ------------------------------------

    def matmul_parameters(self, head: bool = True) -> int:
        """Parameters that take part in matmuls: every Linear of every layer (q, k, v, o, gate,
        up, down) and, with `head`, lm_head (a matmul even when tied); not the embedding lookup or
        the norms. `head=False` is what a decode step's layers multiply per token."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * h * self.intermediate_size
        return self.num_hidden_layers * (attn + mlp) + (self.vocab_size * h if head else 0)

    @property
    def num_parameters(self) -> int:
        """Parameter count without building the model (embeddings counted once when tied)."""
        h = self.hidden_size
        norms = self.num_hidden_layers * 2 * h + h
        untied_embedding = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.matmul_parameters() + norms + untied_embedding

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per trained token at `seq_len`: 6 * N_matmul + 12 * layers * hidden * seq_len.

        The second term is attention's QK^T and AV (forward 4 * seq * hidden per layer, x3 for
        backward): the PaLM paper's (Chowdhery et al. 2022, appendix B) accounting. 1.81 GFLOP per
        token for the 303M model at seq 1024.
        """
        return 6.0 * self.matmul_parameters() + 12.0 * self.num_hidden_layers * self.hidden_size * seq_len

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a transformers Llama config dict; reject other families with a clear error."""
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if not isinstance(model_type, (str, type(None))) or not isinstance(archs, list) \
                or not all(isinstance(a, str) for a in archs):
            raise SmallCoderError(f"{source}: fields 'model_type' (a string) and 'architectures' (a list of "
                                  f"strings) are {model_type!r:.40} and {archs!r:.40}")
        if model_type not in LLAMA_MODEL_TYPES and not LLAMA_ARCHITECTURES & set(archs):
            raise SmallCoderError(
                f"{source}: model_type {model_type!r} (architectures {archs}) is not a Llama-family "
                "model; SmallCoder runs Llama decoders only")
        if d.get("hidden_act", "silu") != "silu":
            raise SmallCoderError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise SmallCoderError(f"{source}: {flag}=true is not supported (Llama has no biases)")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
            raise SmallCoderError(f"{source}: field {field!r} must be an object or null, got {rope!r:.60}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise SmallCoderError(f"{source}: rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in required if k not in d]
        if missing:
            raise SmallCoderError(f"{source}: missing field(s) {', '.join(missing)}")
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        kv = d.get("num_key_value_heads")
        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d["num_attention_heads"] if kv is None else kv,
                intermediate_size=d["intermediate_size"],
                max_position_embeddings=d.get("max_position_embeddings", 2048),
                head_dim=d.get("head_dim"),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                rope_theta=theta,
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                initializer_range=d.get("initializer_range", 0.02),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=eos,
            )
        except SmallCoderError as e:
            raise SmallCoderError(f"{source}: {e}") from None

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json that transformers v4 (top-level rope_theta) and v5 (rope_parameters) load."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "intermediate_size": self.intermediate_size,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": None,
            "use_cache": True,
            "torch_dtype": dtype,
            "dtype": dtype,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_hf_dict(read_config_json(path), source=str(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    """config.json as a dict, with errors that name the file (also read for fields beyond the
    model's shape, such as `quantization_config`)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmallCoderError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SmallCoderError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise SmallCoderError(f"{path}: expected a JSON object")
    return d


PRESETS: dict[str, ModelConfig] = {
    # The model card's LlamaConfig: 302,027,520 parameters, untied embeddings.
    "smallcoder-303m": ModelConfig(),
    # Same shape family, small enough for tests and a laptop demo (31.5M with the StarCoder vocab).
    "tiny": ModelConfig(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=4, intermediate_size=1024),
}


def preset(name: str) -> ModelConfig:
    return PRESETS[known(name, "preset", tuple(PRESETS))]

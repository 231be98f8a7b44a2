"""The SmallCoder decoder: a Llama-style transformer in plain PyTorch.

Module and parameter names are those of `transformers.LlamaForCausalLM`, so a state dict moves
between the two without renaming or permuting, and the arithmetic follows the same order
(float32 RMSNorm statistics, float32 rotary tables, rotate-half RoPE) so logits agree to 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .loss import next_token_loss_sum


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys and values for every layer, one row per sequence (slot).

    Each row has its own filled length, so sequences of different lengths share one batch
    without padding and a finished row can be refilled with a new sequence (continuous batching).
    `rows(a, b)` is a view of rows a..b-1 that shares storage with this cache.
    """

    def __init__(self, config: ModelConfig | None, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                 _views: tuple | None = None) -> None:
        if _views is not None:
            self.k, self.v, self.lengths = _views
        else:
            shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
            self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on the CPU: read by Python
        self.max_length = self.k[0].shape[2]
        self.batch_size = self.k[0].shape[0]

    def rows(self, start: int, stop: int) -> KVCache:
        return KVCache(None, 0, 0, _views=([k[start:stop] for k in self.k], [v[start:stop] for v in self.v],
                                            self.lengths[start:stop]))

    @property
    def length(self) -> int:
        """Filled positions of the longest row."""
        return int(self.lengths.max()) if self.batch_size else 0

    def reset(self) -> None:
        self.lengths.zero_()

    def begin(self, T: int) -> torch.Tensor:
        """Start a forward of T new tokens per row: returns each row's first position (B,)."""
        starts = self.lengths.clone()
        self._starts = starts.tolist()
        if max(self._starts) + T > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions, asked for {max(self._starts) + T}")
        self._uniform = len(set(self._starts)) == 1
        self._index = starts.to(self.k[0].device)
        return starts

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, heads, T, head_dim) at each row's positions; return the
        keys/values of positions 0..longest row (rows shorter than that are masked by the caller)."""
        T = k.shape[2]
        k, v = k.to(self.k[layer].dtype), v.to(self.v[layer].dtype)
        if self._uniform:
            s0 = self._starts[0]
            self.k[layer][:, :, s0:s0 + T] = k
            self.v[layer][:, :, s0:s0 + T] = v
        elif T == 1:
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[layer][rows, :, self._index] = k[:, :, 0]
            self.v[layer][rows, :, self._index] = v[:, :, 0]
        else:
            for b, s0 in enumerate(self._starts):
                self.k[layer][b, :, s0:s0 + T] = k[b]
                self.v[layer][b, :, s0:s0 + T] = v[b]
        S = max(self._starts) + T
        return self.k[layer][:, :, :S], self.v[layer][:, :, :S]

    def end(self, T: int) -> None:
        self.lengths += T


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.write(layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None and T > 1 and k.shape[2] == T,
            enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The trunk; its name is the `model.` prefix of every HF state-dict key."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SmallCoder(nn.Module):
    """Causal LM with HF Llama parameter names: `model.*` and `lm_head.weight`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self._inv_freq: dict[torch.device, torch.Tensor] = {}
        self.decode_kernel = None  # set by kernels.attach (the Engine does it on a CPU)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # int8 keeps its own
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int = 0) -> None:
        """Normal(0, initializer_range) for linears and embeddings, ones for norms (as HF does)."""
        g = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    if module is self.lm_head and self.config.tie_word_embeddings:
                        continue
                    w = torch.empty(module.weight.shape, dtype=torch.float32).normal_(0.0, std, generator=g)
                    module.weight.copy_(w)
                elif isinstance(module, RMSNorm):
                    module.weight.fill_(1.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # shared (tied) tensors count once

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            d = self.config.head_dim
            exponent = torch.arange(0, d, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / d
            self._inv_freq[device] = 1.0 / (self.config.rope_theta ** exponent)
        return self._inv_freq[device]

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                last_only: bool = False, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `input_ids` (B, T), appending to `cache` when given; with `labels`, the loss.

        Row b's tokens take positions cache.lengths[b] onwards, so rows of different lengths
        share a batch without padding. `last_only` computes logits for the final position only.
        `labels` (B, T) returns the summed next-token cross-entropy instead of logits, without
        ever holding the full logits (`loss.next_token_loss_sum`): the training path.
        """
        B, T = input_ids.shape
        if labels is not None and (cache is not None or last_only):
            raise ValueError("labels= computes the training loss over the whole sequence: no cache, no last_only")
        if labels is not None and not isinstance(self.lm_head, nn.Linear):
            raise ValueError(f"labels= needs a float lm_head to train; this model's is {type(self.lm_head).__name__}")
        device = input_ids.device
        x = self.model.embed_tokens(input_ids)
        kernel = self.decode_kernel
        if kernel is not None and cache is not None and T == 1 and kernel.supports(cache, B) \
                and not torch.is_grad_enabled() and kernel.valid(self):
            return kernel(x[:, 0], cache)[:, None]  # the C++ decode step (kernels.py)
        mask = None
        if cache is None:
            position_ids = torch.arange(T, device=device).unsqueeze(0)
        else:
            if cache.batch_size != B:
                raise ValueError(f"KV cache has {cache.batch_size} rows, input has {B}")
            starts = cache.begin(T).to(device)
            position_ids = starts[:, None] + torch.arange(T, device=device)
            if not (cache._uniform and (T == 1 or cache._starts[0] == 0)):
                # row b's query at position p sees keys 0..p of its own row
                k_pos = torch.arange(max(cache._starts) + T, device=device)
                mask = (k_pos[None, None, :] <= position_ids[:, :, None])[:, None]
        freqs = position_ids[..., None].float() * self.inv_freq(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.end(T)
        if last_only:
            x = x[:, -1:]
        if labels is not None:
            return next_token_loss_sum(self.model.norm(x), self.lm_head.weight, labels)
        return self.lm_head(self.model.norm(x))

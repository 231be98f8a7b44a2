"""The SmallCoder decoder: a Llama-style transformer in plain PyTorch.

Module and parameter names are those of `transformers.LlamaForCausalLM`, so a state dict moves
between the two without renaming or permuting, and the arithmetic follows the same order
(float32 RMSNorm statistics, float32 rotary tables, rotate-half RoPE) so logits agree to 1e-5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .loss import next_token_loss_sum
from .quant import quantize_rows

if TYPE_CHECKING:
    from .kernels import DecodeKernel


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
    """Preallocated keys and values for every layer, one row per sequence (slot), and each row's
    filled length.

    Storage only: where a forward puts its tokens is that forward's argument (`SmallCoder.forward`'s
    `starts`, by default each row's length) and the forward records the lengths it leaves, so
    rows of different lengths share one batch without padding and a finished row can be refilled
    with a new sequence (continuous batching). `rows(a, b)` is a view of rows a..b-1 that shares
    storage with this cache.

    `dtype` int8 stores each position's key (and value) vector of each head as int8 with one fp32
    scale (`k_scale`, `v_scale`: quant.quantize_rows, as the decode kernel does): a quarter of the
    fp32 bytes that a long-context decode step reads, at a measured mean KL of ~1e-6 per token.
    """

    def __init__(self, config: ModelConfig | None, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                 _views: tuple | None = None) -> None:
        if _views is not None:
            self.k, self.v, self.lengths, self.k_scale, self.v_scale = _views
        else:
            shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
            self.k_scale = self.v_scale = None
            if dtype == torch.int8:
                self.k_scale = [torch.zeros(shape[:3], device=device) for _ in range(config.num_hidden_layers)]
                self.v_scale = [torch.zeros(shape[:3], device=device) for _ in range(config.num_hidden_layers)]
            self.lengths = torch.zeros(batch_size, dtype=torch.long)  # on the CPU: read by Python
        self.max_length = self.k[0].shape[2]
        self.batch_size = self.k[0].shape[0]

    def planes(self) -> list[list[torch.Tensor]]:
        """Per-layer tensor lists: keys, values, then (int8) their scales."""
        return [self.k, self.v] + ([self.k_scale, self.v_scale] if self.k_scale is not None else [])

    def rows(self, start: int, stop: int) -> KVCache:
        k, v, *scales = [[t[start:stop] for t in plane] for plane in self.planes()]
        return KVCache(None, 0, 0, _views=(k, v, self.lengths[start:stop], *(scales or (None, None))))

    def grown(self, batch_size: int, max_length: int) -> KVCache:
        """A cache of at least this one's rows and positions that holds this one's contents."""
        B, L = max(batch_size, self.batch_size), max(max_length, self.max_length)
        planes = []
        for plane in self.planes():
            new = []
            for src in plane:
                dst = src.new_zeros((B, src.shape[1], L, *src.shape[3:]))
                dst[:self.batch_size, :, :self.max_length] = src
                new.append(dst)
            planes.append(new)
        k, v, *scales = planes
        grown = KVCache(None, 0, 0, _views=(k, v, torch.zeros(B, dtype=torch.long), *(scales or (None, None))))
        grown.lengths[:self.batch_size] = self.lengths
        return grown

    @property
    def length(self) -> int:
        """Filled positions of the longest row."""
        return int(self.lengths.max()) if self.batch_size else 0

    def reset(self) -> None:
        self.lengths.zero_()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, at: Positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (B, heads, T, head_dim) at the positions `at` gives each row; return
        the keys/values of positions 0..at.end-1 (rows shorter than that are masked by the caller)."""
        out = []
        for store, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            if scales is None:
                _put(store[layer], x.to(store[layer].dtype), at)
                out.append(store[layer][:, :, :at.end])
            else:
                q, s = quantize_rows(x)
                _put(store[layer], q, at)
                _put(scales[layer], s, at)
                out.append(store[layer][:, :, :at.end].float() * scales[layer][:, :, :at.end, None])
        return out[0], out[1]


def _put(dst: torch.Tensor, x: torch.Tensor, at: Positions) -> None:
    """dst[b, :, positions of row b] = x[b] (x: B, heads, T, ...)."""
    T = x.shape[2]
    if at.uniform:
        dst[:, :, at.starts[0]:at.starts[0] + T] = x
    elif T == 1:
        dst[torch.arange(x.shape[0], device=x.device), :, at.index] = x[:, :, 0]
    else:
        for b, s0 in enumerate(at.starts):
            dst[b, :, s0:s0 + T] = x[b]


class Positions:
    """Where one forward's T new tokens go in a KV cache: row b takes positions starts[b]..starts[b]+T-1.

    Made by each forward from its arguments and handed down to the layers (never kept on the cache)."""

    def __init__(self, starts: torch.Tensor, B: int, T: int, cache: KVCache) -> None:
        if cache.batch_size != B:
            raise ValueError(f"KV cache has {cache.batch_size} rows, input has {B}")
        if starts.shape != (cache.batch_size,):
            raise ValueError(f"starts has shape {tuple(starts.shape)}; the KV cache has {cache.batch_size} rows")
        self.tensor = starts  # (B,) int64 on the CPU
        self.starts: list[int] = starts.tolist()
        self.T = T
        self.end = max(self.starts) + T
        if min(self.starts) < 0:
            raise ValueError(f"starts must be >= 0, got {self.starts}")
        if self.end > cache.max_length:
            raise ValueError(f"KV cache holds {cache.max_length} positions, asked for {self.end}")
        self.uniform = len(set(self.starts)) == 1
        self.index = starts.to(cache.k[0].device)

    def mask(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        """The attention mask for queries at `position_ids` (B, T): row b's query at position p sees
        keys 0..p of its own row. None where plain causal attention (or none) already does that."""
        if self.uniform and (self.T == 1 or self.starts[0] == 0):
            return None
        k_pos = torch.arange(self.end, device=position_ids.device)
        return (k_pos[None, None, :] <= position_ids[:, :, None])[:, None]


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
                mask: torch.Tensor | None, cache: KVCache | None, at: Positions | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.write(layer, k, v, at)
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

    def forward(self, x, cos, sin, mask, cache, at, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, at, layer)
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
        self.decode_kernel: DecodeKernel | None = None  # set by kernels.attach; an Engine keeps its own

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
                last_only: bool = False, labels: torch.Tensor | None = None, *,
                starts: torch.Tensor | Sequence[int] | None = None,
                decode_kernel: DecodeKernel | None = None) -> torch.Tensor:
        """Logits for `input_ids` (B, T), written into `cache` when given; with `labels`, the loss.

        Row b's tokens take positions starts[b].. (default: cache.lengths[b], i.e. appended), so
        rows of different lengths share a batch without padding, and afterwards cache.lengths[b]
        is starts[b] + T. `last_only` computes logits for the final position only. `labels`
        (B, T) returns the summed next-token cross-entropy instead of logits, without ever
        holding the full logits (`loss.next_token_loss_sum`): the training path.
        `decode_kernel` (a `kernels.DecodeKernel` for these weights) runs one-token steps in C++;
        by default the one `kernels.attach` gave this model, if any (several tokens per row in
        C++, e.g. a prefill chunk or a speculative verification: `forward_rows`).
        """
        B, T = input_ids.shape
        if labels is not None and (cache is not None or last_only):
            raise ValueError("labels= computes the training loss over the whole sequence: no cache, no last_only")
        if labels is not None and not isinstance(self.lm_head, nn.Linear):
            raise ValueError(f"labels= needs a float lm_head to train; this model's is {type(self.lm_head).__name__}")
        if cache is None and starts is not None:
            raise ValueError("starts= are positions in a KV cache: pass cache= too")
        device = input_ids.device
        x = self.model.embed_tokens(input_ids)
        mask = at = None
        if cache is None:
            position_ids = torch.arange(T, device=device).unsqueeze(0)
        else:
            first = cache.lengths.clone() if starts is None else torch.as_tensor(starts, dtype=torch.long).cpu()
            at = Positions(first, B, T, cache)
            logits = self._kernel_step(x, cache, at, decode_kernel)
            if logits is not None:
                cache.lengths.copy_(first + T)
                return logits[:, -1:] if last_only else logits
            position_ids = at.index.to(device)[:, None] + torch.arange(T, device=device)
            mask = at.mask(position_ids)
        freqs = position_ids[..., None].float() * self.inv_freq(device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, at, i)
        if cache is not None:
            cache.lengths.copy_(first + T)
        if last_only:
            x = x[:, -1:]
        if labels is not None:
            return next_token_loss_sum(self.model.norm(x), self.lm_head.weight, labels)
        return self.lm_head(self.model.norm(x))

    def forward_rows(self, tokens: torch.Tensor, cache: KVCache, rows: torch.Tensor | Sequence[int],
                     positions: torch.Tensor | Sequence[int], logit_rows: torch.Tensor | Sequence[int],
                     decode_kernel: DecodeKernel | None = None) -> torch.Tensor:
        """Logits (L, V) float32 of tokens logit_rows for N new tokens (N,) spread over KV cache
        rows: token n is written into cache row rows[n] at position positions[n] and attends to
        positions 0..positions[n] of that row, this call's tokens included.

        Why: one call is a batched decode step, several rows' prefill chunks and speculative
        verifications (k+1 positions of one row) at once, so they share one pass over the weights
        where the C++ kernel runs it (`kernels.DecodeKernel.rows`). There a token's logits are bit
        for bit the same whichever tokens share the call (any N, grouping, order), so speculative
        decoding's greedy tokens equal plain decoding's. The kernel runs when it applies (no
        autograd, tokens on the CPU, a cache it reads, weights unchanged since it was built) and
        `kernels.kernel_faster` says it measured faster than PyTorch for these weights and sizes;
        elsewhere (a GPU too) each row's span is one ordinary forward (`self(ids[None],
        cache=cache.rows(r, r + 1), starts=[p0])`), all KV cache dtypes alike.

        Contract, checked (ValueError): each cache row's tokens form one contiguous group of the
        list at consecutive ascending positions; positions lie in 0..cache.max_length-1, rows in
        0..cache.batch_size-1, logit_rows in 0..N-1. Afterwards cache.lengths[r] is the last
        position written + 1 for every row touched; the other rows are unchanged.
        `decode_kernel`: a kernel for these weights (an Engine's), else `self.decode_kernel`.
        """
        from . import kernels

        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D tensor (N,), got shape {tuple(tokens.shape)}")
        N = tokens.numel()
        rows_t = torch.as_tensor(rows, dtype=torch.long).cpu()
        pos_t = torch.as_tensor(positions, dtype=torch.long).cpu()
        head_t = torch.as_tensor(logit_rows, dtype=torch.long).cpu()
        if rows_t.shape != (N,) or pos_t.shape != (N,):
            raise ValueError(f"rows {tuple(rows_t.shape)} and positions {tuple(pos_t.shape)} must have one entry "
                             f"per token ({N},)")
        if head_t.dim() != 1:
            raise ValueError(f"logit_rows must be 1-D, got shape {tuple(head_t.shape)}")
        rl, pl, hl = rows_t.tolist(), pos_t.tolist(), head_t.tolist()
        if min(rl) < 0 or max(rl) >= cache.batch_size:
            raise ValueError(f"rows must lie in 0..{cache.batch_size - 1} (the KV cache's rows), got {rl}")
        if min(pl) < 0 or max(pl) >= cache.max_length:
            raise ValueError(f"positions must lie in 0..{cache.max_length - 1} (the KV cache holds "
                             f"{cache.max_length}), got {pl}")
        if hl and (min(hl) < 0 or max(hl) >= N):
            raise ValueError(f"logit_rows must lie in 0..{N - 1} (indices of tokens), got {hl}")
        spans: list[tuple[int, int, int]] = []  # (cache row, first token, end token)
        for n in range(N):
            if n and rl[n] == rl[n - 1]:
                if pl[n] != pl[n - 1] + 1:
                    raise ValueError(f"cache row {rl[n]}'s tokens must take consecutive ascending positions: "
                                     f"token {n} is at {pl[n]} after {pl[n - 1]}")
                continue
            if any(r == rl[n] for r, _, _ in spans):
                raise ValueError(f"cache row {rl[n]}'s tokens must form one contiguous group; token {n} starts "
                                 "a second one")
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], n)
            spans.append((rl[n], n, N))
        kernel = decode_kernel if decode_kernel is not None else self.decode_kernel
        if (kernel is not None and not torch.is_grad_enabled() and tokens.device.type == "cpu"
                and kernel.supports(cache) and kernels.kernel_faster(kernel.weight_dtype, N, len(spans))):
            if kernel.valid(self):
                logits = kernel.rows(self.model.embed_tokens(tokens), cache, rows_t, pos_t, head_t)
                for r, i0, i1 in spans:
                    cache.lengths[r] = pl[i1 - 1] + 1
                return logits
            if kernel is self.decode_kernel:  # tensors replaced (.to(), load_state_dict): never read stale addresses
                self.decode_kernel = None
        out = torch.empty(len(hl), self.config.vocab_size, dtype=torch.float32, device=tokens.device)
        for r, i0, i1 in spans:
            want = [(j, n - i0) for j, n in enumerate(hl) if i0 <= n < i1]
            last_only = all(t == i1 - i0 - 1 for _, t in want)
            logits = self(tokens[i0:i1][None], cache=cache.rows(r, r + 1), starts=[pl[i0]], last_only=last_only,
                          decode_kernel=decode_kernel)[0]
            for j, t in want:
                out[j] = logits[0 if last_only else t]
        return out

    def _kernel_step(self, x: torch.Tensor, cache: KVCache, at: Positions,
                     kernel: DecodeKernel | None) -> torch.Tensor | None:
        """Logits (B, 1, V) from the C++ step when it applies here (one new token per row where
        `kernels.kernel_faster` says so, as `forward_rows` decides: the same rows take the same path
        either way; a cache it can read, no autograd, weights unchanged since it was built); else None."""
        from .kernels import kernel_faster

        kernel = kernel if kernel is not None else self.decode_kernel
        if kernel is None or at.T != 1 or torch.is_grad_enabled() \
                or not kernel_faster(kernel.weight_dtype, len(at.starts), len(at.starts)) or not kernel.supports(cache):
            return None
        if not kernel.valid(self):  # tensors replaced (.to(), load_state_dict): never read stale addresses
            if kernel is self.decode_kernel:
                self.decode_kernel = None
            return None
        return kernel(x[:, 0], cache, at.tensor)[:, None]

"""Pre-norm transformer blocks with rotary positions and an optional KV cache.

Used by the continuous models (``BENDRForecast`` causally over encoder frames with a KV cache
while forecasting; ``CNNLSTM`` non-causally over pooled conv features). Attention runs on
:func:`torch.nn.functional.scaled_dot_product_attention`.

Rotary position embeddings (Su et al. 2021, "RoFormer") encode *relative* positions, so a
cached sequence can grow past any training length without a position table.

Shapes: B batch, N sequence length (tokens or frames), D model width, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def rotary_tables(positions: torch.Tensor, head_dim: int, base: float = 10000.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(N, head_dim)`` for integer ``positions`` ``(N,)``."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device,
                                      dtype=torch.float32) / head_dim)
    ang = positions.to(torch.float32)[:, None] * inv[None, :]  # (N, head_dim/2)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, N, hd)`` by the tables ``(N, hd)`` (rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x * cos.to(x.dtype) + rot * sin.to(x.dtype))


@dataclass
class KVCache:
    """Keys/values of every layer for the positions seen so far.

    ``keys[i]``/``values[i]`` are ``(B, H, N, hd)``; ``length`` is N. Appending is a
    concatenation per new frame; the continuous models add one frame every few samples, so
    this costs far less than re-running the sequence.
    """

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([None] * n_layers, [None] * n_layers, 0)


class RotarySelfAttention(nn.Module):
    """Multi-head self-attention with rotary positions; causal or bidirectional."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> torch.Tensor:
        """``x`` (B, N, D) → (B, N, D). With ``cache``, ``x`` holds the N newest positions,
        which attend to the cached ones and are appended to the cache."""
        B, N, _ = x.shape
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3,
                            h=self.n_heads)
        start = cache.length if cache is not None else 0
        pos = torch.arange(start, start + N, device=x.device)
        cos, sin = rotary_tables(pos, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if cache.keys[layer] is not None:
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
            cache.keys[layer], cache.values[layer] = k, v
        drop = self.dropout if self.training else 0.0
        if not self.causal or (cache is not None and N == 1):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif cache is None or start == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:  # several new positions after a non-empty cache: offset causal mask
            n_k = k.shape[2]
            mask = torch.ones(N, n_k, dtype=torch.bool, device=x.device).tril(n_k - N)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(rearrange(y, "b h n d -> b n (h d)"))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + Attn(LN(x))`` then ``x + MLP(LN(x))``.

    LayerNorm acts on the feature axis of each position only, so a causal stack leaks
    nothing from the future.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 causal: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = RotarySelfAttention(d_model, n_heads, dropout, causal)
        self.ln2 = nn.LayerNorm(d_model)
        hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0
                ) -> torch.Tensor:
        """(B, N, D) → (B, N, D)."""
        x = x + self.attn(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))


class TransformerStack(nn.Module):
    """``n_layers`` blocks and a final LayerNorm; ``forward(x, cache=None)``."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, mlp_ratio, dropout, causal)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """(B, N, D) → (B, N, D). With ``cache``, ``x`` holds only the new positions."""
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache, i)
        if cache is not None:
            cache.length += x.shape[1]
        return self.ln_f(x)

    def new_cache(self) -> KVCache:
        return KVCache.empty(len(self.blocks))

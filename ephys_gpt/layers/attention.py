"""Multi-head self-attention on ``torch.nn.functional.scaled_dot_product_attention`` with a
preallocated key/value cache, and the pre-norm GPT-2 transformer block built on it.

Legend: N sequences (batch, possibly with channels folded in), T time steps, D model width,
H heads, Dh = D / H head width.

Incremental decoding::

    caches = [KVCache(max_len) for _ in blocks]
    h = block(h_prompt, cache=caches[i])      # prime: (N, T0, D), causal inside the prompt
    h = block(h_new, cache=caches[i])         # each step: (N, 1, D) attends to all cached keys

The cache allocates its ``(N, H, max_len, Dh)`` key and value buffers once, on the first
update (taking the dtype/device of the keys, so bf16 autocast and CUDA work unchanged), and
then only writes into them: one step costs O(cached length), never a reallocation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class KVCache:
    """Preallocated key/value buffers for one attention layer.

    Parameters
    ----------
    max_len : int
        Most time steps the cache can hold; appending beyond raises a ValueError (callers
        slide their window and :meth:`reset` first).
    """

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"KVCache max_len must be >= 1, got {max_len}")
        self.max_len = int(max_len)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def reset(self) -> None:
        """Forget the cached steps (buffers are kept and reused)."""
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append keys/values ``(N, H, T, Dh)``; return all cached ones ``(N, H, L, Dh)``."""
        N, H, T, Dh = k.shape
        if (self.k is None or self.k.shape[:2] != (N, H) or self.k.shape[-1] != Dh
                or self.k.dtype != k.dtype or self.k.device != k.device):
            if self.length:
                raise ValueError("KVCache: batch/head shape or dtype changed mid-sequence "
                                 f"(cached {tuple(self.k.shape)} {self.k.dtype}, "
                                 f"got {tuple(k.shape)} {k.dtype}); call reset() first")
            self.k = k.new_empty(N, H, self.max_len, Dh)
            self.v = v.new_empty(N, H, self.max_len, Dh)
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {self.length} cached + {T} new steps > "
                             f"max_len {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over the second axis of ``(N, T, D)``.

    Parameters
    ----------
    d_model : int
        Width D (divisible by ``n_heads``).
    n_heads : int
        Number of heads H.
    causal : bool
        If True, step t attends to steps <= t only (and a :class:`KVCache` may be used).
    dropout : float
        Dropout on attention weights and on the output projection (training only).
    bias : bool
        Bias in the projections.
    """

    def __init__(self, d_model: int, n_heads: int, causal: bool = True, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """``x (N, T, D)`` → ``(N, T, D)``. With ``cache``, ``x`` holds the T newest steps
        (following the cached ones) and their keys/values are appended to it."""
        q, k, v = rearrange(self.qkv(x), "n t (three h d) -> three n h t d",
                            three=3, h=self.n_heads)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            if not self.causal:
                raise ValueError("a KVCache only makes sense for causal attention")
            past, T = cache.length, x.shape[1]
            k, v = cache.update(k, v)
            if T == 1:  # the newest step may see every cached step
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            elif past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:  # T new steps after `past` cached ones: bottom-right aligned causal mask
                rows = torch.arange(T, device=x.device)[:, None] + past
                mask = rows >= torch.arange(past + T, device=x.device)[None, :]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.proj_dropout(self.proj(rearrange(y, "n h t d -> n t (h d)")))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(D, r·D) → GELU → Linear(r·D, D) → dropout."""

    def __init__(self, d_model: int, ratio: int = 4, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model, bias=bias)
        self.proj = nn.Linear(ratio * d_model, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class TransformerBlock(nn.Module):
    """Pre-norm GPT-2 block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))`` (Radford et al., 2019).

    ``forward(x (N, T, D), cache=None) -> (N, T, D)``; causal over T.
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadSelfAttention(d_model, n_heads, causal=True, dropout=dropout,
                                           bias=bias)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, mlp_ratio, dropout, bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache=cache)
        return x + self.mlp(self.ln2(x))


def init_gpt_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, std) for linear/embedding weights, zero biases, and the
    residual output projections (``*.proj.weight``) scaled by ``1/sqrt(2·n_layers)``."""
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            scale = 1 / math.sqrt(2 * n_layers) if name.endswith("proj.weight") else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        elif name.endswith("bias"):
            nn.init.zeros_(p)

"""Attention over video latents ``(B, C, T, H, W)`` for the tokenizers.

- :class:`AxialAttention3d`: VideoGPT's axial block (Yan et al., 2021, "VideoGPT: video
  generation using VQ-VAE and transformers"): multi-head attention along time (causal), along
  the rows and along the columns of each frame, summed. Cost ``O(THW (T + H + W))`` instead of
  ``O((THW)^2)`` for full attention.
- :class:`FrameSelfAttention`: single-head self-attention over the pixels of each frame
  (the attention block of VQGAN/MoVQ-style 2-D encoders), no time mixing at all.

Both are pre-norm residual blocks with per-position (never per-time-pooled) normalization, so
a latent at step ``t`` depends only on steps ``<= t``. They use
:func:`torch.nn.functional.scaled_dot_product_attention` and hold no KV cache (tokenizers run
on whole windows). Until the unified attention stack offers axial attention, these are the
tokenizers' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ephys_gpt.layers.conv3d import group_count


class AxialAttention3d(nn.Module):
    """``x + attn_t(x) + attn_h(x) + attn_w(x)`` over ``(B, C, T, H, W)``; ``attn_t`` causal.

    Parameters
    ----------
    dim : int
        Channels C (divisible by ``n_heads``).
    n_heads : int
        Attention heads of each axis.
    causal_time : bool
        Causal mask along time (default True). Rows and columns attend fully within a frame.
    """

    def __init__(self, dim: int, n_heads: int = 2, causal_time: bool = True):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"AxialAttention3d: dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.causal_time = n_heads, causal_time
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim) for _ in range(3))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))

    def _attend(self, x: torch.Tensor, axis: int, causal: bool) -> torch.Tensor:
        """Attention along ``axis`` (0 t, 1 h, 2 w) of channel-last ``x (B, T, H, W, C)``."""
        b, t, h, w, c = x.shape
        pattern = ["b t h w c -> (b h w) t c", "b t h w c -> (b t w) h c",
                   "b t h w c -> (b t h) w c"][axis]
        seq = rearrange(x, pattern)  # (N, L, C)
        q, k, v = rearrange(self.qkv[axis](seq), "n l (three k d) -> three n k l d", three=3,
                            k=self.n_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        y = self.out[axis](rearrange(y, "n k l d -> n l (k d)"))
        back = ["(b h w) t c -> b t h w c", "(b t w) h c -> b t h w c",
                "(b t h) w c -> b t h w c"][axis]
        return rearrange(y, back, b=b, t=t, h=h, w=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` → same shape."""
        h = self.norm(rearrange(x, "b c t h w -> b t h w c"))
        y = (self._attend(h, 0, self.causal_time) + self._attend(h, 1, False)
             + self._attend(h, 2, False))
        return x + rearrange(y, "b t h w c -> b c t h w")


class FrameSelfAttention(nn.Module):
    """Single-head self-attention over the ``H*W`` pixels of each frame, pre-GroupNorm,
    residual. Takes frames ``(N, C, H, W)`` (batch and time folded together)."""

    def __init__(self, dim: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(dim, groups), dim, eps=1e-6)
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "n (three c) h w -> three n 1 (h w) c",
                            three=3)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(rearrange(y, "n 1 (h w) c -> n c h w", h=h, w=w))

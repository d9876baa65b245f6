"""Attention over video latents ``(B, C, T, H, W)`` for the tokenizers, on the one attention
module (:class:`ephys_gpt.layers.attention.MultiHeadSelfAttention`).

- :class:`AxialAttention3d`: VideoGPT's axial block (Yan et al., 2021, "VideoGPT: video
  generation using VQ-VAE and transformers"): multi-head attention along time (causal), along
  the rows and along the columns of each frame, summed. Cost ``O(THW (T + H + W))`` instead of
  ``O((THW)^2)`` for full attention.
- :class:`FrameSelfAttention`: single-head self-attention over the pixels of each frame
  (the attention block of VQGAN/MoVQ-style 2-D encoders), no time mixing at all.

Both are pre-norm residual blocks with per-position (never per-time-pooled) normalization, so
a latent at step ``t`` depends only on steps ``<= t``. They hold no KV cache (tokenizers run
on whole windows). Weights saved under the blocks' former parameter names (``qkv.<axis>``,
``out.<axis>``; 1x1 convolutions in :class:`FrameSelfAttention`) still load.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ephys_gpt.layers.attention import MultiHeadSelfAttention
from ephys_gpt.layers.conv3d import group_count

#: the sequences each axis attends along, from and back to channel-last (B, T, H, W, C)
_AXES = (("b t h w c -> (b h w) t c", "(b h w) t c -> b t h w c"),
         ("b t h w c -> (b t w) h c", "(b t w) h c -> b t h w c"),
         ("b t h w c -> (b t h) w c", "(b t h) w c -> b t h w c"))


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
        self.attn = nn.ModuleList(MultiHeadSelfAttention(dim, n_heads, causal=causal_time and i == 0)
                                  for i in range(3))  # time, rows, columns
        self._register_load_state_dict_pre_hook(_former_axial_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, H, W)`` → same shape."""
        h = self.norm(rearrange(x, "b c t h w -> b t h w c"))
        b, t, hh, w, _ = h.shape
        y = sum(rearrange(attn(rearrange(h, there)), back, b=b, t=t, h=hh, w=w)
                for attn, (there, back) in zip(self.attn, _AXES))
        return x + rearrange(y, "b t h w c -> b c t h w")


def _former_axial_keys(state_dict, prefix, *args) -> None:
    """Rename the former ``qkv.<axis>.*`` / ``out.<axis>.*`` to ``attn.<axis>.qkv/proj.*``."""
    for axis in range(3):
        for old, new in (("qkv", "qkv"), ("out", "proj")):
            for name in ("weight", "bias"):
                key = f"{prefix}{old}.{axis}.{name}"
                if key in state_dict:
                    state_dict[f"{prefix}attn.{axis}.{new}.{name}"] = state_dict.pop(key)


class FrameSelfAttention(nn.Module):
    """Single-head self-attention over the ``H*W`` pixels of each frame, pre-GroupNorm,
    residual. Takes frames ``(N, C, H, W)`` (batch and time folded together)."""

    def __init__(self, dim: int, groups: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(dim, groups), dim, eps=1e-6)
        self.attn = MultiHeadSelfAttention(dim, 1, causal=False)
        self._register_load_state_dict_pre_hook(_former_frame_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.attn(rearrange(self.norm(x), "n c h w -> n (h w) c"))
        return x + rearrange(y, "n (h w) c -> n c h w", h=h, w=w)


def _former_frame_keys(state_dict, prefix, *args) -> None:
    """Rename the former 1x1-convolution ``qkv.*`` / ``out.*`` to ``attn.qkv/proj.*``
    (a 1x1 convolution's weight ``(out, in, 1, 1)`` is a linear layer's ``(out, in)``)."""
    for old, new in (("qkv", "qkv"), ("out", "proj")):
        for name in ("weight", "bias"):
            key = f"{prefix}{old}.{name}"
            if key in state_dict:
                value = state_dict.pop(key)
                state_dict[f"{prefix}attn.{new}.{name}"] = (
                    value.flatten(1) if name == "weight" else value)

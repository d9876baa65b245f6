"""Time-causal 3-D convolutions and per-frame normalization for video tokenizers.

Tensors are ``(B, C, T, H, W)`` (channels first, time before space). "Causal" means
block-causal at the layer's temporal stride ``s``: output step ``j`` depends only on input
frames ``< (j + 1) * s`` (with ``s = 1``: frames ``<= j``), in training and in evaluation.
Space is padded symmetrically ("same" padding), so ``H`` and ``W`` shrink exactly by the
stride. Nothing here pools statistics over time: :class:`FrameGroupNorm` normalizes each
frame on its own.

Legend: B batch, C channels, T frames, H x W frame size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _triple(v, name: str) -> tuple[int, int, int]:
    t = (v, v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 3 or not all(isinstance(i, int) and i >= 1 for i in t):
        raise ValueError(f"{name} must be a positive int or three positive ints (t, h, w), "
                         f"got {v!r}")
    return t  # type: ignore[return-value]


def _same(k: int, s: int) -> tuple[int, int]:
    total = max(k - s, 0)
    return total // 2, total - total // 2


class CausalConv3d(nn.Module):
    """``nn.Conv3d`` with causal (left-only) time padding and "same" spatial padding.

    Time is padded by ``kernel_t - stride_t`` frames on the left, so output step ``j`` sees
    input frames ``j*s - (k - s) … (j + 1)*s - 1`` and ``T`` becomes ``T / s``. Requires
    ``kernel_t >= stride_t``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 bias: bool = True):
        super().__init__()
        k, s = _triple(kernel_size, "kernel_size"), _triple(stride, "stride")
        if k[0] < s[0]:
            raise ValueError(f"CausalConv3d: the time kernel ({k[0]}) must be at least the time "
                             f"stride ({s[0]}), or frames would be skipped")
        self.stride = s
        hl, hr = _same(k[1], s[1])
        wl, wr = _same(k[2], s[2])
        self.pad = (wl, wr, hl, hr, k[0] - s[0], 0)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(in_channels, out_channels, k, stride=s, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, T, H, W)`` → ``(B, Cout, T/st, H/sh, W/sw)``."""
        return self.conv(F.pad(x, self.pad))


class CausalConvTranspose3d(nn.Module):
    """Transposed 3-D convolution upsampling by ``stride``, causal in time.

    Input step ``i`` writes output frames ``i*s … i*s + k - 1``; keeping the first ``T*s``
    frames (cropping only at the end) means output frame ``o`` depends on inputs
    ``<= o // s``. Space is cropped symmetrically so ``H`` becomes exactly ``H * sh``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=4, stride=2,
                 bias: bool = True):
        super().__init__()
        k, s = _triple(kernel_size, "kernel_size"), _triple(stride, "stride")
        if any(ki < si for ki, si in zip(k, s)):
            raise ValueError(f"CausalConvTranspose3d: kernel {k} must be >= stride {s} on "
                             "every axis")
        self.stride = s
        self.crop_h, self.crop_w = _same(k[1], s[1]), _same(k[2], s[2])
        self.conv = nn.ConvTranspose3d(in_channels, out_channels, k, stride=s, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, T, H, W)`` → ``(B, Cout, T*st, H*sh, W*sw)``."""
        t, h, w = x.shape[-3:]
        y = self.conv(x)
        (hl, _), (wl, _) = self.crop_h, self.crop_w
        st, sh, sw = self.stride
        return y[:, :, :t * st, hl:hl + h * sh, wl:wl + w * sw]


class CausalUpsample3d(nn.Module):
    """Nearest-neighbour upsampling by ``factor`` (t, h, w), then a causal 3x3x3 conv.

    Output frame ``o`` repeats latent step ``o // st`` and the causal conv only looks back, so
    it depends on latent steps ``<= o // st``.
    """

    def __init__(self, in_channels: int, out_channels: int, factor=(2, 2, 2)):
        super().__init__()
        self.factor = _triple(factor, "factor")
        self.conv = CausalConv3d(in_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st, sh, sw = self.factor
        if st > 1:
            x = x.repeat_interleave(st, dim=2)
        if sh > 1 or sw > 1:
            x = x.repeat_interleave(sh, dim=3).repeat_interleave(sw, dim=4)
        return self.conv(x)


def group_count(channels: int, groups: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame separately: ``(B, C, T, H, W)`` statistics over each
    ``(group, H, W)`` of each frame, never over time (so normalization cannot leak the future).
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = 1e-6):
        super().__init__(group_count(channels, groups), channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:  # (N, C, H, W) frames already
            return super().forward(x)
        b = x.shape[0]
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)

"""Causal strided 1-D convolution encoder (BENDR-style feature encoder, made causal).

Each layer pads ``kernel - stride`` zeros on the left only, so output frame ``j`` of a layer
with stride ``S`` sees inputs ``<= (j + 1) * S - 1``. Stacking layers, frame ``k`` of the
encoder sees raw samples ``<= (k + 1) * s - 1`` with ``s`` the product of the strides: a frame
is emitted once its last sample has arrived and never looks further.

Shapes: N sequences (e.g. batch x channels), F input features, D width, T samples,
T' = floor(T / s) frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class CausalStridedConvEncoder(nn.Module):
    """Stack of causal strided convolutions with GELU and per-frame LayerNorm.

    Parameters
    ----------
    in_features : int
        Input features per sample (1 when each channel is encoded on its own).
    width : int
        Output features of every layer (D).
    kernels, strides : sequence of int
        One entry per layer; ``kernel >= stride`` so no input sample is skipped.
    """

    def __init__(self, in_features: int, width: int, kernels: Sequence[int],
                 strides: Sequence[int]):
        super().__init__()
        if len(kernels) != len(strides) or not kernels:
            raise ValueError(f"encoder kernels {list(kernels)} and strides {list(strides)} "
                             "must be non-empty lists of the same length")
        for k, s in zip(kernels, strides):
            if s < 1 or k < s:
                raise ValueError(f"each encoder layer needs stride >= 1 and kernel >= stride; "
                                 f"got kernel={k}, stride={s}")
        self.kernels, self.strides = list(kernels), list(strides)
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        f = in_features
        for k, s in zip(kernels, strides):
            self.convs.append(nn.Conv1d(f, width, k, stride=s))
            self.norms.append(nn.LayerNorm(width))
            f = width

    @property
    def total_stride(self) -> int:
        """Samples per encoder frame (s)."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    @property
    def receptive_field(self) -> int:
        """Raw samples one frame depends on."""
        rf, jump = 1, 1
        for k, s in zip(self.kernels, self.strides):
            rf += (k - 1) * jump
            jump *= s
        return rf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, F, T) → frames (N, D, floor(T / s))."""
        for conv, norm, k, s in zip(self.convs, self.norms, self.kernels, self.strides):
            if x.shape[-1] < s:  # too short for one frame
                return x.new_zeros(x.shape[0], conv.out_channels, 0)
            x = conv(F.pad(x, (k - s, 0)))
            x = F.gelu(norm(x.transpose(1, 2)).transpose(1, 2))  # norm per frame: causal
        return x

    def last_frame(self, x: torch.Tensor, end: int) -> torch.Tensor:
        """The frame completed at raw sample ``end - 1`` (``end`` a multiple of s).

        Runs the stack only on the last samples the frame depends on (aligned to a frame
        boundary), which is exact: the result equals ``forward(x[..., :end])[..., -1]``.
        ``x`` (N, F, T >= end) → (N, D).
        """
        s = self.total_stride
        if end % s:
            raise ValueError(f"end ({end}) must be a multiple of the total stride ({s})")
        span = -(-self.receptive_field // s) * s  # receptive field rounded up to frames
        start = max(0, end - span)
        return self.forward(x[..., start:end])[..., -1]

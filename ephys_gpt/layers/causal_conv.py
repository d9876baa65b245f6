"""Causal (dilated) 1-D convolution with streaming state for step-by-step generation.

Legend: B batch, Cin/Cout channels, T time, k kernel size, d dilation, L = d·(k-1) the
number of past samples a layer needs.

``CausalConv1d(x)`` left-pads with zeros so output t sees inputs ``t - d·(k-1) .. t`` only.
Streaming: ``conv(x, state)`` treats ``x`` as the continuation of the stream held by
``state`` (its past replaces the zero padding) and advances ``state``; feeding a sequence in
any split — all at once, in chunks, or one step at a time — gives the same outputs as one
call on the whole sequence. Single steps read their taps from a ring buffer of the last L
inputs (O(k) per step: no shifting, no re-running the window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvState:
    """The last L inputs of one :class:`CausalConv1d`, as a ring buffer.

    ``buf (B, Cin, L)``; ``pos`` is the slot the next input goes to, so ``x[t-m]`` lives at
    ``buf[..., (pos - m) % L]``. A fresh state holds zeros (the causal padding). The buffer
    is allocated on first use with the input's dtype and device.
    """

    def __init__(self, context: int):
        self.context = context
        self.buf: torch.Tensor | None = None
        self.pos = 0

    def _ensure(self, x: torch.Tensor) -> None:
        B, C = x.shape[:2]
        if self.buf is None:
            self.buf = x.new_zeros(B, C, self.context)
        elif self.buf.shape[:2] != (B, C):
            raise ValueError(f"ConvState holds a stream of shape (B, Cin)={tuple(self.buf.shape[:2])}"
                             f", got an input of shape {tuple(x.shape)}")
        elif self.buf.dtype != x.dtype or self.buf.device != x.device:
            self.buf = self.buf.to(device=x.device, dtype=x.dtype)

    def ordered(self) -> torch.Tensor:
        """The buffer in time order, oldest first: ``(B, Cin, L)``."""
        assert self.buf is not None
        return torch.roll(self.buf, -self.pos, dims=-1) if self.pos else self.buf


class CausalConv1d(nn.Conv1d):
    """``nn.Conv1d`` made causal by left zero-padding, with optional streaming state.

    Parameters are those of ``nn.Conv1d`` (no ``padding``; stride 1). The weights keep
    ``nn.Conv1d``'s layout ``(Cout, Cin/groups, k)``. With ``groups == 1`` the convolution
    runs as ``k`` batched matmuls over shifted views of the input (and a single matmul per
    streaming step): CPU ``conv1d`` kernels are several times slower for the narrow channel
    counts of these models, and matmuls follow bf16 autocast on every device.

    ``forward(x (B, Cin, T), state=None) -> (B, Cout, T)``
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation,
                         groups=groups, bias=bias)
        self.context = dilation * (kernel_size - 1)
        # offsets of the past taps, oldest first: m = d·(k-1), ..., d
        self.register_buffer("_tap_offsets",
                             -torch.arange(kernel_size - 1, 0, -1) * dilation, persistent=False)

    @property
    def receptive_field(self) -> int:
        return self.context + 1

    def new_state(self) -> ConvState:
        """A fresh (all-zero past) streaming state."""
        return ConvState(self.context)

    def _conv_valid(self, xp: torch.Tensor) -> torch.Tensor:
        """Unpadded convolution: ``xp (B, Cin, L + T) -> (B, Cout, T)``."""
        if self.groups != 1:
            return F.conv1d(xp, self.weight, self.bias, dilation=self.dilation, groups=self.groups)
        B, T = xp.shape[0], xp.shape[-1] - self.context
        d = self.dilation[0]
        y = None
        for j in range(self.kernel_size[0]):
            w = self.weight[:, :, j].expand(B, -1, -1)  # (B, Cout, Cin)
            tap = xp[:, :, j * d:j * d + T]
            if y is None:
                y = (torch.bmm(w, tap) if self.bias is None
                     else torch.baddbmm(self.bias[None, :, None], w, tap))
            else:
                y = torch.baddbmm(y, w, tap)
        return y

    def forward(self, x: torch.Tensor, state: ConvState | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"CausalConv1d expects (B, Cin, T), got shape {tuple(x.shape)}")
        L = self.context
        if state is None or L == 0:
            return self._conv_valid(F.pad(x, (L, 0)) if L else x)
        state._ensure(x)
        T = x.shape[-1]
        if T == 1:
            if self.kernel_size[0] == 2:  # the common WaveNet case: one past tap, a view
                j = (state.pos - L) % L
                past = state.buf[:, :, j:j + 1]
            else:
                past = state.buf.index_select(2, torch.remainder(self._tap_offsets + state.pos, L))
            window = torch.cat([past, x], dim=-1)  # (B, Cin, k)
            if self.groups == 1:
                y = F.linear(window.flatten(1), self.weight.flatten(1), self.bias)[..., None]
            else:
                y = F.conv1d(window, self.weight, self.bias, groups=self.groups)
            state.buf[:, :, state.pos] = x[:, :, 0]
            state.pos = (state.pos + 1) % L
            return y
        full = torch.cat([state.ordered(), x], dim=-1)  # (B, Cin, L + T)
        y = self._conv_valid(full)
        state.buf = full[:, :, -L:].contiguous()
        state.pos = 0
        return y


class PointwiseConv1d(nn.Conv1d):
    """1×1 convolution ``(B, Cin, T) -> (B, Cout, T)`` computed as one batched matmul
    (same parameters and state-dict layout as ``nn.Conv1d(Cin, Cout, 1)``; see
    :class:`CausalConv1d` for why)."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[:, :, 0].expand(x.shape[0], -1, -1)
        if self.bias is None:
            return torch.bmm(w, x)
        return torch.baddbmm(self.bias[None, :, None], w, x)

"""Rotary position embeddings (Su et al. 2021, "RoFormer: enhanced transformer with rotary
position embedding") over one or several axes.

A rotary embedding turns each pair of feature dimensions of a query or key by an angle
proportional to the token's position, so the score ``q·k`` depends on the two positions only
through their difference: attention sees *relative* positions, and a cached sequence can grow
past any training length without a position table.

Several axes (time, row, column of a video-like grid): the head dimension is split into one
equal, even-sized segment per axis and segment ``a`` is turned by the position along axis
``a``; the score then depends only on the difference of the coordinates, axis by axis.
Attention along a single axis of a grid (axial attention) needs only that axis's segment
turned, since the other coordinates are equal for every query/key pair and their rotations
cancel: :meth:`RotaryEmbedding.tables` does exactly that when given ``axis``.

Convention: rotate-half within each segment (the first half of a segment pairs with its
second half), base 10000, tables computed in fp32.

Shapes: L tokens, hd head width, A axes.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos/sin tables for rotary positions over ``n_axes`` axes.

    Parameters
    ----------
    head_dim : int
        Width hd of one attention head; ``hd / n_axes`` must be even.
    n_axes : int
        Number of position axes (1: a sequence; 3: (t, row, col) of a video grid).
    base : float
        Wavelength base of the rotation frequencies.

    The object holds no parameters (it is not a module, so it adds nothing to a state dict).
    """

    def __init__(self, head_dim: int, n_axes: int = 1, base: float = 10000.0):
        if n_axes < 1 or head_dim % n_axes or (head_dim // n_axes) % 2:
            raise ValueError(f"rotary positions need a head dimension divisible into {n_axes} "
                             f"even segment(s), got head_dim={head_dim}")
        self.head_dim, self.n_axes, self.base = head_dim, n_axes, float(base)
        self.seg = head_dim // n_axes
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def _freqs(self, device: torch.device) -> torch.Tensor:
        inv = self._inv_freq.get(device)
        if inv is None:
            inv = 1.0 / self.base ** (torch.arange(0, self.seg, 2, device=device,
                                                   dtype=torch.float32) / self.seg)
            self._inv_freq[device] = inv
        return inv  # (seg/2,)

    def tables(self, positions: torch.Tensor, axis: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(cos, sin)``, each ``(L, hd)``.

        ``positions``: integer ``(L,)`` (one axis, or one coordinate with ``axis``) or
        ``(L, A)`` coordinates. With ``axis`` only that axis's segment is turned (cos 1,
        sin 0 elsewhere): the tables of attention along one axis of a grid.
        """
        pos = positions.to(torch.float32)
        if axis is None:
            if self.n_axes == 1 and pos.dim() == 1:
                pos = pos[:, None]
            if pos.dim() != 2 or pos.shape[1] != self.n_axes:
                raise ValueError(f"rotary positions must be ({self.n_axes} coordinates per "
                                 f"token), got shape {tuple(positions.shape)}")
        else:
            if not 0 <= axis < self.n_axes or pos.dim() != 1:
                raise ValueError(f"axis must be in [0, {self.n_axes}) with (L,) positions, "
                                 f"got axis={axis} and shape {tuple(positions.shape)}")
            full = torch.zeros(pos.shape[0], self.n_axes, device=pos.device)
            full[:, axis] = pos
            pos = full
        ang = pos[:, :, None] * self._freqs(pos.device)  # (L, A, seg/2)
        ang = torch.cat([ang, ang], dim=-1).flatten(1)   # (L, hd): rotate-half per segment
        return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 n_axes: int = 1) -> torch.Tensor:
    """Turn ``x (..., L, hd)`` by the tables ``(L, hd)`` (broadcast over leading dims);
    the result has ``x``'s dtype."""
    seg = x.shape[-1] // n_axes
    xs = x.unflatten(-1, (n_axes, 2, seg // 2))
    rot = torch.stack([-xs[..., 1, :], xs[..., 0, :]], dim=-2).flatten(-3)
    return (x * cos.to(x.dtype) + rot * sin.to(x.dtype)).to(x.dtype)

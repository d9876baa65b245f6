"""Axial (factorised) attention over a grid of tokens that evolves in time: sensors
``(B, C, T, D)`` or sensor images / video ``(B, H, W, T, D)``.

Each :class:`AxialTransformerBlock` applies, each pre-norm and residual (divided space-time
attention, Bertasius et al. 2021, "Is space-time attention all you need for video
understanding?"; axial attention, Ho et al. 2019, "Axial attention in multidimensional
transformers"):

1. causal self-attention over time T, separately for every grid site (KV-cached when
   decoding);
2. for each spatial axis in turn, bidirectional self-attention along that axis, separately
   for every time step and every position on the other axes;
3. a position-wise MLP.

Steps 2 and 3 only combine tokens of the same time step, each computed from inputs ``<= t``,
so the block stays causal in time, and a decode step runs them for the new step only.

Positions: learned embeddings added by the model, or rotary tables per attention axis (a
:class:`~ephys_gpt.layers.rotary.RotaryEmbedding` over ``(t, row, col)``; attention along one
axis only needs that axis's segment turned, :func:`axial_rope`).

Legend: B batch, S... spatial axes (C, or H and W), T time, D width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ephys_gpt.layers.attention import MLP, KVCache, MultiHeadSelfAttention
from ephys_gpt.layers.rotary import RotaryEmbedding

Tables = tuple[torch.Tensor, torch.Tensor, int]


def axial_rope(rotary: RotaryEmbedding, spatial_sizes: Sequence[int], start: int, T: int,
               device: torch.device | None = None) -> dict[str, Tables]:
    """Rotary tables for an :class:`AxialTransformerBlock` whose axes are time then
    ``spatial_sizes`` (``rotary.n_axes == 1 + len(spatial_sizes)``), for time steps
    ``start .. start + T - 1``: ``{"time": ..., "axis0": ..., "axis1": ...}`` keyed by
    attention (spatial axes by index; :class:`AxialTransformerBlock` looks up its
    ``spatial_axes`` names in order)."""
    if rotary.n_axes != 1 + len(spatial_sizes):
        raise ValueError(f"a rotary embedding over {rotary.n_axes} axes cannot position time "
                         f"+ {len(spatial_sizes)} spatial axes")
    out = {"time": (*rotary.tables(torch.arange(start, start + T, device=device), axis=0),
                    rotary.n_axes)}
    for i, n in enumerate(spatial_sizes):
        out[f"axis{i}"] = (*rotary.tables(torch.arange(n, device=device), axis=i + 1),
                           rotary.n_axes)
    return out


class AxialTransformerBlock(nn.Module):
    """Causal time attention, attention along each spatial axis, MLP (each pre-norm, residual).

    Parameters
    ----------
    d_model, n_heads, mlp_ratio, dropout, bias, eps, activation
        As :class:`~ephys_gpt.layers.attention.TransformerBlock`.
    spatial_axes : sequence of str
        Names of the spatial axes in the order of the grid's dims after B (``("chan",)`` for
        ``(B, C, T, D)``; ``("row", "col")`` for ``(B, H, W, T, D)``). They name the
        parameters: ``ln_time``/``time_attn``, ``ln_<axis>``/``<axis>_attn``, ``ln_mlp``/``mlp``.
    kv_heads : int | None
        Key/value heads of the (cached) time attention; see
        :class:`~ephys_gpt.layers.attention.MultiHeadSelfAttention`.

    ``forward(h (B, *S, T, D), cache=None, rope=None, position=None) -> (B, *S, T, D)``;
    ``cache`` is the time attention's :class:`KVCache` (``h`` then holds the newest T steps);
    ``rope`` maps ``"time"`` and ``"axis<i>"`` to rotary tables (:func:`axial_rope`).
    """

    def __init__(self, d_model: int, n_heads: int, spatial_axes: Sequence[str] = ("row", "col"),
                 mlp_ratio: float = 4, dropout: float = 0.0, bias: bool = True,
                 eps: float = 1e-5, activation: str = "gelu_tanh", kv_heads: int | None = None):
        super().__init__()
        if not spatial_axes or len(set(spatial_axes)) != len(spatial_axes) or "time" in spatial_axes:
            raise ValueError(f"spatial_axes must be distinct names other than 'time', got "
                             f"{spatial_axes!r}")
        self.spatial_axes = tuple(spatial_axes)
        self.ln_time = nn.LayerNorm(d_model, eps=eps)
        self.time_attn = MultiHeadSelfAttention(d_model, n_heads, causal=True, dropout=dropout,
                                                bias=bias, kv_heads=kv_heads)
        for name in self.spatial_axes:
            setattr(self, f"ln_{name}", nn.LayerNorm(d_model, eps=eps))
            setattr(self, f"{name}_attn", MultiHeadSelfAttention(
                d_model, n_heads, causal=False, dropout=dropout, bias=bias))
        self.ln_mlp = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, int(d_model * mlp_ratio), dropout, bias, activation)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None,
                rope: dict[str, Tables] | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        n_sp = len(self.spatial_axes)
        if h.dim() != n_sp + 3:
            raise ValueError(f"AxialTransformerBlock over {self.spatial_axes} expects (B, "
                             f"{', '.join(self.spatial_axes)}, T, D), got shape {tuple(h.shape)}")
        rope = rope or {}
        shape = h.shape
        T, D = shape[-2], shape[-1]
        x = h.reshape(-1, T, D)  # (B·ΠS, T, D): one sequence per grid site
        x = x + self.time_attn(self.ln_time(x), cache=cache, rope=rope.get("time"),
                               position=position)
        x = x.view(shape)
        for i, name in enumerate(self.spatial_axes):
            x = x.movedim(1 + i, -2)  # (B, ..., T, L_i, D): the attended axis next to D
            moved = x.shape
            y = x.reshape(-1, moved[-2], D)
            y = y + getattr(self, f"{name}_attn")(getattr(self, f"ln_{name}")(y),
                                                 rope=rope.get(f"axis{i}"))
            x = y.view(moved).movedim(-2, 1 + i)
        return x + self.mlp(self.ln_mlp(x))

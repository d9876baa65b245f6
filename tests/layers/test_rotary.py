"""Rotary positions: scores depend only on relative positions, over one axis or several."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.layers.rotary import RotaryEmbedding, apply_rotary


def _rotated_scores(rot: RotaryEmbedding, q, k, pos_q, pos_k):
    """q·k after turning q by its positions and k by its own: (Lq, Lk)."""
    cq, sq = rot.tables(pos_q)
    ck, sk = rot.tables(pos_k)
    return apply_rotary(q, cq, sq, rot.n_axes) @ apply_rotary(k, ck, sk, rot.n_axes).T


def test_one_axis_scores_depend_only_on_the_offset():
    rot = RotaryEmbedding(8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g,
                                                                             dtype=torch.float64)
    base = _rotated_scores(rot, q, k, torch.tensor([5]), torch.tensor([2]))
    for shift in (1, 17, 300):
        moved = _rotated_scores(rot, q, k, torch.tensor([5 + shift]), torch.tensor([2 + shift]))
        assert torch.allclose(moved, base, atol=1e-5)
    assert not torch.allclose(_rotated_scores(rot, q, k, torch.tensor([6]), torch.tensor([2])),
                              base, atol=1e-3)


def test_one_axis_is_the_rotate_half_convention():
    """Same tables as RoFormer's rotate-half form (and the former continuous transformer):
    angle ``pos / 10000**(2i/hd)`` for the pair (i, i + hd/2)."""
    rot = RotaryEmbedding(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cos, sin = rot.tables(torch.tensor([3]))
    ang = 3 * torch.tensor([1.0, 1e-2])
    x1, x2 = x[:, :2], x[:, 2:]
    expect = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)
    assert torch.allclose(apply_rotary(x, cos, sin), expect, atol=1e-6)


def test_three_axes_scores_depend_only_on_coordinate_differences():
    """(t, row, col) positions of a video grid: shifting both tokens by the same offset on
    every axis leaves the score unchanged; a different offset on any one axis changes it."""
    rot = RotaryEmbedding(12, n_axes=3)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 12, generator=g, dtype=torch.float64)
    k = torch.randn(1, 12, generator=g, dtype=torch.float64)
    pq, pk = torch.tensor([[4, 1, 3]]), torch.tensor([[2, 2, 0]])
    base = _rotated_scores(rot, q, k, pq, pk)
    shift = torch.tensor([[7, -3, 5]])
    assert torch.allclose(_rotated_scores(rot, q, k, pq + shift, pk + shift), base, atol=1e-5)
    for axis in range(3):
        other = pq.clone()
        other[0, axis] += 1
        assert not torch.allclose(_rotated_scores(rot, q, k, other, pk), base, atol=1e-4)


def test_axis_tables_equal_the_full_tables_along_that_axis():
    """Attention along one axis of a grid compares tokens whose other coordinates are equal;
    turning only that axis's segment gives exactly the scores of the full 3-D rotation."""
    rot = RotaryEmbedding(12, n_axes=3)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 12, generator=g, dtype=torch.float64)
    k = torch.randn(5, 12, generator=g, dtype=torch.float64)
    cols = torch.arange(5)
    full = torch.stack([torch.full((5,), 3), torch.full((5,), 2), cols], -1)  # t=3, row=2
    c_full, s_full = rot.tables(full)
    c_ax, s_ax = rot.tables(cols, axis=2)
    full_scores = apply_rotary(q, c_full, s_full, 3) @ apply_rotary(k, c_full, s_full, 3).T
    axis_scores = apply_rotary(q, c_ax, s_ax, 3) @ apply_rotary(k, c_ax, s_ax, 3).T
    assert torch.allclose(full_scores, axis_scores, atol=1e-5)


def test_rotation_keeps_dtype_and_norm():
    rot = RotaryEmbedding(8, n_axes=2)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rot.tables(torch.randint(0, 50, (5, 2)))
    y = apply_rotary(x, cos, sin, 2)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert apply_rotary(x.bfloat16(), cos, sin, 2).dtype == torch.bfloat16


def test_bad_rotary_arguments():
    with pytest.raises(ValueError, match="even segment"):
        RotaryEmbedding(10, n_axes=3)
    with pytest.raises(ValueError, match="even segment"):
        RotaryEmbedding(7)
    rot = RotaryEmbedding(12, n_axes=3)
    with pytest.raises(ValueError, match="3 coordinates"):
        rot.tables(torch.arange(4))
    with pytest.raises(ValueError, match="axis"):
        rot.tables(torch.arange(4), axis=3)

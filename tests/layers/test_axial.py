"""Axial attention over a (B, H, W, T, D) grid: causal in time (train and eval), cached
decoding equals the full pass, spatial axes mix within a time step."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.layers.attention import KVCache, attention_backend
from ephys_gpt.layers.axial import AxialTransformerBlock, axial_rope
from ephys_gpt.layers.rotary import RotaryEmbedding

B, H, W, T, D = 2, 3, 4, 7, 24


class Grid(torch.nn.Module):
    """Two axial blocks over (rows, cols) with 3-D rotary positions (t, row, col)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(AxialTransformerBlock(D, 2, ("row", "col"))
                                          for _ in range(2))
        self.rot = RotaryEmbedding(D // 2, n_axes=3)

    def forward(self, x, caches=None, start=0):
        rope = axial_rope(self.rot, (H, W), start, x.shape[-2])
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i], rope=rope)
        return x


@pytest.fixture
def grid():
    torch.manual_seed(0)
    return Grid()


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_causal_over_time_in_train_and_eval(grid, backend):
    x = torch.randn(B, H, W, T, D)
    t0 = 4
    x2 = x.clone()
    x2[..., t0:, :] = torch.randn(B, H, W, T - t0, D)
    for mode in (grid.train, grid.eval):
        mode()
        with attention_backend(backend):
            a, b = grid(x), grid(x2)
            assert torch.allclose(a[..., :t0, :], b[..., :t0, :], atol=1e-5)
            assert not torch.allclose(a[..., t0:, :], b[..., t0:, :])
            xg = x.clone().requires_grad_()
            grid(xg)[..., :t0, :].sum().backward()
        assert xg.grad[..., t0:, :].abs().max() == 0


def test_spatial_axes_mix_within_a_time_step(grid):
    grid.eval()
    x = torch.randn(B, H, W, T, D)
    x2 = x.clone()
    x2[:, 2, 3, 5] = torch.randn(B, D)  # one site at t=5
    with torch.no_grad():
        a, b = grid(x), grid(x2)
    assert torch.allclose(a[..., :5, :], b[..., :5, :], atol=1e-5)
    assert not torch.allclose(a[:, 0, 0, 5], b[:, 0, 0, 5])  # another row and column


def test_cached_decoding_equals_the_full_pass(grid):
    grid.eval()
    x = torch.randn(B, H, W, T, D)
    caches = [KVCache(T) for _ in grid.blocks]
    with torch.no_grad():
        full = grid(x)
        parts = [grid(x[..., :3, :], caches)]
        parts += [grid(x[..., t:t + 1, :], caches, start=t) for t in range(3, T)]
    assert caches[0].length == T
    assert torch.allclose(torch.cat(parts, -2), full, atol=1e-5)


def test_sensor_grid_and_errors():
    """One spatial axis (channels) is STGPT2MEG's block; a wrong rank fails clearly."""
    torch.manual_seed(0)
    blk = AxialTransformerBlock(16, 2, ("chan",)).eval()
    assert [n for n, _ in blk.named_children()] == ["ln_time", "time_attn", "ln_chan",
                                                    "chan_attn", "ln_mlp", "mlp"]
    with torch.no_grad():
        assert blk(torch.randn(2, 5, 6, 16)).shape == (2, 5, 6, 16)
    with pytest.raises(ValueError, match=r"\(B, chan, T, D\)"):
        blk(torch.randn(2, 3, 5, 6, 16))
    with pytest.raises(ValueError, match="spatial_axes"):
        AxialTransformerBlock(16, 2, ("time",))
    with pytest.raises(ValueError, match="cannot position"):
        axial_rope(RotaryEmbedding(8, n_axes=2), (3, 4), 0, 5)

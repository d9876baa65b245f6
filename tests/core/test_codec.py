"""Mu-law quantization as stage 2 records it: round trip, saturation, inversion of steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ephys_gpt.codec import (
    invert_steps,
    mulaw_dequantize,
    mulaw_encode,
    mulaw_mu,
    mulaw_quantize,
)


@pytest.mark.parametrize("n_bits", [4, 8, 10])
@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_mulaw_round_trip_within_one_quantization_step(n_bits, scale):
    mu = mulaw_mu(n_bits)
    x = np.linspace(-scale, scale, 20001, dtype=np.float32)[None]  # (1, T)
    tokens = mulaw_quantize(x, n_bits, scale)
    assert tokens.min() == 0 and tokens.max() == mu
    back = mulaw_dequantize(tokens, n_bits, scale)
    # in the companded domain the error is at most half a token (1/mu) ...
    def compand(v):
        return np.sign(v) * np.log1p(mu * np.abs(v) / scale) / math.log1p(mu)

    assert np.all(np.abs(compand(back) - compand(x)) <= 1.0 / mu + 1e-5)
    # ... so in signal units it is within the gap between the two levels around x
    levels = mulaw_dequantize(np.arange(mu + 1), n_bits, scale)
    i = np.clip(np.searchsorted(levels, x[0]) - 1, 0, mu - 1)
    gap = levels[i + 1] - levels[i]
    assert np.all(np.abs(back[0] - x[0]) <= gap + 1e-6)
    # torch gives the same tokens
    assert torch.equal(mulaw_quantize(torch.from_numpy(x), n_bits, scale),
                       torch.from_numpy(tokens.astype(np.int64)))


def test_mulaw_saturates_instead_of_wrapping():
    x = np.array([[-1e6, -7.0, -6.0, 0.0, 6.0, 7.0, 1e6]], dtype=np.float32)
    tokens = mulaw_quantize(x, 8, 6.0)
    assert tokens.dtype == np.uint8
    assert tokens[0, 0] == 0 and tokens[0, 1] == 0 and tokens[0, 2] == 0
    assert tokens[0, -1] == 255 and tokens[0, -2] == 255 and tokens[0, -3] == 255
    assert np.all(np.diff(tokens[0].astype(int)) >= 0)  # monotone, no wrap-around
    assert tokens[0, 3] in (127, 128)


def test_invert_steps_with_recorded_normalize_and_mulaw():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(3, 500)).astype(np.float32)
    center, scale = x.mean(1).astype(np.float64), x.std(1).astype(np.float64)
    z = (x - center[:, None]) / scale[:, None]
    tokens = mulaw_quantize(z, 12, 8.0)
    steps = [{"name": "normalize", "method": "zscore", "center": center.tolist(),
              "scale": scale.tolist()},
             {"name": "mulaw_quantize", "n_bits": 12, "mu": 4095, "scale": 8.0}]
    back = invert_steps(tokens, steps)
    assert back.shape == x.shape
    assert np.max(np.abs(back - x)) < 0.05 * scale.max()


@pytest.mark.parametrize("n_bits", [6, 8, 10])
def test_numpy_and_torch_quantizers_agree_with_the_companding_formula(n_bits):
    """The in-place numpy path gives exactly the tokens of the plain formula, as torch does."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 501)) * 0.4).astype(np.float32)
    x[0, :5] = [-3.0, -1.0, 0.0, 1.0, 3.0]
    scale = np.linspace(0.5, 2.0, 64).astype(np.float32)
    mu = 2**n_bits - 1
    for sc in (1.0, scale):
        ref_scale = sc[:, None] if np.ndim(sc) else sc
        y = mulaw_encode(x / ref_scale, mu)
        ref = np.clip(np.rint((y + 1.0) * (mu / 2.0)), 0, mu)
        got = mulaw_quantize(x, n_bits, sc)
        np.testing.assert_array_equal(got, ref)
        assert got.dtype == np.dtype(np.uint8 if n_bits <= 8 else np.int16)
        tq = mulaw_quantize(torch.from_numpy(x), n_bits, torch.as_tensor(sc) if np.ndim(sc) else sc)
        np.testing.assert_array_equal(tq.numpy(), ref)

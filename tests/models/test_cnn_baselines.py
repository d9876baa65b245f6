"""CNN baselines beyond the registry contract: channel mixing vs. sharing, next-sample
semantics, streaming forecast/generate past the receptive field."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.models.cnn_baselines import (
    CNNMultivariate,
    CNNMultivariateQuantized,
    CNNUnivariate,
    CNNUnivariateQuantized,
)

CONT = dict(num_channels=3, hidden_channels=8, n_layers=3, kernel_size=3)
QUANT = dict(num_channels=3, vocab_size=16, embed_dim=4, hidden_channels=8, n_layers=3,
             kernel_size=2)


def _perturb_channel_1(x):
    x2 = x.clone()
    if x.is_floating_point():
        x2[:, 1] += 1.0
    else:
        x2[:, 1] = (x2[:, 1] + 3) % 16
    return x2


@pytest.mark.parametrize("cls, cfg, mixes", [
    (CNNMultivariate, CONT, True), (CNNUnivariate, CONT, False),
    (CNNMultivariateQuantized, QUANT, True), (CNNUnivariateQuantized, QUANT, False),
])
def test_channel_mixing(cls, cfg, mixes):
    torch.manual_seed(0)
    m = cls(**cfg).eval()
    x = m.example_inputs(2, 16)
    with torch.no_grad():
        a, b = m(x).prediction, m(_perturb_channel_1(x)).prediction
    assert torch.allclose(a[:, 2], b[:, 2]) != mixes
    assert not torch.allclose(a[:, 1], b[:, 1])


@pytest.mark.parametrize("cls", [CNNMultivariate, CNNUnivariate])
def test_forecast_streams_like_the_full_pass(cls):
    torch.manual_seed(0)
    m = cls(**CONT).eval()
    past = m.example_inputs(2, 10)
    R = m.trunk.receptive_field
    assert R == 1 + 2 * (1 + 2 + 4)
    cached = m.forecast(past, 3 * R)
    plain = m.forecast(past, 3 * R, use_cache=False)
    assert cached.shape == (2, 3, 10 + 3 * R)
    assert torch.equal(cached[..., :10], past)
    assert torch.allclose(cached, plain, atol=1e-5)
    # each forecast sample is the one-step prediction from everything before it
    with torch.no_grad():
        assert torch.allclose(m(cached).prediction[..., 9:-1], cached[..., 10:], atol=1e-5)


@pytest.mark.parametrize("cls", [CNNMultivariateQuantized, CNNUnivariateQuantized])
def test_generate_streams_like_uncached(cls):
    torch.manual_seed(0)
    m = cls(**QUANT).eval()
    c = m.example_inputs(2, 4)
    cached = m.generate(c, 25, temperature=0.0)
    assert torch.equal(cached, m.generate(c, 25, temperature=0.0, use_cache=False))
    sampled = m.generate(c, 25, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 3, 29) and sampled.max() < 16


def test_bad_inputs():
    m = CNNMultivariate(**CONT)
    with pytest.raises(ValueError, match="C=3"):
        m(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="float"):
        m(torch.zeros(1, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="horizon"):
        m.forecast(torch.randn(1, 3, 8), -2)
    with pytest.raises(ValueError, match="hidden_channels"):
        CNNUnivariate(**{**CONT, "hidden_channels": 0})


@pytest.mark.parametrize("cls, cfg", [
    (CNNMultivariate, CONT), (CNNUnivariate, CONT),
    (CNNMultivariateQuantized, QUANT), (CNNUnivariateQuantized, QUANT),
])
def test_bf16_autocast_forward_is_finite(cls, cfg):
    torch.manual_seed(0)
    m = cls(**cfg).eval()
    x = m.example_inputs(2, 16)
    with torch.no_grad():
        ref = m(x).prediction
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x).prediction
    assert out.shape == ref.shape and torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().max() < 0.1

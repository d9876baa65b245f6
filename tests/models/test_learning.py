"""Every model of this family learns: a few dozen Adam steps on a predictable synthetic
signal (per-channel sinusoids, mu-law tokenized for the token models) cut the loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ephys_gpt.codec import mulaw_quantize
from ephys_gpt.models.registry import build_model

C, T, V = 3, 48, 16


def sinusoids(batch: int) -> torch.Tensor:
    """(B, C, T) sinusoids with a random phase per example and a period per channel."""
    g = torch.Generator().manual_seed(0)
    phase = torch.rand(batch, C, 1, generator=g) * 2 * math.pi
    period = torch.tensor([8.0, 12.0, 16.0])[None, :, None]
    t = torch.arange(T + 1, dtype=torch.float32)
    return 0.8 * torch.sin(2 * math.pi * t / period + phase)


# model -> (config, Adam learning rate)
TOKEN_MODELS = {
    "GPT2MEG": (dict(n_positions=T, d_model=32, n_layers=2, n_heads=2), 5e-3),
    "STGPT2MEG": (dict(n_positions=T, d_model=32, n_layers=2, n_heads=2), 5e-3),
    "WavenetFullChannel": (dict(embed_dim=4, residual_channels=16, dilation_channels=16,
                                skip_channels=16, layers_per_block=3, n_blocks=1), 1e-2),
    "CNNMultivariateQuantized": (dict(embed_dim=4, hidden_channels=16, n_layers=3), 1e-2),
    "CNNUnivariateQuantized": (dict(embed_dim=4, hidden_channels=16, n_layers=3), 1e-2),
}


@pytest.mark.parametrize("name", list(TOKEN_MODELS))
def test_token_model_loss_goes_down(name):
    torch.manual_seed(0)
    cfg, lr = TOKEN_MODELS[name]
    model = build_model(name, {"num_channels": C, "vocab_size": V, **cfg})
    tokens = mulaw_quantize(sinusoids(8), n_bits=4)  # (8, C, T+1) in [0, 15]
    x, y = tokens[..., :-1], tokens[..., 1:]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(x).prediction.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    first, last = losses[0].item(), torch.stack(losses[-5:]).mean().item()
    assert first > 2.0  # ~log(16) at initialisation
    assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("name", ["CNNMultivariate", "CNNUnivariate"])
def test_continuous_model_loss_goes_down(name):
    torch.manual_seed(0)
    model = build_model(name, {"num_channels": C, "hidden_channels": 16, "n_layers": 3})
    sig = sinusoids(8)
    x, y = sig[..., :-1], sig[..., 1:]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x).prediction, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    first, last = losses[0].item(), torch.stack(losses[-5:]).mean().item()
    assert last < 0.3 * first, f"{name}: loss {first:.4f} -> {last:.4f}"

"""Token data from a known VAR, and the VAR fitted on it: for the models whose logits add a
fitted VAR's forecast (``ephys_gpt/models/token_var.py``)."""

from __future__ import annotations

import torch


def var_tokens(B=2, T=400, bits=4, scale=3.0, seed=0, corr=None):
    """A stable 3-channel VAR(2) with a mean, mu-law quantized: tokens, steps. ``corr``
    (3, 3): the errors' correlation (None: independent errors)."""
    from ephys_gpt.codec import mulaw_quantize

    g = torch.Generator().manual_seed(seed)
    A1 = 0.5 * torch.eye(3) + 0.3 * torch.roll(torch.eye(3), 1, dims=1)
    A2 = -0.3 * torch.eye(3) + 0.2 * torch.roll(torch.eye(3), -1, dims=1)
    x = torch.zeros(B, 3, T)
    z = torch.randn(B, 3, T, generator=g)
    if corr is not None:
        z = torch.einsum("ij,bjt->bit", torch.linalg.cholesky(torch.as_tensor(corr).float()), z)
    e = 0.5 * z + 0.1
    for t in range(2, T):
        x[..., t] = x[..., t - 1] @ A1.T + x[..., t - 2] @ A2.T + e[..., t]
    steps = [{"name": "normalize", "method": "robust"},
             {"name": "mulaw_quantize", "n_bits": bits, "scale": scale}]
    return mulaw_quantize(x, bits, scale), steps


def fitted(tok, steps, order):
    """The VAR(order) fitted on the decoded tokens, and those values."""
    from ephys_gpt.linear import decode_tokens, fit_linear

    vals = decode_tokens(tok, steps)
    var = fit_linear(list(vals.double().numpy()), "var", order)
    return var, vals


def set_fitted(model, tok, steps, order):
    """Give ``model`` the VAR(order) fitted on ``tok``; returns the fit."""
    var, _ = fitted(tok, steps, order)
    sd = var.noise_cov.diagonal() ** 0.5
    model.set_linear_path(var.channel_coefficients(), var.intercept, noise_std=sd, steps=steps,
                          noise_corr=var.noise_cov / (sd[:, None] * sd[None, :]))
    return var

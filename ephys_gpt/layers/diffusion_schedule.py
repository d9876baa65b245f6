"""Gaussian diffusion noise schedules and the DDPM / DDIM reverse steps.

Forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):
``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for ``t = 0 .. T-1`` with
``abar_t = prod_{s<=t} (1 - beta_s)``.

Schedules:

- ``cosine`` (Nichol & Dhariwal 2021, "Improved DDPM"):
  ``abar(t) = cos^2(((t + 1) / T + o) / (1 + o) * pi / 2) / cos^2(o / (1 + o) * pi / 2)``
  with offset ``o = 0.008``; betas clipped to ``max_beta = 0.999``.
- ``linear``: betas linear from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T`` (Ho et al., scaled
  so any T gives a comparable total noise).

Reverse steps: :meth:`NoiseSchedule.ddpm_step` (ancestral sampling with the posterior
variance) and :meth:`NoiseSchedule.ddim_step` (Song et al. 2021, "DDIM"; ``eta = 0`` is
deterministic, and it can skip steps). Both take the denoiser's prediction either as noise
(``eps``) or as the clean signal (``x0``).

Shapes: B batch; any trailing signal dims (e.g. C channels x L samples).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, ..., 1) broadcastable against ``like``."""
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class NoiseSchedule(nn.Module):
    """A fixed schedule of ``num_steps`` noise levels (buffers, not parameters)."""

    def __init__(self, num_steps: int = 100, kind: str = "cosine", max_beta: float = 0.999):
        super().__init__()
        if not isinstance(num_steps, int) or num_steps < 2:
            raise ValueError(f"diffusion num_steps must be an integer >= 2, got {num_steps!r}")
        if kind == "cosine":
            o = 0.008
            t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
            f = torch.cos((t + o) / (1 + o) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        elif kind == "linear":
            scale = 1000 / num_steps
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, num_steps, dtype=torch.float64)
            betas = betas.clamp(max=max_beta)
        else:
            raise ValueError(f"noise schedule must be 'cosine' or 'linear', got {kind!r}")
        self.num_steps, self.kind = num_steps, kind
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1 - abar_prev) / (1 - abar)
        for name, val in {"betas": betas, "alphas_cumprod": abar,
                          "alphas_cumprod_prev": abar_prev,
                          "posterior_variance": post_var}.items():
            self.register_buffer(name, val.to(torch.float32), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise ``x0`` (B, ...) to levels ``t`` (B,) with ``noise`` (B, ...)."""
        ab = _expand(self.alphas_cumprod[t], x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = _expand(self.alphas_cumprod[t], x_t)
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def _resolve(self, x_t: torch.Tensor, t: int, eps: torch.Tensor | None,
                 x0: torch.Tensor | None, clip: float | None):
        """The clean-signal estimate (clipped if ``clip``) and the noise consistent with it,
        from whichever of ``eps`` / ``x0`` the denoiser predicted."""
        ab = self.alphas_cumprod[t]
        if (eps is None) == (x0 is None):
            raise ValueError("give exactly one of eps (predicted noise) or x0 (predicted "
                             "clean signal)")
        if x0 is None:
            x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        if eps is None or clip is not None:
            eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return x0, eps

    def ddpm_step(self, x_t: torch.Tensor, t: int, eps: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, clip: float | None = None, *,
                  x0: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step ``x_t -> x_{t-1}`` given the predicted noise ``eps`` or the
        predicted clean signal ``x0``.

        ``clip`` bounds the implied clean signal to ``[-clip, clip]`` (with ``eps``, the last
        levels of a cosine schedule divide by ``sqrt(abar)`` ~ 0 and could explode).
        """
        x0, _ = self._resolve(x_t, t, eps, x0, clip)
        beta, ab, ab_prev = self.betas[t], self.alphas_cumprod[t], self.alphas_cumprod_prev[t]
        mean = (ab_prev.sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - ab_prev) * x_t) / (1 - ab)
        if t == 0:
            return mean
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        return mean + self.posterior_variance[t].sqrt() * z

    def ddim_step(self, x_t: torch.Tensor, t: int, t_prev: int,
                  eps: torch.Tensor | None = None, eta: float = 0.0,
                  generator: torch.Generator | None = None, clip: float | None = None, *,
                  x0: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM step from level ``t`` to ``t_prev`` (``-1``: the clean signal), given the
        predicted noise ``eps`` or the predicted clean signal ``x0``."""
        ab = self.alphas_cumprod[t]
        ab_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else ab.new_tensor(1.0)
        x0, eps = self._resolve(x_t, t, eps, x0, clip)
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
        direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        x = ab_prev.sqrt() * x0 + direction
        if eta > 0 and t_prev >= 0:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x = x + sigma * z
        return x

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` of levels ``t``."""
        ab = self.alphas_cumprod[t]
        return ab / (1 - ab)

    def ddim_timesteps(self, n: int) -> list[int]:
        """``n`` evenly spaced levels from ``T - 1`` down to 0."""
        if not 1 <= n <= self.num_steps:
            raise ValueError(f"sampling steps must be in [1, {self.num_steps}], got {n}")
        steps = torch.linspace(self.num_steps - 1, 0, n).round().long().tolist()
        return list(dict.fromkeys(steps))  # unique, order kept

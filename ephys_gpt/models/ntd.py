"""NTD: denoising diffusion over multi-channel neural time series.

After "Generating realistic neurophysiological time series with denoising diffusion
probabilistic models" (Vetter et al. 2024, the NTD model), with a DiffWave-style denoiser
(Kong et al. 2021): a non-causal stack of dilated residual convolutions over time whose 1x1
projections mix all channels, conditioned on the diffusion step.

Training (``forward``): draw a level ``t`` per example and Gaussian noise, noise the signal
with the schedule (:class:`~ephys_gpt.layers.diffusion_schedule.NoiseSchedule`, cosine by
default), and predict the clean signal (``prediction: x0``, the default) or the noise
(``prediction: eps``, as in DDPM). The loss is the min-SNR-gamma weighted error (Hang et al.
2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): in noise units,
``min(1, gamma / SNR_t) * |eps_hat - eps|^2``, which is the same number as
``min(SNR_t, gamma) * |x0_hat - x0|^2``, so the two parameterizations train the same
objective and report comparable losses (``snr_gamma: null`` gives the plain noise MSE).

Why ``x0`` by default: MEG is spatially low-rank (on the demo's 102 magnetometers, 10
components carry 99% of the variance) while the noise is full rank. Predicting the noise
means passing all C noisy channels through the H-wide conv stack; with H < C that
bottleneck kept the noise error near 0.75 on real MEG, and DDIM's ``x0 = (x_t - s eps) / a``
turned the residual error into samples stuck at the ``clip_denoised`` bound. The clean
signal lives in the low-rank subspace, the implied noise ``(x_t - a x0) / s`` is exact outside
it, and samples stay in the data's range. The denoiser also has a full-rank linear path
(a C x C 1x1 conv of the noisy signal, gated per level and channel) beside the conv stack,
so the identity-like map needed at low noise levels is exact rather than learned through
the bottleneck. With probability ``p_forecast`` an example becomes a
forecasting problem: a random prefix (``forecast_min_fraction`` .. ``forecast_max_fraction``
of the window) is *observed* — given to the network clean, with the observation mask as extra
input channels (``mask_channel``) — and the loss covers only the rest. With probability
``p_impute`` a random subset of channels is observed instead (channel imputation).

Sampling: DDIM (default, ``sampling_steps`` levels, deterministic for ``eta = 0``) or DDPM
(all levels). Known values are in-painted: with ``mask_channel`` the network sees them clean
plus the mask (as in training); without it they are re-noised to each level and pasted in
(replacement in-painting). :meth:`NTD.forecast` extends a signal window by window;
:meth:`NTD.impute` fills unknown channels or samples.

Linear forecast (``linear_order: p``, ``linear_fit: true``): a ridge VAR(p) fitted on the
training split before the first step (``ephys_gpt/training/data_init.py``, the fit the evals
report as a baseline) and held fixed forecasts the unobserved samples from the observed
prefix (:meth:`NTD.linear_forecast`), and the model diffuses the *residual* of that forecast: the
denoiser sees the observed samples clean and the noisy residual elsewhere, and a sample is the
VAR's forecast plus a drawn residual. A denoiser that predicts a zero residual is the VAR's
point forecast; training only has to learn what the VAR cannot. Without it NTD had to learn
the linear dynamics through the conv stack and stayed far above a VAR one step ahead
(docs/models-continuous.md).

Shapes: B batch, C channels, L samples, H hidden width, Cc conditioning channels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ephys_gpt.layers.diffusion_schedule import NoiseSchedule
from ephys_gpt.models.capabilities import Forecaster, Sampler
from ephys_gpt.models.linear_path import (
    check_linear_config,
    fitted_var,
    linear_request,
    var_process_mean,
)
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model

logger = logging.getLogger(__name__)


@dataclass
class NTDConfig:
    """Keyword arguments of :class:`NTD` (``model_config``)."""

    num_channels: int = 306          # C: signal channels
    signal_length: int = 256         # L: window used by example_inputs() and forecast()
    cond_channels: int = 0           # Cc: extra conditioning channels (forward(x, cond))
    hidden: int = 64                 # H: denoiser width
    n_layers: int = 8                # residual blocks
    kernel_size: int = 3             # dilated conv kernel (odd)
    dilation_cycle: int = 6          # dilations 1, 2, ..., 2**(cycle-1), repeated
    diffusion_steps: int = 100       # T: noise levels
    schedule: str = "cosine"         # "cosine" | "linear"
    mask_channel: bool = True        # feed the observation mask (C channels) to the denoiser
    p_forecast: float = 0.5          # P(training example is a forecast: observed prefix)
    p_impute: float = 0.0            # P(training example observes a random channel subset)
    forecast_min_fraction: float = 0.25  # observed prefix length, as a fraction of L
    forecast_max_fraction: float = 0.75
    sampler: str = "ddim"            # "ddim" | "ddpm"
    sampling_steps: int = 50         # DDIM levels per sample (<= diffusion_steps)
    eta: float = 0.0                 # DDIM stochasticity (0: deterministic)
    clip_denoised: float | None = 10.0  # bound predicted clean samples while sampling (signal
                                        # units; stage 2 clips at a few std); None: no bound
    prediction: str = "x0"           # denoiser output: "x0" (clean signal) | "eps" (noise)
    snr_gamma: float | None = 5.0    # min-SNR-gamma loss weight; None: plain noise MSE
    forecast_chunk: int | None = None  # samples generated per window in forecast(); None: L//2
    linear_order: int = 0            # p > 0: diffuse the residual of a VAR(p) forecast of the
                                     # unobserved samples (0: diffuse the signal itself)
    linear_fit: bool = False         # true: that VAR(p) is a ridge fit on the training split,
                                     # set before the first step and held fixed (required
                                     # with linear_order > 0)
    linear_select: bool = False      # true: linear_order is the largest order; the fit
                                     # takes the p <= linear_order with the smallest
                                     # 1-step error on the validation split (as the
                                     # evals do), the lags above it zero

    def __post_init__(self):
        for key in ("num_channels", "signal_length", "hidden", "n_layers", "kernel_size",
                    "dilation_cycle", "diffusion_steps", "sampling_steps"):
            val = getattr(self, key)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"NTD: {key} must be a positive integer, got {val!r}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"NTD: kernel_size must be odd (centred conv), got {self.kernel_size}")
        if self.prediction not in ("x0", "eps"):
            raise ValueError(f"NTD: prediction must be 'x0' or 'eps', got {self.prediction!r}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"NTD: snr_gamma must be > 0 or null, got {self.snr_gamma!r}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"NTD: sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if self.sampling_steps > self.diffusion_steps:
            raise ValueError(f"NTD: sampling_steps ({self.sampling_steps}) must not exceed "
                             f"diffusion_steps ({self.diffusion_steps})")
        for key in ("p_forecast", "p_impute"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"NTD: {key} must be in [0, 1], got {getattr(self, key)}")
        if self.p_forecast + self.p_impute > 1.0:
            raise ValueError("NTD: p_forecast + p_impute must be <= 1")
        if (self.p_forecast or self.p_impute) and not self.mask_channel:
            raise ValueError("NTD: p_forecast/p_impute > 0 needs mask_channel=True (the "
                             "denoiser must be told which samples are observed)")
        if not 0.0 < self.forecast_min_fraction <= self.forecast_max_fraction < 1.0:
            raise ValueError("NTD: need 0 < forecast_min_fraction <= forecast_max_fraction < 1")
        if self.forecast_chunk is not None and not 1 <= self.forecast_chunk < self.signal_length:
            raise ValueError(f"NTD: forecast_chunk must be in [1, signal_length), got "
                             f"{self.forecast_chunk}")
        check_linear_config("NTD", self.linear_order, self.linear_fit, fit_required=True,
                            select=self.linear_select)
        if self.linear_order and not self.mask_channel:
            raise ValueError("NTD: linear_order > 0 needs mask_channel: true (the observed "
                             "samples are given to the denoiser clean, beside the noisy "
                             "residual of the rest)")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer levels ``t`` (B,) → (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = t.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class ResidualBlock(nn.Module):
    """Dilated non-causal conv + level embedding, gated activation, residual and skip."""

    def __init__(self, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1d(hidden, 2 * hidden, kernel, dilation=dilation,
                              padding=dilation * (kernel - 1) // 2)
        self.level = nn.Linear(hidden, hidden)
        self.out = nn.Conv1d(hidden, 2 * hidden, 1)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` (B, H, L), ``emb`` (B, H) → (residual output, skip), both (B, H, L)."""
        a, b = self.conv(h + self.level(emb)[:, :, None]).chunk(2, dim=1)
        res, skip = self.out(torch.tanh(a) * torch.sigmoid(b)).chunk(2, dim=1)
        return (h + res) / math.sqrt(2.0), skip


class Denoiser(nn.Module):
    """(noisy signal, mask, conditioning, level) → predicted clean signal or noise.

    A gated dilated conv stack of width H plus a full-rank linear path from the C noisy
    channels to the output (``linear``, zero at initialization, scaled per level and channel
    by ``linear_gain``): the stack need not carry every channel through its H features.
    """

    def __init__(self, cfg: NTDConfig):
        super().__init__()
        C, H = cfg.num_channels, cfg.hidden
        in_ch = C + (C if cfg.mask_channel else 0) + cfg.cond_channels
        self.inp = nn.Conv1d(in_ch, H, 1)
        self.level_mlp = nn.Sequential(nn.Linear(H, H), nn.SiLU(), nn.Linear(H, H))
        self.blocks = nn.ModuleList(
            ResidualBlock(H, cfg.kernel_size, 2 ** (i % cfg.dilation_cycle))
            for i in range(cfg.n_layers))
        self.head = nn.Sequential(nn.SiLU(), nn.Conv1d(H, H, 1), nn.SiLU(), nn.Conv1d(H, C, 1))
        self.linear = nn.Conv1d(C, C, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.linear_gain = nn.Linear(H, C)
        self.hidden, self.channels = H, C

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` (B, C_in, L) (signal, mask, conditioning stacked), ``t`` (B,) → (B, C, L)."""
        emb = self.level_mlp(timestep_embedding(t, self.hidden))
        h = F.silu(self.inp(x))
        skip = 0.0
        for blk in self.blocks:
            h, s = blk(h, emb)
            skip = skip + s
        lin = self.linear_gain(emb)[:, :, None] * self.linear(x[:, :self.channels])
        return self.head(skip / math.sqrt(len(self.blocks))) + lin


@register_model(
    "NTD",
    input_kind="continuous",
    causal=False,
    capabilities=(Forecaster, Sampler),
    tiny_config={"num_channels": 3, "signal_length": 32, "hidden": 16, "n_layers": 3,
                 "dilation_cycle": 3, "diffusion_steps": 10, "sampling_steps": 5,
                 "p_impute": 0.2},
    output_time_dim=-1,
    default_loss="DiffusionMSE",
    config_class=NTDConfig,
)
class NTD(nn.Module):
    """Denoising diffusion model over (B, C, L) signals with forecasting by in-painting."""

    stochastic_forward = True  # forward draws levels and noise (reproducible under a seed)

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = NTDConfig(**kwargs)
        self.schedule = NoiseSchedule(cfg.diffusion_steps, cfg.schedule)
        self.denoiser = Denoiser(cfg)
        if cfg.linear_order:  # the fitted VAR (set_linear_path); saved with the weights
            # the denoiser starts silent (a zero residual): the untrained model is the VAR
            nn.init.zeros_(self.denoiser.head[-1].weight)
            nn.init.zeros_(self.denoiser.head[-1].bias)
            p, C = cfg.linear_order, cfg.num_channels
            self.register_buffer("var_coef", torch.zeros(p, C, C))
            self.register_buffer("var_intercept", torch.zeros(C))
            self.register_buffer("var_mean", torch.zeros(C))

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None):
        """A (B, C, L) batch of sinusoids plus noise (a tuple with conditioning if Cc > 0)."""
        L = seq_len or self.config.signal_length
        t = torch.arange(L, dtype=torch.float32)
        freq = torch.rand(batch_size, self.config.num_channels, 1) * 0.2 + 0.05
        x = torch.sin(2 * math.pi * freq * t) + 0.1 * torch.randn(batch_size,
                                                                  self.config.num_channels, L)
        if self.config.cond_channels:
            return x, torch.randn(batch_size, self.config.cond_channels, L)
        return x

    # ------------------------------------------------------------------ linear forecast
    @property
    def linear_init_request(self) -> dict | None:
        """What a training run fits on its training split before the first step and sets with
        :meth:`set_linear_path` (``{"kind": "var", "order": p}`` with ``linear_order``), or
        None."""
        cfg = self.config
        return linear_request(cfg.linear_order, cfg.linear_fit, cfg.linear_select)

    @torch.no_grad()
    def set_linear_path(self, coef, intercept) -> None:
        """Set the VAR(p) whose residual the model diffuses: ``coef`` (p, C, C) with
        ``coef[l - 1]`` multiplying ``x[:, t - l]`` and ``intercept`` (C,), so that
        ``x[:, t] = intercept + sum_l coef[l - 1] @ x[:, t - l]`` is its prediction. Lags
        before a window are taken at the process mean ``(I - sum_l coef[l - 1])^-1 intercept``
        (the mean of normalized data when the VAR is not stationary)."""
        if not self.config.linear_order:
            raise ValueError("NTD.set_linear_path: the model has no linear forecast "
                             "(linear_order: 0)")
        a, b = fitted_var("NTD.set_linear_path", coef, intercept, self.config.linear_order,
                          self.config.num_channels)
        self.var_coef.copy_(a)
        self.var_intercept.copy_(b)
        self.var_mean.copy_(var_process_mean(a, b))

    def linear_forecast(self, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """The VAR's forecast of every unobserved sample: ``x`` (B, C, L) where ``observed``
        (B, C, L) bool, elsewhere the VAR's closed-loop mean forecast from the example's
        observed prefix (the leading samples where every channel is observed; lags before it
        at the VAR's mean, so with no such prefix, as in channel imputation, the forecast is
        the mean). Samples observed later (a channel subset) are kept in the output but do
        not drive the recursion: a VAR run with some channels clamped to data is a different
        linear system, and one that can be unstable where the VAR itself is not. Computed in
        float32 outside autocast (a recursion: bf16 errors would compound); no gradient, no
        host sync. → (B, C, L) in ``x``'s dtype."""
        p, (B, C, L) = self.config.linear_order, x.shape
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            prefix = observed.all(dim=1).long().cumprod(dim=1).bool()  # (B, L)
            # time-major buffer: the p samples before t are one contiguous row of p*C values
            buf = torch.empty(B, p + L, C, device=x.device)
            buf[:, :p] = self.var_mean.float()
            buf[:, p:] = x.detach().float().transpose(1, 2)
            # weight on buf[:, t:t + p] (oldest lag first): column k*C + j is lag p - k
            w = self.var_coef.float().flip(0).permute(1, 0, 2).reshape(C, p * C).t()
            b = self.var_intercept.float()
            for t in range(L):
                pred = torch.addmm(b, buf[:, t:t + p].reshape(B, p * C), w)
                buf[:, p + t] = torch.where(prefix[:, t, None], buf[:, p + t], pred)
            out = buf[:, p:].transpose(1, 2)
            return torch.where(observed, x.detach().float(), out).to(x.dtype)

    # ------------------------------------------------------------------ internals
    def _check(self, x: torch.Tensor, cond: torch.Tensor | None) -> None:
        C, Cc = self.config.num_channels, self.config.cond_channels
        if x.ndim != 3 or x.shape[1] != C:
            raise ValueError(f"NTD expects x of shape (B, {C}, L), got {tuple(x.shape)}")
        if Cc and (cond is None or cond.shape != (x.shape[0], Cc, x.shape[-1])):
            got = None if cond is None else tuple(cond.shape)
            raise ValueError(f"NTD was configured with cond_channels={Cc}: pass cond of shape "
                             f"({x.shape[0]}, {Cc}, {x.shape[-1]}), got {got}")
        if not Cc and cond is not None:
            raise ValueError("NTD got cond but was configured with cond_channels=0")

    def _denoise(self, x_t, observed, cond, t):
        parts = [x_t]
        if self.config.mask_channel:
            parts.append(observed.to(x_t.dtype))
        if cond is not None:
            parts.append(cond.to(x_t.dtype))
        return self.denoiser(torch.cat(parts, dim=1), t)

    def sample_observed(self, B: int, L: int, device, generator=None) -> torch.Tensor:
        """Training observation masks (B, C, L) bool: forecast prefixes, channel subsets, or
        nothing observed, drawn with ``p_forecast`` / ``p_impute`` (no host sync)."""
        cfg, C = self.config, self.config.num_channels
        u = torch.rand(B, device=device, generator=generator)
        is_fc = u < cfg.p_forecast
        is_imp = (u >= cfg.p_forecast) & (u < cfg.p_forecast + cfg.p_impute)
        lo = max(1, int(cfg.forecast_min_fraction * L))
        hi = max(lo, int(cfg.forecast_max_fraction * L))
        plen = torch.randint(lo, hi + 1, (B,), device=device, generator=generator)
        prefix = torch.arange(L, device=device)[None, None, :] < plen[:, None, None]
        chans = torch.rand(B, C, 1, device=device, generator=generator) < 0.5
        return (prefix & is_fc[:, None, None]) | (chans & is_imp[:, None, None]).expand(-1, -1, L)

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, *,
                t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                observed: torch.Tensor | None = None, generator: torch.Generator | None = None
                ) -> ModelOutput:
        """One noise-prediction training example per batch row.

        ``x`` (B, C, L) clean signal; ``cond`` (B, Cc, L) or None. ``t`` (B,) levels,
        ``noise`` (B, C, L) and ``observed`` (B, C, L) bool are drawn when not given (from
        ``generator`` or the global RNG, so a seed makes forward reproducible).

        Returns a ModelOutput with ``prediction``, ``target`` and ``weight``, each (B, C, L):
        the clean signal's prediction and the clean signal (``prediction: x0``; with
        ``linear_order`` the clean *residual* of the VAR forecast, :meth:`linear_forecast`) or
        the noise's prediction and the noise (``eps``), and the per-element loss weight, 0
        where the sample is observed and the min-SNR-gamma weight of the example's level where
        it is to be generated (:class:`DiffusionMSE` averages
        ``weight * (prediction - target)^2`` over the generated elements).
        """
        self._check(x, cond)
        B, C, L = x.shape
        if t is None:
            t = torch.randint(0, self.config.diffusion_steps, (B,), device=x.device,
                              generator=generator)
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if observed is None:
            observed = self.sample_observed(B, L, x.device, generator)
        # with a linear forecast the diffused signal is its residual (0 where observed)
        clean = x - self.linear_forecast(x, observed) if self.config.linear_order else x
        x_t = self.schedule.q_sample(clean, t, noise)
        if self.config.mask_channel:
            x_t = torch.where(observed, x, x_t)
        pred = self._denoise(x_t, observed, cond, t)
        snr, gamma = self.schedule.snr(t), self.config.snr_gamma
        if self.config.prediction == "x0":
            target, w = clean, (snr if gamma is None else snr.clamp(max=gamma))
        else:
            target, w = noise, (torch.ones_like(snr) if gamma is None
                                else (gamma / snr).clamp(max=1.0))
        weight = (~observed).to(x.dtype) * w.to(x.dtype)[:, None, None]
        return ModelOutput(pred, target=target, weight=weight)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, batch_size: int | None = None, length: int | None = None, *,
               known: torch.Tensor | None = None, known_mask: torch.Tensor | None = None,
               cond: torch.Tensor | None = None, sampler: str | None = None,
               steps: int | None = None, eta: float | None = None,
               generator: torch.Generator | None = None, progress: bool = True
               ) -> torch.Tensor:
        """Draw signals (B, C, L), in-painting ``known`` where ``known_mask`` is True.

        Either ``batch_size``/``length`` (unconditional) or ``known`` (B, C, L) with
        ``known_mask`` (B, C, L) bool. ``sampler`` "ddim" (``steps`` levels, ``eta``) or
        "ddpm" (all levels); defaults from the config. ``progress`` shows a tqdm bar.
        """
        cfg = self.config
        dev = next(self.parameters()).device
        if known is not None:
            if known_mask is None or known_mask.shape != known.shape:
                raise ValueError("sample(): known_mask must be given with the shape of known "
                                 f"{tuple(known.shape)}")
            B, C, L = known.shape
            obs = known_mask.to(dev, torch.bool)
            known = known.to(dev)
        else:
            B, L = batch_size or 1, length or cfg.signal_length
            C = cfg.num_channels
            obs = torch.zeros(B, C, L, dtype=torch.bool, device=dev)
            known = torch.zeros(B, C, L, device=dev)
        self._check(known, cond)
        sampler = sampler or cfg.sampler
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        eta = cfg.eta if eta is None else eta
        if sampler == "ddpm":
            levels = list(range(cfg.diffusion_steps - 1, -1, -1))
        else:
            levels = self.schedule.ddim_timesteps(steps or cfg.sampling_steps)
        # with a linear forecast, x is its residual on the unobserved samples
        base = self.linear_forecast(known, obs) if cfg.linear_order else None
        x = torch.randn(B, C, L, device=dev, generator=generator)
        for i, lv in enumerate(tqdm(levels, desc=f"NTD {sampler}", disable=not progress,
                                    leave=False)):
            t = torch.full((B,), lv, device=dev, dtype=torch.long)
            if cfg.mask_channel:
                x = torch.where(obs, known, x)
            else:  # replacement in-painting: known values at the current noise level
                z = torch.randn(known.shape, device=dev, generator=generator)
                x = torch.where(obs, self.schedule.q_sample(known, t, z), x)
            out = self._denoise(x, obs, cond, t).float()
            pred = {"x0": out} if cfg.prediction == "x0" else {"eps": out}
            if sampler == "ddpm":
                x = self.schedule.ddpm_step(x, lv, generator=generator,
                                            clip=cfg.clip_denoised, **pred)
            else:
                nxt = levels[i + 1] if i + 1 < len(levels) else -1
                x = self.schedule.ddim_step(x, lv, nxt, eta=eta, generator=generator,
                                            clip=cfg.clip_denoised, **pred)
        return torch.where(obs, known, x if base is None else base + x)

    @torch.no_grad()
    def impute(self, x: torch.Tensor, known_mask: torch.Tensor, *,
               cond: torch.Tensor | None = None, **sample_kw) -> torch.Tensor:
        """Fill the unknown parts of ``x`` (B, C, L) by in-painting.

        ``known_mask``: (C,) or (B, C) bool for whole known channels, or (B, C, L).
        """
        B, C, L = x.shape
        m = known_mask.to(torch.bool)
        if m.shape == (C,):
            m = m[None, :, None].expand(B, C, L)
        elif m.shape == (B, C):
            m = m[:, :, None].expand(B, C, L)
        elif m.shape != (B, C, L):
            raise ValueError(f"impute(): known_mask must be (C,), (B, C) or (B, C, L) for x "
                             f"{tuple(x.shape)}, got {tuple(known_mask.shape)}")
        sample_kw.setdefault("progress", False)
        return self.sample(known=x, known_mask=m, cond=cond, **sample_kw)

    @torch.no_grad()
    def forecast(self, past: torch.Tensor, horizon: int, *, use_cache: bool = True,
                 cond: torch.Tensor | None = None, progress: bool = False, **sample_kw
                 ) -> torch.Tensor:
        """Extend ``past`` (B, C, T) by ``horizon`` samples → (B, C, T + horizon).

        Recursive windows of ``signal_length`` L: each draws ``forecast_chunk`` (default L/2)
        new samples in-painted after the latest ``L - chunk`` known samples. ``cond``, if the
        model uses it, covers ``T + horizon`` samples. The denoiser is not causal, so there
        is no state to carry between steps: ``use_cache`` is accepted for the common
        interface and changes nothing (same seed, same result).
        """
        del use_cache
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        B, C, T = past.shape
        if self.config.cond_channels and (cond is None or cond.shape[-1] != T + horizon):
            raise ValueError(f"forecast(): cond must cover past + horizon = {T + horizon} "
                             f"samples, got {None if cond is None else tuple(cond.shape)}")
        L = self.config.signal_length
        chunk = self.config.forecast_chunk or max(1, L // 2)
        out = torch.empty(B, C, T + horizon, dtype=past.dtype, device=past.device)
        out[..., :T] = past
        done = 0
        bar = tqdm(total=horizon, desc="NTD forecast", disable=not progress, leave=False)
        while done < horizon:
            n = min(chunk, horizon - done)
            end = T + done + n
            start = max(0, end - L)
            win = out[..., start:end].clone()
            n_known = T + done - start
            win[..., n_known:] = 0.0
            mask = torch.zeros_like(win, dtype=torch.bool)
            mask[..., :n_known] = True
            c = cond[..., start:end] if cond is not None else None
            gen = self.sample(known=win, known_mask=mask, cond=c, progress=False, **sample_kw)
            out[..., T + done:end] = gen[..., n_known:].to(out.dtype)
            done += n
            bar.update(n)
        bar.close()
        return out

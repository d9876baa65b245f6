"""BENDRForecast: a causal continuous next-sample forecaster with sensor metadata.

Inspired by BENDR (Kostas, Aroca-Ouellette & Rudzicz 2021, "BENDR: using transformers and a
contrastive self-supervised learning task to learn from massive amounts of EEG data"): a
strided convolutional encoder compresses the signal into frames, a transformer
contextualizes the frames. Unlike BENDR (bidirectional, contrastive pre-training), everything
here is causal and trained to predict the next sample with MSE.

Architecture (B batch, C channels, T samples, s = encoder stride, F = floor(T / s) frames,
D = ``enc_width``, M = ``d_model``):

1. Per-channel causal strided conv encoder (weights shared across channels; channels folded
   into the batch): ``(B, C, T) -> (B, C, D, F)``. Frame ``k`` sees samples ``<= (k+1)s - 1``.
2. Sensor embedding ``e_c = MLP(pos_2d_c) + type_emb(ch_type_c)`` ``(B, C, D)`` added to every
   frame of channel ``c``; ``n_spatial_queries`` learned queries attend over channels
   (per frame) and are concatenated and projected to the frame token ``(B, F, M)``.
3. Causal transformer (rotary positions; :class:`ephys_gpt.layers.attention.TransformerStack`)
   over ``[start, f_0, ..., f_{F-1}]``:
   the sequence is shifted right by a learned start token, so context position ``m`` has
   seen frames ``< m``, i.e. samples ``<= m s - 1``.
4. Decoder, at the full sample rate: the prediction of ``x[t + 1]`` made at time ``t`` uses
   context position ``m(t) = floor((t + 1) / s)`` (the newest complete frame) and the offset
   ``j = t + 1 - m s`` inside the frame (one learned projection per offset), plus a short
   per-channel causal conv over the raw samples ``x[t - K + 1 .. t]`` (the local path, so
   the newest samples count even before their frame completes) and the sensor embedding.
   With ``predict_residual`` the head predicts ``x[t + 1] - x[t]``.
5. Linear path (``linear_order`` p > 0): a learned multichannel autoregression over every
   channel's last p samples, ``sum_l W_l x[:, t - l]`` (a causal ``C -> C`` convolution of
   kernel p, zero at initialization), added to the prediction. The network then only has to
   learn what a VAR(p) cannot: on data close to linear (the embedded MVAR simulation) the
   conv encoder, pooled once per frame, cannot see the other channels' newest samples, and
   without this path the model stays near a VAR(1) (docs/models-continuous.md). With
   ``linear_fit`` the path is instead a ridge VAR(p) fitted on the training split before the
   first step and held fixed (:meth:`BENDRForecast.set_linear_path`).

Output ``y`` (B, C, T) with ``y[..., t]`` the prediction of ``x[..., t + 1]``: pair it with the
target ``x[:, 1:]`` of ``ChunkDatasetReconstruction(target_shift=1)``.

Sensor layout: ``forward(x, pos_2d=None, ch_type=None)``; missing metadata falls back to the
layout stored in the model (buffers ``sensor_pos`` (C, 2) and ``sensor_type`` (C,), set from
the config keys of the same names, or with :meth:`BENDRForecast.set_sensor_layout`;
otherwise channels on a unit circle, all of type 0), so ``forecast(past, horizon)`` works
with the signal alone.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from tqdm.auto import tqdm

from ephys_gpt.layers.attention import KVCache, TransformerStack
from ephys_gpt.layers.conv_encoder import CausalStridedConvEncoder
from ephys_gpt.models.capabilities import Forecaster
from ephys_gpt.models.linear_path import check_linear_config, fitted_var, linear_request
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model

logger = logging.getLogger(__name__)


@dataclass
class BENDRForecastConfig:
    """Keyword arguments of :class:`BENDRForecast` (``model_config``)."""

    num_channels: int = 306            # C: sensors in the input
    enc_width: int = 64                # D: per-channel encoder features
    enc_kernels: list[int] = field(default_factory=lambda: [4, 4])  # conv kernel per layer
    enc_strides: list[int] = field(default_factory=lambda: [2, 2])  # stride per layer (s = product)
    local_kernel: int = 8              # K: raw samples seen by the per-channel local path
    d_model: int = 128                 # M: transformer width
    n_layers: int = 4                  # transformer blocks
    n_heads: int = 4                   # attention heads
    mlp_ratio: float = 4.0             # transformer MLP hidden = mlp_ratio * d_model
    n_spatial_queries: int = 4         # learned queries pooling channels into a frame token
    n_sensor_types: int = 11           # ch_type vocabulary (codes 0..n-1; dataset CH_TYPE_CODES)
    dropout: float = 0.0               # dropout in the transformer
    predict_residual: bool = True      # predict x[t+1] - x[t] (identity is the prior)
    linear_order: int = 0              # p > 0: add a learned VAR(p) over all channels' last p
                                       # samples (zero at init); 0: none (models before it)
    linear_fit: bool = False           # true: the linear path is a ridge VAR(p) fitted on the
                                       # training split before the first step, then held fixed
    linear_select: bool = False        # true: linear_order is the largest order; the fit
                                       # takes the p <= linear_order with the smallest
                                       # 1-step error on the validation split (as the
                                       # evals do), the lags above it zero
    example_length: int = 64           # T of example_inputs()
    sensor_pos: list[list[float]] | None = None  # default layout (C, 2); None: unit circle
    sensor_types: list[int] | None = None        # default ch_type codes (C,); None: zeros

    def __post_init__(self):
        for key in ("num_channels", "enc_width", "local_kernel", "d_model", "n_layers",
                    "n_heads", "n_spatial_queries", "n_sensor_types", "example_length"):
            val = getattr(self, key)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"BENDRForecast: {key} must be a positive integer, got {val!r}")
        check_linear_config("BENDRForecast", self.linear_order, self.linear_fit,
                            fit_required=False, select=self.linear_select)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"BENDRForecast: d_model ({self.d_model}) / n_heads "
                             f"({self.n_heads}) must be an even integer (rotary heads)")
        if self.sensor_pos is not None and (len(self.sensor_pos) != self.num_channels or any(
                len(p) != 2 for p in self.sensor_pos)):
            raise ValueError(f"BENDRForecast: sensor_pos must be {self.num_channels} [x, y] "
                             f"pairs, got {len(self.sensor_pos)} entries")
        if self.sensor_types is not None and len(self.sensor_types) != self.num_channels:
            raise ValueError(f"BENDRForecast: sensor_types must have {self.num_channels} codes, "
                             f"got {len(self.sensor_types)}")


@register_model(
    "BENDRForecast",
    input_kind="continuous_meta",
    causal=True,
    capabilities=(Forecaster,),
    tiny_config={"num_channels": 4, "enc_width": 8, "enc_kernels": [3, 2],
                 "enc_strides": [2, 2], "local_kernel": 3, "d_model": 16, "n_layers": 2,
                 "n_heads": 2, "n_spatial_queries": 2, "example_length": 24, "linear_order": 3},
    output_time_dim=-1,
    default_loss="MSE",
    config_class=BENDRForecastConfig,
)
class BENDRForecast(nn.Module):
    """Causal conv encoder + transformer next-sample forecaster on (x, pos_2d, ch_type)."""

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = BENDRForecastConfig(**kwargs)
        C, D, M = cfg.num_channels, cfg.enc_width, cfg.d_model
        self.encoder = CausalStridedConvEncoder(1, D, cfg.enc_kernels, cfg.enc_strides)
        self.stride = self.encoder.total_stride
        self.pos_mlp = nn.Sequential(nn.Linear(2, D), nn.GELU(), nn.Linear(D, D))
        self.type_emb = nn.Embedding(cfg.n_sensor_types, D)
        self.spatial_queries = nn.Parameter(torch.randn(cfg.n_spatial_queries, D) / math.sqrt(D))
        self.frame_proj = nn.Linear(cfg.n_spatial_queries * D, M)
        self.start = nn.Parameter(torch.zeros(1, 1, M))
        self.context = TransformerStack(M, cfg.n_layers, cfg.n_heads, cfg.mlp_ratio,
                                        cfg.dropout, causal=True)
        self.ctx_to_offsets = nn.Linear(M, self.stride * D)  # one projection per offset j
        self.local = nn.Conv1d(1, D, cfg.local_kernel)
        self.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, 1))
        self.linear = None
        if cfg.linear_order:
            self.linear = nn.Conv1d(C, C, cfg.linear_order)  # causal: padded on the left
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
            # fitted: least squares sets it (set_linear_path), the optimizer never moves it
            self.linear.requires_grad_(not cfg.linear_fit)
        if cfg.sensor_pos is not None:
            pos = torch.tensor(cfg.sensor_pos, dtype=torch.float32)
        else:
            ang = torch.arange(C, dtype=torch.float32) * (2 * math.pi / C)
            pos = torch.stack([ang.cos(), ang.sin()], dim=-1)
        types = torch.tensor(cfg.sensor_types or [0] * C, dtype=torch.long)
        self.register_buffer("sensor_pos", pos)      # (C, 2)
        self.register_buffer("sensor_type", types)   # (C,)

    # ------------------------------------------------------------------ helpers
    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None):
        """``(x (B, C, T), pos_2d (B, C, 2), ch_type (B, C))`` with random x."""
        T = seq_len or self.config.example_length
        x = torch.randn(batch_size, self.config.num_channels, T)
        return (x, repeat(self.sensor_pos, "c k -> b c k", b=batch_size).clone(),
                repeat(self.sensor_type, "c -> b c", b=batch_size).clone())

    @property
    def linear_init_request(self) -> dict | None:
        """What a training run fits on its training split before the first step and sets as
        the linear path (``{"kind": "var", "order": p}``, with ``linear_fit``), or None.
        See :meth:`set_linear_path`."""
        cfg = self.config
        if self.linear is None:
            return None
        return linear_request(cfg.linear_order, cfg.linear_fit, cfg.linear_select)

    @torch.no_grad()
    def set_linear_path(self, coef, intercept) -> None:
        """Set the linear path to a fitted VAR(p): ``coef`` (p, C, C) with ``coef[l - 1]``
        multiplying ``x[:, t - l + 1]`` and ``intercept`` (C,), so that the path alone
        predicts ``x[:, t + 1]`` as the VAR does (with ``predict_residual`` the identity the
        model adds is taken off the first lag). Why (``linear_fit``): a linear path learned
        from zero by SGD reached a lower one-step error than the VAR on the demo data but left
        the closed loop unstable (companion spectral radius 1.06: free-running forecasts
        grew without bound), and Adam at a usual learning rate walks a least-squares start
        away within a hundred steps. A fitted, fixed VAR keeps the linear dynamics at the
        least-squares optimum; the network learns what it cannot."""
        if self.linear is None:
            raise ValueError("BENDRForecast.set_linear_path: the model has no linear path "
                             "(linear_order: 0)")
        C = self.config.num_channels
        a, b = fitted_var("BENDRForecast.set_linear_path", coef, intercept,
                          self.config.linear_order, C, torch.float32)
        if self.config.predict_residual:
            a = a.clone()
            a[0] -= torch.eye(C)
        # conv tap k multiplies x[t - (p - 1) + k]: lag l = p - k
        self.linear.weight.copy_(a.flip(0).permute(1, 2, 0))
        self.linear.bias.copy_(b)

    def set_sensor_layout(self, pos_2d, ch_type) -> None:
        """Store the default layout used when forward/forecast get no metadata."""
        pos = torch.as_tensor(pos_2d, dtype=torch.float32, device=self.sensor_pos.device)
        typ = torch.as_tensor(ch_type, dtype=torch.long, device=self.sensor_type.device)
        if pos.shape != self.sensor_pos.shape or typ.shape != self.sensor_type.shape:
            raise ValueError(f"set_sensor_layout: expected pos_2d {tuple(self.sensor_pos.shape)} "
                             f"and ch_type {tuple(self.sensor_type.shape)}, got "
                             f"{tuple(pos.shape)} and {tuple(typ.shape)}")
        self._check_types(typ)
        self.sensor_pos.copy_(pos)
        self.sensor_type.copy_(typ)

    def _meta(self, x, pos_2d, ch_type):
        if x.ndim != 3 or x.shape[1] != self.config.num_channels:
            raise ValueError(f"BENDRForecast expects x of shape (B, {self.config.num_channels}, T),"
                             f" got {tuple(x.shape)}")
        B, C, _ = x.shape
        pos = self.sensor_pos.expand(B, -1, -1) if pos_2d is None else pos_2d
        typ = self.sensor_type.expand(B, -1) if ch_type is None else ch_type
        if pos.shape != (B, C, 2) or typ.shape != (B, C):
            raise ValueError(f"BENDRForecast: pos_2d must be (B, C, 2) and ch_type (B, C) for x "
                             f"{tuple(x.shape)}; got {tuple(pos.shape)} and {tuple(typ.shape)}")
        return pos.to(x.dtype), typ.long()

    def _check_types(self, typ: torch.Tensor) -> None:
        """Range check of ch_type codes (a host sync: used outside the training step)."""
        if typ.numel() and (int(typ.min()) < 0 or int(typ.max()) >= self.config.n_sensor_types):
            raise ValueError(f"BENDRForecast: ch_type codes must lie in [0, "
                             f"{self.config.n_sensor_types - 1}] (n_sensor_types); got "
                             f"[{int(typ.min())}, {int(typ.max())}]")

    def sensor_embedding(self, pos: torch.Tensor, typ: torch.Tensor) -> torch.Tensor:
        """(B, C, 2), (B, C) → (B, C, D)."""
        return self.pos_mlp(pos) + self.type_emb(typ)

    def _frame_tokens(self, frames: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Encoder frames (B, C, D, F) + sensor embedding (B, C, D) → tokens (B, F, M)."""
        B = frames.shape[0]
        h = rearrange(frames, "b c d f -> (b f) c d") + repeat(
            emb, "b c d -> (b f) c d", f=frames.shape[-1])
        q = repeat(self.spatial_queries, "q d -> n q d", n=h.shape[0])
        pooled = F.scaled_dot_product_attention(q, h, h)  # (B F, Q, D): attend over channels
        return self.frame_proj(rearrange(pooled, "(b f) q d -> b f (q d)", b=B))

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel causal conv of the raw signal: (B, C, T) → (B, C, T, D)."""
        B = x.shape[0]
        h = self.local(F.pad(rearrange(x, "b c t -> (b c) 1 t"), (self.config.local_kernel - 1, 0)))
        return rearrange(h, "(b c) d t -> b c t d", b=B)

    def _linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """The linear path's prediction for every time of ``x`` (B, C, T) → (B, C, T) (from
        ``x[..., t - p + 1 .. t]``, zeros before the start), or None without one."""
        if self.linear is None:
            return None
        return self.linear(F.pad(x, (self.config.linear_order - 1, 0)))

    def _decode(self, ctx: torch.Tensor, local: torch.Tensor, emb: torch.Tensor,
                x_last: torch.Tensor, t0: int, lin: torch.Tensor | None) -> torch.Tensor:
        """Predictions for times ``t0 .. t0 + n - 1``.

        ``ctx`` (B, n, M): the context token used at each of those times; ``local``
        (B, C, n, D); ``emb`` (B, C, D); ``x_last`` (B, C, n) the samples x[t]; ``lin``
        (B, C, n) the linear path's prediction or None. → (B, C, n).
        """
        n = ctx.shape[1]
        offs = rearrange(self.ctx_to_offsets(ctx), "b n (j d) -> b n j d", j=self.stride)
        j = (torch.arange(t0, t0 + n, device=ctx.device) + 1) % self.stride
        ctx_j = offs[:, torch.arange(n, device=ctx.device), j]  # (B, n, D)
        z = local + ctx_j[:, None] + emb[:, :, None]
        y = self.head(z).squeeze(-1)  # (B, C, n)
        if lin is not None:
            y = y + lin
        return y + x_last if self.config.predict_residual else y

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, pos_2d: torch.Tensor | None = None,
                ch_type: torch.Tensor | None = None) -> ModelOutput:
        """Predict the next sample at every time step.

        ``x`` (B, C, T) float, ``pos_2d`` (B, C, 2), ``ch_type`` (B, C) int → ``prediction``
        ``y`` (B, C, T) with ``y[..., t]`` ≈ ``x[..., t + 1]`` computed from ``x[..., :t + 1]``
        only.
        """
        return ModelOutput(self._predict(x, pos_2d, ch_type))

    def _predict(self, x: torch.Tensor, pos_2d: torch.Tensor | None,
                 ch_type: torch.Tensor | None) -> torch.Tensor:
        pos, typ = self._meta(x, pos_2d, ch_type)
        B, C, T = x.shape
        emb = self.sensor_embedding(pos, typ)  # (B, C, D)
        frames = self.encoder(rearrange(x, "b c t -> (b c) 1 t"))
        frames = rearrange(frames, "(b c) d f -> b c d f", b=B)  # (B, C, D, F)
        tokens = torch.cat([self.start.expand(B, -1, -1), self._frame_tokens(frames, emb)], 1)
        n_ctx = T // self.stride + 1  # context positions used: m(t) for t < T
        ctx = self.context(tokens[:, :n_ctx])  # (B, n_ctx, M)
        m = torch.div(torch.arange(T, device=x.device) + 1, self.stride, rounding_mode="floor")
        return self._decode(ctx[:, m], self._local(x), emb, x, 0, self._linear(x))

    # ------------------------------------------------------------------ forecasting
    @torch.no_grad()
    def forecast(self, past: torch.Tensor, horizon: int, *, use_cache: bool = True,
                 pos_2d: torch.Tensor | None = None, ch_type: torch.Tensor | None = None,
                 noise: torch.Tensor | float | None = None,
                 generator: torch.Generator | None = None,
                 progress: bool = False) -> torch.Tensor:
        """Grow ``past`` (B, C, T) by ``horizon`` predicted samples → (B, C, T + horizon).

        Each step appends the 1-step prediction and predicts again. The prediction is the
        conditional mean, so a long deterministic run decays towards the mean. ``noise`` adds
        Gaussian innovations to every appended sample (drawn from ``generator``), which
        simulates the signal instead (an autoregressive process driven by noise): a scalar
        or per-channel (C,) standard deviation, or a (C, C) covariance (e.g. of the 1-step
        residuals: MEG innovations are spatially correlated), in model units. With ``use_cache`` the
        transformer keeps a KV cache (one new frame every s samples) and the encoder and local
        path re-run only on the last receptive field, so a step costs O(context) rather than a
        full forward pass; ``use_cache=False`` re-runs :meth:`forward` on the whole sequence
        each step (the reference). The past is returned unchanged.
        """
        if horizon < 0:
            raise ValueError(f"horizon must be >= 0, got {horizon}")
        if past.ndim != 3 or past.shape[-1] < 1:
            raise ValueError(f"forecast: past must be (B, C, T>=1), got {tuple(past.shape)}")
        T0 = past.shape[-1]
        factor = self._noise_factor(noise, past)
        out = torch.empty(*past.shape[:-1], T0 + horizon, dtype=past.dtype, device=past.device)
        out[..., :T0] = past
        steps = tqdm(range(horizon), desc="BENDR forecast", disable=not progress, leave=False)
        if not use_cache:
            for i in steps:
                out[..., T0 + i] = self._innovate(
                    self._predict(out[..., :T0 + i], pos_2d, ch_type)[..., -1], factor,
                    generator)
            return out
        pos, typ = self._meta(past, pos_2d, ch_type)
        self._check_types(typ)
        B, C, _ = past.shape
        emb = self.sensor_embedding(pos, typ)
        s, K = self.stride, self.config.local_kernel
        p = self.config.linear_order
        # Prime: context over the past's complete frames (plus the start token).
        frames = rearrange(self.encoder(rearrange(past, "b c t -> (b c) 1 t")),
                           "(b c) d f -> b c d f", b=B)
        tokens = torch.cat([self.start.expand(B, -1, -1), self._frame_tokens(frames, emb)], 1)
        caches = self.new_cache(tokens.shape[1] + horizon // s + 1)
        ctx = self.context(tokens, caches)[:, -1:]  # context for m = floor(T0 / s)
        for i in steps:
            t = T0 + i - 1  # predict x[t + 1] from x[:t + 1]
            if i > 0 and (t + 1) % s == 0:  # frame f_{(t+1)/s - 1} just completed
                f = self.encoder.last_frame(
                    rearrange(out[..., :t + 1], "b c t -> (b c) 1 t"), t + 1)
                tok = self._frame_tokens(rearrange(f, "(b c) d -> b c d 1", b=B), emb)
                ctx = self.context(tok, caches)
            window = out[..., max(0, t + 1 - K):t + 1]
            local = self._local(window)[:, :, -1:]
            lin = self._linear(out[..., max(0, t + 1 - p):t + 1])
            out[..., t + 1] = self._innovate(
                self._decode(ctx, local, emb, out[..., t:t + 1], t,
                             None if lin is None else lin[..., -1:])[..., 0],
                factor, generator)
        return out

    @staticmethod
    def _noise_factor(noise, past: torch.Tensor) -> torch.Tensor | None:
        """``noise`` as a std (scalar or (C,)) or a lower Cholesky factor (C, C)."""
        if noise is None:
            return None
        C = past.shape[1]
        f = torch.as_tensor(noise, dtype=torch.float32, device=past.device)
        if f.ndim == 2:
            if f.shape != (C, C):
                raise ValueError(f"forecast: a noise covariance must be ({C}, {C}), got "
                                 f"{tuple(f.shape)}")
            jitter = 1e-6 * f.diagonal().mean().clamp(min=1e-12)
            return torch.linalg.cholesky(f + jitter * torch.eye(C, device=f.device))
        if f.ndim > 1 or (f.ndim == 1 and f.shape[0] != C):
            raise ValueError(f"forecast: noise must be a scalar, ({C},) std or ({C}, {C}) "
                             f"covariance, got shape {tuple(f.shape)}")
        return f

    @staticmethod
    def _innovate(pred: torch.Tensor, factor: torch.Tensor | None, generator) -> torch.Tensor:
        """``pred`` (B, C) plus Gaussian innovations (std or Cholesky ``factor``), if any."""
        if factor is None:
            return pred
        z = torch.randn(pred.shape, generator=generator, device=pred.device, dtype=pred.dtype)
        z = z @ factor.T.to(z.dtype) if factor.ndim == 2 else z * factor.to(z.dtype)
        return pred + z

    def new_cache(self, max_frames: int) -> list[KVCache]:
        """One :class:`KVCache` per transformer block, for ``max_frames`` context positions."""
        return self.context.new_caches(max_frames)

"""A fitted VAR's forecast as token log-probabilities added to a token model's logits.

WavenetFullChannel, GPT2MEG and STGPT2MEG (``linear_order: p``, ``linear_fit: true``) carry a
ridge VAR(p) over all channels, fitted on the training split's decoded tokens before the
first step (``ephys_gpt/training/data_init.py``: the fit the evals report as a baseline) and
held fixed. For every step it forecasts each channel's next value; the Gaussian around that
forecast, with the VAR's 1-step error variance, gives every token the mass of its mu-law bin,
and the log of that mass is added to the logits. The network then learns what the VAR does
not predict, and starts from the VAR's forecast distribution. Saved with the weights: the
coefficients, the intercept, the error variances and their correlation across channels, and
each token's value (the data's mu-law code).

Sampling: a token model draws every channel of a step independently given the past, but the
VAR's errors are correlated across channels (neighbouring sensors see the same sources), and
its dynamics amplify independent errors: on the demo data a VAR(20) run free with
independent errors of the same variances has 3.8x the signal variance of one run with its
correlated errors. So generation draws the channels' uniform numbers through a Gaussian
copula with the errors' correlation (:meth:`TokenVARForecast.innovation_uniforms`): each
channel's token keeps exactly the model's distribution, and the channels' draws are as
dependent as the VAR's errors.

:class:`TokenVARForecast` is the part a model mixes in (buffers, ``set_linear_path``, the
teacher-forced :meth:`~TokenVARForecast.linear_prediction` and
:meth:`~TokenVARForecast.linear_logprior`); :class:`TokenVARStream` is its decoding state
(one matmul a step).

Legend: B batch, C channels, T time, V vocabulary, p the VAR's order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ephys_gpt.linear.predictor import psd_factor
from ephys_gpt.models.linear_path import fitted_var, linear_request, var_process_mean

LOGPRIOR_FLOOR = -40.0  # nats: the least log-probability the linear forecast gives a token
LOGPRIOR_GRID_MAX = 2048  # forecasts tabulated per channel (the grid's step is s_c / 8 below)


class TokenVARForecast:
    """Mixed into an ``nn.Module`` token model whose ``config`` has ``linear_order``,
    ``linear_fit``, ``linear_select``, ``num_channels`` and ``vocab_size``; the model calls
    :meth:`_init_token_var` in its ``__init__`` when ``linear_order > 0``."""

    def _init_token_var(self) -> None:
        """Register the VAR's buffers (zeros until :meth:`set_linear_path`: the forecast then
        adds nothing) and rebuild the log-probability table after weights load."""
        cfg = self.config
        p, C, V = cfg.linear_order, cfg.num_channels, cfg.vocab_size
        self.register_buffer("var_coef", torch.zeros(p, C, C))
        self.register_buffer("var_intercept", torch.zeros(C))
        self.register_buffer("var_mean", torch.zeros(C))
        self.register_buffer("var_inv_var", torch.ones(C))
        self.register_buffer("token_values", torch.zeros(C, V))
        # a factor L of the errors' correlation, L L' = corr (Cholesky; identity:
        # independent draws, as for models saved before it)
        self.register_buffer("var_noise_factor", torch.eye(C))
        self._register_load_state_dict_pre_hook(_independent_if_missing, with_module=True)
        # derived (not saved): where each channel's tokens start in token_values.flatten(),
        # and the token log-probabilities on a grid of forecasts (_build_logprior_table)
        self.register_buffer("token_offsets", torch.arange(C) * V, persistent=False)
        self.register_buffer("logprior_table", torch.zeros(C, 2, V), persistent=False)
        self.register_buffer("logprior_grid", torch.tensor([[0.0, 1.0]] * C), persistent=False)
        self.register_load_state_dict_post_hook(
            lambda module, keys: module._build_logprior_table())

    @property
    def linear_init_request(self) -> dict | None:
        """What a training run fits on its training split before the first step and sets with
        :meth:`set_linear_path` (a VAR of order ``linear_order`` on the decoded tokens), or
        None."""
        cfg = self.config
        return linear_request(cfg.linear_order, cfg.linear_fit, cfg.linear_select, tokens=True)

    @torch.no_grad()
    def set_linear_path(self, coef, intercept, *, noise_std, steps, noise_corr=None) -> None:
        """Set the VAR(p) whose forecast the logits start from.

        ``coef`` (p, C, C) with ``coef[l - 1]`` multiplying the values at ``t - l + 1`` and
        ``intercept`` (C,) predict the normalized value at ``t + 1``; ``noise_std`` (C,) is
        the standard deviation of its 1-step errors and ``noise_corr`` (C, C) their
        correlation (None: independent), which generation gives the channels' draws;
        ``steps`` are the training data's recorded stage-2 steps, whose last must be the
        ``mulaw_quantize`` that made the tokens (its ``n_bits`` and ``scale`` give each
        token's value and bin width).
        """
        from ephys_gpt.codec import mulaw_dequantize

        name, cfg = type(self).__name__, self.config
        if not cfg.linear_order:
            raise ValueError(f"{name}.set_linear_path: the model has no linear forecast "
                             "(linear_order: 0)")
        C, V = cfg.num_channels, cfg.vocab_size
        a, b = fitted_var(f"{name}.set_linear_path", coef, intercept, cfg.linear_order, C)
        std = torch.as_tensor(noise_std, dtype=torch.float64)
        if tuple(std.shape) != (C,) or not (torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"{name}.set_linear_path: expected noise_std ({C},) (num_channels)"
                             f", finite and > 0, got shape {tuple(std.shape)}")
        last = dict(steps[-1]) if steps else {}
        if last.get("name") != "mulaw_quantize":
            raise ValueError(f"{name}: linear_fit needs mu-law token data; the training data's "
                             f"last stage-2 step is {last.get('name')!r} (steps: "
                             f"{[st.get('name') for st in steps]})")
        bits = int(last["n_bits"])
        if 2 ** bits != V:
            raise ValueError(f"{name}: the training data has {bits}-bit tokens ({2 ** bits} "
                             f"values) but vocab_size is {V}")
        scale = torch.as_tensor(last.get("scale", 1.0), dtype=torch.float64)
        scale = scale.reshape(-1, 1).expand(C, 1) if scale.numel() in (1, C) else None
        if scale is None:
            raise ValueError(f"{name}: the mu-law step's scale must be one number or one per "
                             f"channel ({C}), got {last.get('scale')!r}")
        centre = mulaw_dequantize(torch.arange(V, dtype=torch.float64), bits, 1.0).double()
        factor = torch.eye(C, dtype=torch.float64)
        if noise_corr is not None:
            corr = torch.as_tensor(noise_corr, dtype=torch.float64)
            if tuple(corr.shape) != (C, C) or not torch.isfinite(corr).all() or \
                    not torch.allclose(corr, corr.T, atol=1e-8) or \
                    not torch.allclose(corr.diagonal(), torch.ones_like(corr[0]), atol=1e-6):
                raise ValueError(f"{name}.set_linear_path: noise_corr must be a ({C}, {C}) "
                                 "correlation matrix (symmetric, finite, ones on the "
                                 f"diagonal), got shape {tuple(corr.shape)}")
            factor = psd_factor(corr)
        self.var_coef.copy_(a)
        self.var_intercept.copy_(b)
        self.var_mean.copy_(var_process_mean(a, b))
        self.var_inv_var.copy_(std.pow(-2))
        self.token_values.copy_(centre[None] * scale)  # the last token decodes to +scale
        self.var_noise_factor.copy_(factor)
        self._build_logprior_table()

    def linear_uniforms(self, batch: int, chunk: int = 64):
        """What ``generate_tokens`` draws each step's uniforms with (``uniforms=``):
        :meth:`innovation_uniforms` for ``batch`` sequences, or None (independent draws)
        without a linear forecast. The uniforms of ``chunk`` steps are made at once (three
        operations), so a step only takes the next slice: made one step at a time they cost
        a fifth of a streamed WaveNet step."""
        if not self.config.linear_order:
            return None
        lt = self.var_noise_factor.float().T.contiguous()
        dev, C = lt.device, lt.shape[0]
        state = {"u": None, "i": chunk}

        def draw(generator: torch.Generator | None = None) -> torch.Tensor:
            if state["i"] == chunk:
                z = torch.randn(chunk, batch, C, generator=generator, device=dev)
                with torch.autocast(dev.type, enabled=False):  # bf16 would round the scores
                    state["u"] = torch.special.ndtr(z @ lt)[..., None]
                state["i"] = 0
            state["i"] += 1
            return state["u"][state["i"] - 1]

        return draw

    def innovation_uniforms(self, batch: int, generator: torch.Generator | None = None
                            ) -> torch.Tensor:
        """Uniform numbers (batch, C, 1) for one step's draws, one per channel, dependent
        through a Gaussian copula with the VAR errors' correlation: ``Phi(L z)``, ``z`` standard
        normal, ``L L' `` the correlation (independent uniforms for a model without one).
        float32, also under autocast. For :func:`~ephys_gpt.layers.sampling.sample_logits`."""
        if not self.config.linear_order:
            raise ValueError(f"{type(self).__name__}: innovation_uniforms needs a linear "
                             "forecast (linear_order > 0)")
        return self.linear_uniforms(batch, chunk=1)(generator)

    @torch.no_grad()
    def _build_logprior_table(self) -> None:
        """Tabulate each token's log-probability under the VAR's Gaussian forecast N(m,
        s_c^2), the exact mass of its mu-law bin (edges half a code step from each token's
        value; the end tokens take everything beyond), for forecasts m on a grid of step s_c
        / 8 spanning the tokens' range +- 6 s_c (at most :data:`LOGPRIOR_GRID_MAX` points),
        floored at :data:`LOGPRIOR_FLOOR`. :meth:`linear_logprior` interpolates it linearly
        (error ~1e-3 nats). Derived from ``token_values`` (whose last column is each
        channel's mu-law scale) and ``var_inv_var``; all zeros before a VAR is set."""
        from ephys_gpt.codec import mulaw_bin_edges, normal_log_mass

        C, V = self.config.num_channels, self.config.vocab_size
        dev = self.token_values.device
        scale = self.token_values[:, -1].double()
        if not bool((scale > 0).all()):  # no VAR set yet: the forecast adds nothing
            self.logprior_table = torch.zeros(C, 2, V, device=dev)
            self.logprior_grid = torch.tensor([[0.0, 1.0]] * C, device=dev)
            return
        std = self.var_inv_var.double().rsqrt()
        edges = mulaw_bin_edges(V.bit_length() - 1, scale)  # (C, V + 1)
        lo, hi = -scale - 6 * std, scale + 6 * std
        G = int(min(LOGPRIOR_GRID_MAX, math.ceil(float(((hi - lo) / (std / 8)).max())) + 1))
        step = (hi - lo) / (G - 1)
        grid = lo[:, None] + step[:, None] * torch.arange(G, dtype=torch.float64, device=dev)
        table = torch.empty(C, G, V, device=dev)
        for c0 in range(0, C, 8):  # (8, G, V + 1) float64 at a time
            z = (edges[c0:c0 + 8, None] - grid[c0:c0 + 8, :, None]) / std[c0:c0 + 8, None, None]
            table[c0:c0 + 8] = normal_log_mass(z[..., :-1], z[..., 1:]).clamp_min(
                LOGPRIOR_FLOOR)
        self.logprior_table = table
        self.logprior_grid = torch.stack([lo, step], 1).float()

    def linear_prediction(self, x: torch.Tensor) -> torch.Tensor:
        """The VAR's forecast of the next value for every step of tokens ``x`` (B, C, T) →
        (B, C, T) normalized values (``[..., t]`` predicts step ``t + 1``; lags before the
        window at the VAR's mean). float32, outside autocast, no gradient."""
        p = self.config.linear_order
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            v = self.token_values.flatten()[x + self.token_offsets[:, None]]  # (B, C, T)
            v = torch.cat([self.var_mean[None, :, None].expand(x.shape[0], -1, p - 1), v], -1)
            # conv tap j multiplies the value at t - (p - 1) + j: lag l = p - j
            return F.conv1d(v, self.var_coef.flip(0).permute(1, 2, 0), self.var_intercept)

    def linear_logprior(self, pred: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of each token under the VAR's Gaussian forecast ``pred`` (..., C)
        or (B, C, T): each token's bin mass (exact on a grid of forecasts, linearly
        interpolated between; :meth:`_build_logprior_table`), floored at
        :data:`LOGPRIOR_FLOOR` nats. → (..., C, V) or (B, C, T, V), float32.

        Why the floor: tokens many standard deviations away would get log-probabilities in
        the hundreds below zero, their softmax probabilities underflow into subnormal floats,
        and subnormal arithmetic is slow on CPUs: it made a training step's backward pass 4x
        slower (188 vs 44 ms at WavenetFullChannel's example config). A floor of -40 (a
        probability of 4e-18) changes no sample and no loss that matters."""
        C = self.config.num_channels
        table, grid = self.logprior_table, self.logprior_grid
        G = table.shape[1]
        ch = torch.arange(C, device=pred.device)
        if pred.dim() == 3:  # (B, C, T): channels on dim 1
            grid, ch = grid[:, None], ch[:, None]
        u = ((pred.float() - grid[..., 0]) / grid[..., 1]).clamp_(0, G - 1.001)
        i = u.floor()
        rows = (ch * G + i.long()).clamp_(max=C * G - 2)
        flat = table.view(C * G, -1)
        return torch.lerp(flat[rows], flat[rows + 1], (u - i)[..., None])

    def with_linear_forecast(self, logits: torch.Tensor, x: torch.Tensor,
                             last_only: bool = False) -> torch.Tensor:
        """``logits`` (B, C, T, V) for tokens ``x`` (B, C, T) plus the VAR forecast's token
        log-probabilities (float32); ``last_only``: the logits are those of ``x``'s last
        step only, (B, C, 1, V). Unchanged without a linear forecast."""
        if not self.config.linear_order:
            return logits
        pred = self.linear_prediction(x)
        return logits + self.linear_logprior(pred[..., -1:] if last_only else pred)


def _independent_if_missing(module, state_dict, prefix, *args) -> None:
    """Weights saved before the errors' correlation was kept: independent draws."""
    key = prefix + "var_noise_factor"
    if key not in state_dict and prefix + "var_coef" in state_dict:
        state_dict[key] = torch.eye(module.config.num_channels)


class TokenVARStream:
    """The last p decoded values of a decoding stream and the fitted VAR's token
    log-probabilities for the next step. The values live twice in a ``(B, 2p, C)`` buffer
    (slot j and j + p), so the newest p are always one contiguous block and a step is one
    matmul. ``tokens`` (B, C, L): the stream's context (lags before it at the VAR's mean)."""

    def __init__(self, model: TokenVARForecast, tokens: torch.Tensor):
        p = model.config.linear_order
        self.model, self.p, self.i = model, p, 0
        B, C, L = tokens.shape
        vals = model.token_values.flatten()[tokens[..., -p:] + model.token_offsets[:, None]]
        last = torch.cat([model.var_mean[None, :, None].expand(B, -1, p - min(p, L)), vals],
                         -1).transpose(1, 2)  # (B, p, C), oldest first
        self.buf = torch.cat([last, last], 1).contiguous()
        # weight on the p values oldest first: row k*C + j multiplies channel j at lag p - k
        self.w = model.var_coef.flip(0).transpose(1, 2).reshape(p * C, C).contiguous()

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """Push the values of tokens ``tok`` (B, C) → log-probabilities (B, C, V), float32."""
        m, p, i = self.model, self.p, self.i
        with torch.no_grad(), torch.autocast(tok.device.type, enabled=False):
            v = m.token_values.flatten()[tok + m.token_offsets]
            self.buf[:, i] = v
            self.buf[:, i + p] = v
            self.i = i = (i + 1) % p
            pred = torch.addmm(m.var_intercept, self.buf[:, i:i + p].flatten(1), self.w)
            return m.linear_logprior(pred)

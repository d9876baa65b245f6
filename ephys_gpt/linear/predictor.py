"""A fitted linear AR/VAR model and what an eval runner asks of it.

Shapes: B batch, C channels, T time, K inputs per lag (C, or the principal components of a
reduced VAR), p the order. Everything runs in torch (float64 internally, on the input's
device); numpy in gives numpy out.

- :meth:`LinearPredictor.predict_next`: teacher-forced 1-step predictions over a window,
  aligned like a model's output on ``x[:, :-1]``: ``out[..., t]`` predicts ``x[..., t+1]``
  from ``x[..., :t+1]``. The first ``p - 1`` positions have fewer than ``p`` samples of
  history; their missing lags are filled with the training mean (``warmup="mean"``, so every
  position gets a prediction, as a model's does) or they are NaN (``warmup="nan"``).
  ``valid_from`` is the first position with a full history.
- :meth:`LinearPredictor.forecast`: N-step recursive forecasts from a context (the
  conditional mean; predictions are fed back as inputs), optionally with innovations.
- :meth:`LinearPredictor.simulate`: free-running simulation driven by Gaussian innovations
  with the fitted residual covariance (``noise_cov``): a linear reference for the PSD and
  channel covariance of generated signals. A per-channel AR has independent channels
  (diagonal ``noise_cov``); a VAR reproduces the cross-channel structure.
- ``*_tokens``: the same in the token domain: tokens are decoded through each row's recorded
  ``mulaw_quantize`` step, predicted in normalized units and re-quantized through the same
  step (:mod:`ephys_gpt.linear.data`).
- :meth:`LinearPredictor.token_scores`: the 1-step Gaussian forecast as a distribution over
  tokens (each token's bin mass): its NLL of the actual tokens and its most probable token.
  :meth:`LinearPredictor.forecast_token_scores`: the same for the k-step forecasts after a
  context, whose Gaussian has the k-step error variance (:meth:`LinearPredictor.forecast_std`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ephys_gpt.codec import normal_log_mass
from ephys_gpt.linear.data import decode_tokens, requantize, token_bin_edges

Array = Any  # np.ndarray | torch.Tensor


def _owned(a: Any) -> np.ndarray:
    """A float64 C-ordered copy (positive strides, as torch needs; no aliasing of the
    caller's arrays)."""
    return np.array(a, dtype=np.float64, order="C", copy=True)


def psd_factor(m: torch.Tensor) -> torch.Tensor:
    """A matrix L with L L' = ``m``, a covariance or correlation matrix: its lower Cholesky
    factor, or an eigen square root (not triangular) when ``m`` is only semi-definite, e.g.
    of collinear channels."""
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        return chol
    w, v = torch.linalg.eigh(m)
    return v * w.clamp_min(0).sqrt()[None, :]


@dataclass
class LinearPredictor:
    """A fitted per-channel AR(p) or VAR(p) (see ``fitting.py`` for the model equations).

    Attributes
    ----------
    kind : "ar" or "var"
    coef : array
        AR: (p, C), ``coef[l-1, c]`` multiplies ``x[c, t-l+1]``; VAR: (p, C, K),
        ``coef[l-1]`` multiplies ``z[:, t-l+1]`` with ``z = projection @ x``.
    intercept : (C,)
    noise_cov : (C, C)
        Covariance of the 1-step residuals on the training rows (maximum likelihood, divided
        by the number of rows); diagonal for AR.
    mean : (C,)
        Training mean of the targets: fills the lags missing before a window's start.
    projection : (K, C) or None
        VAR inputs on principal components (None: all channels).
    """

    kind: str
    coef: np.ndarray
    intercept: np.ndarray
    noise_cov: np.ndarray
    mean: np.ndarray
    projection: np.ndarray | None = None
    ridge: float = 0.0
    n_rows: int = 0
    selection: dict | None = None
    explained_variance: float | None = None
    fit_seconds: float | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in ("ar", "var"):
            raise ValueError(f"kind must be 'ar' or 'var', got {self.kind!r}")
        self.coef = _owned(self.coef)
        C = np.asarray(self.intercept).shape[0]
        want = 2 if self.kind == "ar" else 3
        if self.coef.ndim != want or self.coef.shape[0] < 1 or self.coef.shape[1] != C:
            raise ValueError(f"{self.kind} coef must be {'(p, C)' if want == 2 else '(p, C, K)'}"
                             f" with C = {C} (the intercept's length), got {self.coef.shape}")
        K = self.coef.shape[2] if want == 3 else C
        if self.projection is not None:
            self.projection = _owned(self.projection)
            if self.projection.shape != (K, C):
                raise ValueError(f"projection must be (K, C) = ({K}, {C}), got "
                                 f"{self.projection.shape}")
        elif K != C:
            raise ValueError(f"coef acts on {K} inputs but there are {C} channels and no "
                             "projection")
        self.intercept = _owned(self.intercept)
        self.mean = _owned(self.mean)
        self.noise_cov = _owned(self.noise_cov)
        if self.mean.shape != (C,) or self.noise_cov.shape != (C, C):
            raise ValueError(f"mean must be ({C},) and noise_cov ({C}, {C}); got "
                             f"{self.mean.shape} and {self.noise_cov.shape}")

    # -- description -----------------------------------------------------------------------
    @property
    def order(self) -> int:
        return int(self.coef.shape[0])

    @property
    def n_channels(self) -> int:
        return int(self.intercept.shape[0])

    @property
    def valid_from(self) -> int:
        """First position of :meth:`predict_next` whose prediction has a full history."""
        return self.order - 1

    @property
    def name(self) -> str:
        """``AR(p)``, ``VAR(p)``, or ``VAR(p, K PCs)``: the label of curves and tables."""
        if self.kind == "ar":
            return f"AR({self.order})"
        if self.projection is not None:
            return f"VAR({self.order}, {self.projection.shape[0]} PCs)"
        return f"VAR({self.order})"

    def summary(self) -> dict:
        """A JSON-ready description (no arrays): for an eval's ``summary.json``."""
        return {"name": self.name, "kind": self.kind, "order": self.order,
                "n_channels": self.n_channels,
                "n_components": None if self.projection is None else
                int(self.projection.shape[0]),
                "explained_variance": self.explained_variance, "ridge": self.ridge,
                "n_train_rows": self.n_rows, "fit_seconds": self.fit_seconds,
                "innovation_std_mean": float(np.sqrt(np.diag(self.noise_cov)).mean()),
                "selection": self.selection}

    def spectral_radius(self) -> float:
        """Largest modulus of the companion matrix's eigenvalues (< 1: stable process).

        Costs an eigen-decomposition of a (p·K)² matrix: seconds up to a few thousand.
        """
        p, C = self.order, self.n_channels
        if self.kind == "ar":
            return float(max(np.abs(np.roots(np.r_[1.0, -self.coef[:, c]])).max(initial=0.0)
                             for c in range(C)))
        # dynamics of z = P x: z[t+1] = sum_l (P A_l) z[t-l+1] (+ P b)
        a = self.coef if self.projection is None else np.einsum(
            "kc,lcj->lkj", self.projection, self.coef)
        K = a.shape[1]
        comp = np.zeros((p * K, p * K))
        comp[:K] = a.transpose(1, 0, 2).reshape(K, p * K)
        comp[K:, :-K] = np.eye((p - 1) * K)
        return float(np.abs(np.linalg.eigvals(comp)).max())

    def channel_coefficients(self) -> np.ndarray:
        """The coefficients on the channels themselves: (p, C, C), ``[l - 1]`` multiplying
        ``x[:, t - l + 1]`` (a VAR on principal components mapped back through its
        projection; an AR as diagonal matrices). With :attr:`intercept`, the prediction is
        ``intercept + sum_l coef[l - 1] @ x[:, t - l + 1]``."""
        if self.kind == "ar":
            return np.stack([np.diag(c) for c in self.coef])
        if self.projection is None:
            return self.coef.copy()
        return np.einsum("lck,kj->lcj", self.coef, self.projection)

    # -- torch parameters --------------------------------------------------------------------
    def _params(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            t = {k: torch.as_tensor(v, dtype=torch.float64, device=device)
                 for k, v in (("coef", self.coef), ("intercept", self.intercept),
                              ("mean", self.mean), ("noise_cov", self.noise_cov))}
            t["proj"] = (None if self.projection is None else
                         torch.as_tensor(self.projection, dtype=torch.float64, device=device))
            t["zmean"] = t["mean"] if t["proj"] is None else t["proj"] @ t["mean"]
            self._cache[key] = t
        return self._cache[key]

    def _inputs(self, x: torch.Tensor, P: dict) -> torch.Tensor:
        """The per-lag inputs ``z`` (B, K, T) of signals ``x`` (B, C, T)."""
        return x if self.kind == "ar" or P["proj"] is None else \
            torch.einsum("kc,bct->bkt", P["proj"], x)

    # -- prediction ---------------------------------------------------------------------------
    def predict_next(self, x: Array, warmup: str = "mean") -> Array:
        """Teacher-forced 1-step predictions: (B, C, T) or (C, T) → the same shape.

        ``out[..., t]`` predicts ``x[..., t+1]`` from ``x[..., :t+1]`` (compare with
        ``x[..., 1:]`` after dropping the last position, like a model's output on
        ``x[..., :-1]``). Positions ``t < p - 1`` fill their missing lags with the training
        mean (``warmup="mean"``) or are NaN (``warmup="nan"``).
        """
        if warmup not in ("mean", "nan"):
            raise ValueError(f"warmup must be 'mean' or 'nan', got {warmup!r}")
        xt, back = self._as_batch(x, "x")
        P = self._params(xt.device)
        B, C, T = xt.shape
        p = self.order
        z = self._inputs(xt, P)  # (B, K, T)
        pad = P["zmean"][None, :, None].expand(B, -1, p - 1)
        zp = torch.cat([pad, z], dim=-1)  # (B, K, T + p - 1): zp[..., t + p - 1] = z[..., t]
        out = P["intercept"][None, :, None].expand(B, C, T).clone()
        for lag in range(1, p + 1):
            zl = zp[..., p - lag:p - lag + T]  # z[..., t - lag + 1]
            if self.kind == "ar":
                out += P["coef"][lag - 1][None, :, None] * zl
            else:
                out += torch.einsum("ck,bkt->bct", P["coef"][lag - 1], zl)
        if warmup == "nan":
            out[..., :p - 1] = float("nan")
        return back(out)

    def forecast(self, context: Array, steps: int, *, innovations: bool = False,
                 generator: torch.Generator | None = None) -> Array:
        """The ``steps`` samples after ``context`` (B, C, Tc) → (B, C, steps).

        Recursive: each prediction becomes an input of the next. Without innovations this is
        the conditional-mean forecast (the 1-step-optimal linear predictor iterated); with
        ``innovations`` each step adds a draw from N(0, ``noise_cov``) (a simulation that
        continues the context). A context shorter than ``p`` is padded with the mean.
        """
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        xt, back = self._as_batch(context, "context")
        P = self._params(xt.device)
        B, C, _ = xt.shape
        p, n = self.order, int(steps)
        z = self._inputs(xt[..., -p:], P)
        K = z.shape[1]
        # inputs oldest first in one buffer: step i reads buf[..., i:i + p], writes i + p
        buf = torch.empty((B, K, p + n), dtype=torch.float64, device=xt.device)
        buf[..., p - z.shape[-1]:p] = z
        buf[..., :p - z.shape[-1]] = P["zmean"][None, :, None]  # short context: mean fill
        drive = P["intercept"].expand(B, n, C).clone()  # (B, n, C)
        if innovations:
            e = torch.randn((B, n, C), dtype=torch.float64, device=xt.device,
                            generator=generator)
            drive += e @ self._noise_factor(P).T
        w = P["coef"].flip(0)  # [j] multiplies input j = lag p - j
        out = torch.empty((B, n, C), dtype=torch.float64, device=xt.device)
        proj = P["proj"] if self.kind == "var" else None
        for i in range(n):
            win = buf[..., i:i + p]  # (B, K, p)
            if self.kind == "ar":
                y = (win * w.T).sum(-1)
            else:
                y = torch.einsum("bkj,jck->bc", win, w)
            y += drive[:, i]
            out[:, i] = y
            buf[..., p + i] = y if proj is None else y @ proj.T
        out = out.transpose(1, 2)  # (B, C, n)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"{self.name}: the forecast diverged (non-finite values); "
                                     f"spectral_radius() = {self.spectral_radius():.4f} "
                                     "(>= 1: unstable fit; raise ridge or lower the order)")
        return back(out)

    def simulate(self, steps: int, *, batch: int = 1, context: Array | None = None,
                 burn_in: int | None = None, generator: torch.Generator | None = None,
                 device: str | torch.device = "cpu") -> Array:
        """Free-running simulation with Gaussian innovations N(0, ``noise_cov``): (B, C, steps).

        From ``context`` (B, C, Tc) when given (the continuation of held-out data, like a
        model's free-running generation), else from the mean after ``burn_in`` discarded
        samples (default ``20 * p``) so the output is a draw from the stationary process.
        """
        if context is None:
            burn = 20 * self.order if burn_in is None else int(burn_in)
            start = torch.as_tensor(self.mean, dtype=torch.float64,
                                    device=torch.device(device))[None, :, None]
            start = start.expand(int(batch), -1, 1)
            if burn <= 0:
                return self.forecast(start, steps, innovations=True, generator=generator)
            out = self.forecast(start, burn + int(steps), innovations=True, generator=generator)
            return out[..., burn:]
        return self.forecast(context, steps, innovations=True, generator=generator)

    def forecast_std(self, steps: int) -> np.ndarray:
        """(steps, C): the standard deviation of each channel's k-step forecast error, k = 1 ..
        ``steps``, if the fitted model is the process: the innovations of ``noise_cov``
        propagated through the dynamics, ``Var_k = sum_{j<k} diag(Psi_j noise_cov Psi_j')``
        with ``Psi_0 = I`` and ``Psi_j = sum_{l=1..min(j,p)} A_l Psi_{j-l}`` (``A_l``:
        :meth:`channel_coefficients`; per channel, scalars, for an AR). Row 0 is the 1-step
        innovation std. A (C, C) matrix product per lag and step for a VAR (0.15 s for a
        VAR(30) of 306 channels and 20 steps on a 2-core CPU); cached per ``steps``."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        key = ("forecast_std", int(steps))
        if key in self._cache:
            return self._cache[key]
        n, p, C = int(steps), self.order, self.n_channels
        if self.kind == "ar":
            psi = np.zeros((n, C))
            psi[0] = 1.0
            for j in range(1, n):
                for lag in range(1, min(j, p) + 1):
                    psi[j] += self.coef[lag - 1] * psi[j - lag]
            var = np.cumsum(psi ** 2, 0) * np.diag(self.noise_cov)[None, :]
        else:
            a = torch.as_tensor(self.channel_coefficients())
            factor = psd_factor(torch.as_tensor(self.noise_cov))
            psi = [torch.eye(C, dtype=torch.float64)]
            var = torch.zeros(n, C, dtype=torch.float64)
            var[0] = (factor ** 2).sum(1)
            for j in range(1, n):
                psi.append(sum(a[lag - 1] @ psi[j - lag] for lag in range(1, min(j, p) + 1)))
                var[j] = var[j - 1] + ((psi[j] @ factor) ** 2).sum(1)
            var = var.numpy()
        self._cache[key] = out = np.sqrt(np.maximum(var, 0.0))
        return out

    def _noise_factor(self, P: dict) -> torch.Tensor:
        """A matrix L with L L' = noise_cov (:func:`psd_factor`)."""
        return psd_factor(P["noise_cov"])

    def _as_batch(self, x: Array, what: str):
        """(B, C, T) float64 torch tensor, and a function restoring the input's kind/shape."""
        is_np = not isinstance(x, torch.Tensor)
        t = torch.as_tensor(np.asarray(x)) if is_np else x
        if t.ndim not in (2, 3):
            raise ValueError(f"{what} must be (C, T) or (B, C, T), got shape {tuple(t.shape)}")
        if t.shape[-2] != self.n_channels:
            raise ValueError(f"{what} has {t.shape[-2]} channels; {self.name} was fitted on "
                             f"{self.n_channels}")
        if t.shape[-1] < 1:
            raise ValueError(f"{what} has no samples")
        if t.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise ValueError(f"{what} must be real-valued, got {t.dtype}")
        squeeze = t.ndim == 2
        dtype = t.dtype if t.is_floating_point() else torch.float32
        t = (t[None] if squeeze else t).to(torch.float64)

        def back(out: torch.Tensor):
            out = out.to(dtype)
            out = out[0] if squeeze else out
            return out.cpu().numpy() if is_np else out

        return t, back

    # -- token domain -------------------------------------------------------------------------
    def predict_next_tokens(self, tokens: Array, steps: Sequence) -> Array:
        """:meth:`predict_next` for tokens (B, C, T): decoded through each row's recorded
        ``mulaw_quantize`` step (``steps``: one list, or one per row), predicted, and
        re-quantized through the same step (warm-up positions use the mean fill)."""
        return requantize(self.predict_next(decode_tokens(tokens, steps)), steps)

    def token_scores(self, tokens: Array, targets: Array, steps: Sequence,
                     chunk_elements: int = 1 << 22
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 1-step forecast as a distribution over tokens: the Gaussian N(``predict_next``,
        ``noise_cov[c, c]``) of each channel's next value, given to each token as the mass of
        its mu-law bin (:func:`~ephys_gpt.linear.data.token_bin_edges`; exact, from the normal
        CDF in float64). Returns, for ``tokens`` (B, C, T) and the ``targets`` (B, C, T) they
        predict, the negative log-probability of each target (nats, float32) and the most
        probable token (int64), which is not always the bin holding the mean: wider mu-law
        bins hold more mass; third, the mean re-quantized (:meth:`predict_next_tokens`, from
        the same prediction). Computed in chunks of about ``chunk_elements`` token masses."""
        tokens, targets = torch.as_tensor(tokens), torch.as_tensor(targets)
        if tokens.dim() != 3:
            raise ValueError(f"token_scores expects tokens (B, C, T), got shape "
                             f"{tuple(tokens.shape)}")
        if targets.shape != tokens.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must match tokens "
                             f"{tuple(tokens.shape)}")
        mean = torch.as_tensor(self.predict_next(decode_tokens(tokens, steps)))
        sd = torch.as_tensor(np.sqrt(np.diag(self.noise_cov)))[:, None]  # (C, 1)
        nll, mode = self._token_distribution(mean.double(), sd, steps, targets, chunk_elements)
        return nll, mode, requantize(mean, steps)

    def forecast_token_scores(self, context: Array, steps: Sequence, n_steps: int,
                              targets: Array | None = None, chunk_elements: int = 1 << 22
                              ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """:meth:`token_scores` for the ``n_steps`` forecasts after a token ``context`` (B, C,
        Tc): the k-step forecast of each channel is the Gaussian N(:meth:`forecast`'s k-th
        value, :meth:`forecast_std`'s k-th value squared), each token given the mass of its
        mu-law bin. Returns (B, C, n_steps): the NLL (nats) of ``targets`` (None without
        them), the most probable token, and the mean forecast re-quantized
        (:meth:`forecast_tokens`). With ``n_steps=1`` this is :meth:`token_scores` at the
        context's last position."""
        context = torch.as_tensor(context)
        if context.dim() != 3:
            raise ValueError(f"forecast_token_scores expects a context (B, C, T), got shape "
                             f"{tuple(context.shape)}")
        if targets is not None:
            targets = torch.as_tensor(targets)
            want = (*context.shape[:2], n_steps)
            if tuple(targets.shape) != want:
                raise ValueError(f"targets {tuple(targets.shape)} must be (B, C, n_steps) = "
                                 f"{want}")
        mean = torch.as_tensor(self.forecast(decode_tokens(context, steps), n_steps))
        sd = torch.as_tensor(self.forecast_std(n_steps).T)  # (C, n_steps)
        nll, mode = self._token_distribution(mean.double(), sd, steps, targets, chunk_elements)
        return nll, mode, requantize(mean, steps)

    def _token_distribution(self, mean: torch.Tensor, sd: torch.Tensor, steps: Sequence,
                            targets: torch.Tensor | None, chunk_elements: int
                            ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Gaussians N(``mean`` (B, C, T), ``sd`` (C, T or 1)²) over the mu-law bins of each
        row's ``steps``: the NLL of ``targets`` (float32; None without them) and the most
        probable token, (B, C, T) each."""
        B, C, T = mean.shape
        lo, hi = token_bin_edges(steps, B, C)  # (B, C, V)
        lo, hi = lo.to(mean.device)[:, :, None], hi.to(mean.device)[:, :, None]
        sd = sd.to(mean.device, torch.float64).clamp_min(1e-12)[None, :, :, None]
        nll = None if targets is None else torch.empty(B, C, T, dtype=torch.float32,
                                                       device=mean.device)
        mode = torch.empty(B, C, T, dtype=torch.long, device=mean.device)
        step = max(1, chunk_elements // max(1, B * C * lo.shape[-1]))
        for t0 in range(0, T, step):
            mu = mean[..., t0:t0 + step, None]
            s = sd[:, :, t0:t0 + step] if sd.shape[2] > 1 else sd
            logp = normal_log_mass((lo - mu) / s, (hi - mu) / s)  # (B, C, t, V)
            if nll is not None:
                tgt = targets[..., t0:t0 + step].to(mean.device)
                nll[..., t0:t0 + step] = -logp.gather(-1, tgt[..., None])[..., 0]
            mode[..., t0:t0 + step] = logp.argmax(-1)
        return nll, mode

    def forecast_tokens(self, context: Array, steps: Sequence, n_steps: int, **kw) -> Array:
        """:meth:`forecast` for token contexts (B, C, Tc) → tokens (B, C, n_steps); the
        recursion runs on the unquantized predictions, each output is re-quantized."""
        return requantize(self.forecast(decode_tokens(context, steps), n_steps, **kw), steps)

    def simulate_tokens(self, steps: Sequence, n_steps: int, *, context: Array | None = None,
                        **kw) -> Array:
        """:meth:`simulate` re-quantized to tokens (B, C, n_steps)."""
        ctx = None if context is None else decode_tokens(context, steps)
        if ctx is None:
            kw.setdefault("device", "cpu")
            out = self.simulate(n_steps, context=None, **kw).to(torch.float32)
        else:
            out = self.simulate(n_steps, context=ctx, **kw)
        return requantize(out, steps)

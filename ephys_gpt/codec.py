"""The codec of the recorded stage-2 steps: normalization, clipping and mu-law quantization,
fitted (:func:`fit_steps`), applied, recorded (:func:`mulaw_step`) and inverted
(:func:`invert_steps`) in one place.

Every transform works on numpy arrays and torch tensors alike (channels first, time last:
``(..., C, T)``), so the same code quantizes in stage 2, on the fly in datasets, and decodes
model tokens back to signal units in evaluation. This module sits at the bottom of the
package: it imports nothing from ``ephys_gpt``.

Each stage-2 step is recorded in the chunk store's ``meta.json`` as a dict with a ``name`` and
its parameters (see :func:`invert_steps`):

- ``{"name": "normalize", "method": "robust"|"zscore", "center": [C], "scale": [C]}``:
  ``y = (x - center) / scale`` per channel.
- ``{"name": "clip", "std_factor": s, "low": [C], "high": [C]}``: ``y = clip(x, low, high)``.
  Not invertible; values inside the bounds pass unchanged.
- ``{"name": "mulaw_quantize", "n_bits": n, "mu": 2**n - 1, "scale": a}``: ``x / a`` (clipped
  to [-1, 1]) is mu-law companded and rounded to an integer token in ``[0, mu]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Array = Any  # np.ndarray | torch.Tensor


def _is_torch(x: Array) -> bool:
    return isinstance(x, torch.Tensor)


def _as_param(p: Any, like: Array) -> Array:
    """Per-channel parameter ([C] list) as an array broadcastable against ``(..., C, T)``."""
    if _is_torch(like):
        t = torch.as_tensor(p, dtype=like.dtype if like.is_floating_point() else torch.float32,
                            device=like.device)
    else:
        t = np.asarray(p, dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)
    return t[..., None] if t.ndim == 1 else t


def mulaw_mu(n_bits: int) -> int:
    """The mu of an ``n_bits`` quantizer: tokens take values ``0 .. mu``."""
    if not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"n_bits must be an integer in [1, 16], got {n_bits!r}")
    return 2**n_bits - 1


def mulaw_encode(x: Array, mu: int) -> Array:
    """Compand ``x`` in [-1, 1] (values beyond are clipped) to [-1, 1]."""
    if _is_torch(x):
        x = x.clamp(-1.0, 1.0)
        return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)
    x = np.clip(x, -1.0, 1.0)
    return np.sign(x) * np.log1p(mu * np.abs(x)) / math.log1p(mu)


def mulaw_decode(y: Array, mu: int) -> Array:
    """Inverse of :func:`mulaw_encode`."""
    if _is_torch(y):
        return torch.sign(y) * torch.expm1(y.abs() * math.log1p(mu)) / mu
    return np.sign(y) * np.expm1(np.abs(y) * math.log1p(mu)) / mu


def token_dtype(n_bits: int):
    """Smallest numpy integer dtype that holds ``n_bits`` tokens (stored on disk)."""
    return np.uint8 if n_bits <= 8 else np.int16 if n_bits <= 15 else np.int32


def mulaw_quantize(x: Array, n_bits: int = 8, scale: float | Array = 1.0) -> Array:
    """Quantize ``x`` to integer tokens in ``[0, 2**n_bits - 1]``.

    ``x / scale`` is clipped to [-1, 1] (values beyond the range saturate at the end tokens;
    they never wrap around), companded and rounded. numpy input gives a compact integer
    dtype (:func:`token_dtype`); torch input gives int64.
    """
    mu = mulaw_mu(n_bits)
    scale = _as_param(scale, x) if np.ndim(scale) else scale
    y = mulaw_encode(x / scale, mu)
    q = (y + 1.0) * (mu / 2.0)
    if _is_torch(q):
        return torch.round(q).clamp_(0, mu).long()
    return np.clip(np.rint(q), 0, mu).astype(token_dtype(n_bits))


def mulaw_dequantize(tokens: Array, n_bits: int = 8, scale: float | Array = 1.0) -> Array:
    """Map tokens back to signal values (float32); inverse of :func:`mulaw_quantize`."""
    mu = mulaw_mu(n_bits)
    if _is_torch(tokens):
        y = tokens.to(torch.float32) * (2.0 / mu) - 1.0
    else:
        y = np.asarray(tokens, dtype=np.float32) * np.float32(2.0 / mu) - np.float32(1.0)
    x = mulaw_decode(y, mu)
    scale = _as_param(scale, x) if np.ndim(scale) else scale
    return x * scale


def mulaw_bin_edges(n_bits: int, scale: float | Array = 1.0) -> torch.Tensor:
    """The values each token stands for: edges ``(V + 1,)``, or ``(C, V + 1)`` for a
    per-channel ``scale``, float64 (on ``scale``'s device when it is a tensor). Token ``k``
    takes the values between edges ``k`` and ``k + 1``, half a companded code step either
    side of its value (:func:`mulaw_quantize` rounds the code; a value exactly on an edge goes
    to either neighbour); the end tokens take everything beyond the range (``-inf`` and
    ``+inf`` ends)."""
    mu = mulaw_mu(n_bits)
    scale = torch.as_tensor(scale, dtype=torch.float64)
    k = torch.arange(mu + 2, dtype=torch.float64) - 0.5
    edges = mulaw_dequantize(k.clamp(0, mu), n_bits, 1.0).double().to(scale.device)
    edges = edges * scale[..., None]
    edges[..., 0], edges[..., -1] = -math.inf, math.inf
    return edges


def normal_log_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b`` (standard normal CDF), accurate far in either
    tail: an interval above zero is mirrored below it, where ``log_ndtr`` keeps precision.
    With ``a`` and ``b`` a token's bin edges in standard units around a Gaussian's mean, it
    is the token's log-probability under that Gaussian (the linear baselines' token scores,
    ``ephys_gpt.linear``, and WavenetFullChannel's linear forecast)."""
    upper = a > 0
    lo, hi = torch.where(upper, -b, a), torch.where(upper, -a, b)
    lhi = torch.special.log_ndtr(hi)
    return lhi + torch.log1p(-torch.exp(torch.special.log_ndtr(lo) - lhi))


def normalize_stats(x: np.ndarray, method: str = "robust") -> tuple[np.ndarray, np.ndarray]:
    """Per-channel center and scale of ``x`` (C, T).

    ``robust``: median and interquartile range / 1.349 (the IQR of a unit normal), so that
    Gaussian data gets unit scale. ``zscore``: mean and standard deviation. A flat channel
    gets scale 1 rather than a division by zero.
    """
    if method == "robust":
        q25, med, q75 = np.percentile(x, [25, 50, 75], axis=-1)
        center, scale = med, (q75 - q25) / 1.349
    elif method == "zscore":
        center, scale = x.mean(axis=-1), x.std(axis=-1)
    else:
        raise ValueError(f"normalize method must be 'robust' or 'zscore', got {method!r}")
    scale = np.where(scale > 0, scale, 1.0)
    return center.astype(np.float64), scale.astype(np.float64)


def invert_steps(x: Array, steps: Sequence[dict]) -> Array:
    """Undo recorded stage-2 ``steps`` (in reverse order) to return to stage-1 units.

    ``x`` may be tokens (when the last step is ``mulaw_quantize``) or continuous values.
    Clipping cannot be undone; clipped samples stay at their bounds.
    """
    for step in reversed(list(steps)):
        name = step.get("name")
        if name == "mulaw_quantize":
            x = mulaw_dequantize(x, int(step["n_bits"]), step.get("scale", 1.0))
        elif name == "normalize":
            x = x * _as_param(step["scale"], x) + _as_param(step["center"], x)
        elif name == "clip":
            continue
        else:
            raise ValueError(f"cannot invert unknown stage-2 step {name!r}; "
                             "known steps: normalize, clip, mulaw_quantize")
    return x


def tokens_to_signal(tokens: Array, steps: Sequence[dict]) -> Array:
    """Decode model tokens to stage-1 signal units (e.g. tesla) through the recorded steps."""
    return invert_steps(tokens, steps)


def mulaw_step(n_bits: int, scale: float | Sequence[float], scale_from: str = "config",
               **extra: Any) -> dict[str, Any]:
    """The record of a ``mulaw_quantize`` step. ``scale_from`` says where the scale came from:
    ``config`` (a setting, compared between datasets), ``clip`` or ``data`` (a per-session
    statistic, see :mod:`ephys_gpt.compatibility`)."""
    return {"name": "mulaw_quantize", "n_bits": int(n_bits), "mu": mulaw_mu(int(n_bits)),
            "scale": scale, "scale_from": scale_from, **extra}


def fit_steps(x: np.ndarray, good: np.ndarray, steps: dict[str, dict],
                ch_types: Sequence[str] | None = None
                ) -> tuple[np.ndarray, list[dict], Callable[[np.ndarray], np.ndarray]]:
    """Fit and apply the stage-2 steps to ``x`` (C, T) float32, in place where possible.

    Returns ``(x, recorded, finish)``: ``normalize`` and ``clip`` are applied to ``x``;
    ``mulaw_quantize`` (always last) is fitted here but applied by ``finish`` one chunk at a
    time (cheaper on memory and cache than a whole-session pass). ``recorded`` lists the steps
    with their fitted statistics, in the format of this module.
    ``good`` (T,) selects the samples that statistics come from. A flat (constant) channel
    is normalized with the median scale of its channel type (``ch_types``), so that it stays
    at the signal level of its neighbours instead of getting a scale of 1 in physical units.
    """
    recorded: list[dict] = []
    finish: Callable[[np.ndarray], np.ndarray] = _identity
    all_good = bool(good.all())
    for name, params in steps.items():
        sample = x if all_good else x[:, good]  # (C, T_good)
        if name == "normalize":
            method = params.get("method", "robust")
            center, scale = normalize_stats(sample, method)
            scale = _fix_flat_scales(sample, scale, ch_types)
            x -= center[:, None].astype(np.float32)
            x *= (1.0 / scale)[:, None].astype(np.float32)
            recorded.append({"name": "normalize", "method": method,
                             "center": center.tolist(), "scale": scale.tolist()})
        elif name == "clip":
            s = float(params.get("std_factor", 6.0))
            mean = sample.mean(axis=1).astype(np.float64)
            std = sample.std(axis=1).astype(np.float64)
            low, high = mean - s * std, mean + s * std
            np.clip(x, low[:, None].astype(np.float32), high[:, None].astype(np.float32), out=x)
            recorded.append({"name": "clip", "std_factor": s,
                             "low": low.tolist(), "high": high.tolist()})
        elif name == "mulaw_quantize":
            n_bits = int(params.get("n_bits", 8))
            scale, scale_from = params.get("scale"), "config"
            if scale is None and recorded and recorded[-1]["name"] == "clip":
                scale, scale_from = (float(max(-min(recorded[-1]["low"]),
                                               max(recorded[-1]["high"]))), "clip")
            elif scale is None:
                scale, scale_from = (float(max(-sample.min(), sample.max()))
                                     if sample.size else 1.0), "data"
            scale = scale if scale > 0 else 1.0
            scale = float(scale)
            # scale_from: a configured scale must match between datasets, a derived one is a
            # per-session statistic (ephys_gpt/compatibility.py)
            recorded.append(mulaw_step(n_bits, scale, scale_from))

            def finish(chunk: np.ndarray, _n=n_bits, _s=scale) -> np.ndarray:
                return mulaw_quantize(chunk, _n, _s)
        else:
            raise ValueError(f"unknown stage-2 step {name!r}")
        del sample
    return x, recorded, finish


def _fix_flat_scales(sample: np.ndarray, scale: np.ndarray,
                     ch_types: Sequence[str] | None) -> np.ndarray:
    flat = sample.min(axis=1) == sample.max(axis=1)
    if not flat.any():
        return scale
    types = np.asarray(ch_types if ch_types is not None else [""] * len(scale))
    scale = scale.copy()
    for kind in np.unique(types[flat]):
        ref = ~flat & (types == kind)
        if ref.any():
            scale[flat & (types == kind)] = np.median(scale[ref])
    return scale


def _identity(chunk: np.ndarray) -> np.ndarray:
    return chunk

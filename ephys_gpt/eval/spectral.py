"""Spectral and spatial statistics for comparing generated with real signals.

Every function takes plain numpy arrays with channels before time, ``(..., C, T)``, so eval
runners for token models, continuous forecasters and diffusion models share them:

- :func:`welch_psd` — Welch power spectral density (``mne.time_frequency.psd_array_welch``).
- :func:`psd_by_channel_type` — channel-averaged PSD per channel type (``mag``, ``grad``...).
- :func:`find_peak` / :func:`alpha_peak` — spectral peak in a band (alpha: 8–13 Hz) measured
  against the aperiodic (1/f) background fitted on the band's flanks.
- :func:`psd_similarity` — log-spectral distance and correlation of two PSDs.
- :func:`channel_covariance`, :func:`channel_correlation`, :func:`matrix_similarity` —
  spatial structure and how closely two channel-by-channel matrices agree.

Legend: C channels, T time samples, F frequency bins, N segments/sequences.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

ALPHA_BAND = (8.0, 13.0)


def _check_signal(data: np.ndarray, name: str = "data", min_ndim: int = 1) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim < min_ndim:
        raise ValueError(f"{name} should have at least {min_ndim} dimension(s) (..., C, T), "
                         f"found shape {data.shape}")
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise TypeError(f"{name} should be a real numeric array, found dtype {data.dtype}")
    if not np.isfinite(data).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return data.astype(np.float64, copy=False)


def welch_psd(data: np.ndarray, sfreq: float, *, fmin: float = 0.0, fmax: float | None = None,
              seg_seconds: float = 2.0, overlap: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Welch PSD of ``data`` (..., T) along its last axis.

    Parameters
    ----------
    data : array (..., T)
        Signal(s); leading axes (e.g. sequences and channels) are kept.
    sfreq : float
        Sampling frequency in Hz.
    fmin, fmax : float
        Frequency range kept (``fmax`` defaults to Nyquist).
    seg_seconds : float
        Welch segment length in seconds (frequency resolution ``1 / seg_seconds`` Hz). It is
        shortened to the signal length when the signal is shorter.
    overlap : float
        Fraction of overlap between segments, in [0, 1).

    Returns
    -------
    freqs : array (F,)
        Frequencies in Hz.
    psd : array (..., F)
        Power spectral density in (signal unit)²/Hz.
    """
    from mne.time_frequency import psd_array_welch

    data = _check_signal(data)
    if not sfreq or sfreq <= 0:
        raise ValueError(f"sfreq must be a positive number of Hz, got {sfreq!r}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    n_times = data.shape[-1]
    if n_times < 4:
        raise ValueError(f"need at least 4 samples for a PSD, found {n_times}")
    n_per_seg = int(min(n_times, max(4, round(seg_seconds * sfreq))))
    fmax = sfreq / 2.0 if fmax is None else min(float(fmax), sfreq / 2.0)
    psd, freqs = psd_array_welch(data, sfreq, fmin=fmin, fmax=fmax, n_fft=n_per_seg,
                                 n_per_seg=n_per_seg, n_overlap=int(n_per_seg * overlap),
                                 window="hann", average="mean", verbose=False)
    return freqs, psd


def psd_by_channel_type(data: np.ndarray, sfreq: float, ch_types: Sequence[str],
                        **welch_kw) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Channel-averaged PSD per channel type.

    Parameters
    ----------
    data : array (C, T) or (N, C, T)
        Signals; with several sequences the PSD is averaged over them too.
    ch_types : list of str, length C
        Channel type of every channel (``mag``, ``grad``, ``eeg``...).

    Returns
    -------
    freqs : array (F,)
    psds : dict ``{ch_type: array (F,)}``
        Mean PSD over the channels (and sequences) of each type, in the order types first
        appear in ``ch_types``.
    """
    data = _check_signal(data, min_ndim=2)
    if data.shape[-2] != len(ch_types):
        raise ValueError(f"data has {data.shape[-2]} channels but ch_types lists "
                         f"{len(ch_types)}")
    freqs, psd = welch_psd(data, sfreq, **welch_kw)  # (..., C, F)
    psd = psd.reshape(-1, psd.shape[-2], psd.shape[-1]).mean(axis=0)  # (C, F)
    types = np.asarray(list(ch_types))
    out = {}
    for t in dict.fromkeys(ch_types):
        out[str(t)] = psd[types == t].mean(axis=0)
    return freqs, out


@dataclass(frozen=True)
class PeakInfo:
    """A spectral peak found by :func:`find_peak`.

    ``freq`` is the peak frequency in Hz (None when the band holds no local maximum),
    ``power`` the PSD there, ``ratio`` the PSD over the fitted aperiodic background at
    ``freq`` (1 = no peak), and ``detected`` whether ``ratio >= min_ratio`` at a true local
    maximum inside the band.
    """

    freq: float | None
    power: float
    ratio: float
    detected: bool
    band: tuple[float, float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["band"] = list(self.band)
        return d


def aperiodic_fit(freqs: np.ndarray, psd: np.ndarray, band: tuple[float, float],
                  flank: float = 4.0) -> np.ndarray:
    """Power-law (1/f) background under ``band``, fitted on the band's flanks.

    A straight line in log-power vs log-frequency is fitted on ``[lo - flank, lo)`` and
    ``(hi, hi + flank]``, then refitted on the bins that lie on or below the first line, so
    a neighbouring rhythm on a flank (e.g. a beta peak just above the alpha band) does not
    lift the background. Returns the background evaluated at every frequency (F,).
    """
    lo, hi = band
    mask = (((freqs >= lo - flank) & (freqs < lo)) | ((freqs > hi) & (freqs <= hi + flank)))
    mask &= (freqs > 0) & (psd > 0)
    if mask.sum() < 2:
        raise ValueError(f"too few frequency bins around the band {band} Hz to fit the "
                         f"background (frequency resolution {np.diff(freqs[:2])} Hz)")
    lf, lp = np.log10(freqs[mask]), np.log10(psd[mask])
    slope, intercept = np.polyfit(lf, lp, 1)
    below = lp <= intercept + slope * lf + 1e-12
    if below.sum() >= 2 and not below.all():
        slope, intercept = np.polyfit(lf[below], lp[below], 1)
    safe = np.where(freqs > 0, freqs, freqs[freqs > 0].min() if (freqs > 0).any() else 1.0)
    return 10.0 ** (intercept + slope * np.log10(safe))


def find_peak(freqs: np.ndarray, psd: np.ndarray, band: tuple[float, float] = ALPHA_BAND, *,
              flank: float = 4.0, min_ratio: float = 1.5) -> PeakInfo:
    """The strongest peak of a PSD (F,) inside ``band`` relative to its 1/f background.

    Candidates are the local maxima of the PSD inside the band; the one standing highest
    above the background is the peak, ``detected`` when that ratio reaches ``min_ratio``.
    A band with no local maximum (a spectrum sloping through it) has no peak (``freq`` None,
    ``ratio`` the largest PSD / background in the band).
    """
    freqs = np.asarray(freqs, dtype=np.float64)
    psd = np.asarray(psd, dtype=np.float64)
    if psd.shape != freqs.shape or psd.ndim != 1:
        raise ValueError(f"psd shape {psd.shape} does not match freqs shape {freqs.shape}; "
                         "average channels first (e.g. psd.mean(axis=0))")
    lo, hi = float(band[0]), float(band[1])
    if not lo < hi:
        raise ValueError(f"band must be (low, high) with low < high, got {band}")
    inside = np.flatnonzero((freqs >= lo) & (freqs <= hi))
    if inside.size == 0:
        raise ValueError(f"no frequency bins inside the band {band} Hz "
                         f"(frequencies {freqs.min():.2f}–{freqs.max():.2f} Hz)")
    background = aperiodic_fit(freqs, psd, (lo, hi), flank)
    ratio = psd / background
    maxima = [i for i in inside
              if 0 < i < len(psd) - 1 and psd[i] >= psd[i - 1] and psd[i] >= psd[i + 1]]
    if not maxima:
        i = inside[np.argmax(ratio[inside])]
        return PeakInfo(freq=None, power=float(psd[i]), ratio=float(ratio[i]), detected=False,
                        band=(lo, hi))
    i = max(maxima, key=lambda j: ratio[j])
    return PeakInfo(freq=float(freqs[i]), power=float(psd[i]), ratio=float(ratio[i]),
                    detected=bool(ratio[i] >= min_ratio), band=(lo, hi))


def alpha_peak(freqs: np.ndarray, psd: np.ndarray, **kw) -> PeakInfo:
    """:func:`find_peak` in the alpha band (8–13 Hz)."""
    return find_peak(freqs, psd, ALPHA_BAND, **kw)


def band_power(freqs: np.ndarray, psd: np.ndarray, band: tuple[float, float]) -> np.ndarray:
    """Power in ``band`` (integral of the PSD (..., F) over the band's bins), shape (...)."""
    freqs = np.asarray(freqs)
    mask = (freqs >= band[0]) & (freqs <= band[1])
    if not mask.any():
        raise ValueError(f"no frequency bins inside the band {band} Hz")
    df = float(np.median(np.diff(freqs))) if len(freqs) > 1 else 1.0
    return np.asarray(psd)[..., mask].sum(axis=-1) * df


def psd_similarity(psd_a: np.ndarray, psd_b: np.ndarray, freqs: np.ndarray | None = None,
                   fmin: float = 1.0, fmax: float | None = None) -> dict[str, float]:
    """How alike two PSDs (F,) are, on a log scale (the scale spectra are judged on).

    Returns ``log_spectral_distance_db`` (RMS difference of ``10·log10`` PSDs, 0 = equal) and
    ``log_psd_correlation`` (Pearson correlation of the log PSDs, 1 = same shape), over
    ``[fmin, fmax]`` Hz when ``freqs`` is given.
    """
    a = np.asarray(psd_a, dtype=np.float64)
    b = np.asarray(psd_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSD shapes differ: {a.shape} vs {b.shape}")
    mask = np.ones(a.shape, dtype=bool)
    if freqs is not None:
        freqs = np.asarray(freqs)
        mask = freqs >= fmin
        if fmax is not None:
            mask &= freqs <= fmax
    tiny = np.finfo(np.float64).tiny
    la = 10 * np.log10(np.maximum(a[mask], tiny))
    lb = 10 * np.log10(np.maximum(b[mask], tiny))
    lsd = float(np.sqrt(np.mean((la - lb) ** 2)))
    corr = _pearson(la, lb)
    return {"log_spectral_distance_db": lsd, "log_psd_correlation": corr}


def channel_covariance(data: np.ndarray) -> np.ndarray:
    """Channel covariance (C, C) of ``data`` (C, T) or (N, C, T) (sequences pooled)."""
    data = _check_signal(data, min_ndim=2)
    x = data.reshape(-1, data.shape[-2], data.shape[-1])
    x = x - x.mean(axis=-1, keepdims=True)
    n = x.shape[0] * x.shape[-1]
    if n < 2:
        raise ValueError("need at least 2 time samples for a covariance")
    return np.einsum("nct,ndt->cd", x, x) / (n - 1)


def channel_correlation(data: np.ndarray) -> np.ndarray:
    """Channel correlation (C, C); a constant channel gets zero correlation with the rest."""
    cov = channel_covariance(data)
    std = np.sqrt(np.clip(np.diag(cov), 0, None))
    safe = np.where(std > 0, std, 1.0)
    corr = cov / safe[:, None] / safe[None, :]
    corr[std == 0, :] = 0.0
    corr[:, std == 0] = 0.0
    np.fill_diagonal(corr, np.where(std > 0, 1.0, 0.0))
    return corr


def matrix_similarity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Agreement of two channel-by-channel matrices (C, C) (covariance or correlation).

    Returns ``offdiag_correlation``: Pearson correlation of the upper-triangle (off-diagonal)
    entries (1 = same spatial pattern, ~0 = unrelated) and ``relative_frobenius_error``:
    ``||a - b||_F / ||b||_F`` (0 = equal; ``b`` is the reference).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"expected two square matrices of one shape, found {a.shape} and "
                         f"{b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)
    norm_b = np.linalg.norm(b)
    return {
        "offdiag_correlation": _pearson(a[iu], b[iu]) if iu[0].size > 1 else float("nan"),
        "relative_frobenius_error": float(np.linalg.norm(a - b) / norm_b) if norm_b > 0
        else float("nan"),
    }


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    if den == 0:
        return 1.0 if np.allclose(x, y) else 0.0
    return float((x * y).sum() / den)

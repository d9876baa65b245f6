"""Paper-quality evaluation figures, each saved as ``.png`` and ``.pdf``.

Figures are built with matplotlib's object API (no global pyplot state is left behind) and
written atomically by :func:`save_figure`. Plot helpers take plain numpy arrays and labels, so
every eval runner draws the same kinds of figures:

- :func:`plot_curves` — metric vs steps / history length; model and baselines in one axes.
- :func:`plot_psd` — PSDs on a log scale with a shaded band (alpha) and marked peaks.
- :func:`plot_matrices` — channel covariance/correlation matrices side by side.
- :func:`plot_traces` — a few channels of real and generated signals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ephys_gpt.fileio import write_with

FORMATS = ("png", "pdf")

# Baselines are drawn dashed/grey-ish so a reader sees at a glance which line is the model.
_BASELINE_STYLE = {"linestyle": "--", "linewidth": 1.4, "alpha": 0.9}
_MODEL_STYLE = {"linestyle": "-", "linewidth": 2.0, "marker": "o", "markersize": 3}


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.6,
               **kw):
    """A figure (not registered with pyplot, so it needs no closing) and its axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig, path: str | os.PathLike, formats: Sequence[str] = FORMATS,
                dpi: int = 150) -> list[Path]:
    """Save ``fig`` as ``<path>.png`` and ``<path>.pdf`` (atomically) and return the paths.

    ``path`` is given without (or with) an extension; each file is written under a
    temporary name in the same folder and renamed into place.
    """
    stem = Path(path)
    if stem.suffix.lstrip(".") in FORMATS:
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        final = stem.with_name(f"{stem.name}.{fmt}")
        written.append(write_with(final, lambda tmp, f=fmt: fig.savefig(tmp, format=f, dpi=dpi)))
    return written


def _is_baseline(label: str, baselines: Sequence[str]) -> bool:
    return label in baselines


def plot_curves(x: np.ndarray, curves: Mapping[str, np.ndarray], *, xlabel: str, ylabel: str,
                title: str = "", baselines: Sequence[str] = (), ax=None,
                bands: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
                logx: bool = False):
    """Line plot of several curves over a shared ``x`` (K,).

    Parameters
    ----------
    curves : dict ``{label: array (K,)}``
        Model(s) and baselines; labels listed in ``baselines`` are drawn dashed.
    bands : dict ``{label: (low (K,), high (K,))}``, optional
        Shaded uncertainty band (e.g. ±1 standard error) around a curve.
    ax : matplotlib Axes, optional
        Draw into an existing axes; a new figure is made otherwise.

    Returns
    -------
    fig, ax
    """
    if ax is None:
        fig, axes = new_figure()
        ax = axes[0, 0]
    else:
        fig = ax.figure
    x = np.asarray(x)
    for label, y in curves.items():
        y = np.asarray(y)
        if y.shape != x.shape:
            raise ValueError(f"curve {label!r} has shape {y.shape}, x has {x.shape}")
        style = _BASELINE_STYLE if _is_baseline(label, baselines) else _MODEL_STYLE
        (line,) = ax.plot(x, y, label=label, **style)
        if bands and label in bands:
            lo, hi = bands[label]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    if logx:
        ax.set_xscale("log")
    elif np.issubdtype(x.dtype, np.integer):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    return fig, ax


def plot_psd(freqs: np.ndarray, psds: Mapping[str, np.ndarray], *, unit: str = "a.u.",
             title: str = "", band: tuple[float, float] | None = (8.0, 13.0),
             band_label: str = "alpha (8–13 Hz)", peaks: Mapping[str, float | None] | None = None,
             fmax: float | None = None, ax=None):
    """PSDs (F,) on a log power axis, with ``band`` shaded and peak frequencies marked.

    ``unit`` is the signal unit (e.g. ``"fT"``): the y axis reads ``unit²/Hz``. ``peaks``
    maps a label to its peak frequency (a vertical dotted line in the curve's colour).
    """
    if ax is None:
        fig, axes = new_figure()
        ax = axes[0, 0]
    else:
        fig = ax.figure
    freqs = np.asarray(freqs)
    keep = freqs > 0
    if fmax is not None:
        keep &= freqs <= fmax
    if band is not None:
        ax.axvspan(band[0], band[1], color="tab:orange", alpha=0.12, label=band_label)
    for label, p in psds.items():
        p = np.asarray(p)
        if p.shape != freqs.shape:
            raise ValueError(f"PSD {label!r} has shape {p.shape}, freqs has {freqs.shape}")
        (line,) = ax.semilogy(freqs[keep], p[keep], label=label, linewidth=1.6)
        f_peak = (peaks or {}).get(label)
        if f_peak is not None:
            ax.axvline(f_peak, color=line.get_color(), linestyle=":", linewidth=1.2)
    ax.set_xlabel("Frequency (Hz)")
    ax.set_ylabel(f"PSD ({unit}²/Hz)")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(frameon=False)
    return fig, ax


def plot_matrices(mats: Mapping[str, np.ndarray], *, title: str = "", cbar_label: str = "",
                  symmetric: bool = True, vmax: float | None = None):
    """Channel-by-channel matrices (C, C) side by side with one shared colour scale."""
    if not mats:
        raise ValueError("plot_matrices needs at least one matrix")
    fig, axes = new_figure(1, len(mats), width=4.0, height=3.6)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in mats.items()}
    if vmax is None:
        vmax = max(float(np.nanmax(np.abs(a))) for a in arrays.values()) or 1.0
    vmin = -vmax if symmetric else None
    im = None
    for ax, (label, a) in zip(axes[0], arrays.items()):
        im = ax.imshow(a, cmap="RdBu_r" if symmetric else "viridis", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        ax.set_title(label)
        ax.set_xlabel("Channel")
        ax.set_ylabel("Channel")
    cb = fig.colorbar(im, ax=list(axes[0]), shrink=0.85)
    if cbar_label:
        cb.set_label(cbar_label)
    if title:
        fig.suptitle(title)
    return fig, axes[0]


def plot_traces(signals: Mapping[str, np.ndarray], sfreq: float, *, ch_names: Sequence[str],
                unit: str = "a.u.", seconds: float | None = 3.0, max_channels: int = 4,
                title: str = ""):
    """The first ``max_channels`` channels of each signal (C, T) over the first ``seconds``."""
    n = min(max_channels, len(ch_names))
    fig, axes = new_figure(n, 1, width=7.0, height=max(1.5, 3.0 / n), sharex=True)
    for label, sig in signals.items():
        sig = np.asarray(sig)
        n_t = sig.shape[-1] if seconds is None else min(sig.shape[-1], int(seconds * sfreq))
        t = np.arange(n_t) / sfreq
        for i in range(n):
            axes[i, 0].plot(t, sig[i, :n_t], label=label, linewidth=1.0)
    for i in range(n):
        axes[i, 0].set_ylabel(f"{ch_names[i]}\n({unit})", fontsize=8)
        axes[i, 0].grid(True, alpha=0.25)
    axes[-1, 0].set_xlabel("Time (s)")
    axes[0, 0].legend(frameon=False, ncols=len(signals), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig, axes[:, 0]

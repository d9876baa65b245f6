"""``EvalVQ``: how well a VQ tokenizer reconstructs held-out data, in channel units.

For a registered model with the ``Tokenizer`` capability over sensor images
(``VideoGPTTokenizer``, ``Emu3VisionVQ``) and a ``ChunkDatasetImage`` split (``split``, the
test split by default), held-out windows are encoded to codes and decoded back; the
reconstruction is read at the sensors (never at empty or interpolated pixels) and the
stage-2 steps are inverted (:func:`~ephys_gpt.codec.invert_steps`), so
errors are in signal units (fT for magnetometers, fT/cm for gradiometers):

- **reconstruction**: RMSE per channel type, per-channel correlation, variance explained
  (``1 - SSE / SS`` with ``SS`` around each window's per-channel mean: 0 is what
  reconstructing each window by its per-channel mean achieves, the baseline reported beside
  it), RMSE by position in the window, per-channel figures;
- **spectra**: Welch PSD of reconstructions against the originals per channel type
  (log-spectral distance, alpha peak);
- **codebook usage**: perplexity of the held-out code histogram, active codes, how many codes
  hold 90% of the uses, a rank-frequency figure;
- ``fif_seconds`` of consecutive held-out signal, original and reconstruction, as MNE ``.fif``.

Outputs in ``<save_dir>/evals/EvalVQ/``: curves ``.npy`` + ``.json``, figures ``.png`` +
``.pdf``, ``summary.json``, ``report.md``, ``original_raw.fif``, ``reconstruction_raw.fif``.

The tokenizer-specific parts are module-level functions (:func:`reconstruction_metrics`,
:func:`codebook_usage`, :func:`consecutive_windows`) so a runner for models over codes can
reuse them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from ephys_gpt.dataset.image_layout import SensorTarget, gather_channels
from ephys_gpt.eval import plots, report, spectral
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import EvalRunner, RunnerOptions, display_unit
from ephys_gpt.eval.windows import spread_indices, window_steps
from ephys_gpt.models.capabilities import Tokenizer

logger = logging.getLogger(__name__)

MEAN_BASELINE = "per-channel mean"


class EvalVQOptions(RunnerOptions):
    """The ``eval`` block for ``eval_class: EvalVQ``. Held-out windows for the metrics:
    ``max_batches * batch_size``, spread over the split."""

    fif_seconds: float = Field(10.0, gt=0, description="consecutive held-out seconds "
                                                       "reconstructed and written as .fif")
    trace_channels: int = Field(4, ge=1, description="channels in the traces figure")


# -- tokenizer-specific computations -----------------------------------------------------------

def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=-1, keepdims=True)


def reconstruction_metrics(orig: np.ndarray, rec: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel figures of windows ``(N, C, T)`` and their reconstructions.

    Returns ``variance_explained`` (C,), ``correlation`` (C,) (Pearson over all samples of
    window-centred signals), ``rmse`` (C,), ``rmse_mean_baseline`` (C,) (the error of each
    window's per-channel mean), ``rmse_by_position`` (T,) and ``mean_baseline_by_position``
    (T,), and the pooled ``variance_explained_total`` (a 0-d array).
    """
    err = rec - orig
    co, cr = _centred(orig), _centred(rec)
    ss = (co ** 2).sum(axis=(0, 2))
    sse = (err ** 2).sum(axis=(0, 2))
    den = np.sqrt(ss * (cr ** 2).sum(axis=(0, 2)))
    corr = np.divide((co * cr).sum(axis=(0, 2)), den, out=np.zeros_like(den), where=den > 0)
    n = orig.shape[0] * orig.shape[2]
    return {"variance_explained": 1.0 - sse / np.maximum(ss, 1e-30),
            "variance_explained_total": np.asarray(1.0 - sse.sum() / max(ss.sum(), 1e-30)),
            "correlation": corr, "rmse": np.sqrt(sse / n),
            "rmse_mean_baseline": np.sqrt(ss / n),
            "rmse_by_position": np.sqrt((err ** 2).mean(axis=(0, 1))),
            "mean_baseline_by_position": np.sqrt((co ** 2).mean(axis=(0, 1)))}


def codebook_usage(codes: np.ndarray, codebook_size: int) -> dict:
    """Usage of a codebook by held-out codes (any shape; the last axis is the stage when
    ``codes.ndim == 5``): ``perplexity`` (exp of the entropy of the code histogram),
    ``active_codes`` and ``active_fraction``, ``codes_for_90pct`` (fewest codes holding 90% of
    the uses) and ``counts`` (K,), per stage when there are several."""
    stages = [codes[..., q] for q in range(codes.shape[-1])] if codes.ndim == 5 else [codes]
    out = []
    for c in stages:
        counts = np.bincount(c.reshape(-1).astype(np.int64), minlength=codebook_size)
        p = counts / max(counts.sum(), 1)
        nz = p[p > 0]
        cum = np.cumsum(np.sort(p)[::-1])
        out.append({"perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
                    "active_codes": int((counts > 0).sum()),
                    "active_fraction": float((counts > 0).mean()),
                    "codes_for_90pct": int(np.searchsorted(cum, 0.9) + 1),
                    "codebook_size": int(codebook_size), "counts": counts})
    return out[0] if len(out) == 1 else {"stages": out}


def _without_counts(usage: dict) -> dict:
    return {k: v for k, v in usage.items() if k != "counts"}


def consecutive_windows(dataset, seconds: float) -> list[int]:
    """Indices of non-overlapping windows of the split's first session, in time order, that
    cover about ``seconds`` of signal (for writing a continuous reconstruction)."""
    idx = np.asarray(dataset.indices)
    if len(idx) == 0:
        return []
    first = idx[:, 0] == idx[0, 0]
    order = np.flatnonzero(first)[np.lexsort((idx[first, 2], idx[first, 1]))]
    picked, last = [], (-1, -1)
    need = max(1, int(round(seconds * dataset.sfreq / dataset.window_samples)))
    for i in order:
        _, chunk, start = (int(v) for v in idx[i])
        if chunk != last[0] or start >= last[1]:
            picked.append(int(i))
            last = (chunk, start + dataset.window_samples)
        if len(picked) == need:
            break
    return picked


# -- the runner --------------------------------------------------------------------------------

@register_eval("EvalVQ", options=EvalVQOptions)
class EvalVQ(EvalRunner):
    """Reconstruction quality in channel units and codebook usage of a VQ tokenizer."""

    name = "EvalVQ"
    options_class = EvalVQOptions
    capability = Tokenizer
    input_kinds = ("image",)

    def first_window(self, dataset) -> torch.Tensor:
        target = dataset[0][1]
        if not isinstance(target, SensorTarget):
            raise ValueError(f"EvalVQ needs image items with a channel-space target "
                             f"(datasplitter.dataset_class: ChunkDatasetImage), got "
                             f"{type(dataset).__name__}")
        return target.signal

    def reconstruct(self, indices: list[int], desc: str = "reconstruct") -> dict:
        """Windows ``indices`` of the held-out split → ``orig``/``rec`` (N, C, T) in model
        units, ``orig_si``/``rec_si`` in signal units, ``codes`` (N, T', H', W'[, Q])."""
        opts, ds = self.options, self.test
        out: dict[str, list] = {"orig": [], "rec": [], "codes": [], "steps": []}
        parts = [indices[j:j + opts.batch_size] for j in range(0, len(indices), opts.batch_size)]
        for part in tqdm(parts, desc=f"EvalVQ {desc}", disable=not opts.progress, leave=False):
            items = [ds[i] for i in part]
            img = torch.stack([it[0] for it in items]).to(self.device)
            with self.autocast:
                codes = self.model.encode(img)
                rec_img = self.model.decode(codes)
            out["orig"].append(torch.stack([it[1].signal for it in items]))
            out["rec"].append(gather_channels(rec_img.float(), items[0][1].pixels).cpu())
            out["codes"].append(codes.cpu().numpy())
            out["steps"] += [window_steps(ds, i) for i in part]
        orig, rec = torch.cat(out["orig"]), torch.cat(out["rec"])
        return {"orig": orig.numpy(), "rec": rec.numpy(), "codes": np.concatenate(out["codes"]),
                "orig_si": self.to_signal(orig, out["steps"]).double().numpy(),
                "rec_si": self.to_signal(rec, out["steps"]).double().numpy()}

    def spectra(self, orig: np.ndarray, rec: np.ndarray) -> dict:
        """Welch PSDs per channel type of originals and reconstructions (signal units)."""
        seg = min(self.options.psd_seconds, orig.shape[-1] / self.sfreq)
        freqs, p_orig = spectral.psd_by_channel_type(orig, self.sfreq, self.ch_types,
                                                     seg_seconds=seg)
        _, p_rec = spectral.psd_by_channel_type(rec, self.sfreq, self.ch_types, seg_seconds=seg)
        types = {}
        for t in self.types:
            sim = spectral.psd_similarity(p_rec[t], p_orig[t], freqs, fmin=1.0,
                                          fmax=self.options.psd_fmax)
            types[t] = {"psd_original": p_orig[t], "psd_reconstruction": p_rec[t], **sim}
        return {"freqs": freqs, "types": types}

    # -- outputs ---------------------------------------------------------------------------------
    def write_reconstruction_outputs(self, m: dict, per_type_si: dict) -> None:
        """Per-channel curve, RMSE-by-position curves/figure, variance-explained map."""
        self.curve("per_channel", np.arange(len(self.ch_names)),
                   {"variance_explained": m["variance_explained"],
                    "correlation": m["correlation"], "rmse_normalized": m["rmse"]},
                   xlabel="Channel index", ylabel="value", channels=self.ch_names)
        T = m["rmse_by_position"].shape[0]
        x_ms = np.arange(T) / self.sfreq * 1e3
        fig, axes = plots.new_figure(1, len(self.types))
        for ax, t in zip(axes[0], self.types):
            factor, unit = display_unit(t)
            curves = {self.model_name: per_type_si[t]["rmse_by_position"] * factor,
                      MEAN_BASELINE: per_type_si[t]["mean_baseline_by_position"] * factor}
            self.curve(f"rmse_by_position_{t}", x_ms, curves, xlabel="Time in window (ms)",
                       ylabel=f"RMSE ({unit})", unit=unit, ch_type=t)
            plots.plot_curves(x_ms, curves, baselines=[MEAN_BASELINE], ax=ax,
                              xlabel="Time in window (ms)", ylabel=f"RMSE ({unit})", title=t)
        fig.suptitle("Reconstruction error by position in the window (held-out)")
        self.figure(fig, "rmse_by_position")
        self.figure(self._ve_map(m["variance_explained"]), "variance_explained_map")

    def _ve_map(self, ve: np.ndarray):
        pos = np.asarray(self.test.pos_2d, dtype=float)
        fig, axes = plots.new_figure(1, 1, width=4.6, height=4.0)
        ax = axes[0, 0]
        sc = ax.scatter(pos[:, 0], pos[:, 1], c=np.clip(ve, -1, 1), cmap="viridis", vmin=0,
                        vmax=1, s=30, edgecolors="k", linewidths=0.3)
        fig.colorbar(sc, ax=ax, label="variance explained")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("Variance explained per sensor (held-out)")
        return fig

    def write_spectra_outputs(self, spec: dict) -> dict:
        freqs, opts = spec["freqs"], self.options
        fig, axes = plots.new_figure(1, len(self.types))
        out = {}
        for ax, t in zip(axes[0], self.types):
            d, (factor, unit) = spec["types"][t], display_unit(t)
            psds = {"original": d["psd_original"] * factor ** 2,
                    "reconstruction": d["psd_reconstruction"] * factor ** 2}
            self.curve(f"psd_{t}", freqs, psds, xlabel="Frequency (Hz)",
                       ylabel=f"PSD ({unit}²/Hz)", unit=f"{unit}²/Hz", ch_type=t)
            peaks = {label: getattr(self._peak(freqs, p, label, t), "freq", None)
                     for label, p in (("original", d["psd_original"]),
                                      ("reconstruction", d["psd_reconstruction"]))}
            plots.plot_psd(freqs, psds, unit=unit, band=opts.alpha_band, peaks=peaks,
                           fmax=opts.psd_fmax, ax=ax, title=t)
            out[t] = {"log_spectral_distance_db": d["log_spectral_distance_db"],
                      "log_psd_correlation": d["log_psd_correlation"],
                      "alpha_peak_original_hz": peaks["original"],
                      "alpha_peak_reconstruction_hz": peaks["reconstruction"]}
        fig.suptitle("PSD of reconstructions vs originals (held-out)")
        self.figure(fig, "psd")
        return out

    def write_usage_outputs(self, usage: dict) -> None:
        stages = usage.get("stages", [usage])
        fig, axes = plots.new_figure(1, 1)
        curves = {}
        for q, u in enumerate(stages):
            freq = np.sort(u["counts"])[::-1] / max(u["counts"].sum(), 1)
            curves["codes" if len(stages) == 1 else f"stage {q}"] = freq
        rank = np.arange(1, len(freq) + 1)
        self.curve("code_usage", rank, curves, xlabel="Code rank", ylabel="Share of uses")
        plots.plot_curves(rank, curves, xlabel="Code rank", ylabel="Share of uses", ax=axes[0, 0],
                          title="Codebook usage on held-out windows", logx=True)
        axes[0, 0].set_yscale("log")
        self.figure(fig, "code_usage")

    def continuous_outputs(self) -> dict:
        """Consecutive held-out windows, original and reconstruction, as .fif + traces."""
        idx = consecutive_windows(self.test, self.options.fif_seconds)
        r = self.reconstruct(idx, desc="fif")
        orig = np.concatenate(list(r["orig_si"]), axis=-1)
        rec = np.concatenate(list(r["rec_si"]), axis=-1)
        self.files.append(self.write_fif(orig, self.out_dir / "original_raw.fif",
                                         "held-out original"))
        self.files.append(self.write_fif(rec, self.out_dir / "reconstruction_raw.fif",
                                         "tokenizer reconstruction"))
        t0 = self.type_idx[self.types[0]][: self.options.trace_channels]
        factor, unit = display_unit(self.types[0])
        fig, _ = plots.plot_traces({"original": orig[t0] * factor,
                                    "reconstruction": rec[t0] * factor}, self.sfreq,
                                   ch_names=[self.ch_names[i] for i in t0], unit=unit,
                                   title="Held-out signal and its reconstruction")
        self.figure(fig, "traces")
        return {"seconds": orig.shape[-1] / self.sfreq, "windows": len(idx)}

    # -- measurements -----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, report.MarkdownReport]:
        opts = self.options
        idx = [int(i) for i in spread_indices(len(self.test), opts.max_batches * opts.batch_size,
                                              opts.seed)]
        r = self.reconstruct(idx)
        m = reconstruction_metrics(r["orig"], r["rec"])
        per_type = {t: reconstruction_metrics(r["orig_si"][:, i], r["rec_si"][:, i])
                    for t, i in self.type_idx.items()}
        usage = codebook_usage(r["codes"], int(self.model.codebook_size))
        self.write_reconstruction_outputs(m, per_type)
        psd = self.write_spectra_outputs(self.spectra(r["orig_si"], r["rec_si"]))
        self.write_usage_outputs(usage)
        fif = self.continuous_outputs()
        summary = self.summarize(m, per_type, usage, psd, fif, len(idx))
        logger.info("EvalVQ: variance explained %.3f, codebook perplexity %s of %d",
                    summary["variance_explained"],
                    report.fmt_value(summary["codebook"].get("perplexity"), 4),
                    self.model.codebook_size)
        return summary, self.write_report(summary)

    def summarize(self, m, per_type, usage, psd, fif, n_windows: int) -> dict:
        types = {}
        for t, pm in per_type.items():
            factor, unit = display_unit(t)
            types[t] = {"unit": unit, "n_channels": len(self.type_idx[t]),
                        "rmse": float(np.sqrt((pm["rmse"] ** 2).mean()) * factor),
                        "rmse_mean_baseline": float(
                            np.sqrt((pm["rmse_mean_baseline"] ** 2).mean()) * factor),
                        "variance_explained": float(pm["variance_explained_total"]),
                        **psd[t]}
        codebook = ({"stages": [_without_counts(u) for u in usage["stages"]]}
                    if "stages" in usage else _without_counts(usage))
        return {**self.base_summary(), "n_windows": n_windows,
                "variance_explained": float(m["variance_explained_total"]),
                "variance_explained_mean_baseline": 0.0,
                "correlation_mean": float(np.mean(m["correlation"])),
                "correlation_median": float(np.median(m["correlation"])),
                "rmse_normalized": float(np.sqrt((m["rmse"] ** 2).mean())),
                "channel_types": types, "codebook": codebook, "fif": fif}

    def write_report(self, s: dict) -> report.MarkdownReport:
        rep = report.MarkdownReport(f"EvalVQ: {s['model_name']}")
        rep.text(f"Checkpoint `{s['ckpt_path']}`: {s['n_windows']} held-out ({s['split']}) "
                 f"windows of {s['window_samples']} samples at {s['sfreq']:g} Hz, "
                 f"{s['n_channels']} channels, reconstructed from their codes and read at the "
                 "sensors.")
        rep.section("Reconstruction")
        rows = [["variance explained (all channels, normalized units)",
                 s["variance_explained"], 0.0],
                ["correlation (mean over channels)", s["correlation_mean"], None]]
        for t, d in s["channel_types"].items():
            rows.append([f"variance explained {t} ({d['unit']})", d["variance_explained"], 0.0])
            rows.append([f"RMSE {t} ({d['unit']})", d["rmse"], d["rmse_mean_baseline"]])
            rows.append([f"PSD log-spectral distance {t} (dB)", d["log_spectral_distance_db"],
                         None])
        rep.table(["metric", "tokenizer", MEAN_BASELINE], rows)
        cb = s["codebook"]
        rep.section("Codebook usage")
        stages = cb.get("stages", [cb])
        rep.table(["stage", "perplexity", "active codes", "codes holding 90% of uses"],
                  [[q, u["perplexity"], f"{u['active_codes']} / {u['codebook_size']}",
                    u["codes_for_90pct"]] for q, u in enumerate(stages)])
        rep.text(f"{s['fif']['seconds']:.1f} s of consecutive held-out signal are in "
                 "`original_raw.fif` and `reconstruction_raw.fif`.")
        self.figures_section(rep, [("rmse_by_position", "Error by position in the window"),
                                   ("psd", "PSD of reconstructions vs originals"),
                                   ("variance_explained_map", "Variance explained per sensor"),
                                   ("code_usage", "Codebook usage"),
                                   ("traces", "Signal traces")])
        return rep

"""``EvalVQ``: a VQ tokenizer of sensor images, or a GPT over its codes, on held-out data in
channel units.

It evaluates a registered model on ``image`` inputs (``ChunkDatasetImage``, the ``split``,
test by default) and dispatches on what the model can do (its capabilities, not its name):

**A tokenizer** (``Tokenizer``: ``VideoGPTTokenizer``, ``Emu3VisionVQ``): held-out windows are
encoded to codes and decoded back; the reconstruction is read at the sensors (never at empty
or interpolated pixels) and the stage-2 steps are inverted
(:func:`~ephys_gpt.codec.invert_steps`), so errors are in signal units (fT for magnetometers,
fT/cm for gradiometers):

- **reconstruction**: RMSE per channel type, per-channel correlation, variance explained
  (``1 - SSE / SS`` with ``SS`` around each window's per-channel mean: 0 is what
  reconstructing each window by its per-channel mean achieves, the baseline reported beside
  it), RMSE by position in the window, per-channel figures;
- **spectra**: Welch PSD of reconstructions against the originals per channel type
  (log-spectral distance, alpha peak);
- **codebook usage**: perplexity of the held-out code histogram, active codes, how many codes
  hold 90% of the uses, a rank-frequency figure;
- ``fif_seconds`` of consecutive held-out signal, original and reconstruction, as MNE ``.fif``.

**A prior over codes** (``TokenGenerator`` on images: ``VQGPT2MEG``), with its own tokenizer:

- **next-code accuracy** (teacher forced): every code of latent frames ``>= 1`` of held-out
  windows predicted (argmax) from the codes before it, against *repeat-last code* (the code
  of the same grid site one latent frame back) and *unigram code* (the most frequent code of
  that grid site in ``unigram_max_windows`` training windows), with the NLL of the model and
  of the unigram; accuracy by latent frame;
- **N-step forecasts** in channel units: the last ``future_steps`` samples of each window
  generated from the samples before it (greedy by default), decoded, read at the sensors and
  the stage-2 steps inverted, against repeat-last, zero (the normalized mean), the fitted AR
  and VAR baselines (:meth:`~ephys_gpt.eval.runner.EvalRunner.linear_forecast`) and the
  tokenizer's reconstruction of the true future (its own codes: the floor of a prior over
  these codes);
- **free-running generation** of ``gen_seconds`` from held-out contexts (``gen_sampling``)
  compared with held-out data: PSD per channel type, channel covariance and correlation, the
  linear baselines run free alike, generation time per second of signal; the generated
  signal as ``.fif``.

Outputs in ``<save_dir>/evals/EvalVQ/``: curves ``.npy`` + ``.json``, figures ``.png`` +
``.pdf``, ``summary.json``, ``report.md``, and the ``.fif`` files (tokenizer:
``original_raw.fif``, ``reconstruction_raw.fif``; prior: ``generated_raw.fif``).

The tokenizer-specific parts are module-level functions (:func:`reconstruction_metrics`,
:func:`codebook_usage`, :func:`consecutive_windows`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from ephys_gpt.dataset.image_layout import SensorTarget, gather_channels
from ephys_gpt.eval import plots, report, spectral
from ephys_gpt.eval.baselines import REPEAT_LAST, ZERO
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import EvalRunner, SamplingOptions, display_unit
from ephys_gpt.eval.windows import spread_indices, window_steps
from ephys_gpt.models.capabilities import TokenGenerator, Tokenizer

logger = logging.getLogger(__name__)

MEAN_BASELINE = "per-channel mean"
REPEAT_CODE = "repeat-last code"
UNIGRAM_CODE = "unigram code"
TRUE_CODES = "tokenizer (true codes)"


class EvalVQOptions(SamplingOptions):
    """The ``eval`` block for ``eval_class: EvalVQ``. Held-out windows for the metrics:
    ``max_batches * batch_size``, spread over the split."""

    fif_seconds: float = Field(10.0, gt=0, description="tokenizer: consecutive held-out "
                                                       "seconds reconstructed and written as "
                                                       ".fif")
    trace_channels: int = Field(4, ge=1, description="tokenizer: channels in the traces figure")
    # a prior over codes (VQGPT2MEG): future_steps, gen_* and sampling from SamplingOptions
    unigram_max_windows: int = Field(256, ge=1, description="prior: training windows encoded "
                                                            "for the unigram-code baseline")


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
    """A VQ tokenizer's reconstructions, or a prior over its codes, in channel units."""

    name = "EvalVQ"
    options_class = EvalVQOptions
    capability = (Tokenizer, TokenGenerator)
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
        if self.spec.can(TokenGenerator):
            return self.evaluate_prior()
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

    # -- a prior over codes (a TokenGenerator on images) ---------------------------------------
    def items(self, indices: list[int], dataset=None) -> dict:
        """Windows ``indices`` of the held-out split (or ``dataset``): ``images`` (N, H, W, T),
        ``signal`` (N, C, T) in model units, ``pixels`` (C,), ``steps`` of each window."""
        ds = self.test if dataset is None else dataset
        items = [ds[i] for i in indices]
        return {"images": torch.stack([it[0] for it in items]),
                "signal": torch.stack([it[1].signal for it in items]),
                "pixels": items[0][1].pixels, "steps": [window_steps(ds, i) for i in indices]}

    def batches(self, indices: list[int], dataset=None) -> list[dict]:
        bs = self.options.batch_size
        return [self.items(indices[j:j + bs], dataset) for j in range(0, len(indices), bs)]

    def real_signal(self) -> np.ndarray:
        """``psd_windows`` held-out windows in signal units (N, C, T), for the spectra."""
        idx = [int(i) for i in spread_indices(len(self.test), self.options.psd_windows,
                                              self.options.seed + 2)]
        return torch.cat([self.to_signal(b["signal"], b["steps"])
                          for b in self.batches(idx)]).numpy()

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images.to(self.device))

    def code_unigram(self) -> np.ndarray:
        """Code frequencies per grid site ``(S, K)`` over ``unigram_max_windows`` training
        windows (add-one smoothed)."""
        opts, m = self.options, self.model
        idx = [int(i) for i in spread_indices(len(self.train), opts.unigram_max_windows,
                                              opts.seed)]
        counts = np.ones((m.codes_per_frame, m.codebook_size))
        for b in tqdm(self.batches(idx, self.train), desc="EvalVQ unigram codes",
                      disable=not opts.progress, leave=False):
            codes = self._encode(b["images"]).flatten(2).cpu().numpy()  # (B, T', S)
            site = np.broadcast_to(np.arange(codes.shape[-1]), codes.shape)
            np.add.at(counts, (site.ravel(), codes.ravel()), 1.0)
        return counts / counts.sum(axis=1, keepdims=True)

    def next_code(self, batches: list[dict], unigram: np.ndarray) -> dict:
        """Teacher-forced next-code accuracy and NLL by latent frame (frames >= 1), with the
        repeat-last-code and unigram-code baselines on the same codes."""
        uni = torch.as_tensor(unigram, dtype=torch.float32, device=self.device)  # (S, K)
        log_uni, mode = uni.log(), uni.argmax(-1)  # (S, K), (S,)
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for b in tqdm(batches, desc="EvalVQ next code", disable=not self.options.progress,
                      leave=False):
            codes = self._encode(b["images"])  # (B, T', H', W')
            with self.autocast:
                logits = self.model.code_logits(codes)
            logits = logits.float().flatten(2, 3)[:, 1:]  # (B, T'-1, S, K)
            tgt = codes.flatten(2)[:, 1:]  # (B, T'-1, S)
            site = torch.arange(tgt.shape[-1], device=self.device)
            parts = {
                "acc": logits.argmax(-1) == tgt,
                "nll": -torch.log_softmax(logits, -1).gather(-1, tgt[..., None])[..., 0],
                "rep": codes.flatten(2)[:, :-1] == tgt,
                "uni": mode[site] == tgt,
                "uni_nll": -log_uni[site, tgt]}
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.float().sum((0, 2))
            n += tgt.shape[0] * tgt.shape[2]
        out = {k: (v / n).cpu().numpy() for k, v in sums.items()}  # by latent frame
        out["frames"] = np.arange(1, len(out["acc"]) + 1)
        out["n_windows"] = sum(len(b["steps"]) for b in batches)
        return out

    def nstep_prior(self, batches: list[dict]) -> dict:
        """RMSE of the last ``future_steps`` samples of each window, generated from the samples
        before it, against the naive and linear baselines and the tokenizer's own
        reconstruction of the true future."""
        opts, m = self.options, self.model
        N, T = opts.future_steps, self.window
        dt = m.tokenizer.time_downsample
        if T - N < dt:
            raise ValueError(f"eval.future_steps ({N}) leaves {T - N} context samples in "
                             f"windows of {T}; at least one latent frame ({dt} samples) is "
                             "needed: lower future_steps or raise datasplitter.example_seconds")
        sampling = ({"temperature": 0.0} if opts.nstep_sampling == "greedy"
                    else opts.gen_kwargs())
        sq: dict[str, dict] = {}
        for b in tqdm(batches, desc="EvalVQ N-step", disable=not opts.progress, leave=False):
            img, signal, steps = b["images"].to(self.device), b["signal"], b["steps"]
            ctx, fut = signal[..., :T - N], signal[..., T - N:]
            with self.autocast:
                gen = m.generate(img[..., :T - N], N, generator=self.generator, **sampling)
                true = m.decode(m.encode(img))
            preds = {self.model_name: gen[..., T - N:], TRUE_CODES: true[..., T - N:]}
            preds = {k: gather_channels(v.float(), b["pixels"]).cpu() for k, v in preds.items()}
            preds[REPEAT_LAST] = ctx[..., -1:].expand_as(fut)
            preds[ZERO] = torch.zeros_like(fut)
            preds.update(self.linear_forecast(ctx, steps, N))
            for k, p in preds.items():
                self.add(sq.setdefault(k, {}), self.sq_errors(p.float(), fut, steps))
        n_win = sum(len(b["steps"]) for b in batches)
        return {"k": np.arange(1, N + 1), "sampling": opts.nstep_sampling,
                "sampling_kwargs": sampling, "context_samples": T - N,
                "rmse": {k: self.rmse(v, n_win) for k, v in sq.items()}}

    def free_running_prior(self) -> dict:
        """``n_generated`` sequences of ``gen_seconds`` after held-out contexts, at the sensors
        in signal units, timed."""
        opts, m = self.options, self.model
        n_new = max(1, round(opts.gen_seconds * self.sfreq))
        ctx_len = self.window if opts.gen_context_seconds is None else min(
            self.window, max(m.tokenizer.time_downsample,
                             round(opts.gen_context_seconds * self.sfreq)))
        idx = [int(i) for i in spread_indices(len(self.test), opts.n_generated, opts.seed + 1)]
        idx = (idx * opts.n_generated)[:opts.n_generated]
        b = self.items(idx)
        t0 = time.perf_counter()
        with self.autocast:
            out = m.generate(b["images"][..., -ctx_len:].to(self.device), n_new,
                             generator=self.generator, progress=opts.progress,
                             **opts.gen_kwargs())
        seconds = time.perf_counter() - t0
        new = gather_channels(out[..., ctx_len:].float(), b["pixels"]).cpu()  # (B, C, n_new)
        return {"signal": self.to_signal(new, b["steps"]).numpy(), "model_units": new,
                "context": b["signal"][..., -ctx_len:], "steps": b["steps"],
                "context_samples": ctx_len, "n_new": n_new, "wall_seconds": seconds,
                "seconds_per_signal_second": seconds / (n_new / self.sfreq * len(idx))}

    def evaluate_prior(self) -> tuple[dict, report.MarkdownReport]:
        opts = self.options
        idx = [int(i) for i in spread_indices(len(self.test), opts.max_batches * opts.batch_size,
                                              opts.seed)]
        batches = self.batches(idx)
        self.baselines = (REPEAT_LAST, ZERO, *(lm.name for lm in self.linear_models()))
        tf = self.next_code(batches, self.code_unigram())
        ns = self.nstep_prior(batches)
        gen = self.free_running_prior()
        real = self.real_signal()
        spec = self.compare_spectra(gen["signal"], real)
        gen["linear"] = self.linear_free_run(gen["context"], gen["steps"], gen["n_new"], real)
        self._write_prior_curves(tf, ns)
        label = f"{opts.gen_seconds:g} s generated ({opts.gen_sampling})"
        spectra = self.spectra_outputs(spec, gen["signal"], real, label)
        summary = self._prior_summary(tf, ns, gen, spectra)
        logger.info("EvalVQ: next-code accuracy %.3f (repeat-last code %.3f, unigram code %.3f)",
                    *summary["next_code"]["accuracy"].values())
        return summary, self._prior_report(summary)

    def _write_prior_curves(self, tf: dict, ns: dict) -> None:
        m = self.model_name
        curves = {m: tf["acc"], REPEAT_CODE: tf["rep"], UNIGRAM_CODE: tf["uni"]}
        frame_ms = self.model.tokenizer.time_downsample / self.sfreq * 1e3
        self.curve("next_code_accuracy", tf["frames"], curves, xlabel="Latent frame",
                   ylabel="Next-code accuracy", n_windows=tf["n_windows"], frame_ms=frame_ms,
                   nll_nats={m: tf["nll"], UNIGRAM_CODE: tf["uni_nll"]})
        fig, _ = plots.plot_curves(tf["frames"] * frame_ms, curves,
                                   baselines=[REPEAT_CODE, UNIGRAM_CODE],
                                   xlabel="History available (ms)", ylabel="Next-code accuracy",
                                   title="Teacher-forced next-code accuracy (held-out)")
        self.figure(fig, "next_code_accuracy")
        self.error_curves("nstep_rmse", ns["k"], ns["rmse"], xlabel="Steps ahead",
                          baselines=[*self.baselines, TRUE_CODES], sampling=ns["sampling"],
                          context_samples=ns["context_samples"],
                          title="N-step-ahead error in signal units (held-out)")

    def _prior_summary(self, tf: dict, ns: dict, gen: dict, spectra: dict) -> dict:
        opts, m, N = self.options, self.model_name, self.options.future_steps
        acc = {m: float(tf["acc"].mean()), REPEAT_CODE: float(tf["rep"].mean()),
               UNIGRAM_CODE: float(tf["uni"].mean())}

        def at(step: int) -> dict:
            return {k: {t: float(v[t][step] * display_unit(t)[0]) for t in self.types}
                    for k, v in ns["rmse"].items()}

        tok = self.model.tokenizer
        return {
            **self.base_summary(), "n_windows": tf["n_windows"],
            "codebook_size": int(self.model.codebook_size),
            "codes_per_second": self.model.codes_per_frame * self.sfreq / tok.time_downsample,
            "next_code": {
                "accuracy": acc,
                "nll_nats": {m: float(tf["nll"].mean()), UNIGRAM_CODE: float(tf["uni_nll"].mean())},
                "beats_baselines": acc[m] > max(acc[REPEAT_CODE], acc[UNIGRAM_CODE]),
                "definition": "teacher-forced argmax accuracy of every code of latent frames "
                              ">= 1 of the held-out windows, each from the codes before it in "
                              "raster order; repeat-last code: the code of the same grid site "
                              "one latent frame back; unigram code: the most frequent code of "
                              "that grid site in training windows"},
            "linear_baselines": self.linear_summary(),
            "nstep": {
                "sampling": ns["sampling"], "sampling_kwargs": ns["sampling_kwargs"],
                "future_steps": N, "context_samples": ns["context_samples"],
                "rmse_at_1": at(0), f"rmse_at_{N}": at(N - 1),
                "rmse_mean": {k: {t: float(np.sqrt((v[t] ** 2).mean()) * display_unit(t)[0])
                                  for t in self.types} for k, v in ns["rmse"].items()},
                "rmse_units": {t: display_unit(t)[1] for t in self.types}},
            "generation": {
                "seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                "sampling": opts.gen_sampling, "sampling_kwargs": opts.gen_kwargs(),
                "context_samples": gen["context_samples"], "wall_seconds": gen["wall_seconds"],
                "seconds_per_signal_second": gen["seconds_per_signal_second"], **spectra,
                "linear": gen["linear"]}}

    def _prior_report(self, s: dict) -> report.MarkdownReport:
        m, nc, ns, ge = self.model_name, s["next_code"], s["nstep"], s["generation"]
        rep = report.MarkdownReport(f"EvalVQ: {m}")
        rep.text(f"Checkpoint `{s['ckpt_path']}`: {s['n_windows']} held-out ({s['split']}) "
                 f"windows of {s['window_samples']} samples at {s['sfreq']:g} Hz, "
                 f"{s['n_channels']} channels; {s['codes_per_second']:g} codes per second of "
                 f"signal from a codebook of {s['codebook_size']}. Device {s['device']}, "
                 f"precision {s['precision']}.")
        rep.section("Next-code accuracy (teacher forced)")
        rep.table(["predictor", "accuracy", "NLL (nats)"],
                  [[k, v, nc["nll_nats"].get(k)] for k, v in nc["accuracy"].items()])
        rep.text(f"{m} {'beats' if nc['beats_baselines'] else 'does NOT beat'} both code "
                 f"baselines. {nc['definition'][0].upper()}{nc['definition'][1:]}.")
        N, units = ns["future_steps"], ns["rmse_units"]
        rep.section(f"N-step-ahead ({ns['sampling']}, {ns['context_samples']}-sample contexts, "
                    "signal units)")
        rep.table(["predictor"] + [f"RMSE {h} {t} ({u})" for t, u in units.items()
                                   for h in ("@1", f"@{N}", "mean")],
                  [[k] + [s["nstep"][key][k][t] for t in units
                          for key in ("rmse_at_1", f"rmse_at_{N}", "rmse_mean")]
                   for k in ns["rmse_at_1"]])
        t0 = self.types[0]
        linear = {k: v[t0] for k, v in ns["rmse_mean"].items() if k in s["linear_baselines"]}
        rep.text(self.linear_verdict(f"mean {N}-step RMSE ({t0})", ns["rmse_mean"][m][t0],
                                     linear, False) +
                 f" `{TRUE_CODES}` decodes the tokenizer's codes of the true future: no prior "
                 "over these codes can do better than that.")
        rep.section(f"Free-running generation ({ge['seconds']:g} s, {ge['sampling']} "
                    f"{ge['sampling_kwargs']})")
        self.spectra_section(rep, ge)
        self.linear_free_run_table(rep, ge["linear"])
        rep.text(f"Generation took {ge['seconds_per_signal_second']:.2f} s per second of "
                 "signal (KV-cached). The generated signal is in `generated_raw.fif` "
                 "(`mne.io.read_raw_fif`).")
        self.figures_section(rep, [("next_code_accuracy", "Next-code accuracy vs history"),
                                   ("nstep_rmse", "N-step-ahead RMSE"),
                                   ("psd", "PSD generated vs held-out"),
                                   ("channel_correlation", "Channel correlation"),
                                   ("traces", "Signal traces")])
        return rep

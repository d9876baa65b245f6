"""``EvalBENDR``: evaluation of continuous next-sample forecasters (BENDRForecast).

On held-out windows of a continuous chunk store (``split``, the test split by default):

1. **1-step error by history** (teacher forced): RMSE of the prediction of ``x[t+1]`` made
   from ``x[:t+1]``, at every position ``t`` of a window (how the error falls as history
   grows), against the repeat-last-value baseline.
2. **N-step-ahead error**: the last ``future_steps`` samples of each window forecast
   autoregressively (``model.forecast``) from the rest; RMSE at each horizon ``k`` in signal
   units (stage-2 steps inverted with :func:`~ephys_gpt.preprocessing.transforms.invert_steps`;
   fT for magnetometers, fT/cm for gradiometers) and in normalized units, against the
   repeat-last baseline.
3. **Free running**: ``gen_seconds`` forecast from a held-out context, compared with held-out
   data by Welch PSD per channel type (alpha peak) and channel covariance/correlation; the
   signal is written as an MNE ``.fif``.

Outputs in ``<save_dir>/evals/EvalBENDR/``: curves ``.npy`` + ``.json``, figures ``.png`` +
``.pdf``, ``summary.json``, ``report.md``, ``generated_raw.fif``.

:class:`ContinuousEval` holds what the continuous runners share (``EvalDiffusion`` builds on
it): loading, held-out windows, decoding to signal units, error accumulation per channel
type, spectra and the common output files.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from ephys_gpt.eval import plots, report, spectral
from ephys_gpt.eval.eval_quant import window_steps
from ephys_gpt.eval.fif import array_to_raw, template_info_from_provenance, write_raw_fif
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import EvalRunner, RunnerOptions, display_unit, spread_indices
from ephys_gpt.preprocessing.transforms import invert_steps

logger = logging.getLogger(__name__)

REPEAT_LAST = "repeat-last"


class ContinuousEvalOptions(RunnerOptions):
    """Options shared by the continuous eval runners (the ``eval`` block of a run YAML)."""


class EvalBENDROptions(ContinuousEvalOptions):
    """The ``eval`` block for ``eval_class: EvalBENDR``."""

    free_run_noise: Literal["residual", "none"] = Field(
        "residual", description="free-running generation: add Gaussian innovations with the "
                                "channel covariance of the 1-step residuals on training "
                                "windows (residual), or run the mean forecast alone (none), "
                                "which decays towards the mean")
    residual_windows: int = Field(32, ge=1, description="training windows for the residual "
                                                        "covariance")


def window_signal(dataset, index: int) -> tuple[torch.Tensor, tuple]:
    """Full continuous window (C, T) of a dataset item, and its extra inputs (pos, type).

    Accepts ``(x, x_next)`` pairs (``ChunkDatasetForecastCont``), ``((x, pos, type),
    target)`` (``ChunkDatasetReconstruction``, shift 0 or 1) and plain tensors.
    """
    item = dataset[index]
    inputs, target = item if isinstance(item, (tuple, list)) else (item, None)
    extra: tuple = ()
    if isinstance(inputs, (tuple, list)):
        inputs, extra = inputs[0], tuple(inputs[1:])
    x = torch.as_tensor(inputs)
    if not x.is_floating_point() or x.dim() != 2:
        raise ValueError(f"continuous evaluation needs float (C, T) windows, got {x.dtype} "
                         f"{tuple(x.shape)} from {type(dataset).__name__} (use "
                         "ChunkDatasetForecastCont / ChunkDatasetReconstruction on a store "
                         "without mulaw_quantize)")
    if target is not None and torch.is_tensor(target) and target.shape == x.shape and (
            x.shape[-1] > 1 and torch.equal(target[:, :-1], x[:, 1:])):
        x = torch.cat([x, target[:, -1:]], dim=-1)  # shifted pair: recover the full window
    return x, extra


class ContinuousEval(EvalRunner):
    """Shared machinery of the continuous eval runners (see the module docstring)."""

    name = "ContinuousEval"
    options_class = ContinuousEvalOptions
    input_kinds: tuple[str, ...] = ("continuous", "continuous_meta")

    # -- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        opts = self.options
        self._load_model()
        from ephys_gpt.models.registry import MODELS

        spec = MODELS.get(self.model_name)
        if spec is not None and (spec.input_kind not in self.input_kinds
                                 or spec.generation != "continuous"):
            raise ValueError(f"{self.name} evaluates continuous forecasters (input kinds "
                             f"{list(self.input_kinds)} with forecast()); {self.model_name} "
                             f"consumes {spec.input_kind!r} and generates {spec.generation!r}")
        if self._splits is None:
            from ephys_gpt.training.run_folder import run_splits

            cfg = self.config.get("datasplitter")
            if not isinstance(cfg, dict):
                raise ValueError(f"{self.name} needs the run config's 'datasplitter' block")
            self._splits = run_splits(self.config, augmentations=False)[0]  # recorded split
        self.test = getattr(self._splits, opts.split)
        if self.test is None or len(self.test) == 0:
            raise ValueError(f"the {opts.split!r} split is empty: adjust datasplitter "
                             f"val_ratio/test_ratio so that {self.name} has held-out windows")
        ds = self.test
        self.sfreq = float(ds.sfreq)
        self.ch_names = [str(c) for c in ds.ch_names]
        self.ch_types = [str(t) for t in ds.ch_types]
        if any(s.get("name") == "mulaw_quantize" for s in ds.steps):
            raise ValueError(f"{self.name} needs continuous chunks, but the data was mu-law "
                             "quantized; re-run stage 2 without mulaw_quantize")
        self.types = list(dict.fromkeys(self.ch_types))
        self.type_idx = {t: [i for i, c in enumerate(self.ch_types) if c == t]
                         for t in self.types}
        self.window = window_signal(ds, 0)[0].shape[-1]
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if opts.precision.startswith("bf16") else nullcontext())

    def heldout(self, n: int, seed_offset: int = 0, dataset=None
                ) -> list[tuple[torch.Tensor, tuple, list]]:
        """Batches of ``n`` windows spread over the held-out split (or ``dataset``):
        ``(x (B, C, T), extra inputs, steps per window)``."""
        opts, ds = self.options, self.test if dataset is None else dataset
        idx = [int(i) for i in spread_indices(len(ds), n, opts.seed + seed_offset)]
        out = []
        for j in range(0, len(idx), opts.batch_size):
            part = idx[j:j + opts.batch_size]
            items = [window_signal(ds, i) for i in part]
            x = torch.stack([w for w, _ in items]).to(self.device)
            extra = tuple(torch.stack([e[k] for _, e in items]).to(self.device)
                          for k in range(len(items[0][1])))
            out.append((x, extra, [window_steps(ds, i) for i in part]))
        return out

    @staticmethod
    def decode(x: torch.Tensor, steps: list[list[dict]]) -> torch.Tensor:
        """Normalized (B, C, T) → stage-1 signal units, row ``b`` with ``steps[b]``."""
        return torch.stack([invert_steps(r.float().cpu(), s) for r, s in zip(x, steps)])

    def sq_errors(self, pred: torch.Tensor, true: torch.Tensor, steps) -> dict[str, np.ndarray]:
        """Summed squared errors over (B, channels) per time step: per channel type in signal
        units and ``"normalized"`` in the model's units. → {key: (T,)}."""
        out = {"normalized": (pred.float() - true.float()).pow(2).sum((0, 1)).cpu().double()
               .numpy()}
        err = (self.decode(pred, steps) - self.decode(true, steps)).pow(2)
        for t, idx in self.type_idx.items():
            out[t] = err[:, idx].double().sum((0, 1)).numpy()
        return out

    @staticmethod
    def add(acc: dict[str, np.ndarray], sums: dict[str, np.ndarray]) -> None:
        """Accumulate :meth:`sq_errors` sums into ``acc`` (key by key)."""
        for k, v in sums.items():
            acc[k] = acc.get(k, 0.0) + v

    def rmse(self, sums: dict[str, np.ndarray], n_windows: int) -> dict[str, np.ndarray]:
        """Summed squared errors → RMSE per key (signal units for channel types)."""
        return {k: np.sqrt(v / (n_windows * (len(self.ch_names) if k == "normalized"
                                             else len(self.type_idx[k]))))
                for k, v in sums.items()}

    def compare_spectra(self, generated: np.ndarray, real: np.ndarray) -> dict:
        """PSD per channel type (alpha peak, log-spectral distance) and covariance/correlation."""
        opts = self.options
        seg = min(opts.psd_seconds, real.shape[-1] / self.sfreq,
                  generated.shape[-1] / self.sfreq)
        freqs, psd_gen = spectral.psd_by_channel_type(generated, self.sfreq, self.ch_types,
                                                      seg_seconds=seg)
        _, psd_real = spectral.psd_by_channel_type(real, self.sfreq, self.ch_types,
                                                   seg_seconds=seg)
        types = {}
        for t in psd_gen:
            peaks = {}
            for label, p in (("generated", psd_gen[t]), ("held-out", psd_real[t])):
                try:
                    peaks[label] = spectral.find_peak(freqs, p, opts.alpha_band)
                except ValueError as err:
                    logger.warning("alpha peak search skipped for %s %s: %s", label, t, err)
                    peaks[label] = None
            types[t] = {"psd_generated": psd_gen[t], "psd_heldout": psd_real[t],
                        "peak_generated": peaks["generated"], "peak_heldout": peaks["held-out"],
                        **spectral.psd_similarity(psd_gen[t], psd_real[t], freqs, fmin=1.0,
                                                  fmax=opts.psd_fmax)}
        corr_gen = spectral.channel_correlation(generated)
        corr_real = spectral.channel_correlation(real)
        cov_gen = spectral.channel_covariance(generated)
        cov_real = spectral.channel_covariance(real)
        return {"freqs": freqs, "types": types, "corr_generated": corr_gen,
                "corr_heldout": corr_real, "cov_generated": cov_gen, "cov_heldout": cov_real,
                "covariance_similarity": spectral.matrix_similarity(cov_gen, cov_real),
                "correlation_similarity": spectral.matrix_similarity(corr_gen, corr_real)}

    def real_signal(self) -> np.ndarray:
        """Held-out windows in signal units (N, C, T) for the spectra."""
        batches = self.heldout(self.options.psd_windows, seed_offset=2)
        return torch.cat([self.decode(x, s) for x, _, s in batches]).numpy()

    # -- outputs -----------------------------------------------------------------------------
    def curve(self, name, x, curves, **kw) -> None:
        self.files.extend(report.save_curve(self.out_dir, name, x, curves, **kw).values())

    def figure(self, fig, name) -> None:
        self.files.extend(plots.save_figure(fig, self.out_dir / name))

    def error_curves(self, name: str, x: np.ndarray, rmse: dict[str, dict[str, np.ndarray]],
                     *, xlabel: str, title: str, baselines=(REPEAT_LAST,), **meta) -> None:
        """One curve file per channel type (+ normalized) and one figure with a panel each.

        ``rmse``: {predictor: {channel type or "normalized": (N,)}} in SI / model units.
        """
        keys = [*self.types, "normalized"]
        fig, axes = plots.new_figure(1, len(keys))
        for ax, key in zip(axes[0], keys):
            factor, unit = display_unit(key) if key != "normalized" else (1.0, "normalized")
            curves = {p: v[key] * factor for p, v in rmse.items()}
            self.curve(f"{name}_{key}", x, curves, xlabel=xlabel, ylabel=f"RMSE ({unit})",
                       unit=unit, **meta)
            plots.plot_curves(x, curves, baselines=list(baselines), ax=ax, xlabel=xlabel,
                              ylabel=f"RMSE ({unit})", title=key)
        fig.suptitle(title)
        self.figure(fig, name)

    def spectra_outputs(self, spec: dict, gen_signal: np.ndarray, real: np.ndarray,
                        label: str) -> dict:
        """PSD/correlation figures, matrices, the .fif of the first sequence; → summary part."""
        opts, out = self.options, self.out_dir
        freqs = spec["freqs"]
        fig, axes = plots.new_figure(1, len(self.types))
        summary = {}
        for ax, t in zip(axes[0], self.types):
            d = spec["types"][t]
            factor, unit = display_unit(t)
            psds = {"held-out": d["psd_heldout"] * factor ** 2,
                    "generated": d["psd_generated"] * factor ** 2}
            pg, ph = d["peak_generated"], d["peak_heldout"]
            self.curve(f"psd_{t}", freqs, psds, xlabel="Frequency (Hz)",
                       ylabel=f"PSD ({unit}²/Hz)", unit=f"{unit}²/Hz", ch_type=t)
            plots.plot_psd(freqs, psds, unit=unit, band=opts.alpha_band,
                           band_label=f"alpha ({opts.alpha_band[0]:g}–{opts.alpha_band[1]:g} Hz)",
                           peaks={"held-out": ph.freq if ph else None,
                                  "generated": pg.freq if pg else None},
                           fmax=opts.psd_fmax, ax=ax, title=f"{t}")
            summary[t] = {"alpha_peak_generated_hz": pg.freq if pg else None,
                          "alpha_peak_heldout_hz": ph.freq if ph else None,
                          "log_spectral_distance_db": d["log_spectral_distance_db"],
                          "log_psd_correlation": d["log_psd_correlation"]}
        fig.suptitle(f"PSD: {label} vs held-out")
        self.figure(fig, "psd")
        for key in ("cov_generated", "cov_heldout", "corr_generated", "corr_heldout"):
            self.files.append(report.write_npy(out / f"{key}.npy", spec[key]))
        fig, _ = plots.plot_matrices({"held-out": spec["corr_heldout"],
                                      "generated": spec["corr_generated"]},
                                     cbar_label="Pearson correlation", vmax=1.0,
                                     title="Channel correlation")
        self.figure(fig, "channel_correlation")
        self.files.append(self.write_fif(gen_signal[0], out / "generated_raw.fif", label))
        return {"psd": summary, "covariance_similarity": spec["covariance_similarity"],
                "correlation_similarity": spec["correlation_similarity"]}

    def write_fif(self, signal: np.ndarray, path: Path, label: str) -> Path:
        meta = (getattr(self.test, "metas", None) or [None])[0]
        kw: dict[str, Any] = {}
        template = (template_info_from_provenance(meta.provenance, self.ch_names)
                    if meta is not None else None)
        if template is not None:
            kw["template"] = template
        elif meta is not None and meta.pos_3d is not None:
            kw["pos_3d"], kw["ori_3d"] = meta.pos_3d, meta.ori_3d
        raw = array_to_raw(signal, ch_names=self.ch_names, ch_types=self.ch_types,
                           sfreq=self.sfreq, description=f"ephys-gpt {self.name}: {label}", **kw)
        return write_raw_fif(raw, path)

    def finish(self, summary: dict, rep: report.MarkdownReport, t_start: float) -> dict:
        summary["wall_seconds"] = time.perf_counter() - t_start
        self.files.append(rep.write(self.out_dir / "report.md"))
        summary["files"] = sorted(str(p.relative_to(self.out_dir)) for p in self.files)
        self.files.append(report.write_json(self.out_dir / "summary.json", summary))
        return summary

    def base_summary(self) -> dict:
        o = self.options
        return {"eval_class": self.name, "model_name": self.model_name,
                "ckpt_path": str(o.ckpt_path), "device": str(self.device),
                "precision": o.precision, "split": o.split, "sfreq": self.sfreq,
                "n_channels": len(self.ch_names),
                "channel_types": {t: len(i) for t, i in self.type_idx.items()},
                "window_samples": self.window,
                "units": {t: display_unit(t)[1] for t in self.types}}


@register_eval("EvalBENDR", options=EvalBENDROptions)
class EvalBENDR(ContinuousEval):
    """1-step / N-step error curves and free-running spectra of a continuous forecaster."""

    name = "EvalBENDR"
    options_class = EvalBENDROptions

    def _predict(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        with self.autocast:
            return self.model(x, *extra).float()

    def _forecast(self, x: torch.Tensor, extra: tuple, steps: int,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
        kw: dict[str, Any] = {}
        if len(extra) == 2:
            kw = {"pos_2d": extra[0], "ch_type": extra[1]}
        if noise is not None:
            kw["noise"] = noise
        with self.autocast:
            return self.model.forecast(x, steps, **kw).float()

    def residual_cov(self) -> torch.Tensor:
        """Channel covariance (C, C) of the 1-step residuals on ``residual_windows`` training
        windows (model units): the innovations of the free-running simulation."""
        opts, train = self.options, getattr(self._splits, "train", None)
        if train is None or len(train) == 0:
            raise ValueError("eval.free_run_noise 'residual' needs training windows; the "
                             "train split is empty (or use free_run_noise: none)")
        sq, n = 0.0, 0
        for x, extra, _ in self.heldout(opts.residual_windows, dataset=train):
            res = (self._predict(x[..., :-1], extra) - x[..., 1:]).double()
            sq = sq + torch.einsum("bct,bdt->cd", res, res)
            n += res.shape[0] * res.shape[2]
        return (sq / n).float()

    @torch.no_grad()
    def run(self) -> dict:
        opts = self.options
        torch.manual_seed(opts.seed)
        t_start = time.perf_counter()
        self._setup()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        N, T = opts.future_steps, self.window
        if N >= T:
            raise ValueError(f"eval.future_steps ({N}) must be smaller than the window "
                             f"({T} samples)")
        m = self.model_name
        batches = self.heldout(opts.max_batches * opts.batch_size)
        one = {m: {}, REPEAT_LAST: {}}
        nst = {m: {}, REPEAT_LAST: {}}
        n_win = 0

        for x, extra, steps in tqdm(batches, desc=f"{self.name} curves",
                                    disable=not opts.progress, leave=False):
            inp, tgt = x[..., :-1], x[..., 1:]
            self.add(one[m], self.sq_errors(self._predict(inp, extra), tgt, steps))
            self.add(one[REPEAT_LAST], self.sq_errors(inp, tgt, steps))
            ctx, fut = x[..., :T - N], x[..., T - N:]
            pred = self._forecast(ctx, extra, N)[..., -N:]
            self.add(nst[m], self.sq_errors(pred, fut, steps))
            self.add(nst[REPEAT_LAST], self.sq_errors(ctx[..., -1:].expand_as(fut), fut, steps))
            n_win += x.shape[0]
        one_rmse = {p: self.rmse(v, n_win) for p, v in one.items()}
        n_rmse = {p: self.rmse(v, n_win) for p, v in nst.items()}
        pos = np.arange(1, T)
        self.error_curves("one_step_rmse", pos / self.sfreq * 1e3, one_rmse,
                          xlabel="History available (ms)",
                          title="1-step-ahead error vs history (teacher forced, held-out)",
                          n_windows=n_win)
        k = np.arange(1, N + 1)
        self.error_curves("nstep_rmse", k, n_rmse,
                          xlabel=f"Steps ahead (1 step = {1e3 / self.sfreq:.3g} ms)",
                          title="N-step-ahead error (autoregressive forecast, held-out)",
                          n_windows=n_win, context_samples=T - N)
        # free running
        n_new = max(1, round(opts.gen_seconds * self.sfreq))
        gen_b = self.heldout(opts.n_generated, seed_offset=1)
        noise = self.residual_cov() if opts.free_run_noise == "residual" else None
        t0 = time.perf_counter()
        gens = [self.decode(self._forecast(x, e, n_new, noise)[..., -n_new:], s)
                for x, e, s in gen_b]
        gen_time = time.perf_counter() - t0
        gen = torch.cat(gens).numpy()
        real = self.real_signal()
        spec = self.compare_spectra(gen, real)
        summary = self.base_summary()
        summary["one_step"] = {
            "rmse_mean": {p: {key: float(v.mean() * (display_unit(key)[0]
                                                      if key != "normalized" else 1.0))
                              for key, v in r.items()} for p, r in one_rmse.items()},
            "beats_repeat_last": bool(one_rmse[m]["normalized"].mean()
                                      < one_rmse[REPEAT_LAST]["normalized"].mean()),
        }
        summary["nstep"] = {
            "future_steps": N, "context_samples": T - N,
            "rmse_at_1": {p: {key: float(v[0]) for key, v in r.items()}
                          for p, r in n_rmse.items()},
            f"rmse_at_{N}": {p: {key: float(v[-1]) for key, v in r.items()}
                             for p, r in n_rmse.items()},
            "note": "channel-type RMSE in SI units (T, T/m); normalized in model units",
        }
        summary["n_windows"] = n_win
        summary["generation"] = {"seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                                 "free_run_noise": opts.free_run_noise,
                                 "innovation_std_normalized": (
                                     None if noise is None
                                     else float(noise.diagonal().sqrt().mean())),
                                 "steps_per_second": n_new * len(gen_b) / max(gen_time, 1e-9),
                                 **self.spectra_outputs(spec, gen, real,
                                                        f"{opts.gen_seconds:g} s free-running")}
        rep = report.MarkdownReport(f"EvalBENDR: {m}")
        rep.text(f"Checkpoint `{opts.ckpt_path}`: {n_win} held-out ({opts.split}) windows of "
                 f"{T} samples at {self.sfreq:g} Hz, {len(self.ch_names)} channels.")
        rep.section("1-step-ahead error (teacher forced), mean over history")
        rep.table(["predictor", "RMSE (normalized)"],
                  [[p, summary["one_step"]["rmse_mean"][p]["normalized"]] for p in one_rmse])
        rep.section(f"N-step-ahead error ({N} steps from {T - N}-sample contexts)")
        rep.table(["predictor", "RMSE @1 (normalized)", f"RMSE @{N} (normalized)"],
                  [[p, n_rmse[p]["normalized"][0], n_rmse[p]["normalized"][-1]] for p in n_rmse])
        rep.section("Free-running generation")
        rep.text("Mean forecast plus Gaussian innovations with the channel covariance of the "
                 "1-step residuals on training windows (mean std "
                 f"{float(noise.diagonal().sqrt().mean()):.3g}, normalized units)."
                 if noise is not None else
                 "Mean forecast alone (free_run_noise: none): it decays towards the mean, so "
                 "its spectrum falls below the data's.")
        rep.table(["channel type", "alpha peak held-out (Hz)", "alpha peak generated (Hz)",
                   "log-spectral distance (dB)"],
                  [[t, d["alpha_peak_heldout_hz"], d["alpha_peak_generated_hz"],
                    d["log_spectral_distance_db"]]
                   for t, d in summary["generation"]["psd"].items()])
        rep.text("Correlation similarity (off-diagonal r): "
                 f"{report.fmt_value(spec['correlation_similarity']['offdiag_correlation'], 3)}."
                 " The generated signal is in `generated_raw.fif`.")
        rep.section("Figures")
        for name, cap in [("one_step_rmse", "1-step error vs history"),
                          ("nstep_rmse", "N-step error"), ("psd", "PSD"),
                          ("channel_correlation", "Channel correlation")]:
            rep.figure(self.out_dir / f"{name}.png", cap, relative_to=self.out_dir)
        summary = self.finish(summary, rep, t_start)
        logger.info("EvalBENDR done in %.1f s: 1-step RMSE (normalized) %s %.4g vs %s %.4g",
                    summary["wall_seconds"], m, one_rmse[m]["normalized"].mean(), REPEAT_LAST,
                    one_rmse[REPEAT_LAST]["normalized"].mean())
        return summary

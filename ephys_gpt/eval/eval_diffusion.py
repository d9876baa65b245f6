"""``EvalDiffusion``: evaluation of continuous diffusion forecasters (NTD).

On held-out windows of a continuous chunk store:

1. **Horizon MSE**: the last ``future_steps`` (H) samples of each window forecast by
   in-painting from the rest (``model.forecast``), ``n_samples`` draws per window. The
   point forecast is the mean of the draws (it estimates the conditional mean, which is what
   RMSE rewards; a single draw of a good model of a noisy signal has ~sqrt(2) times the
   error of the conditional mean far ahead, and is reported beside it). RMSE at each horizon
   step in signal and normalized units, against repeat-last-value and zero (the normalized
   mean) baselines; and the CRPS of the draws (the ensemble's probabilistic skill, fair
   estimator; the deterministic baselines' CRPS is their mean absolute error).
2. **History sweep**: the same H samples forecast (mean of the draws) from only the ``h``
   samples before them, for each ``h`` in ``history_lengths``: how much context the model
   uses.
3. **Recursive forecasting**: ``recursive_steps`` samples forecast window by window (each
   window in-paints ``forecast_chunk`` new samples after the latest ones), error vs horizon.
4. **Samples vs data**: ``gen_seconds`` generated recursively after a held-out context, and
   ``n_unconditional`` unconditional windows, compared with held-out data by Welch PSD per
   channel type and channel covariance/correlation; the generated signal as ``.fif``.

Sampling (``sampler``: ddim/ddpm, ``sampling_steps``, ``eta``) defaults to the model's
configuration; every loop shows a tqdm bar. Outputs in ``<save_dir>/evals/EvalDiffusion/``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ephys_gpt.eval import report
from ephys_gpt.eval.eval_bendr import REPEAT_LAST, ContinuousEval, ContinuousEvalOptions
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import check_history_lengths
from ephys_gpt.models.capabilities import Sampler
from ephys_gpt.models.registry import get_model_spec

logger = logging.getLogger(__name__)

ZERO = "zero (mean)"


class EvalDiffusionOptions(ContinuousEvalOptions):
    """The ``eval`` block for ``eval_class: EvalDiffusion``."""

    history_lengths: list[int] | None = Field(
        None, description="context lengths of the history sweep (default: powers of two up "
                          "to the window minus future_steps)")
    recursive_steps: int | None = Field(None, ge=1, description="horizon of the recursive "
                                                               "forecast (default: half the "
                                                               "window)")
    n_unconditional: int = Field(4, ge=0, description="unconditional sample windows")
    n_samples: int = Field(8, ge=1, description="forecasts drawn per window: their mean is "
                                                "the point forecast, their spread gives CRPS")
    sampler: Literal["ddim", "ddpm"] | None = Field(None, description="default: the model's")
    sampling_steps: int | None = Field(None, ge=1, description="DDIM levels (default: the "
                                                               "model's)")
    eta: float | None = Field(None, ge=0, description="DDIM stochasticity (default: model's)")

    _lengths = field_validator("history_lengths")(check_history_lengths)


@register_eval("EvalDiffusion", options=EvalDiffusionOptions)
class EvalDiffusion(ContinuousEval):
    """Horizon / history / recursive error curves and sample spectra of a diffusion model."""

    name = "EvalDiffusion"
    options_class = EvalDiffusionOptions
    input_kinds = ("continuous",)

    def _sample_kw(self) -> dict[str, Any]:
        o = self.options
        kw = {"sampler": o.sampler, "steps": o.sampling_steps, "eta": o.eta}
        return {k: v for k, v in kw.items() if v is not None}

    def _forecast(self, ctx: torch.Tensor, steps: int) -> torch.Tensor:
        """The ``steps`` new samples (B, C, steps) after ``ctx`` (B, C, T)."""
        with self.autocast:
            out = self.model.forecast(ctx, steps, **self._sample_kw())
        return out[..., -steps:].float()

    def _draws(self, ctx: torch.Tensor, steps: int) -> torch.Tensor:
        """``n_samples`` forecasts (K, B, C, steps) of ``ctx`` (B, C, T), in one batch."""
        K = self.options.n_samples
        out = self._forecast(ctx.repeat(K, 1, 1), steps)
        return out.reshape(K, *ctx.shape[:2], steps)

    @staticmethod
    def crps_sums(draws: torch.Tensor, true: torch.Tensor) -> np.ndarray:
        """Summed CRPS over (B, channels) per time step → (T,), normalized units.

        ``draws`` (K, B, C, T): the fair ensemble estimator
        ``mean_k |x_k - y| - sum_{k != j} |x_k - x_j| / (2 K (K - 1))``; with K = 1 it is the
        absolute error.
        """
        K = draws.shape[0]
        skill = (draws - true[None]).abs().mean(0)
        if K > 1:
            spread = (draws[:, None] - draws[None]).abs().sum((0, 1)) / (2 * K * (K - 1))
            skill = skill - spread
        return skill.sum((0, 1)).cpu().double().numpy()

    @torch.no_grad()
    def run(self) -> dict:
        opts = self.options
        torch.manual_seed(opts.seed)
        t_start = time.perf_counter()
        self._setup()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        m, T, H = self.model_name, self.window, opts.future_steps
        if H >= T:
            raise ValueError(f"eval.future_steps ({H}) must be smaller than the window ({T})")
        hist = opts.history_lengths or sorted({*(2 ** i for i in range(20) if 2 ** i < T - H),
                                               T - H})
        if max(hist) > T - H:
            raise ValueError(f"eval.history_lengths {hist} exceed the context available "
                             f"({T - H} samples: window {T} minus future_steps {H})")
        R = opts.recursive_steps or max(1, T // 2)
        if R >= T:
            raise ValueError(f"eval.recursive_steps ({R}) must be smaller than the window ({T})")
        batches = self.heldout(opts.max_batches * opts.batch_size)
        K = opts.n_samples
        one = f"{m} (single draw)"
        preds = (m, REPEAT_LAST, ZERO)
        hor = {p: {} for p in (m, one, REPEAT_LAST, ZERO)}
        crps = {p: np.zeros(H) for p in preds}
        rec = {p: {} for p in preds}
        sweep = {p: np.zeros(len(hist)) for p in preds}
        n_win = 0

        for x, _, steps in tqdm(batches, desc=f"{self.name} forecasts",
                                disable=not opts.progress, leave=False):
            ctx, fut = x[..., :T - H], x[..., T - H:]
            base = {REPEAT_LAST: ctx[..., -1:].expand_as(fut), ZERO: torch.zeros_like(fut)}
            draws = self._draws(ctx, H)
            self.add(hor[m], self.sq_errors(draws.mean(0), fut, steps))
            self.add(hor[one], self.sq_errors(draws[0], fut, steps))
            crps[m] += self.crps_sums(draws, fut)
            for p, v in base.items():
                err = self.sq_errors(v, fut, steps)
                self.add(hor[p], err)
                sweep[p] += err["normalized"].sum()  # the baselines ignore the context length
                crps[p] += self.crps_sums(v[None], fut)
            for j, h in enumerate(hist):
                err = self.sq_errors(self._draws(ctx[..., -h:], H).mean(0), fut, steps)
                sweep[m][j] += err["normalized"].sum()
            rctx, rfut = x[..., :T - R], x[..., T - R:]
            self.add(rec[m], self.sq_errors(self._draws(rctx, R).mean(0), rfut, steps))
            self.add(rec[REPEAT_LAST],
                     self.sq_errors(rctx[..., -1:].expand_as(rfut), rfut, steps))
            self.add(rec[ZERO], self.sq_errors(torch.zeros_like(rfut), rfut, steps))
            n_win += x.shape[0]
        C = len(self.ch_names)
        hor_rmse = {p: self.rmse(v, n_win) for p, v in hor.items()}
        rec_rmse = {p: self.rmse(v, n_win) for p, v in rec.items()}
        sweep_rmse = {p: np.sqrt(v / (n_win * C * H)) for p, v in sweep.items()}
        crps_mean = {p: v / (n_win * C) for p, v in crps.items()}
        baselines = (REPEAT_LAST, ZERO)
        step_ms = f"1 step = {1e3 / self.sfreq:.3g} ms"
        self.error_curves("horizon_rmse", np.arange(1, H + 1), hor_rmse,
                          xlabel=f"Steps ahead ({step_ms})", baselines=baselines,
                          title=f"Forecast error vs horizon (in-painting, mean of {K} draws, "
                                "held-out)",
                          n_windows=n_win, context_samples=T - H, n_samples=K)
        from ephys_gpt.eval import plots

        self.curve("horizon_crps", np.arange(1, H + 1), crps_mean,
                   xlabel=f"Steps ahead ({step_ms})", ylabel="CRPS (normalized)",
                   n_windows=n_win, n_samples=K)
        fig, _ = plots.plot_curves(np.arange(1, H + 1), crps_mean, baselines=list(baselines),
                                   xlabel=f"Steps ahead ({step_ms})",
                                   ylabel="CRPS (normalized)",
                                   title=f"Probabilistic forecast skill ({K} draws; lower is "
                                         "better)")
        self.figure(fig, "horizon_crps")
        self.curve("history_sweep", np.asarray(hist), sweep_rmse,
                   xlabel="Context length (samples)", ylabel="RMSE (normalized)",
                   horizon=H, n_windows=n_win)
        fig, _ = plots.plot_curves(np.asarray(hist), sweep_rmse, baselines=list(baselines),
                                   logx=len(hist) > 2, xlabel="Context length (samples)",
                                   ylabel=f"RMSE over {H} steps (normalized)",
                                   title="Forecast error vs history length")
        self.figure(fig, "history_sweep")
        chunk = getattr(getattr(self.model, "config", None), "forecast_chunk", None)
        self.error_curves("recursive_rmse", np.arange(1, R + 1), rec_rmse,
                          xlabel=f"Steps ahead ({step_ms})", baselines=baselines,
                          title="Recursive forecast error (window by window, held-out)",
                          n_windows=n_win, context_samples=T - R, forecast_chunk=chunk)
        # samples vs data
        n_new = max(1, round(opts.gen_seconds * self.sfreq))
        gen_b = self.heldout(opts.n_generated, seed_offset=1)
        t0 = time.perf_counter()
        gen = torch.cat([self.decode(self._forecast(x, n_new), s) for x, _, s in
                         tqdm(gen_b, desc="free-running", disable=not opts.progress,
                              leave=False)]).numpy()
        gen_time = time.perf_counter() - t0
        real = self.real_signal()
        spec = self.compare_spectra(gen, real)
        summary = self.base_summary()
        summary["n_windows"] = n_win
        summary["sampling"] = self._sample_kw() or "model defaults"
        summary["horizon"] = {
            "future_steps": H, "context_samples": T - H, "n_samples": K,
            "rmse_mean_normalized": {p: float(v["normalized"].mean())
                                     for p, v in hor_rmse.items()},
            "rmse_at_1_normalized": {p: float(v["normalized"][0])
                                     for p, v in hor_rmse.items()},
            "crps_mean_normalized": {p: float(v.mean()) for p, v in crps_mean.items()},
            "beats_baselines": bool(hor_rmse[m]["normalized"].mean()
                                    < min(hor_rmse[p]["normalized"].mean() for p in baselines)),
        }
        summary["history_sweep"] = {"history_lengths": hist, "rmse_normalized": sweep_rmse}
        summary["recursive"] = {"steps": R, "forecast_chunk": chunk,
                                "rmse_mean_normalized": {p: float(v["normalized"].mean())
                                                         for p, v in rec_rmse.items()}}
        summary["generation"] = {"seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                                 "seconds_per_generated_second":
                                     gen_time / max(opts.gen_seconds * len(gen), 1e-9),
                                 **self.spectra_outputs(spec, gen, real,
                                                        f"{opts.gen_seconds:g} s recursive")}
        if opts.n_unconditional and get_model_spec(self.model_name).can(Sampler):
            L = getattr(getattr(self.model, "config", None), "signal_length", T)
            with self.autocast:
                unc = self.model.sample(opts.n_unconditional, L, progress=opts.progress,
                                        **self._sample_kw()).float()
            steps0 = batches[0][2][0]
            unc_sig = self.decode(unc, [steps0] * len(unc)).numpy()
            self.files.append(report.write_npy(self.out_dir / "unconditional_samples.npy",
                                               unc_sig.astype(np.float32)))
            uspec = self.compare_spectra(unc_sig, real)
            summary["unconditional"] = {
                "n": opts.n_unconditional, "samples": L,
                "log_spectral_distance_db": {t: d["log_spectral_distance_db"]
                                             for t, d in uspec["types"].items()},
                "correlation_similarity": uspec["correlation_similarity"]}
        rep = report.MarkdownReport(f"EvalDiffusion: {m}")
        rep.text(f"Checkpoint `{opts.ckpt_path}`: {n_win} held-out ({opts.split}) windows of "
                 f"{T} samples at {self.sfreq:g} Hz, {C} channels; sampling "
                 f"{summary['sampling']}.")
        rep.section(f"Forecast error over {H} steps (normalized units)")
        rep.text(f"{m}: the mean of {K} in-painted draws per window; {one}: the first draw "
                 "alone. CRPS scores the draws as a forecast distribution (for the "
                 "deterministic baselines it is their mean absolute error).")
        hz, rc = summary["horizon"], summary["recursive"]["rmse_mean_normalized"]
        rep.table(["predictor", "RMSE at 1 step", "horizon RMSE", "horizon CRPS",
                   f"recursive RMSE ({R} steps)"],
                  [[p, hz["rmse_at_1_normalized"][p], hz["rmse_mean_normalized"][p],
                    hz["crps_mean_normalized"].get(p, "—"), rc.get(p, "—")]
                   for p in (m, one, REPEAT_LAST, ZERO)])
        rep.section("History sweep")
        rep.table(["context (samples)", *preds],
                  [[h, *(sweep_rmse[p][j] for p in preds)] for j, h in enumerate(hist)])
        rep.section("Generated vs held-out spectra")
        rep.table(["channel type", "alpha peak held-out (Hz)", "alpha peak generated (Hz)",
                   "log-spectral distance (dB)"],
                  [[t, d["alpha_peak_heldout_hz"], d["alpha_peak_generated_hz"],
                    d["log_spectral_distance_db"]]
                   for t, d in summary["generation"]["psd"].items()])
        rep.section("Figures")
        for name, cap in [("horizon_rmse", "Error vs horizon"),
                          ("horizon_crps", "CRPS vs horizon"),
                          ("history_sweep", "Error vs history"),
                          ("recursive_rmse", "Recursive forecast error"), ("psd", "PSD"),
                          ("channel_correlation", "Channel correlation")]:
            rep.figure(self.out_dir / f"{name}.png", cap, relative_to=self.out_dir)
        summary = self.finish(summary, rep, t_start)
        logger.info("EvalDiffusion done in %.1f s: horizon RMSE %s %.4g, %s %.4g, %s %.4g",
                    summary["wall_seconds"], m, hor_rmse[m]["normalized"].mean(), REPEAT_LAST,
                    hor_rmse[REPEAT_LAST]["normalized"].mean(), ZERO,
                    hor_rmse[ZERO]["normalized"].mean())
        return summary

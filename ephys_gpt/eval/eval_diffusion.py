"""``EvalDiffusion``: evaluation of continuous diffusion forecasters (NTD).

On held-out windows of a continuous chunk store:

1. **Horizon MSE**: the last ``future_steps`` (H) samples of each window forecast by
   in-painting from the rest (``model.forecast``), ``n_samples`` draws per window. The
   point forecast is the mean of the draws (it estimates the conditional mean, which is what
   RMSE rewards; a single draw of a good model of a noisy signal has ~sqrt(2) times the
   error of the conditional mean far ahead, and is reported beside it). RMSE at each horizon
   step in signal and normalized units, against repeat-last-value, zero (the normalized
   mean) and the fitted AR and VAR (recursive forecasts, ``ephys_gpt/linear/``); and
   the CRPS of the draws (the ensemble's probabilistic skill, fair
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

import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ephys_gpt.eval import plots, report
from ephys_gpt.eval.baselines import REPEAT_LAST, ZERO, repeat_last
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import EvalRunner, RunnerOptions, check_history_lengths
from ephys_gpt.models.capabilities import Forecaster, Sampler
from ephys_gpt.models.registry import get_model_spec

NAIVE = (REPEAT_LAST, ZERO)


class EvalDiffusionOptions(RunnerOptions):
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


@register_eval("EvalDiffusion", options=EvalDiffusionOptions)
class EvalDiffusion(EvalRunner):
    """Horizon / history / recursive error curves and sample spectra of a diffusion model."""

    name = "EvalDiffusion"
    options_class = EvalDiffusionOptions
    capability = Forecaster
    input_kinds = ("continuous",)
    crps_sums = staticmethod(crps_sums)

    def setup(self) -> None:
        super().setup()
        opts, T, H = self.options, self.window, self.options.future_steps
        if H >= T:
            raise ValueError(f"eval.future_steps ({H}) must be smaller than the window ({T})")
        self.hist = opts.history_lengths or sorted({*(2 ** i for i in range(20)
                                                      if 2 ** i < T - H), T - H})
        if max(self.hist) > T - H:
            raise ValueError(f"eval.history_lengths {self.hist} exceed the context available "
                             f"({T - H} samples: window {T} minus future_steps {H})")
        self.R = opts.recursive_steps or max(1, T // 2)
        if self.R >= T:
            raise ValueError(f"eval.recursive_steps ({self.R}) must be smaller than the "
                             f"window ({T})")

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
        return self._forecast(ctx.repeat(K, 1, 1), steps).reshape(K, *ctx.shape[:2], steps)

    # -- measurements -----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, report.MarkdownReport]:
        opts = self.options
        batches = self.heldout(opts.max_batches * opts.batch_size)
        self.baselines = (*NAIVE, *(m.name for m in self.linear_models()))
        acc, n_win = self.forecast_sums(batches)
        res = self._curves(acc, n_win)
        summary = {**self.base_summary(), "n_windows": n_win,
                   "linear_baselines": self.linear_summary(),
                   "sampling": self._sample_kw() or "model defaults",
                   "horizon": self._horizon_summary(res),
                   "history_sweep": {"history_lengths": self.hist,
                                     "rmse_normalized": res["sweep"]},
                   "recursive": {"steps": self.R,
                                 "forecast_chunk": getattr(self.model.config,
                                                           "forecast_chunk", None),
                                 "rmse_mean_normalized": {p: float(v["normalized"].mean())
                                                          for p, v in res["rec"].items()}}}
        summary["generation"], real = self.free_running()
        if opts.n_unconditional and get_model_spec(self.model_name).can(Sampler):
            # unconditional windows belong to no session: decode with the first window's steps
            summary["unconditional"] = self.unconditional(real, batches[0][2][0])
        return summary, self._report(summary, res["sweep"])

    def forecast_sums(self, batches: list) -> tuple[dict, int]:
        """Summed squared errors (horizon, history sweep, recursive) and CRPS of the model's
        draws and the baselines over ``batches``."""
        opts, m, T, R = self.options, self.model_name, self.window, self.R
        H = opts.future_steps
        one, preds = f"{m} (single draw)", (m, *self.baselines)
        acc = {"hor": {p: {} for p in (m, one, *self.baselines)}, "rec": {p: {} for p in preds},
               "crps": {p: np.zeros(H) for p in preds},
               "sweep": {p: np.zeros(len(self.hist)) for p in preds}}
        n_win = 0
        for x, _, steps in tqdm(batches, desc=f"{self.name} forecasts",
                                disable=not opts.progress, leave=False):
            ctx, fut = x[..., :T - H], x[..., T - H:]
            draws = self._draws(ctx, H)
            self.add(acc["hor"][m], self.sq_errors(draws.mean(0), fut, steps))
            self.add(acc["hor"][one], self.sq_errors(draws[0], fut, steps))
            acc["crps"][m] += crps_sums(draws, fut)
            linear = self.linear_forecast(ctx, steps, H)
            for p, v in {REPEAT_LAST: repeat_last(ctx, H), ZERO: torch.zeros_like(fut),
                         **linear}.items():
                err = self.sq_errors(v, fut, steps)
                self.add(acc["hor"][p], err)
                acc["crps"][p] += crps_sums(v[None].to(fut.device), fut)
                if p in NAIVE:  # the naive baselines ignore the context length
                    acc["sweep"][p] += err["normalized"].sum()
            for j, h in enumerate(self.hist):
                err = self.sq_errors(self._draws(ctx[..., -h:], H).mean(0), fut, steps)
                acc["sweep"][m][j] += err["normalized"].sum()
                for p, v in self.linear_forecast(ctx[..., -h:], steps, H).items():
                    acc["sweep"][p][j] += self.sq_errors(v, fut, steps)["normalized"].sum()
            rctx, rfut = x[..., :T - R], x[..., T - R:]
            self.add(acc["rec"][m], self.sq_errors(self._draws(rctx, R).mean(0), rfut, steps))
            for p, v in {REPEAT_LAST: repeat_last(rctx, R), ZERO: torch.zeros_like(rfut),
                         **self.linear_forecast(rctx, steps, R)}.items():
                self.add(acc["rec"][p], self.sq_errors(v, rfut, steps))
            n_win += x.shape[0]
        return acc, n_win

    def _curves(self, acc: dict, n_win: int) -> dict:
        """RMSE / CRPS curves and figures from the summed errors."""
        C, H, K = len(self.ch_names), self.options.future_steps, self.options.n_samples
        res = {"hor": {p: self.rmse(v, n_win) for p, v in acc["hor"].items()},
               "rec": {p: self.rmse(v, n_win) for p, v in acc["rec"].items()},
               "sweep": {p: np.sqrt(v / (n_win * C * H)) for p, v in acc["sweep"].items()},
               "crps": {p: v / (n_win * C) for p, v in acc["crps"].items()}}
        step_ms = f"Steps ahead (1 step = {1e3 / self.sfreq:.3g} ms)"
        k = np.arange(1, H + 1)
        self.error_curves("horizon_rmse", k, res["hor"], xlabel=step_ms, baselines=self.baselines,
                          title=f"Forecast error vs horizon (in-painting, mean of {K} draws, "
                                "held-out)", n_windows=n_win,
                          context_samples=self.window - H, n_samples=K)
        self.curve("horizon_crps", k, res["crps"], xlabel=step_ms, ylabel="CRPS (normalized)",
                   n_windows=n_win, n_samples=K)
        fig, _ = plots.plot_curves(k, res["crps"], baselines=self.baselines, xlabel=step_ms,
                                   ylabel="CRPS (normalized)",
                                   title=f"Probabilistic forecast skill ({K} draws; lower is "
                                         "better)")
        self.figure(fig, "horizon_crps")
        hist = np.asarray(self.hist)
        self.curve("history_sweep", hist, res["sweep"], xlabel="Context length (samples)",
                   ylabel="RMSE (normalized)", horizon=H, n_windows=n_win)
        fig, _ = plots.plot_curves(hist, res["sweep"], baselines=self.baselines, logx=len(hist) > 2,
                                   xlabel="Context length (samples)",
                                   ylabel=f"RMSE over {H} steps (normalized)",
                                   title="Forecast error vs history length")
        self.figure(fig, "history_sweep")
        self.error_curves("recursive_rmse", np.arange(1, self.R + 1), res["rec"],
                          xlabel=step_ms, baselines=self.baselines,
                          title="Recursive forecast error (window by window, held-out)",
                          n_windows=n_win, context_samples=self.window - self.R,
                          forecast_chunk=getattr(self.model.config, "forecast_chunk", None))
        return res

    def _horizon_summary(self, res: dict) -> dict:
        m, hor = self.model_name, res["hor"]
        return {"future_steps": self.options.future_steps,
                "context_samples": self.window - self.options.future_steps,
                "n_samples": self.options.n_samples,
                "rmse_mean_normalized": {p: float(v["normalized"].mean()) for p, v in hor.items()},
                "rmse_at_1_normalized": {p: float(v["normalized"][0]) for p, v in hor.items()},
                "crps_mean_normalized": {p: float(v.mean()) for p, v in res["crps"].items()},
                "beats_baselines": bool(hor[m]["normalized"].mean()
                                        < min(hor[p]["normalized"].mean() for p in NAIVE)),
                "beats_linear": {p: bool(hor[m]["normalized"].mean()
                                         < hor[p]["normalized"].mean())
                                 for p in self.baselines[len(NAIVE):]}}

    def free_running(self) -> tuple[dict, np.ndarray]:
        """``gen_seconds`` forecast recursively after held-out contexts, compared with held-out
        data; → (the summary's generation part, the held-out signal)."""
        opts = self.options
        n_new = max(1, round(opts.gen_seconds * self.sfreq))
        gen_b = self.heldout(opts.n_generated, seed_offset=1)
        t0 = time.perf_counter()
        gen = torch.cat([self.to_signal(self._forecast(x, n_new), s) for x, _, s in
                         tqdm(gen_b, desc="free-running", disable=not opts.progress,
                              leave=False)]).numpy()
        gen_time = time.perf_counter() - t0
        real = self.real_signal()
        spec = self.compare_spectra(gen, real)
        linear = self.linear_free_run(torch.cat([x for x, _, _ in gen_b]),
                                      [s for _, _, st in gen_b for s in st], n_new, real)
        return {"seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                "seconds_per_generated_second": gen_time / max(opts.gen_seconds * len(gen),
                                                               1e-9),
                **self.spectra_outputs(spec, gen, real, f"{opts.gen_seconds:g} s recursive"),
                "linear": linear}, real

    def unconditional(self, real: np.ndarray, steps: list[dict]) -> dict:
        """``n_unconditional`` unconditional windows compared with held-out data."""
        opts = self.options
        L = self.model.config.signal_length
        with self.autocast:
            unc = self.model.sample(opts.n_unconditional, L, progress=opts.progress,
                                    **self._sample_kw()).float()
        unc_sig = self.to_signal(unc, [steps] * len(unc)).numpy()
        self.files.append(report.write_npy(self.out_dir / "unconditional_samples.npy",
                                           unc_sig.astype(np.float32)))
        uspec = self.compare_spectra(unc_sig, real)
        return {"n": opts.n_unconditional, "samples": L,
                "log_spectral_distance_db": {t: d["log_spectral_distance_db"]
                                             for t, d in uspec["types"].items()},
                "correlation_similarity": uspec["correlation_similarity"]}

    def _report(self, summary: dict, sweep: dict) -> report.MarkdownReport:
        opts, m = self.options, self.model_name
        H, K, R = opts.future_steps, opts.n_samples, self.R
        one = f"{m} (single draw)"
        rep = report.MarkdownReport(f"EvalDiffusion: {m}")
        rep.text(f"Checkpoint `{opts.ckpt_path}`: {summary['n_windows']} held-out "
                 f"({opts.split}) windows of {self.window} samples at {self.sfreq:g} Hz, "
                 f"{len(self.ch_names)} channels; sampling {summary['sampling']}.")
        rep.section(f"Forecast error over {H} steps (normalized units)")
        rep.text(f"{m}: the mean of {K} in-painted draws per window; {one}: the first draw "
                 "alone. CRPS scores the draws as a forecast distribution (for the "
                 "deterministic baselines it is their mean absolute error).")
        hz, rc = summary["horizon"], summary["recursive"]["rmse_mean_normalized"]
        rep.table(["predictor", "RMSE at 1 step", "horizon RMSE", "horizon CRPS",
                   f"recursive RMSE ({R} steps)"],
                  [[p, hz["rmse_at_1_normalized"][p], hz["rmse_mean_normalized"][p],
                    hz["crps_mean_normalized"].get(p, "—"), rc.get(p, "—")]
                   for p in (m, one, *self.baselines)])
        lin = list(hz["beats_linear"])
        rep.text(self.linear_verdict("held-out 1-step RMSE (normalized units)",
                                     hz["rmse_at_1_normalized"][m],
                                     {p: hz["rmse_at_1_normalized"][p] for p in lin}, False))
        rep.text(self.linear_verdict(f"held-out RMSE over {H} steps (normalized units)",
                                     hz["rmse_mean_normalized"][m],
                                     {p: hz["rmse_mean_normalized"][p] for p in lin}, False))
        rep.section("History sweep")
        rep.table(["context (samples)", m, *self.baselines],
                  [[h, *(sweep[p][j] for p in (m, *self.baselines))]
                   for j, h in enumerate(self.hist)])
        rep.section("Generated vs held-out spectra")
        self.spectra_section(rep, summary["generation"])
        self.linear_free_run_table(rep, summary["generation"]["linear"])
        self.figures_section(rep, [("horizon_rmse", "Error vs horizon"),
                                   ("horizon_crps", "CRPS vs horizon"),
                                   ("history_sweep", "Error vs history"),
                                   ("recursive_rmse", "Recursive forecast error"),
                                   ("psd", "PSD"),
                                   ("channel_correlation", "Channel correlation"),
                                   ("traces", "Signal traces")])
        return rep

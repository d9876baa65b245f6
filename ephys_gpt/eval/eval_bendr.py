"""``EvalBENDR``: evaluation of continuous next-sample forecasters (BENDRForecast, the CNN
baselines).

On held-out windows of a continuous chunk store (``split``, the test split by default):

1. **1-step error by history** (teacher forced): RMSE of the prediction of ``x[t+1]`` made
   from ``x[:t+1]``, at every position ``t`` of a window (how the error falls as history
   grows), against the repeat-last-value baseline and the fitted per-channel AR and
   multichannel VAR (``ephys_gpt/linear/``).
2. **N-step-ahead error**: the last ``future_steps`` samples of each window forecast
   autoregressively (``model.forecast``) from the rest; RMSE at each horizon ``k`` in signal
   units (stage-2 steps inverted with :func:`~ephys_gpt.codec.invert_steps`;
   fT for magnetometers, fT/cm for gradiometers) and in normalized units, against the
   repeat-last baseline and the recursive AR and VAR forecasts.
3. **Free running**: ``gen_seconds`` forecast from a held-out context, compared with held-out
   data by Welch PSD per channel type (alpha peak) and channel covariance/correlation; the
   signal is written as an MNE ``.fif``.

Outputs in ``<save_dir>/evals/EvalBENDR/``: curves ``.npy`` + ``.json``, figures ``.png`` +
``.pdf``, ``summary.json``, ``report.md``, ``generated_raw.fif``.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from tqdm.auto import tqdm

from ephys_gpt.eval import report
from ephys_gpt.eval.baselines import REPEAT_LAST, repeat_last
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import EvalRunner, RunnerOptions, display_unit
from ephys_gpt.models.capabilities import Forecaster


class EvalBENDROptions(RunnerOptions):
    """The ``eval`` block for ``eval_class: EvalBENDR``."""

    free_run_noise: Literal["residual", "none"] = Field(
        "residual", description="free-running generation: add Gaussian innovations with the "
                                "channel covariance of the 1-step residuals on training "
                                "windows (residual), or run the mean forecast alone (none), "
                                "which decays towards the mean")
    residual_windows: int = Field(32, ge=1, description="training windows for the residual "
                                                        "covariance")


@register_eval("EvalBENDR", options=EvalBENDROptions)
class EvalBENDR(EvalRunner):
    """1-step / N-step error curves and free-running spectra of a continuous forecaster."""

    name = "EvalBENDR"
    options_class = EvalBENDROptions
    capability = Forecaster
    input_kinds = ("continuous", "continuous_meta")

    def setup(self) -> None:
        super().setup()
        if any(s.get("name") == "mulaw_quantize" for s in self.steps):
            raise ValueError(f"{self.name} needs continuous chunks, but the data was mu-law "
                             "quantized; re-run stage 2 without mulaw_quantize")

    def _predict(self, x: torch.Tensor, extra: tuple) -> torch.Tensor:
        with self.autocast:
            return self.model(x, *extra).prediction.float()

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
        if len(self.train) == 0:
            raise ValueError("eval.free_run_noise 'residual' needs training windows; the "
                             "train split is empty (or use free_run_noise: none)")
        sq, n = 0.0, 0
        for x, extra, _ in self.heldout(self.options.residual_windows, dataset=self.train):
            res = (self._predict(x[..., :-1], extra) - x[..., 1:]).double()
            sq = sq + torch.einsum("bct,bdt->cd", res, res)
            n += res.shape[0] * res.shape[2]
        return (sq / n).float()

    # -- measurements -----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, report.MarkdownReport]:
        opts = self.options
        N, T = opts.future_steps, self.window
        if N >= T:
            raise ValueError(f"eval.future_steps ({N}) must be smaller than the window "
                             f"({T} samples)")
        self.baselines = (REPEAT_LAST, *(m.name for m in self.linear_models()))
        one, nst, n_win = self.error_sums(self.heldout(opts.max_batches * opts.batch_size))
        one_rmse = {p: self.rmse(v, n_win) for p, v in one.items()}
        n_rmse = {p: self.rmse(v, n_win) for p, v in nst.items()}
        self.error_curves("one_step_rmse", np.arange(1, T) / self.sfreq * 1e3, one_rmse,
                          xlabel="History available (ms)", baselines=self.baselines,
                          title="1-step-ahead error vs history (teacher forced, held-out)",
                          n_windows=n_win)
        self.error_curves("nstep_rmse", np.arange(1, N + 1), n_rmse, baselines=self.baselines,
                          xlabel=f"Steps ahead (1 step = {1e3 / self.sfreq:.3g} ms)",
                          title="N-step-ahead error (autoregressive forecast, held-out)",
                          n_windows=n_win, context_samples=T - N)
        summary = {**self.base_summary(), "n_windows": n_win,
                   "linear_baselines": self.linear_summary(),
                   "one_step": self._one_step_summary(one_rmse),
                   "nstep": {"future_steps": N, "context_samples": T - N,
                             "rmse_at_1": self._at(n_rmse, 0),
                             f"rmse_at_{N}": self._at(n_rmse, -1),
                             "note": "channel-type RMSE in the summary's `units` (as the "
                                     "one-step figures); normalized in model units"},
                   "generation": self.free_running()}
        return summary, self._report(summary, one_rmse, n_rmse)

    def error_sums(self, batches: list) -> tuple[dict, dict, int]:
        """Summed squared 1-step and N-step errors of the model and repeat-last."""
        opts, m = self.options, self.model_name
        N, T = opts.future_steps, self.window
        one: dict = {p: {} for p in (m, *self.baselines)}
        nst: dict = {p: {} for p in (m, *self.baselines)}
        n_win = 0
        for x, extra, steps in tqdm(batches, desc=f"{self.name} curves",
                                    disable=not opts.progress, leave=False):
            inp, tgt = x[..., :-1], x[..., 1:]
            self.add(one[m], self.sq_errors(self._predict(inp, extra), tgt, steps))
            self.add(one[REPEAT_LAST], self.sq_errors(inp, tgt, steps))
            for k, p in self.linear_next(inp, steps).items():
                self.add(one[k], self.sq_errors(p, tgt, steps))
            ctx, fut = x[..., :T - N], x[..., T - N:]
            self.add(nst[m], self.sq_errors(self._forecast(ctx, extra, N)[..., -N:], fut, steps))
            self.add(nst[REPEAT_LAST], self.sq_errors(repeat_last(ctx, N), fut, steps))
            for k, p in self.linear_forecast(ctx, steps, N).items():
                self.add(nst[k], self.sq_errors(p, fut, steps))
            n_win += x.shape[0]
        return one, nst, n_win

    @staticmethod
    def _at(rmse: dict, i: int) -> dict:
        """{predictor: {key: RMSE at horizon index ``i``}} in display units (fT, fT/cm...)."""
        return {p: {k: float(v[i] * display_unit(k)[0]) for k, v in r.items()}
                for p, r in rmse.items()}

    def _one_step_summary(self, one_rmse: dict) -> dict:
        m = self.model_name
        mean = {p: float(r["normalized"].mean()) for p, r in one_rmse.items()}
        return {"rmse_mean": {p: {key: float(v.mean() * display_unit(key)[0])
                                  for key, v in r.items()} for p, r in one_rmse.items()},
                "beats_repeat_last": mean[m] < mean[REPEAT_LAST],
                "beats_linear": {k: mean[m] < mean[k] for k in self.baselines[1:]}}

    def free_running(self) -> dict:
        """``gen_seconds`` forecast after held-out contexts (driven by the residual noise),
        compared with held-out data; → the summary's generation part."""
        opts = self.options
        n_new = max(1, round(opts.gen_seconds * self.sfreq))
        gen_b = self.heldout(opts.n_generated, seed_offset=1)
        self.noise = self.residual_cov() if opts.free_run_noise == "residual" else None
        t0 = time.perf_counter()
        gen = torch.cat([self.to_signal(self._forecast(x, e, n_new, self.noise)[..., -n_new:], s)
                         for x, e, s in gen_b]).numpy()
        gen_time = time.perf_counter() - t0
        real = self.real_signal()
        spec = self.compare_spectra(gen, real)
        noise_std = None if self.noise is None else float(self.noise.diagonal().sqrt().mean())
        linear = self.linear_free_run(torch.cat([x for x, _, _ in gen_b]),
                                      [s for _, _, st in gen_b for s in st], n_new, real)
        return {"seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                "free_run_noise": opts.free_run_noise, "innovation_std_normalized": noise_std,
                "steps_per_second": n_new * len(gen_b) / max(gen_time, 1e-9),
                **self.spectra_outputs(spec, gen, real, f"{opts.gen_seconds:g} s free-running"),
                "linear": linear}

    def _report(self, summary: dict, one_rmse: dict, n_rmse: dict) -> report.MarkdownReport:
        opts, m, N, T = self.options, self.model_name, self.options.future_steps, self.window
        rep = report.MarkdownReport(f"EvalBENDR: {m}")
        rep.text(f"Checkpoint `{opts.ckpt_path}`: {summary['n_windows']} held-out "
                 f"({opts.split}) windows of {T} samples at {self.sfreq:g} Hz, "
                 f"{len(self.ch_names)} channels.")
        rep.section("1-step-ahead error (teacher forced), mean over history")
        rmse = {p: summary["one_step"]["rmse_mean"][p]["normalized"] for p in one_rmse}
        rep.table(["predictor", "RMSE (normalized)"], [[p, v] for p, v in rmse.items()])
        rep.text(self.linear_verdict("held-out 1-step RMSE (normalized units)", rmse[m],
                                     {k: rmse[k] for k in self.baselines[1:]}, False))
        rep.section(f"N-step-ahead error ({N} steps from {T - N}-sample contexts)")
        rep.table(["predictor", "RMSE @1 (normalized)", f"RMSE @{N} (normalized)"],
                  [[p, n_rmse[p]["normalized"][0], n_rmse[p]["normalized"][-1]] for p in n_rmse])
        rep.section("Free-running generation")
        gen = summary["generation"]
        rep.text("Mean forecast plus Gaussian innovations with the channel covariance of the "
                 f"1-step residuals on training windows (mean std "
                 f"{gen['innovation_std_normalized']:.3g}, normalized units)."
                 if self.noise is not None else
                 "Mean forecast alone (free_run_noise: none): it decays towards the mean, so "
                 "its spectrum falls below the data's.")
        self.spectra_section(rep, gen)
        self.linear_free_run_table(rep, gen["linear"])
        rep.text("The generated signal is in `generated_raw.fif`.")
        self.figures_section(rep, [("one_step_rmse", "1-step error vs history"),
                                   ("nstep_rmse", "N-step error"), ("psd", "PSD"),
                                   ("channel_correlation", "Channel correlation"),
                                   ("traces", "Signal traces")])
        return rep


"""``EvalQuant``: evaluation of autoregressive token models (GPT2MEG, STGPT2MEG, WaveNet...).

What it measures, on held-out windows of the chunk store (the ``test`` split by default):

1. **Next-step accuracy by position** (teacher forcing): accuracy of predicting token ``t+1``
   from tokens ``0..t``, for every ``t`` of a window — how accuracy grows with history.
2. **History sweep**: the last token of each window predicted from only the ``h`` tokens
   before it, for each ``h`` in ``history_lengths`` (truncated contexts).
3. **N-step-ahead curves**: from a held-out context, ``future_steps`` tokens are rolled out
   with the model's ``generate`` (greedy by default, or sampled); accuracy and RMSE in signal
   units (tokens decoded through the recorded stage-2 steps) at every horizon ``k``.
4. **Baselines** on exactly the same targets: ``repeat-last`` (the last context token is
   repeated), ``unigram`` (tokens drawn from each channel's training-set distribution), and
   the fitted linear models, a per-channel AR(p) and a multichannel VAR(p) (see
   ``ephys_gpt/linear/``): they predict in the decoded domain and their predictions are
   re-quantized through the recorded mu-law step, so their accuracy compares directly.
   Each is also read as a distribution over tokens (``<name>, token distribution``): its
   Gaussian forecast, with the 1-step innovation variance (teacher forcing, history sweep)
   or the k-step forecast-error variance (N-step curves), gives each token the mass of its
   mu-law bin; its most probable token and NLL compare with a token model's like for like.
5. **Free-running generation** of ``gen_seconds`` (temperature / top-k / top-p sampling)
   compared with held-out data: Welch PSD per channel type with the alpha peak, channel
   covariance and correlation matrices with similarity scores; the generated signal is
   written as an MNE ``.fif``.

Outputs go to ``<save_dir>/evals/EvalQuant/`` (or ``out_dir``): curves as ``.npy`` +
``.json``, figures as ``.png`` + ``.pdf``, ``summary.json``, ``report.md`` and
``generated_raw.fif``. The model is used only through ``forward`` and ``generate``.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ephys_gpt.eval import plots, report
from ephys_gpt.eval.baselines import (
    REPEAT_LAST,
    UNIGRAM,
    linear_distribution_name,
    repeat_last,
    sample_unigram,
    unigram_distribution,
)
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import (
    EvalRunner,
    SamplingOptions,
    check_history_lengths,
    default_history_lengths,
    display_unit,
    max_context,
)
from ephys_gpt.eval.windows import full_window, spread_indices, window_steps
from ephys_gpt.models.capabilities import TokenGenerator

NAIVE = (REPEAT_LAST, UNIGRAM)


class EvalQuantOptions(SamplingOptions):
    """The ``eval`` block of a run YAML for ``eval_class: EvalQuant``."""

    batch_size: int = Field(4, ge=1, description="held-out windows per forward pass")
    max_batches: int = Field(8, ge=1, description="held-out batches for the teacher-forced "
                                                  "and N-step curves")
    history_lengths: list[int] | None = Field(
        None, description="context lengths (tokens) of the history sweep; default powers of "
                          "two up to the window")
    future_steps: int = Field(16, ge=1, description="horizon N of the N-step-ahead curves")
    gen_seconds: float = Field(10.0, gt=0, description="length of free-running generation")
    unigram_max_windows: int = Field(2000, ge=1, description="training windows read for the "
                                                             "unigram baseline when chunks "
                                                             "are not stored as tokens")
    psd_windows: int = Field(64, ge=1, description="held-out windows for the real PSD and "
                                                   "covariance")
    psd_seconds: float = Field(2.0, gt=0, description="Welch segment length (s)")
    num_channels: int | None = Field(None, ge=1, description="optional check of the data")

    _positive_lengths = field_validator("history_lengths")(check_history_lengths)


@register_eval("EvalQuant", options=EvalQuantOptions)
class EvalQuant(EvalRunner):
    """Evaluate a token-level autoregressive model against baselines and held-out data."""

    name = "EvalQuant"
    options_class = EvalQuantOptions
    capability = TokenGenerator
    input_kinds = ("tokens",)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        opts = self.options
        if not self.steps or self.steps[-1].get("name") != "mulaw_quantize":
            raise ValueError("EvalQuant needs mu-law token data: the dataset's stage-2 steps "
                             f"end with {self.steps[-1].get('name') if self.steps else None!r}, "
                             "expected 'mulaw_quantize'")
        if full_window(self.test, 0)[0].dtype != torch.long:
            raise ValueError("EvalQuant needs a token dataset (ChunkDataset) yielding int64 "
                             "windows")
        self.vocab_size = 2 ** int(self.steps[-1]["n_bits"])
        if opts.num_channels is not None and opts.num_channels != len(self.ch_names):
            raise ValueError(f"eval.num_channels is {opts.num_channels} but the data has "
                             f"{len(self.ch_names)} channels")
        self.max_context = max_context(self.model)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, T, V) for tokens (B, C, T), truncated to the model's context."""
        if self.max_context is not None and x.shape[-1] > self.max_context:
            x = x[..., -self.max_context:]
        with self.autocast:
            out = self.model(x).prediction
        if out.dim() != 4 or out.shape[:3] != x.shape:
            raise ValueError(f"{self.model_name}.forward returned shape {tuple(out.shape)}; "
                             f"EvalQuant expects logits (B, C, T, V) for input "
                             f"{tuple(x.shape)}")
        return out.float()

    def _generate(self, context: torch.Tensor, steps: int, sampling: dict) -> torch.Tensor:
        """The ``steps`` new tokens (B, C, steps) after ``context`` via ``model.generate``."""
        kw = dict(sampling, generator=self.generator, progress=self.options.progress)
        with self.autocast:
            out = self.model.generate(context, steps, **kw)
        if out.shape[:2] != context.shape[:2] or out.shape[-1] != context.shape[-1] + steps:
            raise ValueError(f"{self.model_name}.generate returned shape {tuple(out.shape)} "
                             f"for context {tuple(context.shape)} and {steps} steps")
        return out[..., -steps:]

    # -- measurements -----------------------------------------------------------------------------
    def evaluate(self) -> tuple[dict, report.MarkdownReport]:
        opts = self.options
        unigram = torch.as_tensor(unigram_distribution(
            self.train, self.vocab_size, max_windows=opts.unigram_max_windows, seed=opts.seed,
            progress=opts.progress), dtype=torch.float32)
        batches = self.heldout(opts.max_batches * opts.batch_size)
        linear = [m.name for m in self.linear_models()]
        self.baselines = (*NAIVE, *linear, *map(linear_distribution_name, linear))
        tf = self.teacher_forced(batches, unigram)
        ns = self.nstep(batches, unigram)
        gen = self.free_running()
        real = self.real_signal()
        spec = self.compare_spectra(gen["signal"], real)
        gen["linear"] = self.linear_free_run(gen["context"], gen["steps"],
                                             gen["tokens"].shape[-1], real)
        self._write_curves(tf, ns)
        self.files.append(report.write_npy(self.out_dir / "generated_tokens.npy",
                                           gen["tokens"].numpy().astype(np.int16)))
        label = f"{opts.gen_seconds:g} s generated ({opts.gen_sampling})"
        spectra = self.spectra_outputs(spec, gen["signal"], real, label)
        summary = self._summarize(tf, ns, gen, spectra)
        return summary, self._report(summary)

    def _n_inputs(self, T: int) -> int:
        return T - 1 if self.max_context is None else min(T - 1, self.max_context)

    def teacher_forced(self, batches: list, unigram: torch.Tensor) -> dict:
        """Accuracy by position and the history sweep, with both baselines."""
        opts = self.options
        n_in = self._n_inputs(batches[0][0].shape[-1])
        hist = opts.history_lengths or default_history_lengths(n_in)
        too_long = [h for h in hist if h > n_in]
        if too_long:
            raise ValueError(f"eval.history_lengths {too_long} exceed the usable context "
                             f"({n_in} tokens: window {batches[0][0].shape[-1]} samples, model "
                             f"context {self.max_context})")
        linear = [m.name for m in self.linear_models()]
        dist = {m.name: linear_distribution_name(m.name) for m in self.linear_models()}
        sums = {k: torch.zeros(n_in, device=self.device)
                for k in ("acc", "nll", "rep", "uni", "uni_nll", *linear, *dist.values(),
                          *(f"{d} nll" for d in dist.values()))}
        sweep = {"acc": torch.zeros(len(hist), device=self.device),
                 "rep": torch.zeros((), device=self.device),
                 "uni": torch.zeros((), device=self.device),
                 **{k: torch.zeros(len(hist)) for k in (*linear, *dist.values())}}
        n_rows = 0
        for x, _, steps in tqdm(batches, desc="teacher-forced", disable=not opts.progress,
                                leave=False):
            x = x[..., -(n_in + 1):]
            inp, tgt = x[..., :-1], x[..., 1:]  # (B, C, n_in)
            draw = sample_unigram(unigram, tgt.shape, self.cpu_generator).to(self.device)
            self._position_sums(sums, inp, tgt, draw, unigram)
            for m in self.linear_models():  # one 1-step prediction, read both ways
                nll, mode, nearest = m.token_scores(inp.cpu(), tgt.cpu(), steps)
                sums[m.name] += (nearest == tgt.cpu()).float().sum((0, 1)).to(self.device)
                sums[dist[m.name]] += (mode == tgt.cpu()).float().sum((0, 1)).to(self.device)
                sums[f"{dist[m.name]} nll"] += nll.sum((0, 1)).to(self.device)
            self._sweep_sums(sweep, hist, inp, tgt[..., -1], draw[..., -1], steps)
            n_rows += inp.shape[0] * inp.shape[1]
        out = {k: (v / n_rows).cpu().numpy() for k, v in sums.items()}  # one host transfer
        return {"positions": np.arange(1, n_in + 1), "pos_acc": out["acc"],
                "pos_nll": out["nll"], "pos_rep": out["rep"], "pos_uni": out["uni"],
                "pos_uni_nll": out["uni_nll"],
                "pos_linear": {k: out[k] for k in (*linear, *dist.values())},
                "pos_linear_nll": {d: out[f"{d} nll"] for d in dist.values()},
                "hist": np.asarray(hist),
                "hist_acc": (sweep["acc"] / n_rows).cpu().numpy(),
                "hist_rep": float(sweep["rep"] / n_rows),
                "hist_uni": float(sweep["uni"] / n_rows),
                "hist_linear": {k: (sweep[k] / n_rows).numpy()
                                for k in (*linear, *dist.values())},
                "n_windows": int(sum(b.shape[0] for b, _, _ in batches))}

    def _position_sums(self, sums: dict, inp, tgt, draw, unigram) -> None:
        """Add the correct predictions and NLL at each position of one batch to ``sums``."""
        C = inp.shape[1]
        logits = self._forward(inp)  # (B, C, n_in, V)
        logp = torch.log_softmax(logits, dim=-1)
        sums["acc"] += (logits.argmax(-1) == tgt).float().sum((0, 1))
        sums["nll"] -= logp.gather(-1, tgt[..., None])[..., 0].sum((0, 1))
        sums["rep"] += (inp == tgt).float().sum((0, 1))
        sums["uni"] += (draw == tgt).float().sum((0, 1))
        log_u = unigram.log().to(self.device)
        sums["uni_nll"] -= log_u[torch.arange(C, device=self.device)[:, None], tgt].sum(0).sum(0)

    def _sweep_sums(self, sweep: dict, hist, inp, last, draw_last, steps) -> None:
        """The last token of each window predicted from its ``h`` preceding tokens."""
        last_cpu = last.cpu()
        for j, h in enumerate(hist):
            lg = self._forward(inp[..., -h:])[..., -1, :]
            sweep["acc"][j] += (lg.argmax(-1) == last).float().sum()
            for m in self.linear_models():  # one 1-step forecast, read both ways
                _, mode, mean = m.forecast_token_scores(inp[..., -h:].cpu(), steps, 1)
                sweep[m.name][j] += (mean[..., 0] == last_cpu).float().sum()
                sweep[linear_distribution_name(m.name)][j] += (
                    mode[..., 0] == last_cpu).float().sum()
        sweep["rep"] += (inp[..., -1] == last).float().sum()
        sweep["uni"] += (draw_last == last).float().sum()

    def nstep(self, batches: list, unigram: torch.Tensor) -> dict:
        """N-step-ahead accuracy and RMSE (signal units) for the model and the baselines."""
        opts = self.options
        N, T = opts.future_steps, batches[0][0].shape[-1]
        if N >= T:
            raise ValueError(f"eval.future_steps ({N}) must be smaller than the window "
                             f"({T} samples); lower it or raise datasplitter.example_seconds")
        sampling = ({"temperature": 0.0} if opts.nstep_sampling == "greedy"
                    else opts.gen_kwargs())
        names = [self.model_name, *self.baselines]
        correct = {k: np.zeros(N) for k in names}
        sq: dict[str, dict] = {k: {} for k in names}
        n_win = 0
        for x, _, steps in tqdm(batches, desc="N-step rollouts", disable=not opts.progress,
                                leave=False):
            ctx, fut = x[..., :T - N], x[..., T - N:]  # (B, C, T-N), (B, C, N)
            preds = {self.model_name: self._generate(ctx, N, sampling),
                     REPEAT_LAST: repeat_last(ctx, N),
                     UNIGRAM: sample_unigram(unigram, fut.shape,
                                             self.cpu_generator).to(self.device)}
            for m in self.linear_models():  # one forecast: its mean and its k-step Gaussian
                _, mode, mean = m.forecast_token_scores(ctx.cpu(), steps, N)
                preds[m.name] = mean.to(self.device)
                preds[linear_distribution_name(m.name)] = mode.to(self.device)
            for k, p in preds.items():
                correct[k] += (p == fut).float().sum((0, 1)).cpu().numpy()
                self.add(sq[k], self.sq_errors(p, fut, steps))
            n_win += x.shape[0]
        n_rows = n_win * len(self.ch_names)
        return {"k": np.arange(1, N + 1), "sampling": opts.nstep_sampling,
                "sampling_kwargs": sampling, "context_samples": T - N,
                "acc": {k: v / n_rows for k, v in correct.items()},
                "rmse": {k: self.rmse(v, n_win) for k, v in sq.items()}}

    def free_running(self) -> dict:
        """Generate ``gen_seconds`` after held-out contexts; decode to signal units."""
        opts = self.options
        n_new = max(1, round(opts.gen_seconds * self.sfreq))
        ctx_len = self.window if opts.gen_context_seconds is None else min(
            self.window, max(1, round(opts.gen_context_seconds * self.sfreq)))
        if self.max_context is not None:
            ctx_len = min(ctx_len, self.max_context)
        idx = [int(i) for i in spread_indices(len(self.test), opts.n_generated, opts.seed + 1)]
        idx = (idx * opts.n_generated)[:opts.n_generated]  # fewer windows than sequences
        context = torch.stack([full_window(self.test, i)[0][..., -ctx_len:] for i in idx])
        t0 = time.perf_counter()
        new = self._generate(context.to(self.device), n_new, opts.gen_kwargs()).cpu()
        seconds = time.perf_counter() - t0
        # each sequence continues its context's session: decode with that session's steps
        steps = [window_steps(self.test, i) for i in idx]
        signal = self.to_signal(new, steps).numpy()
        return {"tokens": new, "signal": signal, "context_samples": ctx_len,
                "context": context, "steps": steps,
                "wall_seconds": seconds, "steps_per_second": n_new / max(seconds, 1e-9)}

    # -- outputs ----------------------------------------------------------------------------------
    def _summarize(self, tf: dict, ns: dict, gen: dict, spectra: dict) -> dict:
        opts, m = self.options, self.model_name
        acc = {m: float(tf["pos_acc"].mean()), REPEAT_LAST: float(tf["pos_rep"].mean()),
               UNIGRAM: float(tf["pos_uni"].mean()),
               **{k: float(v.mean()) for k, v in tf["pos_linear"].items()}}
        N = opts.future_steps
        return {
            **self.base_summary(),
            "vocab_size": self.vocab_size, "model_context": self.max_context,
            "n_windows": tf["n_windows"],
            "next_step": {
                "accuracy": acc,
                "nll_nats": {m: float(tf["pos_nll"].mean()),
                             UNIGRAM: float(tf["pos_uni_nll"].mean()),
                             **{k: float(v.mean()) for k, v in tf["pos_linear_nll"].items()}},
                "beats_baselines": acc[m] > max(acc[REPEAT_LAST], acc[UNIGRAM]),
                "beats_linear": {k: acc[m] > acc[k] for k in tf["pos_linear"]},
                "definition": "teacher-forced next-token accuracy averaged over all positions, "
                              "channels and held-out windows"},
            "linear_baselines": self.linear_summary(),
            "history_sweep": {"history_lengths": tf["hist"], "accuracy": tf["hist_acc"],
                              REPEAT_LAST: tf["hist_rep"], UNIGRAM: tf["hist_uni"],
                              **tf["hist_linear"]},
            "nstep": {
                "sampling": ns["sampling"], "sampling_kwargs": ns["sampling_kwargs"],
                "future_steps": N, "context_samples": ns["context_samples"],
                "accuracy_at_1": {k: float(v[0]) for k, v in ns["acc"].items()},
                f"accuracy_at_{N}": {k: float(v[-1]) for k, v in ns["acc"].items()},
                "rmse_at_1": {k: {t: float(v[t][0] * display_unit(t)[0]) for t in self.types}
                              for k, v in ns["rmse"].items()},
                "rmse_units": {t: display_unit(t)[1] for t in self.types}},
            "generation": {
                "seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                "sampling": opts.gen_sampling, "sampling_kwargs": opts.gen_kwargs(),
                "context_samples": gen["context_samples"],
                "steps_per_second": gen["steps_per_second"], **spectra,
                "linear": gen["linear"]}}

    def _write_curves(self, tf: dict, ns: dict) -> None:
        m = self.model_name
        # 1. accuracy by position (teacher forcing)
        curves = {m: tf["pos_acc"], REPEAT_LAST: tf["pos_rep"], UNIGRAM: tf["pos_uni"],
                  **tf["pos_linear"]}
        self.curve("accuracy_by_position", tf["positions"], curves,
                   xlabel="History length (tokens)", ylabel="Next-token accuracy",
                   n_windows=tf["n_windows"],
                   nll_nats={m: tf["pos_nll"], UNIGRAM: tf["pos_uni_nll"],
                             **tf["pos_linear_nll"]})
        fig, _ = plots.plot_curves(tf["positions"] / self.sfreq * 1e3, curves,
                                   baselines=[k for k in curves if k != m],
                                   xlabel="History available (ms)",
                                   ylabel="Next-token accuracy",
                                   title="Teacher-forced next-step accuracy (held-out)")
        self.figure(fig, "accuracy_by_position")
        # 2. history sweep (truncated contexts)
        n_h = len(tf["hist"])
        curves = {m: tf["hist_acc"], REPEAT_LAST: np.full(n_h, tf["hist_rep"]),
                  UNIGRAM: np.full(n_h, tf["hist_uni"]), **tf["hist_linear"]}
        self.curve("history_sweep", tf["hist"], curves, xlabel="Context length (tokens)",
                   ylabel="Next-token accuracy", sfreq=self.sfreq)
        fig, _ = plots.plot_curves(tf["hist"], curves, baselines=self.baselines, logx=n_h > 2,
                                   xlabel="Context length (tokens)",
                                   ylabel="Next-token accuracy",
                                   title="Accuracy vs history length (truncated contexts)")
        self.figure(fig, "history_sweep")
        # 3. N-step-ahead accuracy and RMSE
        mode = f"{ns['sampling']} rollouts"
        self.curve("nstep_accuracy", ns["k"], ns["acc"], xlabel="Steps ahead",
                   ylabel="Token accuracy", sampling=ns["sampling"],
                   sampling_kwargs=ns["sampling_kwargs"],
                   context_samples=ns["context_samples"])
        fig, _ = plots.plot_curves(ns["k"], ns["acc"], baselines=self.baselines,
                                   xlabel=f"Steps ahead (1 step = {1e3 / self.sfreq:.3g} ms)",
                                   ylabel="Token accuracy",
                                   title=f"N-step-ahead accuracy ({mode})")
        self.figure(fig, "nstep_accuracy")
        self.error_curves("nstep_rmse", ns["k"], ns["rmse"], xlabel="Steps ahead",
                          baselines=self.baselines, sampling=ns["sampling"],
                          title="N-step-ahead error in signal units (held-out)")

    def _report(self, s: dict) -> report.MarkdownReport:
        m, ns, ge = self.model_name, s["nstep"], s["generation"]
        rep = report.MarkdownReport(f"EvalQuant: {m}")
        rep.text(f"Checkpoint `{s['ckpt_path']}`, {s['n_windows']} held-out ({s['split']}) "
                 f"windows of {s['window_samples']} samples at {s['sfreq']:g} Hz, "
                 f"{s['n_channels']} channels, vocabulary {s['vocab_size']}. "
                 f"Device {s['device']}, precision {s['precision']}.")
        acc = s["next_step"]["accuracy"]
        verdict = ("beats both naive baselines" if s["next_step"]["beats_baselines"]
                   else "does NOT beat both naive baselines")
        rep.section("Next-step accuracy (teacher forced)")
        rep.table(["predictor", "accuracy", "NLL (nats)"],
                  [[k, v, s["next_step"]["nll_nats"].get(k)] for k, v in acc.items()])
        rep.text(f"{m} {verdict}. `repeat-last` repeats the previous token; `unigram` draws "
                 "from each channel's training-set token distribution; the AR and VAR "
                 "predictions are re-quantized through the recorded mu-law step. "
                 f"`{linear_distribution_name('VAR(p)')}` is the same model's Gaussian 1-step "
                 "forecast given to each token as the mass of its mu-law bin: its NLL, and "
                 "the accuracy of its most probable token (not always the bin holding the "
                 "mean: wider bins hold more mass), compare with a token model's like for "
                 "like.")
        linear = {k: acc[k] for k in s["next_step"]["beats_linear"]}
        rep.text(self.linear_verdict("held-out next-token accuracy", acc[m], linear, True))
        rep.section(f"N-step-ahead ({ns['sampling']} rollouts from "
                    f"{ns['context_samples']}-sample contexts)")
        N = ns["future_steps"]
        rep.table(["predictor", "acc @1", f"acc @{N}"] +
                  [f"RMSE @1 {t} ({u})" for t, u in ns["rmse_units"].items()],
                  [[k, ns["accuracy_at_1"][k], ns[f"accuracy_at_{N}"][k]] +
                   [ns["rmse_at_1"][k][t] for t in ns["rmse_units"]]
                   for k in ns["accuracy_at_1"]])
        if s["linear_baselines"]:
            rep.text("The linear baselines' rows forecast recursively from the same contexts: "
                     "their mean re-quantized, and (`token distribution`) the most probable "
                     "token of the k-step Gaussian forecast, whose variance grows with k as "
                     "the fitted dynamics propagate the innovations.")
        rep.section(f"Free-running generation ({ge['seconds']:g} s, {ge['sampling']} "
                    f"{ge['sampling_kwargs']})")
        self.spectra_section(rep, ge)
        self.linear_free_run_table(rep, ge["linear"])
        rep.text(f"Generation speed: {ge['steps_per_second']:.1f} steps/s. The generated "
                 "signal is in `generated_raw.fif` (`mne.io.read_raw_fif`).")
        self.figures_section(rep, [("accuracy_by_position", "Next-step accuracy vs history"),
                                   ("history_sweep", "Accuracy vs context length"),
                                   ("nstep_accuracy", "N-step-ahead accuracy"),
                                   ("nstep_rmse", "N-step-ahead RMSE"),
                                   ("psd", "PSD generated vs held-out"),
                                   ("channel_correlation", "Channel correlation"),
                                   ("traces", "Signal traces")])
        return rep


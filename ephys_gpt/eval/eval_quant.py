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
   repeated) and ``unigram`` (tokens drawn from each channel's training-set distribution).
5. **Free-running generation** of ``gen_seconds`` (temperature / top-k / top-p sampling)
   compared with held-out data: Welch PSD per channel type with the alpha peak, channel
   covariance and correlation matrices with similarity scores; the generated signal is
   written as an MNE ``.fif``.

Outputs go to ``<save_dir>/evals/EvalQuant/`` (or ``out_dir``): curves as ``.npy`` +
``.json``, figures as ``.png`` + ``.pdf``, ``summary.json``, ``report.md`` and
``generated_raw.fif``. The model is used only through ``forward`` and ``generate``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from tqdm.auto import tqdm

from ephys_gpt.eval import plots, report, spectral
from ephys_gpt.eval.fif import array_to_raw, template_info_from_provenance, write_raw_fif
from ephys_gpt.eval.registry import register_eval
from ephys_gpt.eval.runner import (
    EvalRunner,
    RunnerOptions,
    check_history_lengths,
    display_unit,
    max_context,
    spread_indices,
)
from ephys_gpt.preprocessing.transforms import tokens_to_signal

logger = logging.getLogger(__name__)

REPEAT_LAST = "repeat-last"
UNIGRAM = "unigram"

class EvalQuantOptions(RunnerOptions):
    """The ``eval`` block of a run YAML for ``eval_class: EvalQuant``."""

    batch_size: int = Field(4, ge=1, description="held-out windows per forward pass")
    max_batches: int = Field(8, ge=1, description="held-out batches for the teacher-forced "
                                                  "and N-step curves")
    history_lengths: list[int] | None = Field(
        None, description="context lengths (tokens) of the history sweep; default powers of "
                          "two up to the window")
    future_steps: int = Field(16, ge=1, description="horizon N of the N-step-ahead curves")
    nstep_sampling: Literal["greedy", "sample"] = Field(
        "greedy", description="N-step rollouts: greedy (argmax) or sampled with the gen_* "
                              "settings")
    gen_seconds: float = Field(10.0, gt=0, description="length of free-running generation")
    gen_context_seconds: float | None = Field(
        None, gt=0, description="held-out context before free-running generation (default "
                                "and at most: one window, within the model's context)")
    gen_sampling: Literal["top_p", "top_k", "temperature", "greedy"] = Field(
        "top_p", description="sampling rule for free-running generation")
    temperature: float = Field(1.0, ge=0, description="softmax temperature (0 = greedy)")
    top_k: int = Field(50, ge=1, description="kept tokens for gen_sampling: top_k")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus mass for gen_sampling: top_p")
    unigram_max_windows: int = Field(2000, ge=1, description="training windows read for the "
                                                             "unigram baseline when chunks "
                                                             "are not stored as tokens")
    psd_windows: int = Field(64, ge=1, description="held-out windows for the real PSD and "
                                                   "covariance")
    psd_seconds: float = Field(2.0, gt=0, description="Welch segment length (s)")
    num_channels: int | None = Field(None, ge=1, description="optional check of the data")
    channel_shape: list[int] | None = Field(None, description="accepted for compatibility "
                                                              "with image models; unused")

    _positive_lengths = field_validator("history_lengths")(check_history_lengths)

    def gen_kwargs(self) -> dict[str, Any]:
        """Sampling keyword arguments of ``model.generate`` for free-running generation."""
        if self.gen_sampling == "greedy" or self.temperature == 0:
            return {"temperature": 0.0}
        kw: dict[str, Any] = {"temperature": self.temperature}
        if self.gen_sampling == "top_k":
            kw["top_k"] = self.top_k
        elif self.gen_sampling == "top_p":
            kw["top_p"] = self.top_p
        return kw


# -- model / data access ---------------------------------------------------------------------


def window_tokens(dataset, index: int) -> torch.Tensor:
    """Full token window (C, T) of a shifted-token dataset item ``(x[:, :-1], x[:, 1:])``."""
    inputs, targets = dataset[index]
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    inputs, targets = torch.as_tensor(inputs), torch.as_tensor(targets)
    if inputs.dtype != torch.long or inputs.dim() != 2 or targets.shape != inputs.shape:
        raise ValueError(f"EvalQuant needs a token dataset (ChunkDataset) yielding int64 "
                         f"(x[:, :-1], x[:, 1:]) of shape (C, T); found {inputs.dtype} "
                         f"{tuple(inputs.shape)} and {tuple(targets.shape)}")
    return torch.cat([inputs, targets[:, -1:]], dim=-1)


def window_steps(dataset, index: int) -> list[dict]:
    """Stage-2 steps of the session window ``index`` comes from.

    Normalization statistics are per session, so tokens are decoded with their own
    session's steps (``dataset.session_steps``) when the dataset exposes them.
    """
    indices = getattr(dataset, "indices", None)
    if callable(getattr(dataset, "session_steps", None)) and indices is not None:
        return list(dataset.session_steps(int(indices[index][0])))
    return list(dataset.steps)


def decode(tokens: torch.Tensor, steps: Sequence[Sequence[dict]],
           keep_normalized: bool = False) -> torch.Tensor:
    """Tokens (B, C, T) → float signal (B, C, T), row ``b`` decoded with ``steps[b]``.

    ``keep_normalized``: skip the ``normalize`` inversion (normalized units, comparable
    across channels and sessions) instead of returning stage-1 SI units.
    """
    rows = []
    for tok, st in zip(tokens, steps):
        if keep_normalized:
            st = [s for s in st if s.get("name") != "normalize"]
        rows.append(tokens_to_signal(tok, st))
    return torch.stack(rows)


def unigram_distribution(dataset, vocab_size: int, *, max_windows: int = 2000,
                         seed: int = 0, progress: bool = False) -> np.ndarray:
    """Per-channel token distribution of the training data, (C, V), add-one smoothed.

    Counts whole token chunks from the store when they are stored as tokens; otherwise (the
    dataset quantizes on the fly) counts up to ``max_windows`` dataset windows.
    """
    metas = list(getattr(dataset, "metas", []) or [])
    counts = None
    if metas and all(m.is_tokens for m in metas):
        from ephys_gpt.dataset.store import load_chunk

        counts = np.zeros((metas[0].n_channels, vocab_size), dtype=np.float64)
        chunks = [(m, i) for m in metas for i in range(m.n_chunks)]
        for m, i in tqdm(chunks, desc="unigram counts", disable=not progress, leave=False):
            arr = np.asarray(load_chunk(m, i), dtype=np.int64)
            _add_counts(counts, arr, vocab_size)
    else:
        for idx in tqdm(spread_indices(len(dataset), max_windows, seed), desc="unigram counts",
                        disable=not progress, leave=False):
            arr = window_tokens(dataset, int(idx)).numpy()
            if counts is None:
                counts = np.zeros((arr.shape[0], vocab_size), dtype=np.float64)
            _add_counts(counts, arr, vocab_size)
    if counts is None:
        raise ValueError("the training split is empty: cannot fit the unigram baseline")
    counts += 1.0
    return counts / counts.sum(axis=1, keepdims=True)


def _add_counts(counts: np.ndarray, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token values {tokens.min()}..{tokens.max()} fall outside the "
                         f"model's vocabulary [0, {vocab_size})")
    C = tokens.shape[0]
    flat = (np.arange(C)[:, None] * vocab_size + tokens).ravel()
    counts += np.bincount(flat, minlength=C * vocab_size).reshape(C, vocab_size)


def sample_unigram(probs: torch.Tensor, shape: Sequence[int],
                   generator: torch.Generator) -> torch.Tensor:
    """Tokens (B, C, N) drawn from per-channel probabilities ``probs`` (C, V)."""
    B, C, N = shape
    draws = torch.multinomial(probs, B * N, replacement=True, generator=generator)  # (C, B·N)
    return draws.view(C, B, N).permute(1, 0, 2).contiguous()


# -- the runner ------------------------------------------------------------------------------


@register_eval("EvalQuant", options=EvalQuantOptions)
class EvalQuant(EvalRunner):
    """Evaluate a token-level autoregressive model against baselines and held-out data.

    Parameters
    ----------
    config : dict
        The validated run config (``save_dir``, ``dataset_name``, ``datasplitter``...).
    options : EvalQuantOptions
        The validated ``eval`` block.
    model, info : optional
        An already loaded model and its info (skips loading ``ckpt_path``).
    splits : optional
        Already built ``DataSplits`` (``.train``, ``.val``, ``.test``); built from
        ``config['datasplitter']`` otherwise.
    """

    name = "EvalQuant"
    options_class = EvalQuantOptions

    # -- setup -------------------------------------------------------------------------------

    def _setup(self) -> None:
        opts = self.options
        self._load_model()
        if not callable(getattr(self.model, "generate", None)):
            raise ValueError(f"EvalQuant evaluates token models with a generate() method; "
                             f"{self.model_name} has none (use the eval runner for its kind)")
        try:
            from ephys_gpt.models.registry import get_model_spec

            spec = get_model_spec(self.model_name)
            if spec.input_kind != "tokens" or spec.generation != "tokens":
                raise ValueError(f"EvalQuant evaluates token models (input_kind 'tokens' with "
                                 f"generate()); {self.model_name} consumes {spec.input_kind!r}"
                                 f" and generates {spec.generation!r}")
        except ValueError as err:
            if "unknown model_name" not in str(err):
                raise
        if self._splits is None:
            self._splits = self._build_splits()
        self.test = getattr(self._splits, opts.split)
        self.train = self._splits.train
        if self.test is None or len(self.test) == 0:
            raise ValueError(f"the {opts.split!r} split is empty: adjust datasplitter "
                             f"val_ratio/test_ratio so that EvalQuant has held-out windows")
        ds = self.test
        self.sfreq = float(ds.sfreq)
        self.ch_names = [str(c) for c in ds.ch_names]
        self.ch_types = [str(t) for t in ds.ch_types]
        self.steps = list(ds.steps)
        if not self.steps or self.steps[-1].get("name") != "mulaw_quantize":
            raise ValueError("EvalQuant needs mu-law token data: the dataset's stage-2 steps "
                             f"end with {self.steps[-1].get('name') if self.steps else None!r}, "
                             "expected 'mulaw_quantize'")
        self.vocab_size = 2 ** int(self.steps[-1]["n_bits"])
        known = self.info.get("ch_names")
        if known and list(known) != self.ch_names:
            raise ValueError(f"the checkpoint {opts.ckpt_path} was trained on {len(known)} "
                             f"channels ({list(known)[:3]}...) but the {opts.split} data has "
                             f"{len(self.ch_names)} ({self.ch_names[:3]}...)")
        if opts.num_channels is not None and opts.num_channels != len(self.ch_names):
            raise ValueError(f"eval.num_channels is {opts.num_channels} but the data has "
                             f"{len(self.ch_names)} channels")
        self.max_context = max_context(self.model)
        self.window = window_tokens(ds, 0).shape[-1]
        self.window_steps = lambda i: window_steps(ds, i)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if opts.precision.startswith("bf16") else nullcontext())
        self.generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        self.cpu_generator = torch.Generator().manual_seed(opts.seed)

    def _build_splits(self):
        from ephys_gpt.training.run_folder import run_splits

        cfg = self.config.get("datasplitter")
        if not isinstance(cfg, dict):
            raise ValueError("EvalQuant needs the run config's 'datasplitter' block to find "
                             "held-out data")
        return run_splits(self.config, augmentations=False)[0]  # the run's recorded split

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, T, V) for tokens (B, C, T), truncated to the model's context."""
        if self.max_context is not None and x.shape[-1] > self.max_context:
            x = x[..., -self.max_context:]
        with self.autocast:
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() != 4 or out.shape[:3] != x.shape:
            raise ValueError(f"{self.model_name}.forward returned shape {tuple(out.shape)}; "
                             f"EvalQuant expects logits (B, C, T, V) for input "
                             f"{tuple(x.shape)}")
        return out.float()

    def _generate(self, context: torch.Tensor, steps: int, sampling: dict,
                  desc: str) -> torch.Tensor:
        """The ``steps`` new tokens (B, C, steps) after ``context`` via ``model.generate``."""
        kw = dict(sampling, generator=self.generator)
        if "progress" in _parameters(self.model.generate):
            kw["progress"] = self.options.progress
        with self.autocast:
            out = self.model.generate(context, steps, **kw)
        if out.shape[:2] != context.shape[:2] or out.shape[-1] != context.shape[-1] + steps:
            raise ValueError(f"{self.model_name}.generate returned shape {tuple(out.shape)} "
                             f"for context {tuple(context.shape)} and {steps} steps")
        return out[..., -steps:]

    def _heldout_batches(self) -> list[tuple[torch.Tensor, list[list[dict]]]]:
        """Held-out windows in batches: ``(tokens (B, C, T), the steps of each window)``."""
        opts = self.options
        idx = [int(i) for i in spread_indices(len(self.test),
                                              opts.max_batches * opts.batch_size, opts.seed)]
        out = []
        for j in range(0, len(idx), opts.batch_size):
            part = idx[j:j + opts.batch_size]
            out.append((torch.stack([window_tokens(self.test, i) for i in part]).to(self.device),
                        [self.window_steps(i) for i in part]))
        return out

    # -- metrics -----------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_forced(self, batches: list, unigram: torch.Tensor) -> dict:
        """Accuracy by position and the history sweep, with both baselines."""
        opts = self.options
        T = batches[0][0].shape[-1]
        n_in = T - 1 if self.max_context is None else min(T - 1, self.max_context)
        hist = opts.history_lengths or _default_lengths(n_in)
        too_long = [h for h in hist if h > n_in]
        if too_long:
            raise ValueError(f"eval.history_lengths {too_long} exceed the usable context "
                             f"({n_in} tokens: window {T} samples, model context "
                             f"{self.max_context})")
        log_u = unigram.log()
        pos_correct = torch.zeros(n_in, device=self.device)
        pos_nll = torch.zeros(n_in, device=self.device)
        rep_correct = torch.zeros(n_in, device=self.device)
        uni_correct = torch.zeros(n_in, device=self.device)
        uni_nll = torch.zeros(n_in, device=self.device)
        hist_correct = torch.zeros(len(hist), device=self.device)
        hist_rep = torch.zeros((), device=self.device)
        hist_uni = torch.zeros((), device=self.device)
        n_rows = 0
        for x, _ in tqdm(batches, desc="teacher-forced", disable=not opts.progress,
                         leave=False):
            x = x[..., -(n_in + 1):]
            inp, tgt = x[..., :-1], x[..., 1:]  # (B, C, n_in)
            B, C, _ = inp.shape
            logits = self._forward(inp)  # (B, C, n_in, V)
            logp = torch.log_softmax(logits, dim=-1)
            pos_correct += (logits.argmax(-1) == tgt).float().sum((0, 1))
            pos_nll -= logp.gather(-1, tgt[..., None])[..., 0].sum((0, 1))
            rep_correct += (inp == tgt).float().sum((0, 1))
            draw = sample_unigram(unigram, tgt.shape, self.cpu_generator).to(self.device)
            uni_correct += (draw == tgt).float().sum((0, 1))
            uni_nll -= log_u.to(self.device)[torch.arange(C, device=self.device)[:, None],
                                             tgt].sum(0).sum(0)
            last = tgt[..., -1]  # (B, C): the token every truncated context predicts
            for j, h in enumerate(hist):
                lg = self._forward(inp[..., -h:])[..., -1, :]
                hist_correct[j] += (lg.argmax(-1) == last).float().sum()
            hist_rep += (inp[..., -1] == last).float().sum()
            hist_uni += (draw[..., -1] == last).float().sum()
            n_rows += B * C
        # one host transfer at the end of the loop
        pos_acc = (pos_correct / n_rows).cpu().numpy()
        return {
            "positions": np.arange(1, n_in + 1),
            "pos_acc": pos_acc,
            "pos_nll": (pos_nll / n_rows).cpu().numpy(),
            "pos_rep": (rep_correct / n_rows).cpu().numpy(),
            "pos_uni": (uni_correct / n_rows).cpu().numpy(),
            "pos_uni_nll": (uni_nll / n_rows).cpu().numpy(),
            "hist": np.asarray(hist),
            "hist_acc": (hist_correct / n_rows).cpu().numpy(),
            "hist_rep": float(hist_rep / n_rows),
            "hist_uni": float(hist_uni / n_rows),
            "n_windows": int(sum(b.shape[0] for b, _ in batches)),
        }

    @torch.no_grad()
    def nstep(self, batches: list, unigram: torch.Tensor) -> dict:
        """N-step-ahead accuracy and RMSE (signal units) for the model and the baselines."""
        opts = self.options
        N = opts.future_steps
        T = batches[0][0].shape[-1]
        if N >= T:
            raise ValueError(f"eval.future_steps ({N}) must be smaller than the window "
                             f"({T} samples); lower it or raise datasplitter.example_seconds")
        sampling = ({"temperature": 0.0} if opts.nstep_sampling == "greedy"
                    else opts.gen_kwargs())
        types = list(dict.fromkeys(self.ch_types))
        type_idx = {t: [i for i, c in enumerate(self.ch_types) if c == t] for t in types}
        names = [self.model_name, REPEAT_LAST, UNIGRAM]
        correct = {k: np.zeros(N) for k in names}
        sq = {k: {t: np.zeros(N) for t in types} for k in names}
        sq_norm = {k: np.zeros(N) for k in names}
        n_rows = 0
        for x, steps in tqdm(batches, desc="N-step rollouts", disable=not opts.progress,
                             leave=False):
            ctx, fut = x[..., :T - N], x[..., T - N:]  # (B, C, T-N), (B, C, N)
            preds = {
                self.model_name: self._generate(ctx, N, sampling, "N-step"),
                REPEAT_LAST: ctx[..., -1:].expand_as(fut),
                UNIGRAM: sample_unigram(unigram, fut.shape, self.cpu_generator).to(self.device),
            }
            true_sig, true_z = decode(fut, steps), decode(fut, steps, keep_normalized=True)
            for k, p in preds.items():
                correct[k] += (p == fut).float().sum((0, 1)).cpu().numpy()
                err = (decode(p, steps) - true_sig) ** 2  # (B, C, N)
                for t, idx in type_idx.items():
                    sq[k][t] += err[:, idx].double().sum((0, 1)).cpu().numpy()
                sq_norm[k] += ((decode(p, steps, keep_normalized=True) - true_z) ** 2
                               ).double().sum((0, 1)).cpu().numpy()
            n_rows += x.shape[0] * x.shape[1]
        n_b = n_rows // len(self.ch_names)
        return {
            "k": np.arange(1, N + 1),
            "sampling": opts.nstep_sampling,
            "sampling_kwargs": sampling,
            "acc": {k: v / n_rows for k, v in correct.items()},
            "rmse": {k: {t: np.sqrt(v[t] / (n_b * len(type_idx[t]))) for t in types}
                     for k, v in sq.items()},
            "rmse_norm": {k: np.sqrt(v / n_rows) for k, v in sq_norm.items()},
            "context_samples": T - N,
        }

    @torch.no_grad()
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
        context = torch.stack([window_tokens(self.test, i)[..., -ctx_len:] for i in idx])
        t0 = time.perf_counter()
        new = self._generate(context.to(self.device), n_new, opts.gen_kwargs(), "free-running")
        seconds = time.perf_counter() - t0
        new = new.cpu()
        # each sequence continues its context's session: decode with that session's steps
        signal = decode(new, [self.window_steps(i) for i in idx]).numpy()
        return {"tokens": new, "signal": signal,
                "context_samples": ctx_len, "wall_seconds": seconds,
                "steps_per_second": n_new / max(seconds, 1e-9)}

    def heldout_signal(self) -> np.ndarray:
        """Real held-out windows decoded to signal units, (N, C, T)."""
        idx = spread_indices(len(self.test), self.options.psd_windows, self.options.seed + 2)
        wins = torch.stack([window_tokens(self.test, int(i)) for i in idx])
        return decode(wins, [self.window_steps(int(i)) for i in idx]).numpy()

    def compare_spectra(self, generated: np.ndarray, real: np.ndarray) -> dict:
        """PSD per channel type, alpha peaks and covariance/correlation comparisons."""
        opts = self.options
        seg = min(opts.psd_seconds, real.shape[-1] / self.sfreq, generated.shape[-1] / self.sfreq)
        kw = {"seg_seconds": seg}
        freqs, psd_gen = spectral.psd_by_channel_type(generated, self.sfreq, self.ch_types, **kw)
        _, psd_real = spectral.psd_by_channel_type(real, self.sfreq, self.ch_types, **kw)
        per_type = {}
        for t in psd_gen:
            peaks = {}
            for label, p in (("generated", psd_gen[t]), ("held-out", psd_real[t])):
                try:
                    peaks[label] = spectral.find_peak(freqs, p, opts.alpha_band)
                except ValueError as err:  # too coarse a resolution around the band
                    logger.warning("alpha peak search skipped for %s %s: %s", label, t, err)
                    peaks[label] = None
            per_type[t] = {"psd_generated": psd_gen[t], "psd_heldout": psd_real[t],
                           "peak_generated": peaks["generated"],
                           "peak_heldout": peaks["held-out"],
                           **spectral.psd_similarity(psd_gen[t], psd_real[t], freqs,
                                                     fmin=1.0, fmax=opts.psd_fmax)}
        cov_gen, cov_real = spectral.channel_covariance(generated), spectral.channel_covariance(real)
        corr_gen = spectral.channel_correlation(generated)
        corr_real = spectral.channel_correlation(real)
        return {"freqs": freqs, "types": per_type,
                "cov_generated": cov_gen, "cov_heldout": cov_real,
                "corr_generated": corr_gen, "corr_heldout": corr_real,
                "covariance_similarity": spectral.matrix_similarity(cov_gen, cov_real),
                "correlation_similarity": spectral.matrix_similarity(corr_gen, corr_real)}

    # -- main --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Compute everything, write the outputs, return the summary (also ``summary.json``)."""
        opts = self.options
        torch.manual_seed(opts.seed)
        t_start = time.perf_counter()
        self._setup()
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        logger.info("EvalQuant: %s on %s (%d %s windows of %d samples), writing to %s",
                    self.model_name, self.device, min(len(self.test),
                                                      opts.max_batches * opts.batch_size),
                    opts.split, self.window, out)
        unigram = torch.as_tensor(unigram_distribution(
            self.train, self.vocab_size, max_windows=opts.unigram_max_windows, seed=opts.seed,
            progress=opts.progress), dtype=torch.float32)
        batches = self._heldout_batches()
        tf = self.teacher_forced(batches, unigram)
        ns = self.nstep(batches, unigram)
        gen = self.free_running()
        real = self.heldout_signal()
        spec = self.compare_spectra(gen["signal"], real)
        summary = self._summarize(tf, ns, gen, spec, unigram)
        self._write_outputs(tf, ns, gen, spec, real, summary)
        summary["wall_seconds"] = time.perf_counter() - t_start
        summary["files"] = sorted(str(p.relative_to(out)) for p in self.files)
        self.files.append(report.write_json(out / "summary.json", summary))
        logger.info("EvalQuant done in %.1f s: next-step accuracy %s %.3f, %s %.3f, %s %.3f",
                    summary["wall_seconds"], self.model_name,
                    summary["next_step"]["accuracy"][self.model_name], REPEAT_LAST,
                    summary["next_step"]["accuracy"][REPEAT_LAST], UNIGRAM,
                    summary["next_step"]["accuracy"][UNIGRAM])
        return summary

    def _summarize(self, tf, ns, gen, spec, unigram) -> dict:
        opts = self.options
        m = self.model_name
        acc = {m: float(tf["pos_acc"].mean()), REPEAT_LAST: float(tf["pos_rep"].mean()),
               UNIGRAM: float(tf["pos_uni"].mean())}
        types = list(spec["types"])
        psd_summary = {}
        for t, d in spec["types"].items():
            pg, ph = d["peak_generated"], d["peak_heldout"]
            psd_summary[t] = {
                "alpha_peak_generated_hz": pg.freq if pg else None,
                "alpha_peak_heldout_hz": ph.freq if ph else None,
                "alpha_peak_ratio_generated": pg.ratio if pg else None,
                "alpha_peak_ratio_heldout": ph.ratio if ph else None,
                "alpha_peak_detected_generated": bool(pg and pg.detected),
                "alpha_peak_detected_heldout": bool(ph and ph.detected),
                "log_spectral_distance_db": d["log_spectral_distance_db"],
                "log_psd_correlation": d["log_psd_correlation"],
            }
        return {
            "eval_class": self.name,
            "model_name": m,
            "ckpt_path": str(opts.ckpt_path),
            "device": str(self.device),
            "precision": opts.precision,
            "split": opts.split,
            "sfreq": self.sfreq,
            "n_channels": len(self.ch_names),
            "channel_types": {t: self.ch_types.count(t) for t in types},
            "vocab_size": self.vocab_size,
            "window_samples": self.window,
            "model_context": self.max_context,
            "n_windows": tf["n_windows"],
            "next_step": {
                "accuracy": acc,
                "nll_nats": {m: float(tf["pos_nll"].mean()),
                             UNIGRAM: float(tf["pos_uni_nll"].mean())},
                "beats_baselines": acc[m] > max(acc[REPEAT_LAST], acc[UNIGRAM]),
                "definition": "teacher-forced next-token accuracy averaged over all positions, "
                              "channels and held-out windows",
            },
            "history_sweep": {"history_lengths": tf["hist"], "accuracy": tf["hist_acc"],
                              REPEAT_LAST: tf["hist_rep"], UNIGRAM: tf["hist_uni"]},
            "nstep": {
                "sampling": ns["sampling"], "sampling_kwargs": ns["sampling_kwargs"],
                "future_steps": opts.future_steps, "context_samples": ns["context_samples"],
                "accuracy_at_1": {k: float(v[0]) for k, v in ns["acc"].items()},
                f"accuracy_at_{opts.future_steps}": {k: float(v[-1])
                                                     for k, v in ns["acc"].items()},
                "rmse_at_1": {k: {t: float(v[t][0] * display_unit(t)[0]) for t in v}
                              for k, v in ns["rmse"].items()},
                "rmse_units": {t: display_unit(t)[1] for t in types},
            },
            "generation": {
                "seconds": opts.gen_seconds, "n_sequences": opts.n_generated,
                "sampling": opts.gen_sampling, "sampling_kwargs": opts.gen_kwargs(),
                "context_samples": gen["context_samples"],
                "steps_per_second": gen["steps_per_second"],
                "psd": psd_summary,
                "covariance_similarity": spec["covariance_similarity"],
                "correlation_similarity": spec["correlation_similarity"],
            },
            "alpha_band_hz": list(opts.alpha_band),
        }

    def _write_outputs(self, tf, ns, gen, spec, real, summary) -> None:
        out, m, opts = self.out_dir, self.model_name, self.options
        files = self.files
        base = [REPEAT_LAST, UNIGRAM]

        def curve(name, x, curves, **kw):
            files.extend(report.save_curve(out, name, x, curves, **kw).values())

        def figure(fig, name):
            files.extend(plots.save_figure(fig, out / name))

        # 1. accuracy by position (teacher forcing)
        curves = {m: tf["pos_acc"], REPEAT_LAST: tf["pos_rep"], UNIGRAM: tf["pos_uni"]}
        curve("accuracy_by_position", tf["positions"], curves,
              xlabel="History length (tokens)", ylabel="Next-token accuracy",
              n_windows=tf["n_windows"], nll_nats={m: tf["pos_nll"], UNIGRAM: tf["pos_uni_nll"]})
        fig, ax = plots.plot_curves(tf["positions"] / self.sfreq * 1e3, curves, baselines=base,
                                    xlabel="History available (ms)",
                                    ylabel="Next-token accuracy",
                                    title="Teacher-forced next-step accuracy (held-out)")
        figure(fig, "accuracy_by_position")
        # 2. history sweep (truncated contexts)
        n_h = len(tf["hist"])
        curves = {m: tf["hist_acc"], REPEAT_LAST: np.full(n_h, tf["hist_rep"]),
                  UNIGRAM: np.full(n_h, tf["hist_uni"])}
        curve("history_sweep", tf["hist"], curves, xlabel="Context length (tokens)",
              ylabel="Next-token accuracy", sfreq=self.sfreq)
        fig, ax = plots.plot_curves(tf["hist"], curves, baselines=base, logx=n_h > 2,
                                    xlabel="Context length (tokens)",
                                    ylabel="Next-token accuracy",
                                    title="Accuracy vs history length (truncated contexts)")
        figure(fig, "history_sweep")
        # 3. N-step-ahead accuracy and RMSE
        mode = f"{ns['sampling']} rollouts"
        curve("nstep_accuracy", ns["k"], ns["acc"], xlabel="Steps ahead",
              ylabel="Token accuracy", sampling=ns["sampling"],
              sampling_kwargs=ns["sampling_kwargs"], context_samples=ns["context_samples"])
        fig, ax = plots.plot_curves(ns["k"], ns["acc"], baselines=base,
                                    xlabel=f"Steps ahead (1 step = {1e3 / self.sfreq:.3g} ms)",
                                    ylabel="Token accuracy",
                                    title=f"N-step-ahead accuracy ({mode})")
        figure(fig, "nstep_accuracy")
        types = list(dict.fromkeys(self.ch_types))
        fig, axes = plots.new_figure(1, len(types) + 1)
        for ax, t in zip(axes[0], types):
            factor, unit = display_unit(t)
            rm = {k: v[t] * factor for k, v in ns["rmse"].items()}
            curve(f"nstep_rmse_{t}", ns["k"], rm, xlabel="Steps ahead",
                  ylabel=f"RMSE ({unit})", unit=unit, ch_type=t, sampling=ns["sampling"])
            plots.plot_curves(ns["k"], rm, baselines=base, ax=ax, xlabel="Steps ahead",
                              ylabel=f"RMSE ({unit})", title=f"{t} ({mode})")
        curve("nstep_rmse_normalized", ns["k"], ns["rmse_norm"], xlabel="Steps ahead",
              ylabel="RMSE (normalized units)", sampling=ns["sampling"])
        plots.plot_curves(ns["k"], ns["rmse_norm"], baselines=base, ax=axes[0, -1],
                          xlabel="Steps ahead", ylabel="RMSE (normalized units)",
                          title="all channels (normalized)")
        fig.suptitle("N-step-ahead error in signal units (held-out)")
        figure(fig, "nstep_rmse")
        # 4. PSD per channel type, generated vs held-out
        freqs = spec["freqs"]
        fig, axes = plots.new_figure(1, len(types))
        for ax, t in zip(axes[0], types):
            d = spec["types"][t]
            factor, unit = display_unit(t)
            psds = {"held-out": d["psd_heldout"] * factor ** 2,
                    "generated": d["psd_generated"] * factor ** 2}
            curve(f"psd_{t}", freqs, psds, xlabel="Frequency (Hz)", ylabel=f"PSD ({unit}²/Hz)",
                  unit=f"{unit}²/Hz", ch_type=t,
                  alpha_peak={"held-out": d["peak_heldout"], "generated": d["peak_generated"]})
            peaks = {"held-out": d["peak_heldout"].freq if d["peak_heldout"] else None,
                     "generated": d["peak_generated"].freq if d["peak_generated"] else None}
            plots.plot_psd(freqs, psds, unit=unit, band=opts.alpha_band,
                           band_label=f"alpha ({opts.alpha_band[0]:g}–{opts.alpha_band[1]:g} Hz)",
                           peaks=peaks, fmax=opts.psd_fmax, ax=ax,
                           title=f"{t} ({self.ch_types.count(t)} channels)")
        fig.suptitle(f"PSD: {opts.gen_seconds:g} s generated ({opts.gen_sampling}) vs held-out")
        figure(fig, "psd")
        # 5. channel covariance / correlation
        for key in ("cov_generated", "cov_heldout", "corr_generated", "corr_heldout"):
            files.append(report.write_npy(out / f"{key}.npy", spec[key]))
        files.append(report.write_json(out / "covariance.json", {
            "covariance_similarity": spec["covariance_similarity"],
            "correlation_similarity": spec["correlation_similarity"],
            "ch_names": self.ch_names, "files": ["cov_generated.npy", "cov_heldout.npy",
                                                 "corr_generated.npy", "corr_heldout.npy"]}))
        sim = spec["correlation_similarity"]["offdiag_correlation"]
        fig, _ = plots.plot_matrices({"held-out": spec["corr_heldout"],
                                      "generated": spec["corr_generated"]},
                                     cbar_label="Pearson correlation", vmax=1.0,
                                     title=f"Channel correlation (similarity r = "
                                           f"{report.fmt_value(sim, 3)})")
        figure(fig, "channel_correlation")
        # 6. traces: the first channel of each type
        first = [self.ch_types.index(t) for t in types]
        unit = " / ".join(display_unit(t)[1] for t in types)
        scale = np.array([display_unit(self.ch_types[i])[0] for i in first])[:, None]
        fig, _ = plots.plot_traces({"held-out": real[0][first] * scale,
                                    "generated": gen["signal"][0][first] * scale},
                                   self.sfreq, ch_names=[self.ch_names[i] for i in first],
                                   unit=unit, seconds=min(3.0, real.shape[-1] / self.sfreq),
                                   max_channels=len(first),
                                   title="Held-out vs generated signal")
        figure(fig, "traces")
        # 7. the generated signal as MNE Raw
        files.append(report.write_npy(out / "generated_tokens.npy",
                                      gen["tokens"].numpy().astype(np.int16)))
        for i, sig in enumerate(gen["signal"]):
            name = "generated_raw.fif" if i == 0 else f"generated_{i}_raw.fif"
            files.append(self._write_fif(sig, out / name))
        # 8. report.md
        files.append(self._write_report(summary))

    def _write_fif(self, signal: np.ndarray, path: Path) -> Path:
        meta = (getattr(self.test, "metas", None) or [None])[0]
        template = None
        if meta is not None:
            template = template_info_from_provenance(meta.provenance, self.ch_names)
        kw: dict[str, Any] = {}
        if template is not None:
            kw["template"] = template
        elif meta is not None and meta.pos_3d is not None:
            kw["pos_3d"], kw["ori_3d"] = meta.pos_3d, meta.ori_3d
        desc = (f"ephys-gpt EvalQuant: {self.options.gen_seconds:g} s generated by "
                f"{self.model_name} ({self.options.gen_sampling}, {self.options.gen_kwargs()})")
        raw = array_to_raw(signal, ch_names=self.ch_names, ch_types=self.ch_types,
                           sfreq=self.sfreq, description=desc, **kw)
        return write_raw_fif(raw, path)

    def _write_report(self, s: dict) -> Path:
        m = self.model_name
        ns, ge = s["nstep"], s["generation"]
        rep = report.MarkdownReport(f"EvalQuant: {m}")
        rep.text(f"Checkpoint `{s['ckpt_path']}`, {s['n_windows']} held-out ({s['split']}) "
                 f"windows of {s['window_samples']} samples at {s['sfreq']:g} Hz, "
                 f"{s['n_channels']} channels, vocabulary {s['vocab_size']}. "
                 f"Device {s['device']}, precision {s['precision']}.")
        acc = s["next_step"]["accuracy"]
        verdict = ("beats both baselines" if s["next_step"]["beats_baselines"]
                   else "does NOT beat both baselines")
        rep.section("Next-step accuracy (teacher forced)")
        rep.table(["predictor", "accuracy", "NLL (nats)"],
                  [[k, v, s["next_step"]["nll_nats"].get(k)] for k, v in acc.items()])
        rep.text(f"{m} {verdict}. `repeat-last` repeats the previous token; `unigram` draws "
                 "from each channel's training-set token distribution.")
        rep.section(f"N-step-ahead ({ns['sampling']} rollouts from "
                    f"{ns['context_samples']}-sample contexts)")
        N = ns["future_steps"]
        rep.table(["predictor", "acc @1", f"acc @{N}"] +
                  [f"RMSE @1 {t} ({u})" for t, u in ns["rmse_units"].items()],
                  [[k, ns["accuracy_at_1"][k], ns[f"accuracy_at_{N}"][k]] +
                   [ns["rmse_at_1"][k][t] for t in ns["rmse_units"]]
                   for k in ns["accuracy_at_1"]])
        rep.section(f"Free-running generation ({ge['seconds']:g} s, {ge['sampling']} "
                    f"{ge['sampling_kwargs']})")
        rep.table(["channel type", "alpha peak held-out (Hz)", "alpha peak generated (Hz)",
                   "peak/background generated", "log-spectral distance (dB)"],
                  [[t, d["alpha_peak_heldout_hz"], d["alpha_peak_generated_hz"],
                    d["alpha_peak_ratio_generated"], d["log_spectral_distance_db"]]
                   for t, d in ge["psd"].items()])
        rep.text(f"Channel correlation similarity (off-diagonal r): "
                 f"{report.fmt_value(ge['correlation_similarity']['offdiag_correlation'], 3)}; "
                 f"covariance similarity: "
                 f"{report.fmt_value(ge['covariance_similarity']['offdiag_correlation'], 3)}. "
                 f"Generation speed: {ge['steps_per_second']:.1f} steps/s. The generated "
                 "signal is in `generated_raw.fif` (`mne.io.read_raw_fif`).")
        rep.section("Figures")
        for name, caption in [("accuracy_by_position", "Next-step accuracy vs history"),
                              ("history_sweep", "Accuracy vs context length"),
                              ("nstep_accuracy", "N-step-ahead accuracy"),
                              ("nstep_rmse", "N-step-ahead RMSE"),
                              ("psd", "PSD generated vs held-out"),
                              ("channel_correlation", "Channel correlation"),
                              ("traces", "Signal traces")]:
            rep.figure(self.out_dir / f"{name}.png", caption, relative_to=self.out_dir)
        return rep.write(self.out_dir / "report.md")


def _default_lengths(n: int) -> list[int]:
    lengths = [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return sorted(set(lengths + [n]))


def _parameters(fn) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()

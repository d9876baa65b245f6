"""The base every eval runner inherits from, and the options every runner takes.

:class:`EvalRunner` owns what all runners need: loading the model and checking it can do what
the runner evaluates (a capability from :mod:`ephys_gpt.models.capabilities`), the held-out
split and its windows, the check that the data was made like the model's training data,
decoding to signal units, error accumulation per channel type, the comparison of generated
with held-out spectra and covariance, figures, ``.fif`` export, ``summary.json`` and
``report.md``. A concrete runner declares its ``capability`` and ``input_kinds`` and
implements :meth:`EvalRunner.evaluate` with what is specific to that capability; it inherits
from this base only, never from another runner.

Legend: B windows, C channels, T samples, N steps.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ephys_gpt.eval import plots, report, spectral
from ephys_gpt.eval.fif import array_to_raw, template_info_from_provenance, write_raw_fif
from ephys_gpt.eval.windows import full_window, spread_indices, to_signal, window_steps
from ephys_gpt.linear import LinearBaselineOptions, LinearPredictor, fit_linear_baselines

logger = logging.getLogger(__name__)


class RunnerOptions(BaseModel):
    """Options every eval runner takes (the ``eval`` block of a run YAML); runners subclass
    it to add their own and may change a default by re-declaring the field."""

    model_config = ConfigDict(extra="forbid")

    ckpt_path: str = Field(description="exported model folder (model.safetensors + "
                                       "config.json), a Lightning .ckpt, or a run's save_dir")
    split: Literal["test", "val"] = Field("test", description="held-out split evaluated")
    batch_size: int = Field(4, ge=1, description="held-out windows per batch")
    max_batches: int = Field(4, ge=1, description="held-out batches for the error curves")
    future_steps: int = Field(16, ge=1, description="forecast horizon N (samples)")
    gen_seconds: float = Field(5.0, gt=0, description="length of free-running generation")
    n_generated: int = Field(1, ge=1, description="free-running sequences generated")
    psd_windows: int = Field(32, ge=1, description="held-out windows for the real PSD and "
                                                   "covariance")
    psd_seconds: float = Field(1.0, gt=0, description="Welch segment length (s)")
    psd_fmax: float | None = Field(None, gt=0, description="highest frequency compared")
    alpha_band: tuple[float, float] = Field((8.0, 13.0), description="band of the alpha "
                                                                     "peak search")
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    device: int | str | None = Field(None, description="device index or torch device string")
    precision: Literal["32", "32-true", "bf16", "bf16-mixed"] = Field(
        "32", description="bf16 / bf16-mixed: run the model under bf16 autocast")
    seed: int = 0
    out_dir: str | None = Field(None, description="default <save_dir>/evals/<eval_class>")
    progress: bool = Field(True, description="show tqdm progress bars")
    linear: LinearBaselineOptions | None = Field(
        default_factory=LinearBaselineOptions,
        description="the per-channel AR and multichannel VAR baselines fitted on the training "
                    "split (orders chosen on the validation split when the test split is "
                    "evaluated); null: none")

    @model_validator(mode="after")
    def _band(self):
        lo, hi = self.alpha_band
        if not 0 < lo < hi:
            raise ValueError(f"alpha_band must be (low, high) Hz with 0 < low < high, got "
                             f"{self.alpha_band}")
        return self


class SamplingOptions(RunnerOptions):
    """The options of runners whose model samples discrete tokens (EvalQuant; EvalVQ for a
    prior over codes): how N-step rollouts and free-running generation sample."""

    nstep_sampling: Literal["greedy", "sample"] = Field(
        "greedy", description="N-step rollouts: greedy (argmax) or sampled with the gen_* "
                              "settings")
    gen_context_seconds: float | None = Field(
        None, gt=0, description="held-out context before free-running generation (default "
                                "and at most: one window, within the model's context)")
    gen_sampling: Literal["top_p", "top_k", "temperature", "greedy"] = Field(
        "top_p", description="sampling rule for free-running generation")
    temperature: float = Field(1.0, ge=0, description="softmax temperature (0 = greedy)")
    top_k: int = Field(50, ge=1, description="kept tokens for gen_sampling: top_k")
    top_p: float = Field(0.95, gt=0, le=1, description="nucleus mass for gen_sampling: top_p")

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


def check_history_lengths(v: list[int] | None) -> list[int] | None:
    """Validator of ``history_lengths`` options: sorted unique integers >= 1, or None."""
    if v is not None and (not v or any(h < 1 for h in v)):
        raise ValueError(f"history_lengths must be a non-empty list of integers >= 1, got {v}")
    return sorted(set(v)) if v is not None else v


def default_history_lengths(n: int) -> list[int]:
    """Powers of two up to ``n``, and ``n`` itself."""
    lengths = [2 ** i for i in range(int(math.log2(n)) + 1)] if n >= 1 else []
    return sorted(set(lengths + [n]))


# Display units per channel type: (factor from SI, label).
_UNITS = {"mag": (1e15, "fT"), "grad": (1e13, "fT/cm"), "planar1": (1e13, "fT/cm"),
          "planar2": (1e13, "fT/cm"), "eeg": (1e6, "µV"), "seeg": (1e6, "µV"),
          "ecog": (1e6, "µV"), "dbs": (1e6, "µV"), "eog": (1e6, "µV"), "ecg": (1e6, "µV"),
          "emg": (1e6, "µV")}


def display_unit(ch_type: str) -> tuple[float, str]:
    """``(factor, label)`` turning SI values of ``ch_type`` into readable units (fT, µV...);
    ``"normalized"`` (model units) is shown as it is."""
    if ch_type == "normalized":
        return 1.0, "normalized"
    return _UNITS.get(ch_type, (1.0, "a.u."))


def max_context(model: torch.nn.Module) -> int | None:
    """Longest input the model accepts (its config's ``n_positions``), None if unbounded."""
    value = getattr(getattr(model, "config", None), "n_positions", None)
    return value if isinstance(value, int) and value > 0 else None


def resolve_device(accelerator: str, device: int | str | None) -> torch.device:
    """The torch device for ``accelerator`` (auto: CUDA when available) and ``device``."""
    if isinstance(device, str) and not device.isdigit():
        return torch.device(device)
    index = int(device) if device is not None else None
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"eval.accelerator is {accelerator!r} but no CUDA device is "
                             "available; use accelerator: cpu")
        return torch.device("cuda", index or 0)
    return torch.device("cpu")


Batch = tuple[torch.Tensor, tuple, list]  # (x (B, C, T), extra inputs, steps of each window)


class EvalRunner:
    """Base of the eval runners (see the module docstring).

    ``model``/``info``/``splits`` may be passed in (tests, notebooks); otherwise they come
    from ``options.ckpt_path`` and the run config's ``datasplitter``.
    """

    name: ClassVar[str] = "EvalRunner"
    options_class: ClassVar[type[RunnerOptions]] = RunnerOptions
    # what the evaluated model must be able to do (a tuple: any one of them)
    capability: ClassVar[type | tuple[type, ...] | None] = None
    input_kinds: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: dict, options: BaseModel | dict, *,
                 model: torch.nn.Module | None = None, info: dict | None = None,
                 splits: Any = None):
        self.config = dict(config or {})
        self.options = (options if isinstance(options, self.options_class)
                        else self.options_class.model_validate(options))
        self._model, self._info, self._splits = model, info, splits
        if self.options.out_dir:
            self.out_dir = Path(self.options.out_dir)
        elif self.config.get("save_dir"):
            self.out_dir = Path(self.config["save_dir"]) / "evals" / self.name
        else:
            raise ValueError(f"{self.name} needs save_dir in the run config or eval.out_dir")
        self.device = resolve_device(self.options.accelerator, self.options.device)
        self.files: list[Path] = []
        self._linear: list[LinearPredictor] | None = None

    # -- the run ------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self) -> dict:
        """Set up, evaluate, write ``report.md`` and ``summary.json``; return the summary."""
        torch.manual_seed(self.options.seed)
        t_start = time.perf_counter()
        self.setup()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        logger.info("%s: %s on %s (%s split, windows of %d samples), writing to %s",
                    self.name, self.model_name, self.device, self.options.split, self.window,
                    self.out_dir)
        summary, rep = self.evaluate()
        summary["wall_seconds"] = time.perf_counter() - t_start
        self.files.append(rep.write(self.out_dir / "report.md"))
        summary["files"] = sorted(str(p.relative_to(self.out_dir)) for p in self.files)
        self.files.append(report.write_json(self.out_dir / "summary.json", summary))
        logger.info("%s done in %.1f s: %s", self.name, summary["wall_seconds"],
                    self.out_dir / "report.md")
        return summary

    def evaluate(self) -> tuple[dict, report.MarkdownReport]:
        """The runner's own measurements: the summary and the report (without files)."""
        raise NotImplementedError

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Load the model, check what it can do, build the splits, check the data."""
        self._load_model()
        self._check_model()
        self._load_data()

    def _load_model(self) -> None:
        if self._model is None:
            from ephys_gpt.models.loading import load_model

            if not Path(self.options.ckpt_path).exists():
                raise FileNotFoundError(f"eval.ckpt_path {self.options.ckpt_path} does not exist "
                                        "(expected an export folder with model.safetensors + "
                                        "config.json, a .ckpt, or a run's save_dir)")
            self._model, self._info = load_model(self.options.ckpt_path, self.device)
        self.info = dict(self._info or {})
        self.model = self._model.to(self.device).eval()
        self.model_name = str(getattr(self.model, "registry_name", type(self.model).__name__))

    def _check_model(self) -> None:
        from ephys_gpt.models.registry import get_model_spec

        self.spec = spec = get_model_spec(self.model_name)
        caps = self.capability if isinstance(self.capability, tuple) else (self.capability,)
        if spec.input_kind not in self.input_kinds or not any(spec.can(c) for c in caps):
            raise ValueError(
                f"{self.name} evaluates models with the "
                f"{' or '.join(c.__name__ for c in caps)} capability "
                f"on {' or '.join(repr(k) for k in self.input_kinds)} inputs; "
                f"{self.model_name} consumes {spec.input_kind!r} and can do: "
                f"{', '.join(spec.capability_names) or 'nothing generative'}")

    def _load_data(self) -> None:
        opts = self.options
        if self._splits is None:
            self._splits = self._build_splits()
        self.train, self.test = self._splits.train, getattr(self._splits, opts.split)
        if self.test is None or len(self.test) == 0:
            raise ValueError(f"the {opts.split!r} split is empty: adjust datasplitter "
                             f"val_ratio/test_ratio so that {self.name} has held-out windows")
        self._check_data(self.test)
        ds = self.test
        self.sfreq = float(ds.sfreq)
        self.ch_names = [str(c) for c in ds.ch_names]
        self.ch_types = [str(t) for t in ds.ch_types]
        self.types = list(dict.fromkeys(self.ch_types))
        self.type_idx = {t: [i for i, c in enumerate(self.ch_types) if c == t]
                         for t in self.types}
        self.steps = list(ds.steps)
        first = self.first_window(ds)
        self.window, self.tokens = first.shape[-1], not first.is_floating_point()
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if opts.precision.startswith("bf16") else nullcontext())
        self.generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        self.cpu_generator = torch.Generator().manual_seed(opts.seed)

    def first_window(self, dataset) -> torch.Tensor:
        """The first held-out window in channel space, (C, T): its length and kind (tokens or
        continuous) set ``self.window`` and ``self.tokens``."""
        return full_window(dataset, 0)[0]

    def _build_splits(self):
        from ephys_gpt.training.run_folder import run_splits

        cfg = self.config.get("datasplitter")
        if not isinstance(cfg, dict):
            raise ValueError(f"{self.name} needs the run config's 'datasplitter' block to find "
                             "held-out data")
        return run_splits(self.config, augmentations=False)[0]  # the run's recorded split

    def _check_data(self, dataset) -> None:
        """Refuse held-out data made differently from the model's training data: sampling
        rate, channels and stage-2 steps against what the export / checkpoint recorded
        (:func:`ephys_gpt.compatibility.check_model_data`)."""
        from ephys_gpt.compatibility import check_model_data

        root = (self.config.get("datasplitter") or {}).get("dataset_root")
        metas = getattr(dataset, "metas", None)
        if root is not None:
            data = f"datasplitter.dataset_root={root}"
        elif metas:
            data = f"the {self.options.split} data ({metas[0].path.parent})"
        else:
            data = f"the {self.options.split} data"
        source = self.info.get("source") or self.options.ckpt_path
        check_model_data(self.info, dataset, model=f"the model {source}", data_label=data)

    # -- held-out data ----------------------------------------------------------------------------
    def heldout(self, n: int, seed_offset: int = 0, dataset=None) -> list[Batch]:
        """Batches of ``n`` windows spread over the held-out split (or ``dataset``)."""
        opts, ds = self.options, self.test if dataset is None else dataset
        idx = [int(i) for i in spread_indices(len(ds), n, opts.seed + seed_offset)]
        out = []
        for j in range(0, len(idx), opts.batch_size):
            items = [full_window(ds, i) for i in idx[j:j + opts.batch_size]]
            x = torch.stack([w for w, _ in items]).to(self.device)
            extra = tuple(torch.stack([e[k] for _, e in items]).to(self.device)
                          for k in range(len(items[0][1])))
            out.append((x, extra, [window_steps(ds, i) for i in idx[j:j + opts.batch_size]]))
        return out

    @staticmethod
    def to_signal(x: torch.Tensor, steps, normalized: bool = False) -> torch.Tensor:
        """Model values (B, C, T) → signal units on the CPU (:func:`~ephys_gpt.eval.windows.to_signal`)."""
        return to_signal(x, steps, normalized)

    def real_signal(self) -> np.ndarray:
        """``psd_windows`` held-out windows in signal units (N, C, T), for the spectra."""
        batches = self.heldout(self.options.psd_windows, seed_offset=2)
        return torch.cat([self.to_signal(x, s) for x, _, s in batches]).numpy()

    # -- linear baselines -------------------------------------------------------------------------
    def linear_models(self) -> list[LinearPredictor]:
        """The AR/VAR baselines (``options.linear``), fitted once on the training split; their
        orders are chosen on the validation split when the test split is evaluated (BIC on the
        training data otherwise, so the evaluated windows never choose a model)."""
        if self._linear is None:
            opts = self.options.linear
            val = self._splits.val if self.options.split == "test" else None
            self._linear = [] if opts is None else fit_linear_baselines(
                self.train, val, opts, progress=self.options.progress)
            for m in self._linear:
                logger.info("%s: linear baseline %s fitted on the training split", self.name,
                            m.name)
        return self._linear

    def linear_next(self, x: torch.Tensor, steps) -> dict[str, torch.Tensor]:
        """Each linear baseline's teacher-forced prediction of ``x[..., t+1]`` at every ``t``
        of ``x`` (B, C, T): tokens for token data (re-quantized through ``steps``), else
        values in the model's units."""
        x = x.cpu()
        return {m.name: (m.predict_next_tokens(x, steps) if self.tokens else m.predict_next(x))
                for m in self.linear_models()}

    def linear_forecast(self, context: torch.Tensor, steps, n: int) -> dict[str, torch.Tensor]:
        """Each linear baseline's ``n``-step recursive forecast (B, C, n) after ``context``."""
        context = context.cpu()
        return {m.name: (m.forecast_tokens(context, steps, n) if self.tokens
                         else m.forecast(context, n)) for m in self.linear_models()}

    def linear_free_run(self, context: torch.Tensor, steps, n: int,
                        real: np.ndarray) -> dict[str, dict]:
        """Each linear baseline run free for ``n`` samples after ``context`` with Gaussian
        innovations of its residual covariance, compared with held-out data like the model's
        generation: ``{name: {log_spectral_distance_db per type, covariance and correlation
        similarity}}``."""
        gen = torch.Generator().manual_seed(self.options.seed + 3)
        context, out = context.cpu(), {}
        for m in self.linear_models():
            sim = (m.simulate_tokens(steps, n, context=context, generator=gen) if self.tokens
                   else m.simulate(n, context=context, generator=gen))
            spec = self.compare_spectra(self.to_signal(sim, steps).numpy(), real)
            out[m.name] = {
                "log_spectral_distance_db": {t: d["log_spectral_distance_db"]
                                             for t, d in spec["types"].items()},
                "covariance_similarity": spec["covariance_similarity"],
                "correlation_similarity": spec["correlation_similarity"]}
        return out

    def linear_summary(self) -> dict:
        """What each fitted linear baseline is (order, inputs, fit), for ``summary.json``."""
        return {m.name: m.summary() for m in self.linear_models()}

    # -- errors per channel type -----------------------------------------------------------------
    def sq_errors(self, pred: torch.Tensor, true: torch.Tensor, steps) -> dict[str, np.ndarray]:
        """Summed squared errors over (B, channels) per time step, ``{key: (T,)}``: per channel
        type in signal units, and ``"normalized"`` (normalization not undone)."""
        z = (self.to_signal(pred, steps, True) - self.to_signal(true, steps, True)).double()
        out = {"normalized": z.pow(2).sum((0, 1)).numpy()}
        err = (self.to_signal(pred, steps) - self.to_signal(true, steps)).double().pow(2)
        for t, idx in self.type_idx.items():
            out[t] = err[:, idx].sum((0, 1)).numpy()
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

    # -- generated vs held-out ---------------------------------------------------------------------
    def compare_spectra(self, generated: np.ndarray, real: np.ndarray) -> dict:
        """PSD per channel type (alpha peaks, log-spectral distance) and channel
        covariance/correlation of ``generated`` against ``real`` (both (N, C, T), SI units)."""
        opts = self.options
        seg = min(opts.psd_seconds, real.shape[-1] / self.sfreq,
                  generated.shape[-1] / self.sfreq)
        freqs, psd_gen = spectral.psd_by_channel_type(generated, self.sfreq, self.ch_types,
                                                      seg_seconds=seg)
        _, psd_real = spectral.psd_by_channel_type(real, self.sfreq, self.ch_types,
                                                   seg_seconds=seg)
        types = {t: {"psd_generated": psd_gen[t], "psd_heldout": psd_real[t],
                     "peak_generated": self._peak(freqs, psd_gen[t], "generated", t),
                     "peak_heldout": self._peak(freqs, psd_real[t], "held-out", t),
                     **spectral.psd_similarity(psd_gen[t], psd_real[t], freqs, fmin=1.0,
                                               fmax=opts.psd_fmax)}
                 for t in psd_gen}
        cov_gen, cov_real = spectral.channel_covariance(generated), spectral.channel_covariance(real)
        corr_gen = spectral.channel_correlation(generated)
        corr_real = spectral.channel_correlation(real)
        return {"freqs": freqs, "types": types,
                "cov_generated": cov_gen, "cov_heldout": cov_real,
                "corr_generated": corr_gen, "corr_heldout": corr_real,
                "covariance_similarity": spectral.matrix_similarity(cov_gen, cov_real),
                "correlation_similarity": spectral.matrix_similarity(corr_gen, corr_real)}

    def _peak(self, freqs, psd, label: str, ch_type: str):
        try:
            return spectral.find_peak(freqs, psd, self.options.alpha_band)
        except ValueError as err:  # too coarse a resolution around the band
            logger.warning("alpha peak search skipped for %s %s: %s", label, ch_type, err)
            return None

    def spectra_outputs(self, spec: dict, generated: np.ndarray, real: np.ndarray,
                        label: str) -> dict:
        """Figures (PSD, channel correlation, traces), matrices and the generated ``.fif``
        files of a :meth:`compare_spectra` result; returns its part of the summary."""
        summary = self._psd_figure(spec, label)
        for key in ("cov_generated", "cov_heldout", "corr_generated", "corr_heldout"):
            self.files.append(report.write_npy(self.out_dir / f"{key}.npy", spec[key]))
        self.files.append(report.write_json(self.out_dir / "covariance.json", {
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
        self.figure(fig, "channel_correlation")
        self._traces_figure(generated, real)
        for i, sig in enumerate(generated):
            name = "generated_raw.fif" if i == 0 else f"generated_{i}_raw.fif"
            self.files.append(self.write_fif(sig, self.out_dir / name, label))
        return {"psd": summary, "covariance_similarity": spec["covariance_similarity"],
                "correlation_similarity": spec["correlation_similarity"]}

    def _psd_figure(self, spec: dict, label: str) -> dict:
        opts, freqs = self.options, spec["freqs"]
        fig, axes = plots.new_figure(1, len(self.types))
        summary = {}
        for ax, t in zip(axes[0], self.types):
            d = spec["types"][t]
            factor, unit = display_unit(t)
            psds = {"held-out": d["psd_heldout"] * factor ** 2,
                    "generated": d["psd_generated"] * factor ** 2}
            pg, ph = d["peak_generated"], d["peak_heldout"]
            self.curve(f"psd_{t}", freqs, psds, xlabel="Frequency (Hz)",
                       ylabel=f"PSD ({unit}²/Hz)", unit=f"{unit}²/Hz", ch_type=t,
                       alpha_peak={"held-out": ph, "generated": pg})
            plots.plot_psd(freqs, psds, unit=unit, band=opts.alpha_band,
                           band_label=f"alpha ({opts.alpha_band[0]:g}–{opts.alpha_band[1]:g} Hz)",
                           peaks={"held-out": ph.freq if ph else None,
                                  "generated": pg.freq if pg else None},
                           fmax=opts.psd_fmax, ax=ax,
                           title=f"{t} ({self.ch_types.count(t)} channels)")
            summary[t] = {
                "alpha_peak_generated_hz": pg.freq if pg else None,
                "alpha_peak_heldout_hz": ph.freq if ph else None,
                "alpha_peak_ratio_generated": pg.ratio if pg else None,
                "alpha_peak_ratio_heldout": ph.ratio if ph else None,
                "alpha_peak_detected_generated": bool(pg and pg.detected),
                "alpha_peak_detected_heldout": bool(ph and ph.detected),
                "log_spectral_distance_db": d["log_spectral_distance_db"],
                "log_psd_correlation": d["log_psd_correlation"]}
        fig.suptitle(f"PSD: {label} vs held-out")
        self.figure(fig, "psd")
        return summary

    def _traces_figure(self, generated: np.ndarray, real: np.ndarray) -> None:
        """The first channel of each type, held-out against generated."""
        first = [self.ch_types.index(t) for t in self.types]
        unit = " / ".join(display_unit(t)[1] for t in self.types)
        scale = np.array([display_unit(self.ch_types[i])[0] for i in first])[:, None]
        fig, _ = plots.plot_traces({"held-out": real[0][first] * scale,
                                    "generated": generated[0][first] * scale},
                                   self.sfreq, ch_names=[self.ch_names[i] for i in first],
                                   unit=unit, seconds=min(3.0, real.shape[-1] / self.sfreq),
                                   max_channels=len(first), title="Held-out vs generated signal")
        self.figure(fig, "traces")

    def write_fif(self, signal: np.ndarray, path: Path, label: str) -> Path:
        """``signal`` (C, T) in SI units as an MNE raw ``.fif`` with the recording's channel
        info (sensor geometry from the stage-1 file, else the stored positions)."""
        meta = self.test.metas[0]
        kw: dict[str, Any] = {}
        template = template_info_from_provenance(meta.provenance, self.ch_names)
        if template is not None:
            kw["template"] = template
        elif meta.pos_3d is not None:
            kw["pos_3d"], kw["ori_3d"] = meta.pos_3d, meta.ori_3d
        raw = array_to_raw(signal, ch_names=self.ch_names, ch_types=self.ch_types,
                           sfreq=self.sfreq, description=f"ephys-gpt {self.name}: {label} by "
                                                         f"{self.model_name}", **kw)
        return write_raw_fif(raw, path)

    # -- outputs ------------------------------------------------------------------------------------
    def curve(self, name: str, x, curves, **kw) -> None:
        """One set of curves as ``<name>.npy`` + ``<name>.json``."""
        self.files.extend(report.save_curve(self.out_dir, name, x, curves, **kw).values())

    def figure(self, fig, name: str) -> None:
        """A figure as ``<name>.png`` + ``<name>.pdf``."""
        self.files.extend(plots.save_figure(fig, self.out_dir / name))

    def error_curves(self, name: str, x: np.ndarray, rmse: dict[str, dict[str, np.ndarray]],
                     *, xlabel: str, title: str, baselines=(), **meta) -> None:
        """One curve file per channel type (+ normalized) and one figure with a panel each.

        ``rmse``: {predictor: {channel type or "normalized": (N,)}} in SI / model units.
        """
        keys = [*self.types, "normalized"]
        fig, axes = plots.new_figure(1, len(keys))
        for ax, key in zip(axes[0], keys):
            factor, unit = display_unit(key)
            curves = {p: v[key] * factor for p, v in rmse.items()}
            self.curve(f"{name}_{key}", x, curves, xlabel=xlabel, ylabel=f"RMSE ({unit})",
                       unit=unit, **meta)
            plots.plot_curves(x, curves, baselines=list(baselines), ax=ax, xlabel=xlabel,
                              ylabel=f"RMSE ({unit})", title=key)
        fig.suptitle(title)
        self.figure(fig, name)

    def base_summary(self) -> dict:
        """The summary fields every runner reports."""
        o = self.options
        return {"eval_class": self.name, "model_name": self.model_name,
                "ckpt_path": str(o.ckpt_path), "device": str(self.device),
                "precision": o.precision, "split": o.split, "sfreq": self.sfreq,
                "n_channels": len(self.ch_names),
                "channel_types": {t: len(i) for t, i in self.type_idx.items()},
                "window_samples": self.window,
                "units": {t: display_unit(t)[1] for t in self.types},
                "alpha_band_hz": list(o.alpha_band)}

    def linear_verdict(self, metric: str, model: float, values: dict[str, float],
                       higher_is_better: bool) -> str:
        """One plain sentence: how the model's ``metric`` compares with each linear baseline."""
        if not values:
            return "No linear baselines were fitted (eval.linear: null)."
        parts = []
        for name, v in values.items():
            better = model > v if higher_is_better else model < v
            ratio = model / v if v else float("nan")
            parts.append(f"{'beats' if better else 'does not beat'} {name} "
                         f"({report.fmt_value(model, 3)} vs {report.fmt_value(v, 3)}, "
                         f"ratio {report.fmt_value(ratio, 3)})")
        return (f"On {metric}, {self.model_name} " + "; it ".join(parts) + ". The AR and VAR "
                "models are fitted by ridge least squares on the same training split "
                "(ephys_gpt/linear/); on linear-Gaussian data a long VAR is close to the "
                "best possible predictor.")

    def linear_free_run_table(self, rep: report.MarkdownReport, linear: dict) -> None:
        """The linear baselines' free-running spectra and covariance against held-out data."""
        if not linear:
            return
        types = list(next(iter(linear.values()))["log_spectral_distance_db"])
        rep.text("The linear baselines run free from the same contexts (Gaussian innovations "
                 "with their residual covariance), for reference:")
        rep.table(["baseline", *[f"log-spectral distance {t} (dB)" for t in types],
                   "covariance similarity"],
                  [[k, *[v["log_spectral_distance_db"][t] for t in types],
                    v["covariance_similarity"]["offdiag_correlation"]]
                   for k, v in linear.items()])

    @staticmethod
    def spectra_section(rep: report.MarkdownReport, generation: dict) -> None:
        """The generated-vs-held-out table (alpha peaks, spectral distance) and the
        covariance similarity of a summary's generation part."""
        rep.table(["channel type", "alpha peak held-out (Hz)", "alpha peak generated (Hz)",
                   "peak/background generated", "log-spectral distance (dB)"],
                  [[t, d["alpha_peak_heldout_hz"], d["alpha_peak_generated_hz"],
                    d["alpha_peak_ratio_generated"], d["log_spectral_distance_db"]]
                   for t, d in generation["psd"].items()])
        corr = generation["correlation_similarity"]["offdiag_correlation"]
        cov = generation["covariance_similarity"]["offdiag_correlation"]
        rep.text(f"Channel correlation similarity (off-diagonal r): "
                 f"{report.fmt_value(corr, 3)}; covariance similarity: "
                 f"{report.fmt_value(cov, 3)}.")

    def figures_section(self, rep: report.MarkdownReport, figures: list[tuple[str, str]]) -> None:
        """A "Figures" section embedding ``(name, caption)`` figures."""
        rep.section("Figures")
        for name, caption in figures:
            rep.figure(self.out_dir / f"{name}.png", caption, relative_to=self.out_dir)

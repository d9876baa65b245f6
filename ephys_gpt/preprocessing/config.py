"""The preprocessing YAML (``configs/local/preprocess.yaml``), validated with pydantic.

Every key is checked before any work starts: an unknown key names the allowed ones, a wrong
type names the key, what was expected and what was found, and a ``data_path`` that does not
exist is named. Relative paths in the file resolve against the file's folder; ``key=value``
overrides from the command line (dotted keys reach into blocks, values parsed as YAML)
resolve relative paths against the current directory, as a shell user expects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ephys_gpt.configfile import (
    apply_overrides,
    format_validation_error,
    read_yaml,
    read_yaml_mapping,
    resolve_path,
)
from ephys_gpt.validation import check_number

DATASET_KINDS = ("omega", "bids", "files", "auto")
STEP_NAMES = ("normalize", "clip", "mulaw_quantize")
_PATH_KEYS = ("data_path", "save_folder", "osl_config")


class _Strict(BaseModel):
    # inf/nan are never a sensible setting here (a filter edge, a chunk length, a scale)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class NormalizeStep(_Strict):
    """Per-channel normalization with statistics from the session's good samples."""

    method: Literal["robust", "zscore"] = "robust"  # robust: median / (IQR/1.349); zscore: mean / std


class ClipStep(_Strict):
    """Clip each channel to ``mean +- std_factor * std`` (statistics after the previous steps)."""

    std_factor: float = Field(6.0, gt=0)


class MulawStep(_Strict):
    """Mu-law quantization to ``n_bits`` tokens (uint8 for n_bits <= 8); must be the last step."""

    n_bits: int = Field(8, ge=1, le=16)
    # x / scale is companded; null = the largest clip bound when clip comes right before,
    # else the largest |value| of the session's good samples after the previous steps
    scale: float | None = Field(None, gt=0)


_STEP_MODELS: dict[str, type[_Strict]] = {
    "normalize": NormalizeStep, "clip": ClipStep, "mulaw_quantize": MulawStep}


class RecipeConfig(_Strict):
    """Parameters of the built-in osl-ephys recipe (ignored when ``osl_config`` is given).

    The band edges, the notch frequencies and the target rate are checked together
    (:func:`check_filter_settings`): a reversed band, a value that is not a finite positive
    number, or a band edge at or above the resampled data's Nyquist frequency is refused.
    """

    l_freq: float | None = Field(1.0, ge=0)  # band-pass low edge in Hz (null: no high-pass)
    h_freq: float | None = Field(45.0, gt=0)  # band-pass high edge in Hz (null: no low-pass)
    notch_freqs: list[float] = [50.0, 100.0]  # line noise; frequencies >= Nyquist are skipped
    sfreq: float = Field(100.0, gt=0)  # resample to this rate in Hz
    bad_segment_seconds: float = Field(2.0, gt=0)  # window of the bad-segment detector
    significance_level: float = Field(0.1, gt=0, lt=1)  # GESD alpha for bad segments/channels
    detect_bad_segments: bool = True
    detect_bad_channels: bool = True

    @model_validator(mode="after")
    def _check_filters(self):
        check_filter_settings(self.l_freq, self.h_freq, notch_freqs=self.notch_freqs,
                              sfreq=self.sfreq, prefix="")
        return self


def _freq(value: Any, key: str, *, allow_zero: bool = False) -> float | None:
    """``value`` as a finite frequency in Hz (> 0, or >= 0 with ``allow_zero``), or None."""
    if value is None:
        return None
    try:
        return float(check_number(value, f"{key} (Hz)", low=0, low_inclusive=allow_zero))
    except TypeError as err:  # pydantic reports ValueErrors with the key
        raise ValueError(str(err)) from None


def check_filter_settings(l_freq: Any, h_freq: Any, *, notch_freqs: Sequence[Any] = (),
                          sfreq: Any = None, prefix: str = "") -> None:
    """Refuse band-pass/notch/resample settings that would not do what they say.

    MNE's ``filter(l_freq, h_freq)`` silently builds a band-*stop* filter when
    ``l_freq > h_freq``, so a reversed band would remove the very band asked for. Refused
    here, each with the key, the values and the fix: non-finite or negative values; ``l_freq
    >= h_freq``; notch frequencies that are not finite and positive; and, when the data are
    resampled to ``sfreq``, band edges at or above the new Nyquist frequency ``sfreq / 2``
    (the resampler's anti-alias filter removes everything above it, so such an edge has no
    effect). Notch frequencies at or above a recording's Nyquist frequency are skipped at run
    time by the ``notch_below_nyquist`` step (a harmonics list such as ``[50, 100]`` serves
    recordings of any rate).

    ``prefix`` names where the settings come from in messages (e.g. ``"recipe."``).
    """
    lo = _freq(l_freq, f"{prefix}l_freq", allow_zero=True)
    hi = _freq(h_freq, f"{prefix}h_freq")
    if lo is not None and hi is not None and lo >= hi:
        what = (f"that removes {hi:g}-{lo:g} Hz instead" if lo > hi else
                "instead, and the band kept would be empty")
        raise ValueError(
            f"{prefix}l_freq ({lo:g} Hz) must be below {prefix}h_freq ({hi:g} Hz): l_freq is "
            f"the high-pass edge and h_freq the low-pass edge of the band kept, and with "
            f"l_freq >= h_freq MNE builds a band-stop filter {what}. "
            + ("Swap the two values" if lo > hi else "Widen the band")
            + ", or set one of them to null to filter on one side only")
    if notch_freqs is None:
        notch_freqs = ()
    if isinstance(notch_freqs, (str, bytes)) or not isinstance(notch_freqs, Sequence):
        raise ValueError(f"{prefix}notch_freqs must be a list of frequencies in Hz, found "
                         f"{type(notch_freqs).__name__} {notch_freqs!r:.60}")
    for i, f in enumerate(notch_freqs):
        _freq(f, f"{prefix}notch_freqs[{i}]")
    if sfreq is None:
        return
    rate = _freq(sfreq, f"{prefix}sfreq")
    nyquist = rate / 2
    for key, edge in (("h_freq", hi), ("l_freq", lo)):
        if edge is not None and edge >= nyquist:
            raise ValueError(
                f"{prefix}{key} ({edge:g} Hz) must be below the Nyquist frequency of the "
                f"resampled data ({prefix}sfreq {rate:g} Hz / 2 = {nyquist:g} Hz): resampling "
                f"removes everything above {nyquist:g} Hz, so this band edge has no effect. "
                f"Lower {prefix}{key}, raise {prefix}sfreq above {2 * edge:g} Hz"
                + (", or set h_freq to null" if key == "h_freq" else ""))


def check_recipe_filters(recipe: dict[str, Any], source: str) -> None:
    """:func:`check_filter_settings` for every ``filter``, notch and ``resample`` step of an
    osl-ephys recipe (``{"preproc": [{method: {args}}, ...]}``), in order: a band edge is
    checked against the Nyquist frequency of the next ``resample``. ``source`` (the recipe
    file) and the step's position are named in messages. Values that are not numbers (osl-ephys
    also accepts strings in some places) are left to osl-ephys."""

    def num(v):
        return v if v is None or isinstance(v, (int, float)) and not isinstance(v, bool) else None

    band: tuple[Any, Any, int] | None = None  # the last filter step's edges and position
    for i, step in enumerate(recipe.get("preproc") or []):
        if not isinstance(step, dict) or len(step) != 1:
            continue
        (method, args), = step.items()
        args = args if isinstance(args, dict) else {}
        where = f"osl_config {source}: preproc step {i} ({method})"
        try:
            if method == "filter":
                lo, hi = num(args.get("l_freq")), num(args.get("h_freq"))
                check_filter_settings(lo, hi)
                band = (lo, hi, i)
            elif method in ("notch_filter", "notch_below_nyquist"):
                freqs = args.get("freqs")
                if isinstance(freqs, (int, float)) and not isinstance(freqs, bool):
                    freqs = [freqs]
                if isinstance(freqs, list):
                    check_filter_settings(None, None, notch_freqs=freqs)
            elif method == "resample" and band is not None and num(args.get("sfreq")):
                where += f" after the filter of step {band[2]}"
                check_filter_settings(band[0], band[1], sfreq=num(args.get("sfreq")))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


class PreprocessConfig(_Strict):
    """The whole preprocessing YAML (see docs/preprocessing.md for every key)."""

    data_path: Path  # raw recordings (Omega layout, BIDS, or a folder of MNE-readable files)
    save_folder: Path = Path("preprocessed")  # stage1/ and chunks/ go here
    dataset: Literal["omega", "bids", "files", "auto"] = "auto"
    osl_config: Path | None = None  # osl-ephys recipe YAML; null = the built-in recipe
    recipe: RecipeConfig = RecipeConfig()
    gen_report: bool = False  # osl-ephys HTML report (slow: plots every recording)
    n_workers: int = Field(1, ge=1)  # >1: stage 1 through Dask, stage 2 through a process pool
    dask_scheduler: str | None = None  # tcp://host:8786: both stages on that Dask cluster
    chunk_seconds: float = Field(10.0, gt=0)
    min_chunk_seconds: float = Field(1.0, ge=0)  # shorter leftovers between bad segments are dropped
    picks: str = "meg"  # MNE channel selection kept in stage 2 ("meg", "mag", "grad", "eeg", "data")
    bad_channels: Literal["interpolate", "zero", "keep"] = "interpolate"
    preproc_config: dict[str, Any] = Field(
        default_factory=lambda: {"normalize": {"method": "robust"}, "clip": {"std_factor": 6.0}})
    progress: bool = True  # tqdm progress bars

    @field_validator("preproc_config", mode="before")
    @classmethod
    def _check_steps(cls, value):
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of step name to parameters, found "
                             f"{type(value).__name__}")
        out = {}
        for i, (name, params) in enumerate(value.items()):
            if name not in _STEP_MODELS:
                raise ValueError(f"unknown stage-2 step {name!r}; allowed steps: "
                                 f"{', '.join(STEP_NAMES)}")
            if name == "mulaw_quantize" and i != len(value) - 1:
                raise ValueError("'mulaw_quantize' must be the last step (it turns the signal "
                                 "into integer tokens)")
            try:
                out[name] = _STEP_MODELS[name].model_validate(params or {}).model_dump()
            except ValidationError as err:
                raise ValueError(f"step {name!r}: "
                                 f"{format_validation_error(err, '', _STEP_MODELS[name])}"
                                 ) from None
        return out

    @property
    def stage1_dir(self) -> Path:
        return self.save_folder / "stage1"

    @property
    def chunks_dir(self) -> Path:
        return self.save_folder / "chunks"


def load_preprocess_config(path: str | os.PathLike | None = None, overrides=(), *,
                           require_data: bool = True) -> PreprocessConfig:
    """Read, merge and validate a preprocessing YAML.

    Parameters
    ----------
    path : path or None
        The YAML file; None builds the config from ``overrides`` alone.
    overrides : sequence of str
        ``key=value`` strings applied on top of the file.
    require_data : bool
        Check that ``data_path`` exists (stage 1 and discovery need it; stage 2 alone does not).
    """
    raw: dict[str, Any] = {}
    source = "preprocess config"
    if path is not None:
        path = Path(path)
        source = str(path)
        loaded = read_yaml_mapping(path, "preprocessing config")
        folder = path.resolve().parent
        for key in _PATH_KEYS:  # file paths are relative to the file
            if isinstance(loaded.get(key), str):
                loaded[key] = resolve_path(loaded[key], folder)
        raw.update(loaded)
    for keys, value in apply_overrides(raw, overrides):
        if len(keys) == 1 and keys[0] in _PATH_KEYS and isinstance(value, str):
            raw[keys[0]] = resolve_path(value, Path.cwd())  # command-line paths: from the cwd
    try:
        cfg = PreprocessConfig.model_validate(raw)
    except ValidationError as err:
        error = format_validation_error(err, "", PreprocessConfig)
        raise type(error)(f"{source}: {error}") from None
    if require_data and not cfg.data_path.exists():
        raise FileNotFoundError(f"{source}: data_path {cfg.data_path} does not exist")
    if cfg.osl_config is not None:
        if not cfg.osl_config.is_file():
            raise FileNotFoundError(f"{source}: osl_config {cfg.osl_config} does not exist")
        # its filter settings are checked now, before any work (its shape by stage 1)
        recipe = read_yaml(cfg.osl_config, "osl_config")
        if isinstance(recipe, dict):
            check_recipe_filters(recipe, str(cfg.osl_config))
    return cfg

"""The preprocessing YAML (``configs/local/preprocess.yaml``), validated with pydantic.

Every key is checked before any work starts: an unknown key names the allowed ones, a wrong
type names the key, what was expected and what was found, and a ``data_path`` that does not
exist is named. Relative paths in the file resolve against the file's folder; ``key=value``
overrides from the command line (dotted keys reach into blocks, values parsed as YAML)
resolve relative paths against the current directory, as a shell user expects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DATASET_KINDS = ("omega", "bids", "files", "auto")
STEP_NAMES = ("normalize", "clip", "mulaw_quantize")
_PATH_KEYS = ("data_path", "save_folder", "osl_config")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    """Parameters of the built-in osl-ephys recipe (ignored when ``osl_config`` is given)."""

    l_freq: float | None = Field(1.0, ge=0)  # band-pass low edge in Hz (null: no high-pass)
    h_freq: float | None = Field(45.0, gt=0)  # band-pass high edge in Hz (null: no low-pass)
    notch_freqs: list[float] = [50.0, 100.0]  # line noise; frequencies >= Nyquist are skipped
    sfreq: float = Field(100.0, gt=0)  # resample to this rate in Hz
    bad_segment_seconds: float = Field(2.0, gt=0)  # window of the bad-segment detector
    significance_level: float = Field(0.1, gt=0, lt=1)  # GESD alpha for bad segments/channels
    detect_bad_segments: bool = True
    detect_bad_channels: bool = True


class PreprocessConfig(_Strict):
    """The whole preprocessing YAML (see docs/preprocessing.md for every key)."""

    data_path: Path  # raw recordings (Omega layout, BIDS, or a folder of MNE-readable files)
    save_folder: Path = Path("preprocessed")  # stage1/ and chunks/ go here
    dataset: Literal["omega", "bids", "files", "auto"] = "auto"
    osl_config: Path | None = None  # osl-ephys recipe YAML; null = the built-in recipe
    recipe: RecipeConfig = RecipeConfig()
    gen_report: bool = False  # osl-ephys HTML report (slow: plots every recording)
    n_workers: int = Field(1, ge=1)  # >1: stage 1 through Dask, stage 2 through a process pool
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
                raise ValueError(f"step {name!r}: {_first_error(err)}") from None
        return out

    @property
    def stage1_dir(self) -> Path:
        return self.save_folder / "stage1"

    @property
    def chunks_dir(self) -> Path:
        return self.save_folder / "chunks"


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    return f"key {loc!r}: {e['msg']} (found {e.get('input')!r:.80})"


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.80}"


def _format_error(source: str, err: ValidationError, model: type[BaseModel]) -> str:
    """One readable message per problem: the key, what is allowed, what was found."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            lines.append(f"unknown key {key!r}; allowed keys: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"required key {key!r} is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"key {key!r}: {msg}; found {_describe(e.get('input'))}")
    return f"{source}: " + "; ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} should look like key=value (e.g. n_workers=4)")
        key, raw = item.split("=", 1)
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: value is not valid YAML: {err}") from None
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_preprocess_config(path: str | os.PathLike | None = None, overrides=(), *,
                           require_data: bool = True, base: dict | None = None
                           ) -> PreprocessConfig:
    """Read, merge and validate a preprocessing YAML.

    Parameters
    ----------
    path : path or None
        The YAML file; None builds the config from ``base`` and ``overrides`` alone.
    overrides : sequence of str
        ``key=value`` strings applied on top of the file.
    require_data : bool
        Check that ``data_path`` exists (stage 1 and discovery need it; stage 2 alone does not).
    base : dict or None
        Values used when neither the file nor an override gives them.
    """
    raw: dict[str, Any] = dict(base or {})
    source = "preprocess config"
    folder = Path.cwd()
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"preprocessing config {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values at the top level, "
                             f"found {type(loaded).__name__}")
        folder = path.resolve().parent
        for key in _PATH_KEYS:  # file paths are relative to the file
            if isinstance(loaded.get(key), str) and not os.path.isabs(loaded[key]):
                loaded[key] = os.path.normpath(folder / loaded[key])
        raw = _merge(raw, loaded)
    ov = parse_overrides(list(overrides))
    for key in _PATH_KEYS:  # command-line paths are relative to the current directory
        if isinstance(ov.get(key), str):
            ov[key] = os.path.normpath(Path(ov[key]).expanduser().absolute())
    raw = _merge(raw, ov)
    try:
        cfg = PreprocessConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_format_error(source, err, PreprocessConfig)) from None
    if require_data and not cfg.data_path.exists():
        raise FileNotFoundError(f"{source}: data_path {cfg.data_path} does not exist")
    if cfg.osl_config is not None and not cfg.osl_config.is_file():
        raise FileNotFoundError(f"{source}: osl_config {cfg.osl_config} does not exist")
    return cfg

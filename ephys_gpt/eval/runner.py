"""What every eval runner shares: the :class:`EvalRunner` base (options, output folder,
device, model loading) and small helpers (units for display, checkpoint loading, devices,
evenly spread held-out windows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


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

    @model_validator(mode="after")
    def _band(self):
        lo, hi = self.alpha_band
        if not 0 < lo < hi:
            raise ValueError(f"alpha_band must be (low, high) Hz with 0 < low < high, got "
                             f"{self.alpha_band}")
        return self


def check_history_lengths(v: list[int] | None) -> list[int] | None:
    """Validator of ``history_lengths`` options: sorted unique integers >= 1, or None."""
    if v is not None and (not v or any(h < 1 for h in v)):
        raise ValueError(f"history_lengths must be a non-empty list of integers >= 1, got {v}")
    return sorted(set(v)) if v is not None else v


# Display units per channel type: (factor from SI, label).
_UNITS = {"mag": (1e15, "fT"), "grad": (1e13, "fT/cm"), "planar1": (1e13, "fT/cm"),
          "planar2": (1e13, "fT/cm"), "eeg": (1e6, "µV"), "seeg": (1e6, "µV"),
          "ecog": (1e6, "µV"), "dbs": (1e6, "µV"), "eog": (1e6, "µV"), "ecg": (1e6, "µV"),
          "emg": (1e6, "µV")}


def display_unit(ch_type: str) -> tuple[float, str]:
    """``(factor, label)`` turning SI values of ``ch_type`` into readable units (fT, µV...)."""
    return _UNITS.get(ch_type, (1.0, "a.u."))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu"
                    ) -> tuple[torch.nn.Module, dict]:
    """``(model, info)`` from an export folder, a Lightning ``.ckpt`` or a run's save_dir
    (:func:`ephys_gpt.training.checkpoint.load_model`)."""
    from ephys_gpt.training.checkpoint import load_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"eval.ckpt_path {path} does not exist (expected an export "
                                "folder with model.safetensors + config.json, a .ckpt, or a "
                                "run's save_dir)")
    return load_model(path, map_location=device)


def max_context(model: torch.nn.Module) -> int | None:
    """Longest input the model accepts (``n_positions``-like setting), None if unbounded."""
    for owner in (getattr(model, "config", None), getattr(model, "model_config", None)):
        for key in ("n_positions", "max_seq_len", "block_size", "context_length"):
            value = owner.get(key) if isinstance(owner, dict) else getattr(owner, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


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


def spread_indices(n_items: int, n: int, seed: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(n_items)`` (a seeded offset; no repeats)."""
    n = min(n, n_items)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    offset = np.random.default_rng(seed).integers(0, max(1, n_items // n))
    return (offset + np.arange(n) * (n_items // n)).astype(np.int64) % n_items


class EvalRunner:
    """What every eval runner shares: options, output folder, device and model loading.

    ``model``/``info``/``splits`` may be passed in (tests, notebooks); otherwise they come
    from ``options.ckpt_path`` and the run config's ``datasplitter``.
    """

    name = "EvalRunner"
    options_class: type[BaseModel]

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

    def _load_model(self) -> None:
        """Set ``self.model`` (on the device, eval mode), ``self.info`` and ``self.model_name``."""
        if self._model is None:
            self._model, self._info = load_checkpoint(self.options.ckpt_path, self.device)
        self.info = dict(self._info or {})
        self.model = self._model.to(self.device).eval()
        self.model_name = str(getattr(self.model, "registry_name", type(self.model).__name__))

    def _check_data(self, dataset) -> None:
        """Refuse held-out data made differently from the model's training data: sampling
        rate, channels and stage-2 steps against what the export / checkpoint recorded
        (:func:`ephys_gpt.dataset.compatibility.check_model_data`)."""
        from ephys_gpt.dataset.compatibility import check_model_data

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

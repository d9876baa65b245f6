"""Config-driven augmentations for continuous MEG windows.

An augmentation list is written in YAML (the run config's ``augmentations`` key, inline or as a
path to a YAML file) or given as Python objects::

    augmentations:
      - {name: gaussian_noise, std: 0.05, p: 0.5}
      - {name: channel_dropout, rate: 0.1, p: 0.3}
      - {name: time_shift, max_shift: 10, p: 0.5}
      - {name: amplitude_scale, low: 0.8, high: 1.2, p: 0.5}
      - {name: time_mask, max_width: 20, n_masks: 1, p: 0.3}

Every augmentation has ``p``, the probability that it is applied to a window; they run in the
listed order on the float32 ``(C, T)`` window, in signal units after stage 2 (normalized), and
before any on-the-fly quantization. Datasets apply them to the training split only.

Randomness: each process (the main process, or each DataLoader worker) draws from its own
``numpy`` generator seeded from ``seed`` and the worker's seed that PyTorch assigns
(``torch.utils.data.get_worker_info().seed``, itself derived from the main process RNG), so a
run is reproducible under ``torch.manual_seed`` / ``lightning.seed_everything`` while workers
and epochs get different draws. Training goes further: its loader
(:class:`ephys_gpt.training.resume.ResumableLoader`) calls :meth:`Augmentations.seed_item`
with each window's (run seed, epoch, position) before reading it, so a window's draws do not
depend on which worker reads it and are the same after a resume from a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml

from ephys_gpt.dataset.registry import AUGMENTATIONS, register_augmentation

logger = logging.getLogger(__name__)


@dataclass
class Augmentation:
    """Base class: ``p`` is the probability of applying the augmentation to a window."""

    name: ClassVar[str] = ""
    p: float = 0.5

    def check(self) -> None:
        """Validate parameters (raise ValueError naming the parameter)."""
        _check_range(self, "p", 0.0, 1.0)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment ``x`` float32 (C, T); may modify it in place; returns the result."""
        raise NotImplementedError


def _check_range(aug: Augmentation, field: str, lo: float | None, hi: float | None,
                 integer: bool = False) -> None:
    v = getattr(aug, field)
    ok_type = (isinstance(v, (int, np.integer)) if integer
               else isinstance(v, (int, float, np.integer, np.floating)))
    if isinstance(v, bool) or not ok_type:
        want = "an integer" if integer else "a number"
        raise ValueError(f"augmentation {aug.name!r}: {field!r} must be {want}, "
                         f"got {v!r} ({type(v).__name__})")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"augmentation {aug.name!r}: {field!r} must be in "
                         f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}], "
                         f"got {v!r}")


@register_augmentation
@dataclass
class GaussianNoise(Augmentation):
    """Add white Gaussian noise with standard deviation ``std`` (signal units)."""

    name: ClassVar[str] = "gaussian_noise"
    std: float = 0.05

    def check(self) -> None:
        super().check()
        _check_range(self, "std", 0.0, None)

    def apply(self, x, rng):
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.std)
        return x


@register_augmentation
@dataclass
class ChannelDropout(Augmentation):
    """Zero each channel independently with probability ``rate``."""

    name: ClassVar[str] = "channel_dropout"
    rate: float = 0.1

    def check(self) -> None:
        super().check()
        _check_range(self, "rate", 0.0, 1.0)

    def apply(self, x, rng):
        x[rng.random(x.shape[0]) < self.rate] = 0.0
        return x


@register_augmentation
@dataclass
class TimeShift(Augmentation):
    """Shift the window by up to ``max_shift`` samples either way.

    Vacated samples are filled with the edge value (``fill: edge``) or zeros (``fill: zero``);
    nothing wraps around, so no future sample moves into the past.
    """

    name: ClassVar[str] = "time_shift"
    max_shift: int = 10
    fill: str = "edge"

    def check(self) -> None:
        super().check()
        _check_range(self, "max_shift", 0, None, integer=True)
        if self.fill not in ("edge", "zero"):
            raise ValueError(f"augmentation 'time_shift': 'fill' must be 'edge' or 'zero', "
                             f"got {self.fill!r}")

    def apply(self, x, rng):
        k = int(rng.integers(-self.max_shift, self.max_shift + 1))
        k = max(-x.shape[1] + 1, min(x.shape[1] - 1, k))
        if k == 0:
            return x
        out = np.empty_like(x)
        if k > 0:  # content moves later in time
            out[:, k:] = x[:, :-k]
            out[:, :k] = x[:, :1] if self.fill == "edge" else 0.0
        else:
            out[:, :k] = x[:, -k:]
            out[:, k:] = x[:, -1:] if self.fill == "edge" else 0.0
        return out


@register_augmentation
@dataclass
class AmplitudeScale(Augmentation):
    """Multiply by a factor drawn uniformly from ``[low, high]`` (one per channel if
    ``per_channel``)."""

    name: ClassVar[str] = "amplitude_scale"
    low: float = 0.9
    high: float = 1.1
    per_channel: bool = False

    def check(self) -> None:
        super().check()
        _check_range(self, "low", 0.0, None)
        _check_range(self, "high", self.low, None)
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"augmentation 'amplitude_scale': 'per_channel' must be true or "
                             f"false, got {self.per_channel!r}")

    def apply(self, x, rng):
        n = x.shape[0] if self.per_channel else 1
        x *= rng.uniform(self.low, self.high, size=(n, 1)).astype(np.float32)
        return x


@register_augmentation
@dataclass
class TimeMask(Augmentation):
    """Set ``n_masks`` random spans of 1..``max_width`` samples (all channels) to ``value``."""

    name: ClassVar[str] = "time_mask"
    max_width: int = 20
    n_masks: int = 1
    value: float = 0.0

    def check(self) -> None:
        super().check()
        _check_range(self, "max_width", 1, None, integer=True)
        _check_range(self, "n_masks", 1, None, integer=True)
        _check_range(self, "value", None, None)

    def apply(self, x, rng):
        t = x.shape[1]
        for _ in range(self.n_masks):
            width = int(rng.integers(1, min(self.max_width, t) + 1))
            start = int(rng.integers(0, t - width + 1))
            x[:, start:start + width] = self.value
        return x


@register_augmentation
@dataclass
class SignFlip(Augmentation):
    """Multiply the whole window by -1."""

    name: ClassVar[str] = "sign_flip"

    def apply(self, x, rng):
        np.negative(x, out=x)
        return x


def _build_one(spec: Any, where: str) -> Augmentation:
    if isinstance(spec, Augmentation):
        spec.check()
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping like {{name: gaussian_noise, std: 0.05}}, "
                         f"got {spec!r}")
    spec = dict(spec)
    name = spec.pop("name", None)
    try:
        cls = AUGMENTATIONS.get(name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(f"{where} ({name}): unknown key(s) {unknown}; valid keys: "
                         f"{sorted(fields | {'name'})}")
    aug = cls(**spec)
    try:
        aug.check()
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    return aug


def parse_augmentations(spec: Any) -> list[Augmentation]:
    """Turn a config value into a validated list of augmentations.

    ``spec`` may be None, a list of ``{name: ..., <params>}`` mappings (or
    :class:`Augmentation` objects), a mapping ``{name: {params}}``, a mapping with an
    ``augmentations`` key holding either, or a path to a YAML file holding any of these.
    """
    where = "augmentations"
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"augmentations file {path} does not exist")
        where = str(path)
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
        if spec is None:
            return []
    if isinstance(spec, Mapping) and "augmentations" in spec:
        if set(spec) != {"augmentations"}:
            raise ValueError(f"{where}: unexpected keys {sorted(set(spec) - {'augmentations'})} "
                             "beside 'augmentations'")
        spec = spec["augmentations"]
        if spec is None:
            return []
    if isinstance(spec, Mapping):  # {name: {params}}
        items = []
        for name, params in spec.items():
            if params is not None and not isinstance(params, Mapping):
                raise ValueError(f"{where}.{name}: expected a mapping of parameters, "
                                 f"got {params!r}")
            items.append({"name": name, **(params or {})})
        spec = items
    if isinstance(spec, Augmentation):
        spec = [spec]
    if not isinstance(spec, Sequence) or isinstance(spec, (str, bytes)):
        raise ValueError(f"{where}: expected a list of augmentations, got {spec!r}")
    return [_build_one(s, f"{where}[{i}]") for i, s in enumerate(spec)]


class Augmentations:
    """A validated, seeded pipeline of augmentations (picklable for DataLoader workers).

    Parameters
    ----------
    spec : see :func:`parse_augmentations`.
    seed : int, optional
        Base seed mixed with the per-worker seed (see the module docstring).
    """

    def __init__(self, spec: Any = None, seed: int | None = None):
        self.augs = parse_augmentations(spec)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"augmentations seed must be an int or None, got {seed!r}")
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple | None = None

    def __len__(self) -> int:
        return len(self.augs)

    def __bool__(self) -> bool:
        return bool(self.augs)

    def __repr__(self) -> str:
        return f"Augmentations({self.augs!r}, seed={self.seed!r})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_rng"] = None
        state["_rng_owner"] = None
        return state

    def reseed(self, seed: int | None = None) -> None:
        """Restart the random stream (e.g. to replay the same augmentations in a test)."""
        if seed is not None:
            self.seed = seed
        self._rng = None
        self._rng_owner = None

    @staticmethod
    def _owner() -> tuple:
        info = torch.utils.data.get_worker_info()
        return (os.getpid(), None if info is None else info.id)

    def seed_item(self, *key: int) -> None:
        """Draw the next window's augmentations from a generator that is a pure function of
        ``key`` (integers) and ``seed``, whatever process or worker applies them."""
        entropy = ([self.seed] if self.seed is not None else []) + [int(k) for k in key]
        self._rng = np.random.default_rng(np.random.SeedSequence([v % 2**64 for v in entropy]))
        self._rng_owner = self._owner()

    def rng(self) -> np.random.Generator:
        """This process's generator, created on first use in each process / worker."""
        info = torch.utils.data.get_worker_info()
        owner = self._owner()
        if self._rng is None or self._rng_owner != owner:
            if info is not None:
                entropy = [info.seed % 2**63] + ([self.seed] if self.seed is not None else [])
            elif self.seed is not None:
                entropy = [self.seed]
            else:
                entropy = [torch.initial_seed() % 2**63]
            self._rng = np.random.default_rng(np.random.SeedSequence(entropy))
            self._rng_owner = owner
        return self._rng

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Augment one window ``x`` float32 (C, T) (possibly in place); returns it."""
        if not self.augs:
            return x
        rng = self.rng()
        for aug in self.augs:
            if aug.p >= 1.0 or rng.random() < aug.p:
                x = aug.apply(x, rng)
        return x


def as_augmentations(spec: Any, seed: int | None = None) -> Augmentations | None:
    """``spec`` as an :class:`Augmentations` (None when empty)."""
    if isinstance(spec, Augmentations):
        return spec if spec else None
    augs = Augmentations(spec, seed=seed)
    return augs if augs else None

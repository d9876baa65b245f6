"""Window datasets over the chunk store (DESIGN.md, contract 2).

Every dataset indexes windows ``(session_idx, chunk_idx, start)`` built by
:func:`ephys_gpt.dataset.indexing.build_indices`; a window never crosses a chunk boundary.
An item reads only its window from the memory-mapped chunk (the memmaps are opened lazily and
cached per chunk, and dropped when the dataset is pickled for a DataLoader worker).

Items (shapes without the batch dimension; C channels, T = ``window_samples``, H x W image):

=============================  =================  ===============================================
class                          ``input_kind``     item
=============================  =================  ===============================================
``ChunkDataset``               ``tokens``         int64 ``(x[:, :-1], x[:, 1:])``, each (C, T)
``ChunkDatasetForecastCont``   ``continuous``     float32 ``(x[:, :-1], x[:, 1:])``, each (C, T)
``ChunkDatasetReconstruction`` ``continuous_meta`` ``((x, pos_2d, ch_type), target)``: x float32
                                                  (C, T), pos_2d float32 (C, 2), ch_type int64
                                                  (C,) codes from :data:`CH_TYPE_CODES`; target
                                                  x (``target_shift=0``) or x shifted by one
``ChunkDatasetImage``          ``image``          ``(img, SensorTarget(signal, pixels))``: img
                                                  float32 (H, W, T), signal float32 (C, T),
                                                  pixels int64 (C,)
``ChunkDatasetImageQuantized`` ``image_tokens``   int64 ``(img[..., :-1], img[..., 1:])``, (H, W, T)
=============================  =================  ===============================================

Token datasets read token stores (stage 2 ended with ``mulaw_quantize``) directly, or
quantize continuous chunks on the fly with ``quantize={"n_bits": 8, "scale": 1.0}`` (via
:func:`ephys_gpt.codec.mulaw_quantize`, after any augmentations); the step
is then appended to ``.steps`` so tokens can be decoded back to signal units.
"""

from __future__ import annotations

import logging
import resource
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ephys_gpt.codec import mulaw_quantize, mulaw_step
from ephys_gpt.dataset.augmentations import Augmentations, as_augmentations
from ephys_gpt.dataset.image_layout import (
    DEFAULT_IMAGE_SIZE,
    DenseMap,
    ImageLayout,
    SensorTarget,
    channels_to_dense_image,
    channels_to_image,
    compute_image_layout,
    dense_map,
    image_to_channels,
)
from ephys_gpt.dataset.indexing import build_indices, seconds_to_samples
from ephys_gpt.dataset.registry import register_dataset
from ephys_gpt.store import (
    SessionMeta,
    StoreError,
    check_compatible,
    list_sessions,
    load_chunk,
    repair_advice,
)
from ephys_gpt.validation import check_number

logger = logging.getLogger(__name__)

#: Default bound on ``|x|`` of normalized data (``max_abs_value``): stage 2 scales each
#: channel to a spread of about 1, so ten thousand times that is no brain signal but a
#: damaged chunk or an overflow (a few such values turn a loss into inf or NaN).
MAX_ABS_NORMALIZED = 1e4
_FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Integer code of each channel type (MNE names) in ``ch_type`` tensors.
CH_TYPE_CODES: dict[str, int] = {
    "mag": 0,  # magnetometers (and CTF axial gradiometers, which MNE types as "mag")
    "grad": 1,  # planar gradiometers (MEGIN)
    "eeg": 2,
    "ref_meg": 3,
    "seeg": 4,
    "ecog": 5,
    "dbs": 6,
    "eog": 7,
    "ecg": 8,
    "emg": 9,
    "misc": 10,
}


def _default_max_open() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(32, soft // 4)  # each memmap holds one file descriptor


def _check_quantize(quantize: Any, n_channels: int) -> dict | None:
    if quantize is None:
        return None
    if not isinstance(quantize, Mapping):
        raise ValueError(f"quantize must be a mapping like {{n_bits: 8, scale: 1.0}}, "
                         f"got {quantize!r}")
    unknown = sorted(set(quantize) - {"n_bits", "scale"})
    if unknown:
        raise ValueError(f"quantize: unknown key(s) {unknown}; valid keys: ['n_bits', 'scale']")
    n_bits = quantize.get("n_bits", 8)
    if isinstance(n_bits, bool) or not isinstance(n_bits, int) or not 1 <= n_bits <= 16:
        raise ValueError(f"quantize.n_bits must be an integer in [1, 16], got {n_bits!r}")
    scale = quantize.get("scale", 1.0)
    arr = np.asarray(scale, dtype=np.float64) if not isinstance(scale, bool) else None
    if arr is None or arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != n_channels):
        raise ValueError(f"quantize.scale must be a positive number or a list of {n_channels} "
                         f"positive numbers (one per channel), got {scale!r}")
    if not (np.isfinite(arr).all() and (arr > 0).all()):
        raise ValueError(f"quantize.scale must be positive and finite, got {scale!r}")
    scale = float(arr) if arr.ndim == 0 else arr.tolist()
    return {"n_bits": n_bits, "scale": scale}


class ChunkWindowDataset(Dataset):
    """Base class: windows of one compatible set of sessions.

    Parameters
    ----------
    metas : list of SessionMeta
        The sessions (one sampling rate, one channel set, one data kind).
    indices : array (N, 3) int
        ``(session_idx, chunk_idx, start)`` rows; ``session_idx`` indexes ``metas``.
    window_samples : int
        T, the time length of the returned windows. Shifted kinds read ``T + 1`` samples.
    quantize : dict, optional
        ``{"n_bits": 8, "scale": 1.0}``: quantize continuous chunks on the fly (token kinds).
    augmentations : list / dict / path / Augmentations, optional
        Applied to continuous windows before quantization (see ``augmentations.py``).
    check_finite : bool
        Check continuous windows for NaN/Inf and, when the store's steps normalized the data,
        for values beyond ``max_abs_value`` (cheap; an error names the session, chunk file,
        channel and sample).
    max_abs_value : float, optional
        Largest ``|x|`` accepted in normalized data (default :data:`MAX_ABS_NORMALIZED`);
        None for no bound. Not applied to stores without a ``normalize`` step, whose values
        are in SI units (~1e-12 T).
    max_open_chunks : int, optional
        Most chunk memmaps kept open per process (LRU); default a quarter of the open-file
        limit.
    """

    input_kind: ClassVar[str] = ""
    #: samples read beyond ``window_samples`` (1 for kinds whose targets are shifted)
    shift: ClassVar[int] = 0
    #: "tokens" or "continuous": what the item holds
    produces: ClassVar[str] = "continuous"

    def __init__(self, metas: Sequence[SessionMeta], indices, window_samples: int, *,
                 quantize: Mapping | None = None, augmentations: Any = None,
                 check_finite: bool = True, max_abs_value: float | None = MAX_ABS_NORMALIZED,
                 max_open_chunks: int | None = None):
        metas = list(metas)
        if not metas:
            raise ValueError(f"{type(self).__name__} needs at least one session")
        if not all(isinstance(m, SessionMeta) for m in metas):
            raise TypeError("metas must be SessionMeta objects (from ephys_gpt.store."
                            "list_sessions / read_meta)")
        check_compatible(metas)
        if isinstance(window_samples, bool) or not isinstance(window_samples, (int, np.integer)) \
                or window_samples < 1:
            raise ValueError(f"window_samples must be a positive integer, got {window_samples!r}")
        self.metas = metas
        self.window_samples = int(window_samples)
        self.read_samples = self.window_samples + self.read_shift
        self.check_finite = bool(check_finite)
        if max_abs_value is not None:
            check_number(max_abs_value, "max_abs_value", low=0, low_inclusive=False)
        normalized = any(s.get("name") == "normalize" for s in metas[0].steps)
        self.max_abs_value = float(max_abs_value) if max_abs_value is not None else None
        # the bound read_continuous applies; the float32 maximum only catches +-inf (and NaN)
        self._bound = (self.max_abs_value if normalized and self.max_abs_value is not None
                       else _FLOAT32_MAX)
        self._max_open = int(max_open_chunks) if max_open_chunks else _default_max_open()
        self._set_indices(indices)

        ref = metas[0]
        self.quantize = _check_quantize(quantize, ref.n_channels)
        store_tokens = ref.is_tokens
        name = type(self).__name__
        if self.produces == "continuous" and store_tokens:
            raise ValueError(
                f"{name} needs continuous (float) chunks but {ref.path} holds integer tokens "
                f"(dtype {ref.dtype}, stage 2 ended with mulaw_quantize); use ChunkDataset or "
                "ChunkDatasetImageQuantized for token stores, or re-run stage 2 without "
                "mulaw_quantize")
        if self.produces == "continuous" and self.quantize is not None:
            raise ValueError(f"{name} returns continuous values; 'quantize' only applies to "
                             "token datasets (ChunkDataset, ChunkDatasetImageQuantized)")
        if self.produces == "tokens" and not store_tokens and self.quantize is None:
            raise ValueError(
                f"{name} returns tokens but {ref.path} holds continuous chunks (dtype "
                f"{ref.dtype}); pass quantize={{n_bits: 8, scale: ...}} to quantize on the fly, "
                "or add mulaw_quantize to the stage-2 steps")
        if store_tokens and self.quantize is not None:
            raise ValueError(f"{name}: 'quantize' was given but {ref.path} already holds tokens "
                             f"(dtype {ref.dtype}); drop 'quantize'")
        self.augmentations: Augmentations | None = as_augmentations(augmentations)
        if self.augmentations is not None and store_tokens:
            raise ValueError(f"{name}: augmentations act on continuous signals but {ref.path} "
                             "holds tokens; quantize on the fly from a continuous store instead")

        if store_tokens:
            step = ref.step("mulaw_quantize")
            if step is None or "n_bits" not in step:
                raise StoreError(f"{ref.path / 'meta.json'}: integer chunks but no "
                                 "'mulaw_quantize' step with 'n_bits' in 'steps'")
            self.n_bits: int | None = int(step["n_bits"])
        else:
            self.n_bits = self.quantize["n_bits"] if self.quantize else None
        self._cache: OrderedDict = OrderedDict()

    # -- construction helpers -----------------------------------------------------------------
    @classmethod
    def extra_samples(cls, **dataset_kwargs) -> int:
        """Samples read beyond the window for these constructor arguments."""
        return cls.shift

    @property
    def read_shift(self) -> int:
        return type(self).shift

    @classmethod
    def from_root(cls, root, example_seconds: float = 2.0, stride_seconds: float | None = None,
                  **kwargs) -> ChunkWindowDataset:
        """All windows of every session under ``root`` (no split)."""
        metas = list_sessions(root)
        window = seconds_to_samples(example_seconds, metas[0].sfreq, "example_seconds")
        stride = (seconds_to_samples(stride_seconds, metas[0].sfreq, "stride_seconds")
                  if stride_seconds is not None else None)
        metas, idx = build_indices(metas, window, stride_samples=stride,
                                   extra_samples=cls.extra_samples(**kwargs))
        return cls(metas, idx, window, **kwargs)

    def _set_indices(self, indices) -> None:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1, 3) if len(indices) else \
            np.zeros((0, 3), dtype=np.int64)
        if len(idx):
            s, c, start = idx[:, 0], idx[:, 1], idx[:, 2]
            if s.min() < 0 or s.max() >= len(self.metas):
                raise ValueError(f"indices reference session {int(s.max())} but only "
                                 f"{len(self.metas)} sessions were given")
            for si in np.unique(s):
                m = self.metas[si]
                rows = s == si
                if c[rows].min() < 0 or c[rows].max() >= m.n_chunks:
                    raise ValueError(f"indices reference chunk {int(c[rows].max())} of "
                                     f"{m.path}, which has {m.n_chunks} chunks")
                lengths = np.asarray(m.chunk_lengths)[c[rows]]
                if (start[rows] < 0).any() or (start[rows] + self.read_samples > lengths).any():
                    raise ValueError(f"a window of {self.read_samples} samples runs past the end "
                                     f"of a chunk of {m.path}")
        self.indices = idx

    # -- metadata -------------------------------------------------------------------------------
    @property
    def sfreq(self) -> float:
        return self.metas[0].sfreq

    @property
    def ch_names(self) -> list[str]:
        return list(self.metas[0].ch_names)

    @property
    def ch_types(self) -> list[str]:
        return list(self.metas[0].ch_types)

    @property
    def pos_2d(self) -> np.ndarray:
        """(C, 2) sensor positions."""
        return self.metas[0].pos_2d

    @property
    def n_channels(self) -> int:
        return self.metas[0].n_channels

    @property
    def steps(self) -> list[dict]:
        """Stage-2 steps of the first session (+ the on-the-fly ``mulaw_quantize`` step).

        Normalization statistics differ per session; :meth:`session_steps` gives each one's.
        """
        return self.session_steps(0)

    def session_steps(self, session_idx: int) -> list[dict]:
        steps = [dict(s) for s in self.metas[session_idx].steps]
        if self.quantize is not None:
            steps.append(mulaw_step(self.quantize["n_bits"], self.quantize["scale"],
                                    on_the_fly=True))
        return steps

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} windows of {self.window_samples} samples, "
                f"{len(self.metas)} sessions, {self.n_channels} channels, {self.sfreq:g} Hz)")

    # -- reading --------------------------------------------------------------------------------
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()  # memmaps are reopened lazily in each worker
        return state

    def _chunk(self, s: int, c: int) -> np.ndarray:
        key = (s, c)
        cache = self._cache
        arr = cache.get(key)
        if arr is None:
            arr = load_chunk(self.metas[s], c, mmap=True)
            cache[key] = arr
            if len(cache) > self._max_open:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return arr

    def _window(self, i: int) -> tuple[np.ndarray, int, int, int]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        s, c, start = self.indices[i].tolist()
        return self._chunk(s, c)[:, start:start + self.read_samples], s, c, start

    def read_continuous(self, i: int) -> np.ndarray:
        """Window ``i`` as float32 (C, read_samples), checked and augmented (a fresh copy)."""
        view, s, c, start = self._window(i)
        x = np.array(view, dtype=np.float32)
        # min/max rather than a sum: a sum overflows on huge finite values; NaN fails both
        # comparisons
        if self.check_finite and not (x.min() >= -self._bound and x.max() <= self._bound):
            self._raise_bad_value(x, s, c, start)
        if self.augmentations is not None:
            x = self.augmentations(x)
        return x

    def _raise_bad_value(self, x: np.ndarray, s: int, c: int, start: int) -> None:
        ch, t = (int(v[0]) for v in np.nonzero(~(np.abs(x) <= self._bound)))
        value = x[ch, t]
        if np.isfinite(value):
            what = (f"value {value:.6g} beyond +-{self._bound:g}, the bound for normalized "
                    "data (datasplitter.dataset_kwargs.max_abs_value; raise it if such values "
                    "are real),")
        else:
            what = f"non-finite value ({value})"
        meta = self.metas[s]
        raise StoreError(f"{what} in session {meta.name!r}, chunk file "
                         f"{meta.chunk_path(c)}, channel {meta.ch_names[ch]!r} at sample "
                         f"{start + t} of the chunk. To repair: {repair_advice(meta)}")

    def read_tokens(self, i: int) -> np.ndarray:
        """Window ``i`` as int64 tokens (C, read_samples)."""
        if self.quantize is None:
            view, *_ = self._window(i)
            return view.astype(np.int64)
        x = self.read_continuous(i)
        return mulaw_quantize(x, self.quantize["n_bits"], self.quantize["scale"]).astype(np.int64)


@register_dataset
class ChunkDataset(ChunkWindowDataset):
    """Integer tokens with a one-step shift: ``(x[:, :-1], x[:, 1:])``, int64 (C, T) each."""

    input_kind = "tokens"
    shift = 1
    produces = "tokens"

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.read_tokens(i))  # (C, T + 1)
        return x[:, :-1], x[:, 1:]


@register_dataset
class ChunkDatasetForecastCont(ChunkWindowDataset):
    """Continuous forecasting pairs: ``(x[:, :-1], x[:, 1:])``, float32 (C, T) each."""

    input_kind = "continuous"
    shift = 1

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.read_continuous(i))  # (C, T + 1)
        return x[:, :-1], x[:, 1:]


@register_dataset
class ChunkDatasetReconstruction(ChunkWindowDataset):
    """Continuous windows with sensor metadata: ``((x, pos_2d, ch_type), target)``.

    ``x`` float32 (C, T); ``pos_2d`` float32 (C, 2); ``ch_type`` int64 (C,) codes from
    :data:`CH_TYPE_CODES`. ``target_shift=0``: target is ``x`` (reconstruction);
    ``target_shift=1``: inputs are ``x[:, :-1]`` and target ``x[:, 1:]`` (forecasting).
    """

    input_kind = "continuous_meta"

    def __init__(self, metas, indices, window_samples, *, target_shift: int = 0, **kwargs):
        if target_shift not in (0, 1) or isinstance(target_shift, bool):
            raise ValueError(f"target_shift must be 0 or 1, got {target_shift!r}")
        self.target_shift = int(target_shift)
        super().__init__(metas, indices, window_samples, **kwargs)
        unknown = sorted({t for t in self.ch_types if t not in CH_TYPE_CODES})
        if unknown:
            raise ValueError(f"{self.metas[0].path / 'meta.json'}: channel type(s) {unknown} "
                             f"have no code in CH_TYPE_CODES; known types: "
                             f"{sorted(CH_TYPE_CODES)}")
        self._pos = torch.as_tensor(self.pos_2d, dtype=torch.float32)  # (C, 2)
        self._types = torch.tensor([CH_TYPE_CODES[t] for t in self.ch_types], dtype=torch.int64)

    @classmethod
    def extra_samples(cls, target_shift: int = 0, **kwargs) -> int:
        return int(target_shift) if target_shift in (0, 1) else 0

    @property
    def read_shift(self) -> int:
        return self.target_shift

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.read_continuous(i))  # (C, T + shift)
        if self.target_shift:
            return (x[:, :-1], self._pos, self._types), x[:, 1:]
        return (x, self._pos, self._types), x


class _ImageMixin:
    """Sensor images (see ``image_layout.py``); sets ``self.image_layout`` (and, for dense
    images, ``self.dense_map``)."""

    def _init_image(self, image_size, planes: str, interpolation: str | None,
                    sigma: float | None, fill_value: float) -> None:
        self.image_layout: ImageLayout = compute_image_layout(
            self.pos_2d, self.ch_types, image_size=image_size, planes=planes)
        self.image_shape = (self.image_layout.height, self.image_layout.width)
        self._flat = self.image_layout.flat_index
        self._pixels = torch.as_tensor(self._flat, dtype=torch.int64)
        check_number(fill_value, "fill_value")
        self.fill_value = float(fill_value)
        self.interpolation = interpolation
        self.dense_map: DenseMap | None = None
        if interpolation is not None:
            self.dense_map = dense_map(self.image_layout, interpolation, sigma)
        elif sigma is not None:
            raise ValueError("sigma only applies to dense images; set interpolation: gaussian "
                             "(or linear), or drop sigma")

    @property
    def pixel_mask(self) -> np.ndarray:
        """``(H, W)`` bool: pixels that carry data (sensor pixels; with ``interpolation``,
        every interpolated pixel too). The others hold ``fill_value``."""
        if self.dense_map is not None:
            return self.dense_map.covered
        return self.image_layout.mask

    def _to_image(self, x: np.ndarray, fill) -> np.ndarray:
        if self.dense_map is not None:
            return channels_to_dense_image(x, self.image_layout, self.dense_map, fill)
        h, w = self.image_shape
        img = np.full((h * w, x.shape[-1]), fill, dtype=x.dtype)
        img[self._flat] = x
        return img.reshape(h, w, x.shape[-1])

    def image_to_channels(self, img):
        """``(..., H, W, T)`` image(s) → ``(..., C, T)`` channels (numpy or torch; exact for
        sparse and dense images: sensor pixels hold the sensor values)."""
        return image_to_channels(img, self.image_layout)

    def channels_to_image(self, x):
        """``(..., C, T)`` channels → images as this dataset makes them (sparse or dense,
        ``fill_value`` on empty pixels); numpy or torch."""
        if self.dense_map is not None:
            return channels_to_dense_image(x, self.image_layout, self.dense_map,
                                           self.fill_value)
        return channels_to_image(x, self.image_layout, fill=self.fill_value)


@register_dataset
class ChunkDatasetImage(_ImageMixin, ChunkWindowDataset):
    """Sensor images with a channel-space target: ``(img, SensorTarget(signal, pixels))``.

    ``img`` float32 (H, W, T); the target holds the window's channels ``signal`` float32
    (C, T) and each channel's flat pixel index ``pixels`` int64 (C,), so losses and metrics
    of the signal are computed at the sensors, in channel space (never on empty or
    interpolated pixels; see :func:`~ephys_gpt.dataset.image_layout.gather_channels`).

    Extra arguments:

    - ``image_size`` (int or (H, W), default 32) and ``planes`` (``"single"`` or
      ``"by_type"``), see ``image_layout.py``;
    - ``interpolation``: None (default) for sparse images (one pixel per sensor), or
      ``"gaussian"`` / ``"linear"`` for dense images (:func:`~ephys_gpt.dataset.image_layout.
      dense_map`); ``sigma``: the Gaussian width in pixels (default: from the sensor spacing);
    - ``fill_value`` (default 0.0): the value of pixels without data.
    """

    input_kind = "image"

    def __init__(self, metas, indices, window_samples, *,
                 image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                 planes: str = "single", interpolation: str | None = None,
                 sigma: float | None = None, fill_value: float = 0.0, **kwargs):
        super().__init__(metas, indices, window_samples, **kwargs)
        self._init_image(image_size, planes, interpolation, sigma, fill_value)

    def __getitem__(self, i: int):
        x = self.read_continuous(i)  # (C, T)
        img = torch.from_numpy(self._to_image(x, self.fill_value))  # (H, W, T)
        return img, SensorTarget(torch.from_numpy(x), self._pixels)


@register_dataset
class ChunkDatasetImageQuantized(_ImageMixin, ChunkWindowDataset):
    """Sensor images of tokens with a one-step shift: int64 ``(img[..., :-1], img[..., 1:])``.

    Pixels without data hold the token of the signal value ``fill_value`` (default 0.0: the
    token of a zero signal, ``2**(n_bits-1)`` for mu-law), so they read as silence when
    decoded. Same extra arguments as :class:`ChunkDatasetImage`; dense images
    (``interpolation``) are interpolated in signal units, then quantized, so they need a
    continuous store with ``quantize``.
    """

    input_kind = "image_tokens"
    shift = 1
    produces = "tokens"

    def __init__(self, metas, indices, window_samples, *,
                 image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                 planes: str = "single", interpolation: str | None = None,
                 sigma: float | None = None, fill_value: float = 0.0, **kwargs):
        super().__init__(metas, indices, window_samples, **kwargs)
        self._init_image(image_size, planes, interpolation, sigma, fill_value)
        if interpolation is not None and self.quantize is None:
            raise ValueError(f"{type(self).__name__}: dense images (interpolation="
                             f"{interpolation!r}) are interpolated in signal units, but "
                             f"{self.metas[0].path} holds tokens; use a continuous store with "
                             "quantize={n_bits: ..., scale: ...}")
        scale = self.quantize["scale"] if self.quantize else 1.0
        scale = float(np.median(scale)) if not np.isscalar(scale) else float(scale)
        self.empty_token = int(mulaw_quantize(np.full(1, self.fill_value, np.float32),
                                              self.n_bits, scale)[0])

    def __getitem__(self, i: int):
        if self.dense_map is not None:
            img = self._to_image(self.read_continuous(i), self.fill_value)
            img = mulaw_quantize(img, self.quantize["n_bits"], self._pixel_scale()
                                 ).astype(np.int64)
            img[~self.dense_map.covered] = self.empty_token
            img = torch.from_numpy(img)
        else:
            img = torch.from_numpy(self._to_image(self.read_tokens(i), self.empty_token))
        return img[..., :-1], img[..., 1:]

    def _pixel_scale(self):
        """The mu-law scale of every pixel of a dense image: the configured scale, or for
        per-channel scales, the interpolation of the channels' scales ((H, W, 1))."""
        scale = self.quantize["scale"]
        if np.isscalar(scale):
            return float(scale)
        s = np.asarray(scale, dtype=np.float32)
        h, w = self.image_shape
        return np.asarray(self.dense_map.matrix @ s).reshape(h, w, 1).clip(min=1e-12)

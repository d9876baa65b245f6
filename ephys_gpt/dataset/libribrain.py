"""LibriBrain phoneme classification datasets, read offline through pnpl.

LibriBrain (Özdogan et al., 2025) is ~50 hours of MEG from one listener hearing Sherlock Holmes
audiobooks, with phoneme and word alignments. The ``pnpl`` package reads it; this module wraps
:class:`pnpl.datasets.LibriBrainPhoneme` on a folder the user has already downloaded, and adds
label-grouped averaging (:mod:`ephys_gpt.dataset.grouped`).

Layout under ``data_path`` (what pnpl reads; one run key = (subject, session, task, run))::

    <task>/derivatives/serialised/sub-<s>_ses-<n>_task-<task>_run-<r>_proc-<preprocessing>_meg.h5
        dataset "data": (C, T) float, continuous MEG;  file attribute "sample_frequency" (Hz)
    <task>/derivatives/events/sub-<s>_ses-<n>_task-<task>_run-<r>_events.tsv
        tab-separated, columns "kind" ("phoneme", "word", ...), "segment" (e.g. "ah_B"),
        "timemeg" (onset in seconds on the MEG clock)

Fully offline: pnpl is built with ``download=False`` and ``preload_files=False`` (it never
calls huggingface_hub), and its remote-constants lookup is switched off with its own
``PNPL_REMOTE_CONSTANTS_DISABLED`` switch while pnpl is imported and the constants are read
(they then come from pnpl's local cache or its built-in defaults). Every file a split needs is
checked before pnpl sees it, so a missing or malformed file is one error naming it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ephys_gpt._optional import require
from ephys_gpt.dataset.grouped import GroupedDatasetAugmented, RandomLabelGroupedDataset
from ephys_gpt.dataset.registry import DataSplits, register_splitter
from ephys_gpt.fileio import write_with

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PREPROCESSING",
    "GroupedDatasetAugmented",
    "LibriBrainPhonemeDataset",
    "RandomLabelGroupedDataset",
    "cached_channel_stats",
    "channel_stats",
    "check_run_files",
    "pnpl_offline",
    "resolve_run_keys",
    "split_datasets_libribrain",
]

DEFAULT_PREPROCESSING = "bads+headpos+sss+notch+bp+ds"
# pnpl's own switch for its remote constants. (Not HF_HUB_OFFLINE: huggingface_hub freezes it
# at import, so setting it here could leak offline mode into the user's later code; downloads
# are off through pnpl's download=False instead.)
_OFFLINE_ENV = {"PNPL_REMOTE_CONSTANTS_DISABLED": "true"}
_PARTITIONS = ("train", "validation", "test")
_EVENT_COLUMNS = ("kind", "segment", "timemeg")
DATASET_CLASSES = ("RandomLabelGroupedDataset", "GroupedDatasetAugmented", "LibriBrainPhonemeDataset")

RunKey = tuple[str, str, str, str]

# --------------------------------------------------------------------------- pnpl, offline


@contextlib.contextmanager
def pnpl_offline() -> Iterator[None]:
    """Switch pnpl's remote-constants lookup off inside the block.

    Sets the environment switches of :data:`_OFFLINE_ENV` and restores the previous values on
    exit, so nothing outside this module's calls is affected.
    """
    saved = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _pnpl() -> SimpleNamespace:
    """Import pnpl offline; returns its phoneme dataset class, layout helpers and constants."""
    require("h5py")
    with pnpl_offline():
        require("pnpl")
        remote = require("pnpl.datasets.libribrain2025.remote_constants")
        constants = remote.get_constants()  # cache or built-in defaults; never the network
        compat = require("pnpl.datasets.libribrain2025.compat")
        mixins = require("pnpl.datasets.mixins")
    return SimpleNamespace(
        LibriBrainPhoneme=compat.LibriBrainPhoneme,
        ContinuousH5Mixin=mixins.ContinuousH5Mixin,
        StandardizationMixin=mixins.StandardizationMixin,
        constants=constants,
    )


# --------------------------------------------------------------------------- run keys & files


def resolve_run_keys(spec: str | Sequence[Sequence[Any]], constants: Mapping[str, Any],
                     *, name: str = "runs") -> list[RunKey]:
    """Run keys of a split from a pnpl partition name or an explicit list.

    ``spec`` is ``"train"`` (every run key except validation and test), ``"validation"``,
    ``"test"``, or a list of ``[subject, session, task, run]`` (values become strings).
    """
    if isinstance(spec, str):
        val_keys = [tuple(k) for k in constants["VALIDATION_RUN_KEYS"]]
        test_keys = [tuple(k) for k in constants["TEST_RUN_KEYS"]]
        if spec == "train":
            held_out = set(val_keys) | set(test_keys)
            return [tuple(k) for k in constants["RUN_KEYS"] if tuple(k) not in held_out]
        if spec == "validation":
            return val_keys
        if spec == "test":
            return test_keys
        raise ValueError(f"{name}: a partition name must be one of {list(_PARTITIONS)}, got {spec!r}")
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"{name}: expected a partition name ({', '.join(_PARTITIONS)}) or a "
                         f"non-empty list of [subject, session, task, run], got {spec!r}")
    keys: list[RunKey] = []
    for item in spec:
        if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 4:
            raise ValueError(f"{name}: each run key must be [subject, session, task, run], got {item!r}")
        keys.append(tuple(str(v) for v in item))
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: duplicate run keys in {spec!r}")
    return keys


def _paths(pnpl: SimpleNamespace, data_path: Path, preprocessing: str, key: RunKey) -> tuple[Path, Path]:
    """(h5 path, events path) of a run, as pnpl builds them."""
    layout = SimpleNamespace(data_path=str(data_path), preprocessing=preprocessing)
    h5 = pnpl.ContinuousH5Mixin.get_h5_path(layout, *key)
    events = pnpl.ContinuousH5Mixin.get_events_path(layout, *key)
    return Path(h5), Path(events)


def channel_list_attr(value: Any, attr: str, h5: str | os.PathLike) -> list[str] | None:
    """A per-channel h5 attribute (``channel_names``, ``channel_types``) as a list of str.

    Both forms in use are accepted: one string of comma-separated entries, as pnpl's own
    serializer writes them (``pnpl.preprocessing.serialization.fif_to_h5`` stores
    ``", ".join(names)``), and an array of strings (or of bytes, as h5py returns fixed-length
    strings). ``None`` (no such attribute) gives None.
    """
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    items = [value] if isinstance(value, (str, bytes)) else list(np.ravel(value))
    out: list[str] = []
    for item in items:
        if isinstance(item, (bytes, np.bytes_)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{h5}: attribute {attr!r} is not UTF-8 text ({err})") from None
        elif not isinstance(item, str):
            raise ValueError(f"{h5}: attribute {attr!r} should hold text (one comma-separated "
                             f"string, or a list of strings), found {type(item).__name__} "
                             f"{item!r:.60}")
        out.append(str(item))
    if len(out) == 1 and "," in out[0]:  # pnpl's serializer: "MEG0111, MEG0112, ..."
        out = out[0].split(",")
    out = [x.strip() for x in out]
    if any(not x for x in out):
        raise ValueError(f"{h5}: attribute {attr!r} has an empty entry: {value!r:.120}")
    return out


def check_run_files(data_path: str | os.PathLike, run_keys: Sequence[RunKey], *,
                    preprocessing: str = DEFAULT_PREPROCESSING, missing: str = "error",
                    split: str = "split") -> dict[RunKey, dict[str, Any]]:
    """Check the h5 and events files of ``run_keys``; returns per-run ``{h5, events, sfreq, shape}``.

    ``missing="error"`` raises one FileNotFoundError listing every missing file;
    ``"skip"`` drops runs with a missing file (logged) but fails when none is left. ``ch_names``
    and ``ch_types`` are the h5 file's ``channel_names``/``channel_types`` attributes (either
    form, see :func:`channel_list_attr`), or None when it has none. A present
    but malformed file (no ``data`` dataset, no ``sample_frequency``, missing event columns)
    is always a ValueError naming it.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing_runs must be 'error' or 'skip', got {missing!r}")
    data_path = Path(data_path)
    pnpl = _pnpl()
    h5py = require("h5py")
    import pandas as pd

    found: dict[RunKey, dict[str, Any]] = {}
    absent: list[tuple[RunKey, list[Path]]] = []
    for key in run_keys:
        h5, events = _paths(pnpl, data_path, preprocessing, key)
        lost = [p for p in (h5, events) if not p.is_file()]
        if lost:
            absent.append((key, lost))
            continue
        try:
            with h5py.File(h5, "r") as f:
                if "data" not in f or not isinstance(f["data"], h5py.Dataset):
                    raise ValueError(f"{h5}: expected a dataset 'data' of shape (channels, "
                                     f"times); found keys {sorted(f.keys())}")
                shape = tuple(f["data"].shape)
                if "sample_frequency" not in f.attrs:
                    raise ValueError(f"{h5}: expected a file attribute 'sample_frequency' (Hz); "
                                     f"found attributes {sorted(f.attrs.keys())}")
                sfreq = float(np.asarray(f.attrs["sample_frequency"]).squeeze())
                names = channel_list_attr(f.attrs.get("channel_names"), "channel_names", h5)
                types = channel_list_attr(f.attrs.get("channel_types"), "channel_types", h5)
        except OSError as err:
            raise ValueError(f"{h5}: not a readable HDF5 file ({err})") from err
        if len(shape) != 2 or min(shape) == 0:
            raise ValueError(f"{h5}: 'data' must be a non-empty 2-D (channels, times) array, "
                             f"found shape {shape}")
        if not math.isfinite(sfreq) or sfreq <= 0:
            raise ValueError(f"{h5}: 'sample_frequency' must be a positive number, found {sfreq}")
        columns = list(pd.read_csv(events, sep="\t", nrows=0).columns)
        lacking = [c for c in _EVENT_COLUMNS if c not in columns]
        if lacking:
            raise ValueError(f"{events}: expected tab-separated columns {list(_EVENT_COLUMNS)}; "
                             f"missing {lacking}, found {columns}")
        for attr, values in (("channel_names", names), ("channel_types", types)):
            if values is not None and len(values) != shape[0]:
                raise ValueError(f"{h5}: attribute {attr!r} has {len(values)} entries for "
                                 f"{shape[0]} channels in 'data' (read as a comma-separated "
                                 f"string or a list of strings): {values[:4]}...")
        found[key] = {"h5": h5, "events": events, "sfreq": sfreq, "shape": shape,
                      "ch_names": names, "ch_types": types}

    if absent:
        listing = "\n  ".join(f"{'-'.join(k)}: {', '.join(str(p) for p in ps)}" for k, ps in absent[:20])
        more = f"\n  ... and {len(absent) - 20} more runs" if len(absent) > 20 else ""
        if missing == "error" or not found:
            why = "no run of the split is complete; " if missing == "skip" else ""
            raise FileNotFoundError(
                f"LibriBrain {split}: {why}{len(absent)} of {len(run_keys)} runs have missing "
                f"files under {str(data_path)!r} (nothing is downloaded at run time; see "
                f"docs/libribrain.md, or set missing_runs: skip to use the runs present):"
                f"\n  {listing}{more}")
        logger.warning("LibriBrain %s: skipping %d of %d runs with missing files:\n  %s%s",
                       split, len(absent), len(run_keys), listing, more)
    sfreqs = {round(v["sfreq"], 6) for v in found.values()}
    channels = {v["shape"][0] for v in found.values()}
    if len(sfreqs) > 1 or len(channels) > 1:
        detail = ", ".join(f"{'-'.join(k)}: {v['sfreq']} Hz, {v['shape'][0]} channels"
                           for k, v in found.items())
        raise ValueError(f"LibriBrain {split}: runs disagree on sampling rate or channel count "
                         f"({detail})")
    return found


# --------------------------------------------------------------------------- standardization


def channel_stats(h5_paths: Sequence[str | os.PathLike], *, block_samples: int = 2**18,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation ``(C,)`` pooled over runs (float64).

    Reads each run's ``data`` in time blocks (never a whole run in memory) and merges block
    statistics exactly (Chan et al.'s parallel update). Statistics that pnpl cached in a run's
    ``data`` attributes (``channel_means``/``channel_stds``) are reused. Runs are pooled with
    pnpl's own ``StandardizationMixin._accumulate_stds``. Files are only read, never written.
    """
    h5py = require("h5py")
    pnpl = _pnpl()
    means, stds, counts = [], [], []
    for path in tqdm(h5_paths, desc="channel stats", unit="run", disable=not progress):
        with h5py.File(path, "r") as f:
            data = f["data"]
            n_ch, n_t = data.shape
            if "channel_means" in data.attrs and "channel_stds" in data.attrs:
                means.append(np.asarray(data.attrs["channel_means"], dtype=np.float64))
                stds.append(np.asarray(data.attrs["channel_stds"], dtype=np.float64))
                counts.append(n_t)
                continue
            n, mean, m2 = 0, np.zeros(n_ch), np.zeros(n_ch)
            for start in range(0, n_t, block_samples):
                block = np.asarray(data[:, start:start + block_samples], dtype=np.float64)
                nb = block.shape[1]
                mb = block.mean(axis=1)
                m2b = ((block - mb[:, None]) ** 2).sum(axis=1)
                delta = mb - mean
                total = n + nb
                mean = mean + delta * (nb / total)
                m2 = m2 + m2b + delta**2 * (n * nb / total)
                n = total
            means.append(mean)
            stds.append(np.sqrt(m2 / n))
            counts.append(n)
    std, mean = pnpl.StandardizationMixin._accumulate_stds(
        np.stack(means), np.stack(stds), np.asarray(counts))
    flat = np.flatnonzero(~(std > 0))
    if flat.size:
        logger.warning("channels %s are flat in the statistics runs; their scale is set to 1",
                       flat.tolist())
        std = np.where(std > 0, std, 1.0)
    return np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)


STATS_CACHE_DIR = Path("derivatives") / "ephys_gpt"


def cached_channel_stats(data_path: str | os.PathLike, h5_paths: Sequence[str | os.PathLike], *,
                         cache: bool = True, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """:func:`channel_stats` of ``h5_paths``, cached under ``<data_path>/derivatives/ephys_gpt/``.

    A full LibriBrain training set is tens of GB, so its statistics are computed once: the
    cache file's name hashes the runs' paths, sizes and modification times, so a changed or
    added run recomputes. The cache is a plain ``.npz`` (read with ``allow_pickle=False``),
    written atomically; a read-only data folder just skips it.
    """
    import hashlib
    import json

    ident = [[str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns]
             for p in sorted(map(str, h5_paths))]
    digest = hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:16]
    path = Path(data_path) / STATS_CACHE_DIR / f"channel_stats_{digest}.npz"
    if cache and path.is_file():
        with np.load(path, allow_pickle=False) as f:
            mean, std = f["mean"], f["std"]
        logger.info("LibriBrain channel statistics read from %s", path)
        return mean, std
    mean, std = channel_stats(h5_paths, progress=progress)
    if cache:
        try:
            write_with(path, lambda tmp: np.savez(tmp, mean=mean, std=std), suffix=".npz")
            logger.info("LibriBrain channel statistics cached in %s", path)
        except OSError as err:
            logger.info("could not cache LibriBrain channel statistics in %s (%s)", path, err)
    return mean, std


@contextlib.contextmanager
def _named_pnpl_errors(split: str, files: Mapping[RunKey, Mapping[str, Any]]) -> Iterator[None]:
    """Re-raise pnpl's file-less errors (e.g. "No samples found") naming the files involved."""
    try:
        yield
    except ValueError as err:
        events = ", ".join(str(v["events"]) for v in files.values())
        raise ValueError(f"LibriBrain {split}: pnpl could not build phoneme samples ({err}); "
                         f"events files: {events}") from err


# --------------------------------------------------------------------------- example dataset


class LibriBrainPhonemeDataset(Dataset):
    """Single phoneme-aligned windows of LibriBrain, through :class:`pnpl.datasets.LibriBrainPhoneme`.

    Windows that would start before the recording or run past its end are dropped (pnpl would
    return them shifted or shortened), so every item has the same shape.

    Parameters
    ----------
    data_path : path
        Root of the local LibriBrain copy (layout in the module docstring).
    run_keys : list of (subject, session, task, run)
        The runs to read; their files must exist (see :func:`check_run_files`).
    tmin, tmax : float
        Window relative to each phoneme onset, in seconds; ``T = int((tmax - tmin) * sfreq)``.
    label_type : str
        ``"phoneme"`` (39 classes) or ``"voicing"`` (2 classes), as in pnpl.
    preprocessing : str
        The ``proc-`` tag in the h5 file names.
    standardize : bool
        z-score each channel with ``channel_means``/``channel_stds`` (required when True;
        :func:`split_datasets_libribrain` computes them on the training runs).
    clipping_boundary : float | None
        Clip (standardized) values to ``[-b, b]``; None disables.
    preload_h5 : bool
        Read each run fully into memory on first access (pnpl's ``preload_h5``).

    Items are ``(x, label)``: ``x`` float32 ``(C, T)``, ``label`` int64 scalar.

    Attributes
    ----------
    example_labels : np.ndarray
        int64 ``(N,)`` class id of every item, without reading any signal.
    num_classes, label_names, labels (class ids present), sfreq, n_channels, run_keys, input_kind;
    n_times (= window_samples, T); ch_names (the h5 ``channel_names`` attribute, else
    placeholders ``ch0 ...``); ch_types (the h5 ``channel_types`` attribute, e.g. ``mag``,
    ``grad``, else None); steps (the normalize/clip steps applied, chunk-store format).
    """

    input_kind = "labelled"

    def __init__(
        self,
        data_path: str | os.PathLike,
        run_keys: Sequence[RunKey],
        *,
        tmin: float = 0.0,
        tmax: float = 0.5,
        label_type: str = "phoneme",
        preprocessing: str = DEFAULT_PREPROCESSING,
        standardize: bool = True,
        clipping_boundary: float | None = 10.0,
        channel_means: Sequence[float] | np.ndarray | None = None,
        channel_stds: Sequence[float] | np.ndarray | None = None,
        preload_h5: bool = False,
        split: str = "split",
    ) -> None:
        if not tmax > tmin:
            raise ValueError(f"tmax must be greater than tmin, got tmin={tmin}, tmax={tmax}")
        if label_type not in ("phoneme", "voicing"):
            raise ValueError(f"label_type must be 'phoneme' or 'voicing', got {label_type!r}")
        if clipping_boundary is not None and not clipping_boundary > 0:
            raise ValueError(f"clipping_boundary must be > 0 or None, got {clipping_boundary!r}")
        data_path = Path(data_path)
        if not data_path.is_dir():
            raise FileNotFoundError(f"LibriBrain data_path {str(data_path)!r} is not a folder "
                                    "(download the data first; see docs/libribrain.md)")
        files = check_run_files(data_path, run_keys, preprocessing=preprocessing, split=split)
        n_channels = next(iter(files.values()))["shape"][0]
        if standardize:
            if channel_means is None or channel_stds is None:
                raise ValueError("standardize=True needs channel_means and channel_stds "
                                 "(split_datasets_libribrain computes them on the training runs)")
            channel_means = np.asarray(channel_means, dtype=np.float64)
            channel_stds = np.asarray(channel_stds, dtype=np.float64)
            for name, arr in (("channel_means", channel_means), ("channel_stds", channel_stds)):
                if arr.shape != (n_channels,):
                    raise ValueError(f"{name} must have shape ({n_channels},) to match the h5 "
                                     f"'data' channels, got {arr.shape}")
            if not np.all(channel_stds > 0):
                raise ValueError("channel_stds must all be > 0")
        else:
            channel_means = channel_stds = None

        pnpl = _pnpl()
        with pnpl_offline(), _named_pnpl_errors(split, files):
            self.base = pnpl.LibriBrainPhoneme(
                data_path=str(data_path),
                partition=None,
                label_type=label_type,
                preprocessing_str=preprocessing,
                tmin=tmin,
                tmax=tmax,
                include_run_keys=[list(k) for k in run_keys],
                standardize=standardize,
                clipping_boundary=clipping_boundary,
                channel_means=channel_means,
                channel_stds=channel_stds,
                include_info=False,
                preload_files=False,
                download=False,
                preload_h5=preload_h5,
            )
        self.data_path = data_path
        self.split = split
        self.run_keys = [tuple(k) for k in self.base.run_keys]
        self.sfreq = float(self.base.sfreq)
        self.n_channels = n_channels
        self.n_times = self.window_samples = int(self.base.points_per_sample)
        first = next(iter(files.values()))
        self.ch_names = (first["ch_names"] if first["ch_names"] is not None
                         else [f"ch{i}" for i in range(n_channels)])
        self.ch_types = first["ch_types"]
        self.tmin, self.tmax = float(tmin), float(tmax)
        info = self.base.label_info
        self.num_classes = int(info["n_classes"])
        self.label_names = list(info["classes"])

        per_run = Counter(tuple(sample[:4]) for sample in self.base.samples)
        for key, info_ in files.items():
            if per_run[key] == 0:
                logger.warning("LibriBrain %s: %s holds no usable phoneme event (kind 'phoneme', "
                               "a known phoneme segment)", split, info_["events"])

        # Keep windows fully inside their recording; read labels without touching signals.
        n_samples = {k: v["shape"][1] for k, v in files.items()}
        keep, labels = [], []
        for i, sample in enumerate(self.base.samples):
            onset = float(sample[4])
            if not math.isfinite(onset):
                continue
            start = int((onset + self.tmin) * self.sfreq)
            if onset + self.tmin < 0 or start + self.n_times > n_samples[tuple(sample[:4])]:
                continue
            keep.append(i)
            labels.append(self.base.task.get_label(sample))
        dropped = len(self.base.samples) - len(keep)
        if dropped:
            logger.info("LibriBrain %s: dropped %d of %d windows that leave their recording",
                        split, dropped, len(self.base.samples))
        if not keep:
            raise ValueError(f"LibriBrain {split}: no phoneme window of [{tmin}, {tmax}] s lies "
                             f"inside the recordings of runs {self.run_keys}")
        self.indices = np.asarray(keep, dtype=np.int64)
        self.example_labels = np.asarray(labels, dtype=np.int64)
        self.labels = np.unique(self.example_labels).tolist()

        self.channel_means, self.channel_stds = channel_means, channel_stds
        self.clipping_boundary = None if clipping_boundary is None else float(clipping_boundary)
        self._center = self._scale = None
        if standardize:
            self._center = channel_means.astype(np.float32)[:, None]  # (C, 1)
            self._scale = channel_stds.astype(np.float32)[:, None]
        self.steps: list[dict] = []
        if standardize:
            self.steps.append({"name": "normalize", "method": "zscore",
                               "center": channel_means.tolist(), "scale": channel_stds.tolist()})
        if clipping_boundary is not None:
            b = float(clipping_boundary)
            self.steps.append({"name": "clip", "std_factor": b,
                               "low": [-b] * n_channels, "high": [b] * n_channels})
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def examples(self, items: Sequence[int]) -> np.ndarray:
        """Windows of ``items`` as float32 ``(k, C, T)``: read by pnpl, standardized and clipped.

        pnpl reads each window (its h5 handle cache or ``preload_h5`` array); the z-scoring and
        clipping of pnpl's ``StandardizationMixin.standardize`` are applied once to the stack,
        which is what makes averaging 100 windows cheap.
        """
        if os.getpid() != self._pid:
            # A forked DataLoader worker must not read through the parent's HDF5 handles.
            self.base.close_h5_files()
            self._pid = os.getpid()
        out = np.empty((len(items), self.n_channels, self.n_times), dtype=np.float32)
        for j, item in enumerate(items):
            sample = self.base.samples[self.indices[item]]
            out[j] = self.base.load_continuous_window_from_sample(sample)
        if self._center is not None:
            out -= self._center
            out /= self._scale
        if self.clipping_boundary is not None:
            np.clip(out, -self.clipping_boundary, self.clipping_boundary, out=out)
        return out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, label)``: x float32 (C, T), label int64 scalar."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} LibriBrain windows")
        x = torch.from_numpy(self.examples([index])[0])
        return x, torch.tensor(int(self.example_labels[index]), dtype=torch.int64)

    def __getstate__(self) -> dict:
        # Open HDF5 handles cannot be pickled (spawned workers); they reopen lazily.
        self.base.close_h5_files()
        return self.__dict__.copy()

    def __repr__(self) -> str:
        return (f"LibriBrainPhonemeDataset({self.split}: {len(self)} windows, {len(self.run_keys)} "
                f"runs, C={self.n_channels}, T={self.n_times}, {self.sfreq:g} Hz)")


# --------------------------------------------------------------------------- splitter


def _as_run_spec(value: Any, name: str) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return value
    raise TypeError(f"{name} must be a partition name, a list of run keys or None, "
                    f"got {type(value).__name__}")


def _libribrain_input_kind(cfg) -> str:
    name = cfg.get("dataset_class", "RandomLabelGroupedDataset")
    if name not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset_class {name!r} for libribrain; valid: "
                         f"{sorted(DATASET_CLASSES)}")
    return "labelled"


@register_splitter("libribrain", input_kind=_libribrain_input_kind)
def split_datasets_libribrain(
    data_path: str | os.PathLike | None = None,
    *,
    dataset_root: str | os.PathLike | None = None,
    tmin: float = 0.0,
    tmax: float = 0.5,
    dataset_class: str = "RandomLabelGroupedDataset",
    group_size: int = 100,
    epoch_length: int | None = None,
    drop_last: bool = False,
    train_runs: str | Sequence[Sequence[Any]] | None = "train",
    val_runs: str | Sequence[Sequence[Any]] | None = "validation",
    test_runs: str | Sequence[Sequence[Any]] | None = "test",
    missing_runs: str = "error",
    label_type: str = "phoneme",
    preprocessing: str = DEFAULT_PREPROCESSING,
    standardize: bool = True,
    clipping_boundary: float | None = 10.0,
    channel_means: Sequence[float] | None = None,
    channel_stds: Sequence[float] | None = None,
    augmentations: Any = None,
    quantize_bits: int | None = None,
    quantize_scale: float | None = None,
    seed: int = 0,
    preload_h5: bool = False,
    stats_cache: bool = True,
    progress: bool = True,
) -> Any:
    """LibriBrain phoneme train/val/test datasets from a local folder, offline.

    Parameters
    ----------
    data_path : path
        Root of the downloaded LibriBrain data (layout: module docstring, docs/libribrain.md).
    dataset_root : path
        Same as ``data_path``: the name every splitter's run-YAML key uses
        (``datasplitter.dataset_root``, resolved against the YAML's folder). Give one of them.
    tmin, tmax : float
        Window around each phoneme onset, seconds.
    dataset_class : str
        ``"RandomLabelGroupedDataset"`` (averaged groups), ``"GroupedDatasetAugmented"``
        (averaged groups + augmentations / mu-law tokens) or ``"LibriBrainPhonemeDataset"``
        (single windows, no averaging).
    group_size : int
        k examples of one class averaged per item (grouped classes).
    epoch_length : int | None
        Training items per epoch (random groups); default ``ceil(N_train / group_size)``.
    drop_last : bool
        Validation/test: drop each class's trailing group of fewer than k examples.
    train_runs, val_runs, test_runs : str | list | None
        A pnpl partition name (``"train"``, ``"validation"``, ``"test"``) or a list of
        ``[subject, session, task, run]`` run keys; None leaves that split out (returned as None).
    missing_runs : str
        ``"error"``: a run with a missing file is a FileNotFoundError listing every missing
        file; ``"skip"``: use the runs present (logged), fail only when a split has none.
    label_type, preprocessing, clipping_boundary
        As in pnpl's ``LibriBrainPhoneme``.
    standardize : bool
        z-score every split with the training runs' channel statistics (read in blocks, never
        a whole run in memory) unless ``channel_means``/``channel_stds`` are given.
    augmentations : list | mapping | path | callable | None
        ``GroupedDatasetAugmented`` only: applied to training items (the list format of
        :mod:`ephys_gpt.dataset.augmentations`, e.g. ``[{name: gaussian_noise, std: 0.1}]``).
    quantize_bits, quantize_scale
        ``GroupedDatasetAugmented`` only: mu-law tokens with this many bits; the scale defaults
        to ``clipping_boundary`` (so no standardized value saturates), else 1.
    seed : int
        Seeds the random training groups and the fixed evaluation groups.
    preload_h5 : bool
        Read each run into memory on first access.
    stats_cache : bool
        Cache the training statistics in ``<data_path>/derivatives/ephys_gpt/`` (see
        :func:`cached_channel_stats`); the data files themselves are never written.
    progress : bool
        Show a progress bar while computing channel statistics.

    Returns
    -------
    DataSplits(train, val, test)
        Training items are random groups; validation and test items are fixed groups
        (deterministic), so evaluation repeats exactly. Each dataset has ``num_classes``,
        ``label_names``, ``labels`` and ``input_kind == "labelled"``.
    """
    if (data_path is None) == (dataset_root is None):
        raise ValueError("give the LibriBrain folder as data_path or dataset_root (exactly one), "
                         f"got data_path={data_path!r}, dataset_root={dataset_root!r}")
    data_path = data_path if data_path is not None else dataset_root
    if dataset_class not in DATASET_CLASSES:
        raise ValueError(f"dataset_class must be one of {list(DATASET_CLASSES)} for LibriBrain, "
                         f"got {dataset_class!r}")
    grouped = dataset_class != "LibriBrainPhonemeDataset"
    augmented = dataset_class == "GroupedDatasetAugmented"
    if not augmented and (augmentations is not None or quantize_bits is not None):
        raise ValueError("augmentations and quantize_bits need dataset_class: "
                         f"GroupedDatasetAugmented (got {dataset_class!r})")
    specs = {"train": _as_run_spec(train_runs, "train_runs"),
             "val": _as_run_spec(val_runs, "val_runs"),
             "test": _as_run_spec(test_runs, "test_runs")}
    if specs["train"] is None and standardize and (channel_means is None or channel_stds is None):
        raise ValueError("standardize=True without training runs needs channel_means and "
                         "channel_stds")
    data_path = Path(data_path)
    if not data_path.is_dir():
        raise FileNotFoundError(f"LibriBrain data_path {str(data_path)!r} is not a folder "
                                "(download the data first; see docs/libribrain.md)")
    pnpl = _pnpl()
    runs: dict[str, list[RunKey] | None] = {}
    for split, spec in specs.items():
        if spec is None:
            runs[split] = None
            continue
        keys = resolve_run_keys(spec, pnpl.constants, name=f"{split}_runs")
        files = check_run_files(data_path, keys, preprocessing=preprocessing,
                                missing=missing_runs, split=split)
        runs[split] = list(files)
        logger.info("LibriBrain %s: %d runs", split, len(files))

    if standardize and (channel_means is None or channel_stds is None):
        h5_paths = [_paths(pnpl, data_path, preprocessing, k)[0] for k in runs["train"]]
        channel_means, channel_stds = cached_channel_stats(data_path, h5_paths,
                                                           cache=stats_cache, progress=progress)

    if quantize_scale is None:
        quantize_scale = clipping_boundary if clipping_boundary is not None else 1.0

    out: dict[str, Any] = {}
    for split, keys in runs.items():
        if keys is None:
            out[split] = None
            continue
        examples = LibriBrainPhonemeDataset(
            data_path, keys, tmin=tmin, tmax=tmax, label_type=label_type,
            preprocessing=preprocessing, standardize=standardize,
            clipping_boundary=clipping_boundary, channel_means=channel_means,
            channel_stds=channel_stds, preload_h5=preload_h5, split=split)
        if not grouped:
            out[split] = examples
            continue
        training = split == "train"
        kwargs: dict[str, Any] = {
            "group_size": group_size,
            "seed": seed,
            "deterministic": not training,
            "drop_last": drop_last,
        }
        if training:
            kwargs["epoch_length"] = epoch_length
        if augmented:
            out[split] = GroupedDatasetAugmented(
                examples, augmentations=augmentations if training else None,
                quantize_bits=quantize_bits, quantize_scale=quantize_scale, **kwargs)
        else:
            out[split] = RandomLabelGroupedDataset(examples, **kwargs)
        logger.info("LibriBrain %s: %r", split, out[split])
    return DataSplits(train=out["train"], val=out["val"], test=out["test"])

"""Window indexing and train/val/test splits over a chunk store.

:func:`ephys_gpt.dataset.indexing.build_indices` turns the sessions of a chunk store into
windows ``(session_idx, chunk_idx, start)``; :func:`split_datasets` assigns them to train/val/test and
instantiates one dataset class per split (see ``datasets.py`` and ``docs/datasets.md``).

Splitting (``split_by``):

- ``"session"`` (default): whole sessions go to one split. Shuffled with ``seed``.
- ``"subject"``: whole subjects (``provenance.subject`` in ``meta.json``) go to one split, so
  no subject is seen in training and tested on.
- ``"time"``: every session is cut in time: the first ``1 - val_ratio - test_ratio`` of its
  samples train, the next ``val_ratio`` validate, the last ``test_ratio`` test. Windows are
  laid out inside each part, so none straddles a cut and no sample is in two splits. This is the choice for a
  store with a single session (or fewer sessions/subjects than splits): ``"session"`` and
  ``"subject"`` refuse such stores with an error that points here, rather than silently
  changing what the validation score means.

With ``val_ratio > 0`` (or ``test_ratio > 0``) each of those splits gets at least one session
(subject); the training split must keep at least one.

A recorded split (``sessions={"train": [...], "val": [...], "test": [...]}``, what a run
writes to ``save_dir/split.json``) replaces the draw: each named session goes to its split,
sessions of the store not named are left out, and a named session the store lacks is an
error (see ``ephys_gpt/training/run_folder.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ephys_gpt.dataset.augmentations import as_augmentations
from ephys_gpt.dataset.indexing import build_indices, seconds_to_samples
from ephys_gpt.dataset.registry import DataSplits, get_dataset_class, register_splitter
from ephys_gpt.store import SessionMeta, StoreError, check_compatible, list_sessions

logger = logging.getLogger(__name__)

SPLIT_BY = ("session", "subject", "time")


# ------------------------------------------------------------------------------------ splits
def _check_ratio(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
    return float(v)


def _group_split(keys: list[str], what: str, val_ratio: float, test_ratio: float, seed: int,
                 root: Any) -> dict[str, int]:
    """Assign each distinct key to split 0 (train), 1 (val) or 2 (test)."""
    groups = sorted(set(keys))
    n = len(groups)
    n_val = max(1, round(val_ratio * n)) if val_ratio > 0 else 0
    n_test = max(1, round(test_ratio * n)) if test_ratio > 0 else 0
    if n - n_val - n_test < 1:
        need = 1 + (val_ratio > 0) + (test_ratio > 0)
        raise ValueError(
            f"split_by={what!r} with val_ratio={val_ratio} and test_ratio={test_ratio} needs at "
            f"least {need} {what}s (one per non-empty split), but {root} has {n}: {groups[:10]}. "
            f"Use split_by='time' to split each session in time, set the ratios to 0, or add "
            f"{what}s")
    order = np.random.default_rng(seed).permutation(n)
    assign = {}
    for rank, gi in enumerate(order):
        assign[groups[gi]] = 1 if rank < n_val else 2 if rank < n_val + n_test else 0
    return assign


def _time_split(metas: list[SessionMeta], read: int, stride: int, val_ratio: float,
                test_ratio: float) -> list[np.ndarray]:
    """Windows of each split for ``split_by='time'``: (train, val, test) index arrays.

    Each session's timeline (its chunks end to end) is cut at ``1 - val - test`` and
    ``1 - test`` of its length; windows are laid out afresh inside every (chunk, split)
    segment, so none crosses a cut or a chunk boundary.
    """
    out: list[list[np.ndarray]] = [[], [], []]
    for s, meta in enumerate(metas):
        total = sum(meta.chunk_lengths)
        cuts = [0, int(round((1.0 - val_ratio - test_ratio) * total)),
                int(round((1.0 - test_ratio) * total)), total]
        offset = 0
        for c, length in enumerate(meta.chunk_lengths):
            for label in range(3):
                lo = max(cuts[label], offset) - offset
                hi = min(cuts[label + 1], offset + length) - offset
                if hi - lo < read:
                    continue
                starts = np.arange(lo, hi - read + 1, stride, dtype=np.int64)
                block = np.empty((len(starts), 3), dtype=np.int64)
                block[:, 0], block[:, 1], block[:, 2] = s, c, starts
                out[label].append(block)
            offset += length
    return [np.concatenate(b) if b else np.zeros((0, 3), dtype=np.int64) for b in out]


SPLIT_NAMES = ("train", "val", "test")


def _recorded_sessions(metas: list[SessionMeta], sessions: Mapping[str, Sequence[str]],
                       root: Any) -> tuple[list[SessionMeta], dict[str, int]]:
    """The sessions a recorded split names, and each one's split (0 train, 1 val, 2 test)."""
    if not isinstance(sessions, Mapping) or not set(sessions) <= set(SPLIT_NAMES):
        raise ValueError(f"sessions must map {list(SPLIT_NAMES)} to lists of session names, "
                         f"got {sessions!r}")
    label: dict[str, int] = {}
    for i, name in enumerate(SPLIT_NAMES):
        names = sessions.get(name) or []
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
            raise ValueError(f"sessions[{name!r}] must be a list of session names, got {names!r}")
        for n in names:
            label.setdefault(str(n), i)  # split_by='time' names a session in several splits
    present = {m.name for m in metas}
    missing = sorted(set(label) - present)
    if missing:
        raise StoreError(f"{len(missing)} session(s) of the recorded split are not complete "
                         f"sessions of {root}: {missing[:10]}")
    left_out = sorted(present - set(label))
    if left_out:
        logger.warning("%d session(s) of %s are not in the recorded split and are left out: %s",
                       len(left_out), root, left_out[:10])
    return [m for m in metas if m.name in label], label


def _chunk_input_kind(cfg) -> str:
    return get_dataset_class(cfg.get("dataset_class", "ChunkDataset")).input_kind


@register_splitter("omega", "chunks", input_kind=_chunk_input_kind)
def split_datasets(dataset_root: str | Path, *, dataset_class: str = "ChunkDataset",
                   example_seconds: float = 2.0, stride_seconds: float | None = None,
                   split_by: str = "session", val_ratio: float = 0.1, test_ratio: float = 0.1,
                   seed: int = 0, augmentations: Any = None,
                   dataset_kwargs: Mapping[str, Any] | None = None,
                   sessions: Mapping[str, Sequence[str]] | None = None) -> DataSplits:
    """Index a chunk store, split it and build one dataset per split.

    Parameters
    ----------
    dataset_root : path
        The chunk store (stage 2's output folder).
    dataset_class : str
        A registered chunk dataset class (``ephys_gpt.dataset.registry.DATASETS``).
    example_seconds : float
        Window length T (seconds); shifted kinds read one extra sample.
    stride_seconds : float, optional
        Distance between window starts; default ``example_seconds`` (no overlap).
    split_by : {"session", "subject", "time"}
        See the module docstring.
    val_ratio, test_ratio : float
        Fractions of sessions / subjects / time for validation and test (each in [0, 1)).
    seed : int
        Makes the split (and the training augmentations) reproducible.
    augmentations : list / mapping / path, optional
        Applied to the training split only (see ``augmentations.py``).
    dataset_kwargs : mapping, optional
        Extra keyword arguments of the dataset class (``quantize``, ``target_shift``,
        ``image_size``, ``planes``, ``check_finite``...).
    sessions : mapping, optional
        A recorded split: session names per split (``train``, ``val``, ``test``) used instead
        of drawing one (``split_by='time'`` still cuts each named session in time). Sessions
        of the store not named are left out; a named session the store lacks is an error.

    Returns
    -------
    DataSplits(train, val, test)
        Each dataset holds the sessions of its split; a split with no windows is an empty
        dataset (``len == 0``), except the training split, which must have windows.
    """
    cls = get_dataset_class(dataset_class)
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {list(SPLIT_BY)}, got {split_by!r}")
    val_ratio = _check_ratio("val_ratio", val_ratio)
    test_ratio = _check_ratio("test_ratio", test_ratio)
    if val_ratio + test_ratio >= 1.0:
        raise ValueError(f"val_ratio + test_ratio must be below 1 (training needs data), got "
                         f"{val_ratio} + {test_ratio}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if dataset_kwargs is None:
        dataset_kwargs = {}
    if not isinstance(dataset_kwargs, Mapping):
        raise ValueError(f"dataset_kwargs must be a mapping, got {dataset_kwargs!r}")
    dataset_kwargs = dict(dataset_kwargs)
    if "augmentations" in dataset_kwargs:
        raise ValueError("pass augmentations as split_datasets(augmentations=...), not inside "
                         "dataset_kwargs (they apply to the training split only)")

    metas = list_sessions(dataset_root)
    recorded = None
    if sessions is not None:
        metas, recorded = _recorded_sessions(metas, sessions, dataset_root)
    check_compatible(metas)
    sfreq = metas[0].sfreq
    window = seconds_to_samples(example_seconds, sfreq, "example_seconds")
    stride = (seconds_to_samples(stride_seconds, sfreq, "stride_seconds")
              if stride_seconds is not None else None)
    extra = cls.extra_samples(**dataset_kwargs)
    metas, idx = build_indices(metas, window, stride_samples=stride, extra_samples=extra)

    if split_by == "time":
        per_split = _time_split(metas, window + extra, stride or window, val_ratio, test_ratio)
    elif recorded is not None:
        session_split = np.array([recorded[m.name] for m in metas], dtype=np.int64)
        labels = session_split[idx[:, 0]]
        per_split = [idx[labels == label] for label in range(3)]
    else:
        if split_by == "session":
            keys = [m.name for m in metas]
        else:
            keys = []
            for m in metas:
                subject = m.provenance.get("subject")
                if subject in (None, ""):
                    raise StoreError(f"{m.path / 'meta.json'} has no provenance.subject, which "
                                     "split_by='subject' needs; use split_by='session'")
                keys.append(str(subject))
        assign = _group_split(keys, split_by, val_ratio, test_ratio, seed, dataset_root)
        session_split = np.array([assign[k] for k in keys], dtype=np.int64)
        labels = session_split[idx[:, 0]]
        per_split = [idx[labels == label] for label in range(3)]

    augs = as_augmentations(augmentations, seed=seed)
    splits = []
    for label, name in enumerate(("train", "val", "test")):
        rows = per_split[label]
        ratio = (1.0, val_ratio, test_ratio)[label]
        if ratio > 0 and len(rows) == 0 and name != "train":
            logger.warning("the %s split of %s has no window (%s_ratio=%s, split_by=%r); "
                           "its data is too short for windows of %d samples", name,
                           dataset_root, name, ratio, split_by, window + extra)
        used = np.unique(rows[:, 0]) if len(rows) else np.arange(len(metas))
        remap = np.full(len(metas), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        sub = rows.copy()
        sub[:, 0] = remap[rows[:, 0]]
        if name == "train" and len(sub) == 0:
            raise StoreError(f"the training split of {dataset_root} has no window "
                             f"(split_by={split_by!r}, val_ratio={val_ratio}, "
                             f"test_ratio={test_ratio}); lower the ratios or example_seconds")
        ds = cls([metas[i] for i in used], sub, window,
                 augmentations=augs if name == "train" else None, **dataset_kwargs)
        splits.append(ds)
        logger.info("%s split: %d windows from %d session(s)", name, len(ds),
                    len(used) if len(rows) else 0)
    return DataSplits(*splits)

"""Windows of a chunk store: every ``(session, chunk, start)`` a dataset can read.

A window never crosses a chunk boundary or reads past the end of a chunk; datasets index
these rows and read only their window (memory-mapped).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ephys_gpt.store import SessionMeta, StoreError, check_compatible, list_sessions, load_chunk

logger = logging.getLogger(__name__)


def seconds_to_samples(seconds: Any, sfreq: float, key: str) -> int:
    """``round(seconds * sfreq)``, checked to be at least one sample; errors name ``key``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{key} must be a positive number of seconds, got {seconds!r}")
    n = int(round(seconds * sfreq))
    if n < 1:
        raise ValueError(f"{key}={seconds} s is less than one sample at {sfreq:g} Hz")
    return n


def build_indices(root_or_metas: str | Path | Sequence[SessionMeta], window_samples: int, *,
                  stride_samples: int | None = None, extra_samples: int = 0,
                  validate_chunks: bool = True) -> tuple[list[SessionMeta], np.ndarray]:
    """Index all windows of a chunk store.

    Parameters
    ----------
    root_or_metas : path or list of SessionMeta
        The store's root (scanned with :func:`store.list_sessions`) or its sessions.
    window_samples : int
        T, the window length returned by the datasets.
    stride_samples : int, optional
        Distance between window starts; default ``window_samples`` (non-overlapping).
    extra_samples : int
        Samples read beyond ``window_samples`` (1 for datasets whose targets are shifted).
    validate_chunks : bool
        Open every chunk's header once (memory-mapped; reads no data) so that a missing,
        truncated or mis-shaped file fails here, naming the file, rather than mid-epoch.

    Returns
    -------
    metas : list of SessionMeta
    indices : int64 array (N, 3)
        ``(session_idx, chunk_idx, start)``; a window reads samples
        ``[start, start + window_samples + extra_samples)`` of one chunk, always inside it.
        Chunks shorter than that yield no window (counted in a log message).
    """
    if isinstance(root_or_metas, (str, Path)):
        metas = list_sessions(root_or_metas)
    else:
        metas = list(root_or_metas)
        if not metas:
            raise ValueError("build_indices needs at least one session")
    check_compatible(metas)
    for key, v, lo in (("window_samples", window_samples, 1), ("extra_samples", extra_samples, 0),
                       ("stride_samples", stride_samples if stride_samples is not None else 1, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    stride = int(stride_samples) if stride_samples is not None else int(window_samples)
    need = int(window_samples) + int(extra_samples)
    rows, dropped, n_chunks = [], 0, 0
    for s, meta in enumerate(metas):
        for c, length in enumerate(meta.chunk_lengths):
            n_chunks += 1
            if validate_chunks:
                load_chunk(meta, c, mmap=True)
            if length < need:
                dropped += 1
                continue
            starts = np.arange(0, length - need + 1, stride, dtype=np.int64)
            block = np.empty((len(starts), 3), dtype=np.int64)
            block[:, 0], block[:, 1], block[:, 2] = s, c, starts
            rows.append(block)
    if dropped:
        logger.info("%d of %d chunk(s) are shorter than a window of %d samples and yield no "
                    "window", dropped, n_chunks, need)
    if not rows:
        raise StoreError(f"no chunk of {metas[0].path.parent} holds a window of {need} samples "
                         f"(longest chunk: {max(max(m.chunk_lengths) for m in metas)} samples); "
                         "lower example_seconds or re-run stage 2 with longer chunks")
    indices = np.concatenate(rows)
    logger.debug("indexed %d windows of %d samples in %d sessions", len(indices), need,
                 len(metas))
    return metas, indices

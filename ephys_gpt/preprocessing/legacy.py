"""One-off conversion of the original toolkit's chunks into the chunk store.

The original toolkit saved every chunk as a pickled Python dict inside a ``.npy`` file
(``np.save`` of ``{"data": (C, T), "sfreq": ..., "ch_names": [...], "pos_2d": (C, 2),
"ch_types": [...] (optional), ...}``), one folder per session, files ``0.npy``, ``1.npy``...
This module is the only place in ephys-gpt that unpickles anything: loading a pickle runs
code chosen by whoever wrote the file, so convert only files you trust, once, and use the
resulting store from then on. Every function here that reads a legacy chunk refuses unless
it is called with ``trust_pickle=True`` (``ephys-gpt convert-legacy --trust-pickle``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import ephys_gpt
from ephys_gpt import store
from ephys_gpt.preprocessing.result import RunResult

logger = logging.getLogger(__name__)

PICKLE_REFUSAL = (
    "the original toolkit's chunks are pickled Python objects, and unpickling executes any "
    "code the file contains (a crafted .npy can run commands as you). ephys-gpt unpickles "
    "only on explicit request: if these files come from a source you trust, run "
    "`ephys-gpt convert-legacy SRC DST --trust-pickle` (Python: trust_pickle=True)")


class UntrustedPickleError(ValueError):
    """A legacy conversion was asked for without ``trust_pickle=True``."""


def _require_trust(trust_pickle: bool, what: str) -> None:
    if trust_pickle is not True:
        raise UntrustedPickleError(f"refusing to unpickle {what}: {PICKLE_REFUSAL}")


def _chunk_files(folder: Path) -> list[Path]:
    files = [p for p in folder.glob("*.npy") if re.fullmatch(r"\d+", p.stem)]
    return sorted(files, key=lambda p: int(p.stem))


def find_legacy_sessions(src: str | os.PathLike) -> list[Path]:
    """Session folders under ``src``: ``src`` itself if it holds ``<i>.npy`` files, else its
    sub-folders (searched recursively) that do."""
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"legacy folder {src} does not exist or is not a folder")
    if _chunk_files(src):
        return [src]
    sessions = sorted({p.parent for p in src.rglob("*.npy")
                       if re.fullmatch(r"\d+", p.stem) and not any(
                           part.startswith(".") for part in p.relative_to(src).parts)})
    if not sessions:
        raise ValueError(f"no legacy chunks (<index>.npy files) found under {src}")
    return sessions


def load_legacy_chunk(path: str | os.PathLike, *, trust_pickle: bool = False) -> dict:
    """Unpickle one legacy chunk dict. Refused unless ``trust_pickle=True``: unpickling runs
    code from the file (see the module docstring)."""
    path = Path(path)
    _require_trust(trust_pickle, str(path))
    try:
        # The ONLY place in ephys-gpt that unpickles: it executes code from the file, so it
        # runs only on the caller's explicit trust_pickle=True (--trust-pickle).
        obj = np.load(path, allow_pickle=True)  # legacy pickled-dict chunks, trusted files only
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy file: {err}") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        kind = f"array {obj.dtype} {obj.shape}" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise ValueError(f"{path}: expected a pickled dict with a 'data' entry (legacy chunk), "
                         f"found {kind}")
    for key in ("data", "sfreq", "ch_names"):
        if key not in obj:
            raise ValueError(f"{path}: legacy chunk lacks key {key!r} (keys: {sorted(obj)})")
    return obj


def convert_session(folder: str | os.PathLike, dst: str | os.PathLike, name: str | None = None,
                    default_ch_type: str = "mag", *, trust_pickle: bool = False) -> Path:
    """Convert one legacy session folder into ``<dst>/<name>``; returns the new folder.
    Refused unless ``trust_pickle=True`` (the chunks are unpickled)."""
    folder = Path(folder)
    _require_trust(trust_pickle, f"the legacy chunks in {folder}")
    name = name or folder.name
    files = _chunk_files(folder)
    if not files:
        raise ValueError(f"{folder}: no legacy chunks (<index>.npy files)")
    first = load_legacy_chunk(files[0], trust_pickle=True)
    ch_names = [str(c) for c in first["ch_names"]]
    n_ch = len(ch_names)
    sfreq = float(np.asarray(first["sfreq"]).item())
    if first.get("pos_2d") is None:
        raise ValueError(f"{files[0]}: legacy chunk has no 'pos_2d'; the chunk store needs "
                         "2-D sensor positions")
    pos_2d = np.asarray(first["pos_2d"], dtype=np.float64)
    if pos_2d.shape != (n_ch, 2):
        raise ValueError(f"{files[0]}: 'pos_2d' has shape {pos_2d.shape}, expected ({n_ch}, 2)")
    if first.get("ch_types") is not None:
        ch_types = [str(t) for t in first["ch_types"]]
    else:
        logger.warning("%s: legacy chunks have no 'ch_types'; using %r for every channel",
                       folder, default_ch_type)
        ch_types = [default_ch_type] * n_ch

    def chunks() -> Iterator[np.ndarray]:
        for i, f in enumerate(files):
            d = first if i == 0 else load_legacy_chunk(f, trust_pickle=True)
            if [str(c) for c in d["ch_names"]] != ch_names:
                raise ValueError(f"{f}: channel names differ from {files[0]}")
            if float(np.asarray(d["sfreq"]).item()) != sfreq:
                raise ValueError(f"{f}: sfreq {d['sfreq']} differs from {files[0]} ({sfreq})")
            x = np.asarray(d["data"])
            if x.ndim != 2 or x.shape[0] != n_ch:
                raise ValueError(f"{f}: 'data' has shape {x.shape}, expected ({n_ch}, T)")
            if np.issubdtype(x.dtype, np.floating):
                if not np.isfinite(x).all():
                    raise ValueError(f"{f}: 'data' contains NaN or Inf")
                x = x.astype(np.float32)
            elif not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"{f}: 'data' has dtype {x.dtype}; expected numbers")
            yield x

    # chunk_samples: the common chunk length (the first chunk's; the last may be shorter)
    first_len = int(np.asarray(first["data"]).shape[-1])
    meta = {
        "sfreq": sfreq, "ch_names": ch_names, "ch_types": ch_types,
        "pos_2d": pos_2d.tolist(), "chunk_samples": first_len,
        # the original toolkit did not record its transforms, so none can be inverted
        "steps": [],
        "provenance": {"legacy_source": str(folder), "recording": name,
                       "converted_by": f"ephys-gpt {ephys_gpt.__version__} convert-legacy",
                       "legacy_extra_keys": sorted(set(first) - {"data", "sfreq", "ch_names",
                                                                  "pos_2d", "ch_types"})},
    }
    for key in ("pos_3d", "ori_3d"):
        if first.get(key) is not None:
            arr = np.asarray(first[key], dtype=np.float64)
            if arr.shape == (n_ch, 3):
                meta[key] = arr.tolist()
    return store.write_session(dst, name, chunks(), meta)


def convert_legacy(src: str | os.PathLike, dst: str | os.PathLike, *, trust_pickle: bool = False,
                   progress: bool = True, default_ch_type: str = "mag") -> RunResult:
    """Convert every legacy session under ``src`` into the chunk store ``dst``.

    The legacy chunks are pickles, and unpickling executes code from the files, so this
    refuses (:class:`UntrustedPickleError`, a ValueError, before reading any file) unless
    ``trust_pickle=True``. Sessions already complete in ``dst`` are skipped; a session that
    fails is reported with its reason and the others go on.
    """
    src, dst = Path(src), Path(dst)
    _require_trust(trust_pickle, f"the legacy chunks under {src}")
    sessions = find_legacy_sessions(src)
    logger.info("convert-legacy: unpickling %d session folder(s) under %s (trusted: "
                "--trust-pickle)", len(sessions), src)
    dst.mkdir(parents=True, exist_ok=True)
    store.clean_partial(dst)
    result = RunResult()
    base = [f.name for f in sessions]
    for folder in tqdm(sessions, desc="convert-legacy", unit="session", disable=not progress):
        name = folder.name  # the relative path where two sessions share a folder name
        if base.count(name) > 1:
            name = "_".join(folder.relative_to(src).parts)
        if store.is_complete(dst, name):
            result.skipped.append(name)
            continue
        try:
            result.written.append(convert_session(folder, dst, name, default_ch_type,
                                                   trust_pickle=True))
        except (ValueError, OSError) as err:
            result.failed[name] = str(err)
            logger.error("convert-legacy failed for %s: %s", folder, err)
    return result

"""The chunk store: stage 2's output and every dataset's input (DESIGN.md, contract 1).

Layout::

    <root>/<session>/meta.json     # written last: its presence marks the session complete
    <root>/<session>/0.npy         # chunk 0, shape (C, T_0), float32 or an integer dtype
    <root>/<session>/1.npy ...

Chunks are plain arrays read with ``mmap_mode="r"`` and ``allow_pickle=False``; nothing here
ever unpickles. A session is written into a hidden temporary folder and renamed into place
only once complete, so an interrupted run leaves nothing a reader would trust.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ephys_gpt.dataset.compatibility import differences
from ephys_gpt.fileio import write_json_atomic
from ephys_gpt.validation import describe

logger = logging.getLogger(__name__)

FORMAT = "ephys-gpt-chunks"
FORMAT_VERSION = 1
META_NAME = "meta.json"
_TMP_PREFIX = ".tmp-"
_NPY_MAGIC = b"\x93NUMPY"

_REQUIRED_KEYS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "sfreq": (int, float),
    "ch_names": list,
    "ch_types": list,
    "pos_2d": list,
    "chunk_samples": int,
    "n_chunks": int,
    "chunk_lengths": list,
    "dtype": str,
    "steps": list,
}


class StoreError(ValueError):
    """A chunk store (or one of its files) is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class SessionMeta:
    """Validated contents of one session's ``meta.json``."""

    path: Path  # the session folder
    sfreq: float
    ch_names: list[str]
    ch_types: list[str]
    pos_2d: np.ndarray  # (C, 2)
    chunk_samples: int
    chunk_lengths: list[int]
    dtype: str
    steps: list[dict]
    pos_3d: np.ndarray | None = None  # (C, 3)
    ori_3d: np.ndarray | None = None  # (C, 3)
    provenance: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)  # the whole parsed JSON

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def n_channels(self) -> int:
        return len(self.ch_names)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_lengths)

    @property
    def is_tokens(self) -> bool:
        """True when chunks hold integer tokens (the last step was ``mulaw_quantize``)."""
        return np.issubdtype(np.dtype(self.dtype), np.integer)

    def step(self, name: str) -> dict | None:
        """The recorded parameters of stage-2 step ``name`` (None if it was not applied)."""
        return next((s for s in self.steps if s.get("name") == name), None)

    def chunk_path(self, i: int) -> Path:
        return self.path / f"{i}.npy"


def read_meta(session_dir: str | os.PathLike) -> SessionMeta:
    """Read and validate ``<session_dir>/meta.json``.

    Every malformed field (a missing key, a wrong type, a non-numeric entry of
    ``chunk_lengths`` or ``pos_2d``, steps that are not a list of mappings with a known
    ``name`` and well-formed parameters...) raises :class:`StoreError` naming the file, the
    key and what was found.
    """
    session_dir = Path(session_dir)
    meta_path = session_dir / META_NAME
    if not session_dir.is_dir():
        raise StoreError(f"session folder {session_dir} does not exist")
    if not meta_path.is_file():
        raise StoreError(f"{meta_path} is missing: {session_dir} is not a complete session "
                         "(stage 2 writes meta.json last; re-run stage 2 to finish it)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")

    def bad(key: str, expected: str, found: Any) -> StoreError:
        return StoreError(f"{meta_path}: key {key!r} should be {expected}, found "
                          f"{describe(found, 60)}")

    for key, typ in _REQUIRED_KEYS.items():
        if key not in meta:
            raise StoreError(f"{meta_path}: required key {key!r} is missing")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise bad(key, _type_name(typ), meta[key])
    if meta["format_version"] > FORMAT_VERSION:
        raise StoreError(f"{meta_path}: format_version {meta['format_version']} is newer than "
                         f"this ephys-gpt understands ({FORMAT_VERSION}); upgrade ephys-gpt")
    if meta["format_version"] < 1:
        raise bad("format_version", "an integer >= 1", meta["format_version"])
    if not (math.isfinite(meta["sfreq"]) and meta["sfreq"] > 0):
        raise bad("sfreq", "a positive number (Hz)", meta["sfreq"])
    n_ch = len(meta["ch_names"])
    if n_ch == 0:
        raise bad("ch_names", "a non-empty list of channel names", meta["ch_names"])
    for key in ("ch_names", "ch_types"):
        for i, v in enumerate(meta[key]):
            if not isinstance(v, str) or not v:
                raise bad(f"{key}[{i}]", "a non-empty string", v)
    dupes = sorted({c for c in meta["ch_names"] if meta["ch_names"].count(c) > 1})
    if dupes:
        raise StoreError(f"{meta_path}: 'ch_names' lists {dupes[:5]} more than once")
    for key in ("ch_types", "pos_2d"):
        if len(meta[key]) != n_ch:
            raise StoreError(f"{meta_path}: {key!r} has {len(meta[key])} entries but "
                             f"'ch_names' has {n_ch}")
    for key in ("chunk_samples", "n_chunks"):
        if meta[key] < 1:
            raise bad(key, "an integer >= 1", meta[key])
    for i, n in enumerate(meta["chunk_lengths"]):
        if not _is_int(n) or n < 1:
            raise bad(f"chunk_lengths[{i}]", "an integer >= 1 (samples)", n)
    if meta["n_chunks"] != len(meta["chunk_lengths"]):
        raise StoreError(f"{meta_path}: 'n_chunks' is {meta['n_chunks']} but 'chunk_lengths' "
                         f"lists {len(meta['chunk_lengths'])}")
    try:
        dtype = np.dtype(meta["dtype"])
    except TypeError as err:
        raise StoreError(f"{meta_path}: 'dtype' {meta['dtype']!r} is not a numpy dtype") from err
    if dtype.kind not in "iuf":
        raise bad("dtype", "an integer or floating numpy dtype (e.g. 'float32', 'uint8')",
                  meta["dtype"])
    steps = _check_steps(meta["steps"], n_ch, bad, meta_path)
    provenance = meta.get("provenance")
    if provenance is not None and not isinstance(provenance, dict):
        raise bad("provenance", "a JSON object", provenance)

    def _opt(key: str, width: int) -> np.ndarray | None:
        value = meta.get(key)
        if value is None:
            return None
        rows = value if isinstance(value, list) else None
        if rows is None or len(rows) != n_ch:
            raise bad(key, f"a list of {n_ch} [{', '.join('xyz'[:width])}] rows (one per "
                      "channel)", value)
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != width or not all(map(_is_number, row)):
                raise bad(f"{key}[{i}]", f"a list of {width} numbers", row)
        return np.asarray(rows, dtype=np.float64)

    return SessionMeta(
        path=session_dir,
        sfreq=float(meta["sfreq"]),
        ch_names=list(meta["ch_names"]),
        ch_types=list(meta["ch_types"]),
        pos_2d=_opt("pos_2d", 2),
        chunk_samples=int(meta["chunk_samples"]),
        chunk_lengths=[int(n) for n in meta["chunk_lengths"]],
        dtype=str(meta["dtype"]),
        steps=steps,
        pos_3d=_opt("pos_3d", 3),
        ori_3d=_opt("ori_3d", 3),
        provenance=dict(provenance or {}),
        raw=meta,
    )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


#: Parameters of each stage-2 step as ``meta.json`` records them: (key, required, kind);
#: kinds: "str", "number", "positive", "bits", "int", "per_channel" (a number or one per
#: channel), "positive_per_channel". Other keys are allowed and not checked.
_STEP_PARAMS: dict[str, tuple[tuple[str, bool, str], ...]] = {
    "normalize": (("method", False, "str"), ("center", True, "per_channel"),
                  ("scale", True, "positive_per_channel")),
    "clip": (("std_factor", False, "positive"), ("low", False, "per_channel"),
             ("high", False, "per_channel")),
    "mulaw_quantize": (("n_bits", True, "bits"), ("mu", False, "int"),
                       ("scale", False, "positive_per_channel"), ("scale_from", False, "str")),
}


def _check_steps(steps: list, n_ch: int, bad, meta_path: Path) -> list[dict]:
    """Validate the recorded stage-2 steps (see ``preprocessing/transforms.py``)."""
    for i, step in enumerate(steps):
        key = f"steps[{i}]"
        if not isinstance(step, dict) or not isinstance(step.get("name"), str):
            raise bad(key, 'a JSON object with a "name" (e.g. {"name": "normalize", ...})',
                      step)
        name = step["name"]
        if name not in _STEP_PARAMS:
            raise bad(f"{key}.name", f"one of {sorted(_STEP_PARAMS)}", name)
        for param, required, kind in _STEP_PARAMS[name]:
            where = f"{key}.{param}"
            if param not in step:
                if required:
                    raise StoreError(f"{meta_path}: key {where!r} is missing (every {name!r} "
                                     f"step records {param!r})")
                continue
            v = step[param]
            if kind == "str":
                ok, expected = isinstance(v, str), "a string"
            elif kind == "int":
                ok, expected = _is_int(v), "an integer"
            elif kind == "bits":
                ok, expected = _is_int(v) and 1 <= v <= 16, "an integer in [1, 16]"
            elif kind == "positive":
                ok = _is_number(v) and math.isfinite(v) and v > 0
                expected = "a positive number"
            else:
                positive = kind == "positive_per_channel"
                values = v if isinstance(v, list) else [v]
                ok = (len(values) in (1, n_ch) if isinstance(v, list) else True) and all(
                    _is_number(x) and math.isfinite(x) and (x > 0 or not positive)
                    for x in values)
                expected = (f"a {'positive ' if positive else ''}finite number or a list of "
                            f"{n_ch} (one per channel)")
            if not ok:
                raise bad(where, f"{expected} ({name} {param})", v)
        if name == "mulaw_quantize" and "mu" in step and step["mu"] != 2 ** step["n_bits"] - 1:
            raise bad(f"{key}.mu", f"2**n_bits - 1 = {2 ** step['n_bits'] - 1} (mulaw_quantize "
                      f"with n_bits {step['n_bits']})", step["mu"])
    return [dict(s) for s in steps]


def _type_name(typ) -> str:
    if isinstance(typ, tuple):
        return " or ".join(t.__name__ for t in typ)
    return typ.__name__


def load_chunk(meta: SessionMeta, i: int, mmap: bool = True) -> np.ndarray:
    """Open chunk ``i`` of a session, memory-mapped by default, checked against ``meta``.

    Raises :class:`StoreError` naming the file when it is missing, truncated, not a plain
    ``.npy`` array (e.g. a legacy pickled dict), or its shape/dtype disagree with meta.json.
    """
    path = meta.chunk_path(i)
    if not path.is_file():
        raise StoreError(f"chunk file {path} is missing (meta.json lists {meta.n_chunks} chunks)")
    with open(path, "rb") as fh:
        magic = fh.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise StoreError(f"{path} is not a .npy file (it does not start with the NumPy magic "
                         f"bytes; found {magic!r}): corrupt, or written by another program")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        msg = str(err)
        if "pickle" in msg.lower() or "object" in msg.lower():
            raise StoreError(f"{path} holds pickled Python objects, which ephys-gpt never loads. "
                             "If it is a chunk of the original toolkit, convert it once with "
                             "`ephys-gpt convert-legacy`") from err
        raise StoreError(f"{path} is not a readable .npy array (corrupt or truncated?): "
                         f"{msg}") from err
    except (OSError, EOFError) as err:
        raise StoreError(f"{path} is not a readable .npy array (corrupt or truncated?): "
                         f"{err}") from err
    expected = (meta.n_channels, meta.chunk_lengths[i])
    if arr.shape != expected:
        raise StoreError(f"{path}: shape {arr.shape} does not match meta.json "
                         f"(expected {expected}: channels x chunk_lengths[{i}])")
    if arr.dtype != np.dtype(meta.dtype):
        raise StoreError(f"{path}: dtype {arr.dtype} does not match meta.json dtype {meta.dtype}")
    return arr


def list_sessions(root: str | os.PathLike) -> list[SessionMeta]:
    """All complete sessions under ``root`` (sorted by name), validated.

    Folders without ``meta.json`` (interrupted writes) are skipped with a warning; a root that
    does not exist or holds no complete session is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"chunk store {root} does not exist or is not a folder")
    metas = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name.startswith(_TMP_PREFIX):
            continue
        if not (d / META_NAME).is_file():
            logger.warning("skipping %s: no meta.json (incomplete session)", d)
            continue
        metas.append(read_meta(d))
    if not metas:
        raise StoreError(f"chunk store {root} holds no complete session (folders with "
                         "meta.json); run `ephys-gpt preprocess --stage stage_2` first")
    return metas


def check_compatible(metas: Sequence[SessionMeta]) -> None:
    """Raise if sessions cannot share one dataset: a different sampling rate, channel set or
    stage-2 steps (step names, order and settings; per-session statistics may differ, see
    :mod:`ephys_gpt.dataset.compatibility`), or quantized mixed with continuous chunks.

    The error names the first session and one that differs from it, with both values.
    """
    if not metas:
        return
    ref = metas[0]
    for m in metas[1:]:
        if m.is_tokens != ref.is_tokens:
            raise StoreError(f"sessions {ref.path} ({ref.dtype}) and {m.path} ({m.dtype}) mix "
                             "quantized and continuous chunks; one dataset needs one kind")
        diffs = differences(ref, m, (ref.name, m.name))
        if diffs:
            d = diffs[0]
            detail = f"; {d.detail}" if d.detail else ""
            raise StoreError(
                f"sessions {ref.path} and {m.path} cannot share one dataset: different "
                f"{d.what} ({d.first} in {ref.name} vs {d.second} in {m.name}{detail}). "
                "Every session of a dataset needs the same sampling rate, channels and "
                "stage-2 steps; move the sessions made differently to another folder, or "
                "re-run stage 2 on all of them with one preproc_config")


def write_session(root: str | os.PathLike, name: str, chunks: Iterable[np.ndarray],
                  meta: dict[str, Any]) -> Path:
    """Write one session atomically and return its folder.

    ``chunks`` yields (C, T_i) arrays of one dtype. ``meta`` holds at least ``sfreq``,
    ``ch_names``, ``ch_types``, ``pos_2d``, ``chunk_samples``, ``steps`` (and optionally
    ``pos_3d``, ``ori_3d``, ``provenance``); chunk bookkeeping (``n_chunks``,
    ``chunk_lengths``, ``dtype``) and the format fields are filled in here.

    Everything goes to ``<root>/.tmp-<name>-<id>/`` first; ``meta.json`` is written last and
    the folder is renamed to ``<root>/<name>`` only when complete. An existing folder of the
    same name is replaced. If anything fails, the temporary folder is removed.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        lengths, dtype = [], None
        for i, chunk in enumerate(chunks):
            chunk = np.ascontiguousarray(chunk)
            if chunk.ndim != 2:
                raise ValueError(f"chunk {i} of session {name!r} has shape {chunk.shape}; "
                                 "expected (channels, time)")
            if chunk.dtype == object:
                raise ValueError(f"chunk {i} of session {name!r} has dtype object")
            if dtype is None:
                dtype = chunk.dtype
            elif chunk.dtype != dtype:
                raise ValueError(f"chunk {i} of session {name!r} has dtype {chunk.dtype}, "
                                 f"earlier chunks {dtype}")
            if np.issubdtype(chunk.dtype, np.floating) and not np.isfinite(chunk).all():
                raise ValueError(f"chunk {i} of session {name!r} contains NaN or Inf")
            with open(tmp / f"{i}.npy", "wb") as fh:
                np.save(fh, chunk, allow_pickle=False)
            lengths.append(int(chunk.shape[1]))
        if not lengths:
            raise ValueError(f"session {name!r} produced no chunks")
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
                "n_chunks": len(lengths), "chunk_lengths": lengths, "dtype": str(dtype)}
        full.setdefault("provenance", {})
        full["provenance"].setdefault("created", datetime.now(timezone.utc).isoformat())
        write_json_atomic(tmp / META_NAME, full)
        read_meta(tmp)  # refuse to publish anything a reader would reject
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def is_complete(root: str | os.PathLike, name: str) -> bool:
    """True if ``<root>/<name>`` is a finished session (so a re-run can skip it)."""
    return (Path(root) / name / META_NAME).is_file()


def clean_partial(root: str | os.PathLike) -> list[Path]:
    """Remove temporary folders and meta-less session folders left by interrupted runs."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for d in root.iterdir():
        if d.is_dir() and (d.name.startswith(_TMP_PREFIX) or not (d / META_NAME).exists()):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    if removed:
        logger.info("removed %d incomplete session folder(s) under %s", len(removed), root)
    return removed

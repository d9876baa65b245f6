"""The chunk store: stage 2's output and every dataset's input (DESIGN.md, contract 1).

Layout::

    <root>/<session>/meta.json     # written last: its presence marks the session complete
    <root>/<session>/0.npy         # chunk 0, shape (C, T_0), float32 or an integer dtype
    <root>/<session>/1.npy ...

Chunks are plain arrays read with ``mmap_mode="r"`` and ``allow_pickle=False``; nothing here
ever unpickles. A session is written into a hidden temporary folder (``.tmp-<name>-<id>``,
carrying an in-progress marker, see :mod:`ephys_gpt.locking`) and renamed into place only once
complete, so an interrupted run leaves nothing a reader would trust. Cleanup removes only such
folders: anything else under the root (a user's notes, an archived copy) is left alone.

``meta.json`` records each chunk file's size in bytes (``chunk_sizes``) and its SHA-256
(``chunk_checksums``), computed from the bytes as they were written; :func:`check_session`
compares the files with them (``sha256sum <i>.npy`` gives the same digest).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ephys_gpt.compatibility import differences
from ephys_gpt.fileio import DiskFullError, disk_full_error, is_disk_full, write_json_atomic
from ephys_gpt.locking import (
    MARKER_NAME,
    clear_in_progress,
    in_progress,
    mark_in_progress,
    remove_unfinished,
)
from ephys_gpt.validation import describe

logger = logging.getLogger(__name__)

FORMAT = "ephys-gpt-chunks"
FORMAT_VERSION = 1
META_NAME = "meta.json"
_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"^\.tmp-.+-[0-9a-f]{8}$")  # what write_session names its work folders
_NPY_MAGIC = b"\x93NUMPY"
CHECKSUM_ALGORITHM = "sha256"

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
    """Validate the recorded stage-2 steps (see ``ephys_gpt/codec.py``)."""
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


class ChunkDamagedError(StoreError):
    """A chunk file is missing, truncated, or disagrees with its session's meta.json."""


def load_chunk(meta: SessionMeta, i: int, mmap: bool = True) -> np.ndarray:
    """Open chunk ``i`` of a session, memory-mapped by default, checked against ``meta``.

    Raises :class:`StoreError` naming the file when it is not a plain ``.npy`` array (e.g. a
    legacy pickled dict), and :class:`ChunkDamagedError` (with the command that rewrites the
    session) when it is missing, truncated, its shape/dtype disagree with meta.json, or its
    size differs from the one recorded when it was written.
    """
    try:
        return _open_chunk(meta, i, mmap)
    except ChunkDamagedError as err:
        raise ChunkDamagedError(f"{err}. To repair: {repair_advice(meta)}") from err


def _open_chunk(meta: SessionMeta, i: int, mmap: bool) -> np.ndarray:
    path = meta.chunk_path(i)
    if not path.is_file():
        raise ChunkDamagedError(f"chunk file {path} is missing (meta.json lists "
                                f"{meta.n_chunks} chunks)")
    with open(path, "rb") as fh:
        magic = fh.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise ChunkDamagedError(f"{path} is not a .npy file (it does not start with the NumPy "
                                f"magic bytes; found {magic!r}): corrupt, or written by another "
                                "program")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as err:
        msg = str(err)
        if "pickle" in msg.lower() or "object" in msg.lower():
            raise StoreError(f"{path} holds pickled Python objects, which ephys-gpt never loads. "
                             "If it is a chunk of the original toolkit, convert it once with "
                             "`ephys-gpt convert-legacy`") from err
        raise ChunkDamagedError(f"{path} is not a readable .npy array (corrupt or truncated?): "
                                f"{msg}") from err
    except (OSError, EOFError) as err:
        raise ChunkDamagedError(f"{path} is not a readable .npy array (corrupt or truncated?): "
                                f"{err}") from err
    expected = (meta.n_channels, meta.chunk_lengths[i])
    if arr.shape != expected:
        raise ChunkDamagedError(f"{path}: shape {arr.shape} does not match meta.json "
                                f"(expected {expected}: channels x chunk_lengths[{i}])")
    if arr.dtype != np.dtype(meta.dtype):
        raise ChunkDamagedError(f"{path}: dtype {arr.dtype} does not match meta.json dtype "
                                f"{meta.dtype}")
    sizes = meta.raw.get("chunk_sizes")
    if isinstance(sizes, list) and len(sizes) == meta.n_chunks and isinstance(sizes[i], int):
        size = path.stat().st_size
        if size != sizes[i]:
            raise ChunkDamagedError(f"{path} has {size} bytes but meta.json records {sizes[i]} "
                                    "(the file was changed after stage 2 wrote it)")
    return arr


def repair_advice(session: SessionMeta | str | os.PathLike) -> str:
    """The command that rewrites a damaged session (for messages), from what it records.

    Sessions written by stage 2 with their settings recorded are rewritten from their stage-1
    file by ``ephys-gpt check-store <root> --repair``; older stage-2 sessions by re-running
    stage 2 (which detects damaged sessions); converted legacy sessions by converting again.
    """
    if isinstance(session, SessionMeta):
        path, prov = session.path, session.provenance
    else:
        path = Path(session)
        try:
            prov = json.loads((path / META_NAME).read_text()).get("provenance") or {}
        except (OSError, ValueError, AttributeError):
            prov = {}
    root = shlex.quote(str(path.parent))
    if not isinstance(prov, dict):
        prov = {}
    if prov.get("legacy_source"):
        return (f"delete {path} and convert it again from {prov['legacy_source']} with "
                f"`ephys-gpt convert-legacy` into {path.parent}")
    if isinstance(prov.get("stage2_settings"), dict):
        return (f"run `ephys-gpt check-store {root} --repair` (rewrites the damaged sessions "
                "from their stage-1 files)")
    return ("re-run stage 2 with the YAML this store was made with: `ephys-gpt preprocess "
            "--args <preprocess.yaml> --stage stage_2` (it rewrites damaged sessions from their "
            "stage-1 files)")


_reported: set[tuple[str, str]] = set()  # (folder, why) already logged by list_sessions


def _note_once(level: int, folder: Path, why: str, msg: str, *args) -> None:
    key = (str(folder), why)
    if key not in _reported:
        _reported.add(key)
        logger.log(level, msg, *args)


def list_sessions(root: str | os.PathLike) -> list[SessionMeta]:
    """All complete sessions under ``root`` (sorted by name), validated.

    Hidden folders (the writer's temporary folders among them) are ignored. A folder still
    carrying the in-progress marker (an interrupted or running write) is skipped with a
    warning; a folder without ``meta.json`` is not a session (a user's notes, an archived
    copy...) and is skipped with an INFO message, once per folder. A root that does not exist
    or holds no complete session is an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"chunk store {root} does not exist or is not a folder")
    metas = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if d.name.startswith("."):
            continue
        if (d / MARKER_NAME).exists():
            _note_once(logging.WARNING, d, "in-progress",
                       "skipping %s: incomplete (stage 2 was writing it and was interrupted, or "
                       "is still running; re-run stage 2 to finish it)", d)
            continue
        if not (d / META_NAME).is_file():
            _note_once(logging.INFO, d, "not-a-session",
                       "skipping %s: not a session (no meta.json)", d)
            continue
        metas.append(read_meta(d))
    if not metas:
        raise StoreError(f"chunk store {root} holds no complete session (folders with "
                         "meta.json); run `ephys-gpt preprocess --stage stage_2` first")
    return metas


def check_compatible(metas: Sequence[SessionMeta]) -> None:
    """Raise if sessions cannot share one dataset: a different sampling rate, channel set or
    stage-2 steps (step names, order and settings; per-session statistics may differ, see
    :mod:`ephys_gpt.compatibility`), or quantized mixed with continuous chunks.

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
    ``chunk_lengths``, ``dtype``, ``chunk_sizes``, ``chunk_checksums``) and the format fields
    are filled in here.

    Everything goes to ``<root>/.tmp-<name>-<id>/`` first (marked in progress);
    ``meta.json`` is written last and the folder is renamed to ``<root>/<name>`` only when
    complete. An existing ``<root>/<name>`` is replaced only if it is provably a session of
    this store (its ``meta.json`` has ``"format": "ephys-gpt-chunks"``) or an unfinished one
    (it carries the in-progress marker); anything else raises :class:`StoreError` before any
    work. If anything fails, the temporary folder is removed; a full disk is reported as
    :class:`~ephys_gpt.fileio.DiskFullError` naming the file.
    """
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name \
            or os.sep in name or name in ("..",):
        raise ValueError(f"session name must be a plain folder name not starting with '.', "
                         f"got {name!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    _check_replaceable(final)
    tmp = root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    current = final / META_NAME  # the file being written, for a disk-full message
    try:
        mark_in_progress(tmp, session=name)
        lengths, sizes, digests, dtype = [], [], [], None
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
            current = final / f"{i}.npy"
            size, digest = _write_chunk(tmp / f"{i}.npy", chunk)
            lengths.append(int(chunk.shape[1]))
            sizes.append(size)
            digests.append(digest)
        if not lengths:
            raise ValueError(f"session {name!r} produced no chunks")
        current = final / META_NAME
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
                "n_chunks": len(lengths), "chunk_lengths": lengths, "dtype": str(dtype),
                "chunk_sizes": sizes,
                "chunk_checksums": {"algorithm": CHECKSUM_ALGORITHM, "digests": digests}}
        full.setdefault("provenance", {})
        full["provenance"].setdefault("created", datetime.now(timezone.utc).isoformat())
        write_json_atomic(tmp / META_NAME, full)
        read_meta(tmp)  # refuse to publish anything a reader would reject
        _publish(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and is_disk_full(err):
            cause = err.__cause__ if isinstance(err, DiskFullError) and err.__cause__ else err
            raise disk_full_error(current, cause) from cause
        raise
    return final


def _write_chunk(path: Path, array: np.ndarray) -> tuple[int, str]:
    """Write the C-contiguous ``array`` as a ``.npy`` file (exactly what ``np.save`` writes)
    and return its size in bytes and the SHA-256 of those bytes, hashed as they are written."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    digest = hashlib.new(CHECKSUM_ALGORITHM)
    size = 0
    with open(path, "wb") as fh:
        for part in (header.getbuffer(), memoryview(array).cast("B")):
            digest.update(part)
            fh.write(part)
            size += part.nbytes
    return size, digest.hexdigest()


def is_store_session(folder: str | os.PathLike) -> bool:
    """True if ``folder`` holds a ``meta.json`` this store wrote (its ``format`` field)."""
    try:
        meta = json.loads((Path(folder) / META_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _check_replaceable(final: Path) -> None:
    """Raise unless ``final`` is absent, a session of this store, or one left unfinished."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise StoreError(f"{final} exists and is not a session folder of this store; it was "
                         "left as it is. Move or rename it so that the session can be written")
    if final.exists() and in_progress(final) is None and not is_store_session(final):
        raise StoreError(f"{final} exists but is not a session written by ephys-gpt (no "
                         f"meta.json with \"format\": \"{FORMAT}\"); it was left as it is. "
                         "Move or rename it (or write to another folder) so that the session "
                         "can be written")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` onto ``final``, replacing an older version of the session.

    The older version is first marked in progress and renamed to a temporary name, so a crash
    at any point leaves either a complete session or folders that the next
    :func:`clean_partial` recognises as unfinished.
    """
    old = None
    if final.exists() or final.is_symlink():
        _check_replaceable(final)
        mark_in_progress(final, replacing=True)
        old = final.with_name(f"{_TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    clear_in_progress(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        logger.info("replaced session %s (its previous version was removed)", final)


def is_complete(root: str | os.PathLike, name: str) -> bool:
    """True if ``<root>/<name>`` is a finished session (so a re-run can skip it)."""
    folder = Path(root) / name
    return (folder / META_NAME).is_file() and not (folder / MARKER_NAME).exists()


def clean_partial(root: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes of this store left under ``root``; return the folders.

    Removed: folders carrying the in-progress marker (unless the process that wrote it still
    runs on this host), and empty folders with the writer's temporary names (a crash right
    after creating one). Anything else (a user's folder, with or without ``meta.json``) is
    never touched. Each removal is logged with the path and who left it.
    """
    root = Path(root)
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for d in sorted(root.iterdir()):
        if d.is_symlink() or not d.is_dir():
            continue
        record = in_progress(d)
        if record is None:
            if _TMP_NAME.match(d.name) and not any(d.iterdir()):
                d.rmdir()
                removed.append(d)
                logger.info("removed the empty temporary folder %s (left by an interrupted run)",
                            d)
            continue
        if remove_unfinished(d, record, "unfinished work of an interrupted run", logger):
            removed.append(d)
    return removed


# -- verification ------------------------------------------------------------------------------
@dataclass
class SessionCheck:
    """What :func:`check_session` found for one session folder.

    ``level``: how deeply the chunks were checked: ``"checksums"`` (sizes and SHA-256 of
    every byte), ``"sizes"`` (file sizes against meta.json), ``"structure"`` (sessions
    written before sizes were recorded: each chunk's header, shape, dtype and file length) or
    ``"meta"`` (meta.json itself could not be read). ``ours``: meta.json carries this store's
    format field, so the toolkit may rewrite the session.
    """

    path: Path
    problems: list[str] = field(default_factory=list)
    level: str = "sizes"
    ours: bool = True
    n_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def name(self) -> str:
        return self.path.name


def recorded_files(meta: SessionMeta) -> tuple[list[int] | None, list[str] | None, str | None]:
    """``(chunk_sizes, digests, algorithm)`` recorded in ``meta`` (None where not recorded,
    i.e. a store written before they were). Malformed records raise :class:`StoreError`."""
    raw, where = meta.raw, meta.path / META_NAME
    sizes = raw.get("chunk_sizes")
    if sizes is not None and (not isinstance(sizes, list) or len(sizes) != meta.n_chunks or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)):
        raise StoreError(f"{where}: 'chunk_sizes' should be a list of {meta.n_chunks} byte "
                         f"counts, found {sizes!r:.80}")
    sums = raw.get("chunk_checksums")
    if sums is None:
        return sizes, None, None
    algo = sums.get("algorithm") if isinstance(sums, dict) else None
    digests = sums.get("digests") if isinstance(sums, dict) else None
    if algo not in hashlib.algorithms_guaranteed or not isinstance(digests, list) \
            or len(digests) != meta.n_chunks or not all(isinstance(d, str) for d in digests):
        raise StoreError(f"{where}: 'chunk_checksums' should be {{\"algorithm\": <a hashlib "
                         f"name>, \"digests\": [{meta.n_chunks} hex strings]}}, found "
                         f"{sums!r:.80}")
    return sizes, digests, algo


def file_digest(path: str | os.PathLike, algorithm: str = CHECKSUM_ALGORITHM) -> str:
    """Hex digest of the whole file ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.new(algorithm)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def check_session(session_dir: str | os.PathLike, *, checksums: bool = True) -> SessionCheck:
    """Compare a complete session's chunk files with what its meta.json recorded.

    Sizes are always compared (one ``stat`` per chunk); ``checksums`` also reads every byte
    and compares the SHA-256. Sessions written before sizes were recorded get the structural
    check of :func:`load_chunk` plus an exact file length (and, with ``checksums``, a scan
    of float chunks for NaN/Inf, which stage 2 never writes). Never raises for a damaged session:
    the problems are listed in the result.
    """
    path = Path(session_dir)
    try:
        meta = read_meta(path)
    except StoreError as err:
        return SessionCheck(path, [str(err)], level="meta", ours=is_store_session(path))
    check = SessionCheck(path, ours=meta.raw.get("format") == FORMAT)
    try:
        sizes, digests, algo = recorded_files(meta)
    except StoreError as err:
        check.problems.append(str(err))
        check.level = "meta"
        return check
    if sizes is None:
        check.level = "structure"
        for i in range(meta.n_chunks):
            try:
                arr = _open_chunk(meta, i, mmap=True)
                size = meta.chunk_path(i).stat().st_size
                expected = int(getattr(arr, "offset", 0)) + arr.nbytes
                check.n_bytes += size
                if size != expected:
                    check.problems.append(f"chunk {i} ({i}.npy): {size} bytes, its header "
                                          f"and meta.json make {expected}")
                elif checksums and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                    # no checksum to compare with: the thorough check reads the values
                    check.problems.append(f"chunk {i} ({i}.npy): contains NaN or Inf, which "
                                          "stage 2 never writes")
                del arr
            except StoreError as err:
                check.problems.append(f"chunk {i}: {err}")
        return check
    check.level = "checksums" if checksums and digests is not None else "sizes"
    for i, expected in enumerate(sizes):
        chunk = meta.chunk_path(i)
        try:
            size = chunk.stat().st_size
        except FileNotFoundError:
            check.problems.append(f"chunk {i} ({chunk.name}): missing")
            continue
        check.n_bytes += size
        if size != expected:
            check.problems.append(f"chunk {i} ({chunk.name}): {size} bytes, meta.json records "
                                  f"{expected}")
        elif check.level == "checksums" and file_digest(chunk, algo) != digests[i]:
            check.problems.append(f"chunk {i} ({chunk.name}): {algo} differs from meta.json "
                                  "(its content changed after it was written)")
    return check


def session_folders(root: str | os.PathLike) -> list[Path]:
    """The folders of ``root`` that :func:`list_sessions` reads (complete sessions, sorted),
    without validating them."""
    root = Path(root)
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and (d / META_NAME).is_file() and not (d / MARKER_NAME).exists())


def verify_store(root: str | os.PathLike, *, checksums: bool = True, progress: bool = True
                 ) -> list[SessionCheck]:
    """:func:`check_session` for every complete session under ``root`` (a progress bar over
    the sessions). Sessions written before sizes and checksums were recorded are checked for
    structure, and a log message says so."""
    from tqdm.auto import tqdm

    root = Path(root)
    if not root.is_dir():
        raise StoreError(f"chunk store {root} does not exist or is not a folder")
    folders = session_folders(root)
    if not folders:
        raise StoreError(f"{root} holds no complete session (folders with meta.json): is it "
                         "a chunk store (`<save_folder>/chunks`)?")
    checks = [check_session(d, checksums=checksums)
              for d in tqdm(folders, desc="checking sessions", unit="session",
                            disable=not progress)]
    old = [c.name for c in checks if c.level == "structure"]
    if old:
        logger.info("%d session(s) were written before ephys-gpt recorded chunk sizes and "
                    "checksums (%s%s): their chunks were checked for structure only (header, "
                    "shape, dtype, file length%s). They keep working; rewrite them (delete "
                    "and re-run stage 2) to have them fully verified", len(old),
                    ", ".join(old[:3]), ", ..." if len(old) > 3 else "",
                    ", finite values" if checksums else "")
    return checks

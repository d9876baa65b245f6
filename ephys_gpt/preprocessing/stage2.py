"""Stage 2: stage-1 ``*_preproc-raw.fif`` -> normalized (optionally mu-law) chunks in the store.

Per session:

1. Read the file with MNE, keep the ``picks`` channels (MEG by default) and load them.
2. Bad channels (``info['bads']``): ``interpolate`` (MNE field/spline interpolation, the
   default), ``zero`` (set to 0), or ``keep``. Channels are never dropped, so every session of
   one system keeps the same channel set and can share a dataset.
3. Bad segments: annotations whose description starts with ``bad`` (MNE's convention, e.g.
   osl-ephys's ``bad_segment_mag``) are cut out. The recording splits into good spans; chunks
   are cut inside each span, so a chunk never straddles a bad segment or the gap it leaves.
   Leftovers shorter than ``min_chunk_seconds`` at the end of a span are dropped. Statistics
   come from good samples only.
4. The stage-2 steps in the configured order, each recorded in ``meta.json`` in the format of
   :mod:`ephys_gpt.codec`, so :func:`~ephys_gpt.codec.invert_steps`
   maps chunks back to stage-1 units:

   - ``normalize``: per-channel ``(x - center) / scale``; ``robust`` (median, IQR/1.349) or
     ``zscore`` (mean, std), from the session's good samples.
   - ``clip``: per-channel ``[mean - s*std, mean + s*std]`` of the data after the previous
     steps (good samples), ``s = std_factor``.
   - ``mulaw_quantize``: tokens in ``[0, 2**n_bits - 1]`` of ``x / scale``; ``scale`` is the
     configured value, else the largest clip bound (``max |low|, |high|`` over channels) when
     ``clip`` comes right before, else the largest ``|x|`` over good samples (recorded as
     ``scale_from``: ``config``, ``clip`` or ``data``).

5. Cut into ``chunk_seconds`` chunks and write with :func:`ephys_gpt.store.write_session`
   (atomic; ``meta.json`` last, with each chunk's size and SHA-256).

Re-runs skip finished sessions after checking their chunk files against the sizes recorded
in ``meta.json`` (``verify=True``: also the checksums); a damaged session is rewritten from its
stage-1 file. The chunk store is locked for the run (:class:`ephys_gpt.locking.FolderLock`),
and only the toolkit's own unfinished folders are cleaned up. :func:`repair_store` rewrites
damaged sessions from what each one recorded (``ephys-gpt check-store DIR --repair``).

Sessions run in parallel in a process pool when ``n_workers > 1``; a failing session is
reported with its reason and does not stop the others, except a full disk, which stops the
sessions not yet started.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import ephys_gpt
from ephys_gpt import store
from ephys_gpt.codec import fit_steps
from ephys_gpt.fileio import DiskFullError, as_json, read_json_field
from ephys_gpt.locking import FolderLock, describe_holder, in_progress
from ephys_gpt.preprocessing.parallel import dask_client
from ephys_gpt.preprocessing.result import RunResult
from ephys_gpt.preprocessing.sensors import channel_metadata

logger = logging.getLogger(__name__)

OUTPUT_SUFFIX = "_preproc-raw.fif"
RECORDING_SUFFIX = "_recording.json"


@dataclass(frozen=True)
class Stage2Settings:
    """How stage 2 turns one cleaned recording into chunks.

    Attributes
    ----------
    steps : dict
        Ordered ``{step_name: params}`` (``normalize``, ``clip``, ``mulaw_quantize``), as in the
        YAML's ``preproc_config``.
    chunk_seconds : float
        Chunk length in seconds.
    min_chunk_seconds : float
        Shortest leftover kept at the end of a good span.
    picks : str
        MNE channel selection (``"meg"``, ``"mag"``, ``"grad"``, ``"eeg"``, ``"data"``).
    bad_channels : str
        ``"interpolate"``, ``"zero"`` or ``"keep"``.
    """

    steps: dict[str, dict] = field(default_factory=lambda: {
        "normalize": {"method": "robust"}, "clip": {"std_factor": 6.0}})
    chunk_seconds: float = 10.0
    min_chunk_seconds: float = 1.0
    picks: str = "meg"
    bad_channels: str = "interpolate"

    def __post_init__(self):
        if self.chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be > 0, got {self.chunk_seconds!r}")
        if self.bad_channels not in ("interpolate", "zero", "keep"):
            raise ValueError("bad_channels must be 'interpolate', 'zero' or 'keep', got "
                             f"{self.bad_channels!r}")
        names = list(self.steps)
        for n in names:
            if n not in ("normalize", "clip", "mulaw_quantize"):
                raise ValueError(f"unknown stage-2 step {n!r}; allowed: normalize, clip, "
                                 "mulaw_quantize")
        if "mulaw_quantize" in names and names[-1] != "mulaw_quantize":
            raise ValueError("'mulaw_quantize' must be the last stage-2 step")

    def record(self) -> dict[str, Any]:
        """The settings as plain JSON (kept in each session's ``meta.json``)."""
        return as_json(asdict(self))


def settings_change(recorded: dict | None, now: dict[str, Any]) -> list[str]:
    """``["key: old -> new", ...]`` where ``recorded`` (from a ``meta.json``) differs from
    ``now`` (:meth:`Stage2Settings.record`); empty when they match or nothing was recorded
    (older stores)."""
    if not isinstance(recorded, dict):
        return []
    return [f"{k}: {recorded.get(k)!r} -> {now[k]!r}" for k in now
            if k in recorded and recorded[k] != now[k]]


def session_name(fif: str | os.PathLike) -> str:
    """``.../<name>_preproc-raw.fif`` -> ``<name>`` (the chunk store session folder)."""
    name = Path(fif).name
    for suffix in (OUTPUT_SUFFIX, "_raw.fif", "-raw.fif", "_meg.fif", ".fif"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(fif).stem


def _provenance(fif: Path) -> dict[str, Any]:
    """Subject/session/task of a stage-1 file: from stage 1's JSON, else from the name."""
    side = fif.with_name(session_name(fif) + RECORDING_SUFFIX)
    if side.is_file():
        import json

        try:
            rec = json.loads(side.read_text())
            return {"source_file": rec.get("path"), "subject": rec.get("subject"),
                    "session": rec.get("session"), "task": rec.get("task")}
        except (json.JSONDecodeError, OSError):
            logger.warning("ignoring unreadable %s", side)
    ent = dict(re.findall(r"(?:^|_)(sub|ses|task)-([a-zA-Z0-9]+)", session_name(fif)))
    return {"source_file": None, "subject": ent.get("sub"), "session": ent.get("ses"),
            "task": ent.get("task")}


def good_mask(raw) -> tuple[np.ndarray, list[list[float]]]:
    """Boolean mask (T,) of samples outside ``bad*`` annotations, and those spans in seconds
    (relative to the first sample)."""
    n = raw.n_times
    mask = np.ones(n, dtype=bool)
    spans = []
    ann = raw.annotations
    for onset, duration, desc in zip(ann.onset, ann.duration, ann.description):
        if not str(desc).lower().startswith("bad"):
            continue
        start = raw.time_as_index(onset, use_rounding=True, origin=ann.orig_time)[0]
        stop = raw.time_as_index(onset + duration, use_rounding=True, origin=ann.orig_time)[0]
        start, stop = max(int(start), 0), min(int(stop), n)
        if stop <= start and duration > 0:
            continue
        stop = max(stop, start + 1)  # a zero-length bad annotation still removes its sample
        mask[start:stop] = False
        spans.append([start / raw.info["sfreq"], stop / raw.info["sfreq"]])
    return mask, spans


def good_spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` index ranges of the True runs of ``mask``."""
    padded = np.r_[False, mask, False].astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def chunk_bounds(spans: Sequence[tuple[int, int]], chunk: int, min_len: int
                 ) -> list[tuple[int, int]]:
    """Cut each good span into ``chunk``-sample pieces; keep leftovers of >= ``min_len``."""
    out = []
    for a, b in spans:
        for s in range(a, b, chunk):
            e = min(s + chunk, b)
            if e - s >= max(min_len, 1):
                out.append((s, e))
    return out


def process_session(fif: str | os.PathLike, out_root: str | os.PathLike,
                    settings: Stage2Settings, name: str | None = None) -> Path:
    """Turn one stage-1 file into a chunk-store session; returns its folder.

    Raises ValueError naming the file when MNE cannot read it, it has no channels of
    ``settings.picks``, it contains NaN/Inf, or no good data is left after bad segments.
    """
    import mne

    fif = Path(fif)
    name = name or session_name(fif)
    if not fif.is_file():
        raise FileNotFoundError(f"stage-1 file {fif} does not exist")
    try:
        with mne.utils.use_log_level("ERROR"):
            raw = mne.io.read_raw_fif(fif, preload=False)
    except Exception as err:  # MNE raises many types for corrupt files
        raise ValueError(f"{fif}: MNE cannot read it as a raw .fif file: "
                         f"{type(err).__name__}: {err}") from None
    try:
        with mne.utils.use_log_level("ERROR"):
            raw.pick(settings.picks, exclude=[])
    except ValueError as err:
        raise ValueError(f"{fif}: no channels match picks={settings.picks!r} "
                         f"({err}); channel types present: "
                         f"{sorted(set(raw.get_channel_types()))}") from None
    with mne.utils.use_log_level("ERROR"):
        raw.load_data()
    sfreq = float(raw.info["sfreq"])
    bads = [b for b in raw.info["bads"] if b in raw.ch_names]
    if bads and settings.bad_channels == "interpolate":
        try:
            with mne.utils.use_log_level("ERROR"):
                raw.interpolate_bads(reset_bads=True, mode="fast")
        except Exception as err:
            raise ValueError(f"{fif}: could not interpolate bad channels {bads}: {err}; "
                             "set bad_channels: zero or keep") from None
    data = raw.get_data()  # (C, T) float64
    if bads and settings.bad_channels == "zero":
        data[[raw.ch_names.index(b) for b in bads]] = 0.0
    # checked after interpolation (NaN in a good channel would also spread into the
    # interpolated ones, which are then listed after it)
    finite = np.isfinite(data).all(axis=1)
    if not finite.all():
        nonfinite = [raw.ch_names[i] for i in np.flatnonzero(~finite)]
        first = [c for c in nonfinite if c not in bads] + [c for c in nonfinite if c in bads]
        raise ValueError(f"{fif}: the data contains NaN or Inf (channels {first[:5]}"
                         f"{' ...' if len(first) > 5 else ''}); fix or exclude this recording")
    mask, bad_spans = good_mask(raw)
    n_good = int(mask.sum())
    chunk = max(int(round(settings.chunk_seconds * sfreq)), 1)
    min_len = int(round(settings.min_chunk_seconds * sfreq))
    bounds = chunk_bounds(good_spans(mask), chunk, min_len)
    if not bounds:
        raise ValueError(f"{fif}: no good segment of at least {settings.min_chunk_seconds} s "
                         f"({n_good} of {raw.n_times} samples outside bad annotations)")
    sensors = channel_metadata(raw.info)
    n_times = raw.n_times
    x = data.astype(np.float32)  # (C, T); stage 2 works in float32 from here on
    del data, raw
    x, steps, finish = fit_steps(x, mask, settings.steps, sensors["ch_types"])
    meta = {
        "sfreq": sfreq,
        **sensors,
        "chunk_samples": chunk,
        "steps": steps,
        "provenance": {
            **_provenance(fif),
            "stage1_file": str(fif),
            "recording": name,
            "ephys_gpt_version": ephys_gpt.__version__,
            "bad_channels": bads,
            "bad_channel_handling": settings.bad_channels,
            "stage2_settings": settings.record(),
            "bad_segments_seconds": bad_spans,
            "samples_total": int(n_times),
            "samples_in_chunks": int(sum(b - a for a, b in bounds)),
            "chunk_starts": [int(a) for a, _ in bounds],
        },
    }

    def chunks() -> Iterator[np.ndarray]:
        for a, b in bounds:
            yield finish(x[:, a:b])

    return store.write_session(out_root, name, chunks(), meta)


def _process_one(fif: str, out_root: str, settings: Stage2Settings, name: str) -> str:
    """Process-pool entry point (module level so it pickles by reference)."""
    return str(process_session(fif, out_root, settings, name))


def run_stage2(inputs: Sequence[str | os.PathLike], out_root: str | os.PathLike,
               settings: Stage2Settings | None = None, *, n_workers: int = 1,
               progress: bool = True, verify: bool = False,
               lock_timeout: float | None = 0.0, dask_scheduler: str | None = None) -> RunResult:
    """Run stage 2 over stage-1 files ``inputs`` into the chunk store ``out_root``.

    Finished sessions are skipped when their chunk files match the sizes recorded in
    ``meta.json`` (``verify``: also their SHA-256); damaged ones are rewritten from their
    stage-1 file (listed in ``result.repaired``). Unfinished folders of interrupted runs are
    removed first; anything else under ``out_root`` is left alone, and a folder in the way of a
    session is reported, not replaced. ``out_root`` is locked for the run: another run holding
    it makes this one wait up to ``lock_timeout`` seconds (None: as long as it takes) and then
    raise :class:`~ephys_gpt.locking.FolderLockedError`. Failures of single sessions are
    collected in the result with their reason, never raised. Sessions run in a process pool
    of ``n_workers``, or on the Dask cluster at ``dask_scheduler``
    (:mod:`ephys_gpt.preprocessing.parallel`).
    """
    settings = settings or Stage2Settings()
    out_root = Path(out_root)
    with FolderLock(out_root, timeout=lock_timeout, what="chunk store"):
        store.clean_partial(out_root)
        result = RunResult()
        todo, repairs = _plan(inputs, out_root, settings, verify, result)
        _write_sessions(todo, repairs, out_root, settings, n_workers, progress, result,
                        dask_scheduler)
    logger.info("stage 2: %d written, %d skipped, %d failed", len(result.written),
                len(result.skipped), len(result.failed))
    return result


def _plan(inputs: Sequence[str | os.PathLike], out_root: Path, settings: Stage2Settings,
          verify: bool, result: RunResult) -> tuple[list[tuple[str, str]], set[str]]:
    """``[(stage-1 file, session name)]`` to write and the names among them that replace a
    damaged session; skipped and refused ones go to ``result``."""
    todo: list[tuple[str, str]] = []
    repairs: set[str] = set()
    names: dict[str, Path] = {}
    now = settings.record()
    for fif in inputs:
        name = session_name(fif)
        folder = out_root / name
        if name in names:
            result.failed[name] = (f"{fif}: another stage-1 file ({names[name]}) maps to the same "
                                   "session name")
            continue
        names[name] = Path(fif)
        if store.is_complete(out_root, name):
            change = settings_change(read_json_field(
                folder / store.META_NAME, "provenance", "stage2_settings"), now)
            if change:
                result.failed[name] = (
                    f"{folder} is complete but was written with other stage-2 "
                    f"settings ({'; '.join(change)}); it was left as it is. Delete it (or the "
                    "whole chunks folder) to rebuild with the new settings, or write to "
                    "another save_folder")
                continue
            check = store.check_session(folder, checksums=verify)
            if check.ok:
                result.skipped.append(name)
            elif not check.ours:
                result.failed[name] = (
                    f"{folder} is damaged ({'; '.join(check.problems[:3])}) but its meta.json "
                    "does not show that ephys-gpt wrote it, so it was left as it is; delete it "
                    "to let stage 2 write the session again")
            else:
                logger.warning("%s is damaged (%s); rewriting it from %s", folder,
                               "; ".join(check.problems[:3]), fif)
                repairs.add(name)
                todo.append((str(fif), name))
        elif (marker := in_progress(folder)) is not None:
            result.failed[name] = (f"{folder} is being written by {describe_holder(marker)}; "
                                   "it was left alone")
        elif folder.exists() or folder.is_symlink():
            result.failed[name] = (
                f"{folder} exists but is not a session written by ephys-gpt (no meta.json); it "
                "was left as it is. Move or rename it so that stage 2 can write this session")
        else:
            todo.append((str(fif), name))
    if result.skipped:
        logger.info("stage 2: %d session(s) already complete, skipping", len(result.skipped))
    return todo, repairs


def _executor(n_workers: int, n_todo: int, dask_scheduler: str | None):
    """A concurrent.futures executor: the Dask cluster at ``dask_scheduler``, else a pool of
    ``n_workers`` spawned processes."""
    if dask_scheduler:
        stack = ExitStack()
        client = stack.enter_context(dask_client(n_workers, dask_scheduler))
        return stack, stack.enter_context(client.get_executor())
    ctx = get_context("spawn")  # no fork of a process holding torch/BLAS threads
    pool = ProcessPoolExecutor(max_workers=min(n_workers, n_todo), mp_context=ctx)
    return pool, pool


def _write_sessions(todo: list[tuple[str, str]], repairs: set[str], out_root: Path,
                    settings: Stage2Settings, n_workers: int, progress: bool,
                    result: RunResult, dask_scheduler: str | None = None) -> None:
    """Write the ``todo`` sessions (in parallel when ``n_workers > 1`` or on a Dask cluster)
    into ``result``; after a full disk, the sessions not started yet are reported instead of
    attempted."""
    bar = tqdm(total=len(todo), desc="stage 2 (chunks)", unit="session", disable=not progress)
    if dask_scheduler or (n_workers > 1 and len(todo) > 1):
        context, pool = _executor(n_workers, len(todo), dask_scheduler)
        with context:
            futures = {pool.submit(_process_one, f, str(out_root), settings, n): n
                       for f, n in todo}
            for fut in as_completed(futures):
                if fut.cancelled():
                    continue
                name = futures[fut]
                err = fut.exception()
                _record(result, name, err, None if err else fut.result(), repairs)
                if isinstance(err, DiskFullError):
                    for other in futures:
                        other.cancel()  # only those not started yet
                bar.update()
        not_started = [n for fut, n in futures.items() if fut.cancelled()]
    else:
        not_started = []
        for k, (f, name) in enumerate(todo):
            try:
                path = process_session(f, out_root, settings, name)
            except Exception as err:  # reported at the end; the other sessions go on
                _record(result, name, err, None, repairs)
                if isinstance(err, DiskFullError):
                    not_started = [n for _, n in todo[k + 1:]]
                    break
            else:
                _record(result, name, None, path, repairs)
            bar.update()
    bar.close()
    if not_started:
        logger.error("stage 2: the disk is full; %d session(s) were not started",
                     len(not_started))
        for name in not_started:
            result.failed[name] = ("not started: the disk is full (see the other failures); "
                                   "free some space and run stage 2 again")


def _record(result: RunResult, name: str, err: BaseException | None, written, repairs=()
            ) -> None:
    """Add one session's outcome: its error, or the folder it was ``written`` to."""
    if err is None:
        result.written.append(Path(written))
        if name in repairs:
            result.repaired.append(name)
        return
    result.failed[name] = str(err)
    logger.error("stage 2 failed for %s: %s", name, err)


def recorded_settings(meta: store.SessionMeta) -> Stage2Settings:
    """The :class:`Stage2Settings` a session was written with (its
    ``provenance.stage2_settings``); ValueError when they were not recorded."""
    rec = meta.provenance.get("stage2_settings")
    if not isinstance(rec, dict):
        raise ValueError(f"{meta.path / store.META_NAME} does not record the stage-2 settings it "
                         "was written with (written before they were recorded); "
                         f"{store.repair_advice(meta)}")
    known = {f.name for f in fields(Stage2Settings)}
    try:
        return Stage2Settings(**{k: v for k, v in rec.items() if k in known})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{meta.path / store.META_NAME}: the recorded stage-2 settings cannot "
                         f"be used again: {err}") from None


def recorded_stage1_file(meta: store.SessionMeta) -> Path:
    """The stage-1 file a session was made from: the recorded path, else the same recording
    in the ``stage1`` folder beside the store (a save_folder that was moved as a whole)."""
    prov = meta.provenance
    recording = str(prov.get("recording") or meta.name)
    candidates = [Path(prov["stage1_file"])] if prov.get("stage1_file") else []
    candidates.append(meta.path.parent.parent / "stage1" / recording / f"{recording}{OUTPUT_SUFFIX}")
    for fif in candidates:
        if fif.is_file():
            return fif
    raise FileNotFoundError(f"the stage-1 file of {meta.path} is gone (looked for "
                            f"{' and '.join(str(c) for c in candidates)}); run stage 1 again "
                            "(`ephys-gpt preprocess --args <preprocess.yaml>`), which also "
                            "rewrites damaged sessions")


def rewrite_session(session_dir: str | os.PathLike) -> Path:
    """Write a session again from the stage-1 file and stage-2 settings its meta.json records
    (stage 2 is deterministic: the chunks come out as they were first written).

    Raises ValueError/FileNotFoundError saying why when the session cannot be rewritten:
    meta.json unreadable or not written by ephys-gpt, a converted legacy session, settings not
    recorded, or the stage-1 file gone.
    """
    session_dir = Path(session_dir)
    if not store.is_store_session(session_dir):
        raise ValueError(f"{session_dir / store.META_NAME} is unreadable or was not written by "
                         f"ephys-gpt, so the session cannot be rewritten from it; delete "
                         f"{session_dir} and re-run stage 2")
    meta = store.read_meta(session_dir)
    if meta.provenance.get("legacy_source"):
        raise ValueError(f"{session_dir} was converted from the original toolkit's chunks "
                         f"({meta.provenance['legacy_source']}); {store.repair_advice(meta)}")
    settings = recorded_settings(meta)
    fif = recorded_stage1_file(meta)
    return process_session(fif, session_dir.parent, settings, meta.name)


def repair_store(root: str | os.PathLike, *, checksums: bool = True, progress: bool = True,
                 lock_timeout: float | None = 0.0
                 ) -> tuple[list[store.SessionCheck], RunResult]:
    """Check every session of the chunk store ``root`` and rewrite the damaged ones with
    :func:`rewrite_session` (what ``ephys-gpt check-store DIR --repair`` runs).

    The store is locked meanwhile and unfinished folders of interrupted runs are removed.
    Returns the checks (as found, before repair) and the rewrites (``written``/``failed``).
    """
    root = Path(root)
    result = RunResult()
    with FolderLock(root, timeout=lock_timeout, what="chunk store"):
        store.clean_partial(root)
        checks = store.verify_store(root, checksums=checksums, progress=progress)
        damaged = [c for c in checks if not c.ok]
        for check in tqdm(damaged, desc="rewriting damaged sessions", unit="session",
                          disable=not progress or not damaged):
            try:
                result.written.append(rewrite_session(check.path))
                result.repaired.append(check.name)
                logger.info("rewrote %s", check.path)
            except (ValueError, OSError) as err:
                result.failed[check.name] = str(err)
    return checks, result

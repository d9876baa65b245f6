"""Stage 1: clean raw recordings with osl-ephys (filter, notch, resample, bad segments/channels).

Every recording found by discovery goes through :func:`osl_ephys.preprocessing.run_proc_batch`
with either the built-in recipe (:func:`default_recipe`) or the user's osl-ephys YAML. Output,
one folder per recording::

    <stage1>/<name>/<name>_preproc-raw.fif   # osl-ephys output (bad segments as annotations,
                                             # bad channels in info['bads'])
    <stage1>/<name>/<name>_recording.json    # subject, session, task, source file (for stage 2)
    <stage1>/logs/                           # osl-ephys logs; <name>_preproc.error.log on failure
    <stage1>/report/                         # osl-ephys HTML report (gen_report: true)

osl-ephys writes into a hidden temporary folder (``.tmp-<id>``, carrying the toolkit's
in-progress marker), and each finished recording folder is renamed into place, so an
interrupted run leaves no half-written ``_preproc-raw.fif`` that a re-run would mistake for a
finished one. Re-runs skip recordings whose output exists and remove only such marked
temporary folders; a folder in the way of a recording's output is reported, never replaced.
The folder is locked for the run (:class:`ephys_gpt.locking.FolderLock`). A recording that
fails does not stop the others; failures come back with osl-ephys's reason.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

import ephys_gpt
from ephys_gpt._optional import require
from ephys_gpt.fileio import as_json, read_json_field, write_json_atomic
from ephys_gpt.locking import (
    FolderLock,
    in_progress,
    mark_in_progress,
    remove_unfinished,
)
from ephys_gpt.preprocessing.config import RecipeConfig, check_recipe_filters
from ephys_gpt.preprocessing.discovery import Recording
from ephys_gpt.preprocessing.parallel import dask_client
from ephys_gpt.preprocessing.result import RunResult

logger = logging.getLogger(__name__)

OUTPUT_SUFFIX = "_preproc-raw.fif"
RECORDING_SUFFIX = "_recording.json"
_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"^\.tmp-[0-9a-f]{8}$")  # run_stage1's work folder


def notch_below_nyquist(dataset: dict, userargs: dict) -> dict:
    """osl-ephys recipe step: notch ``freqs`` (list or space-separated string), skipping any at
    or above the recording's Nyquist frequency (e.g. 100 Hz at 150 Hz sampling)."""
    import numpy as np

    userargs = dict(userargs)
    target = userargs.pop("target", "raw")
    freqs = userargs.pop("freqs", [50.0, 100.0])
    if isinstance(freqs, str):
        freqs = freqs.split()
    freqs = np.atleast_1d(np.asarray(freqs, dtype=float))
    nyquist = dataset[target].info["sfreq"] / 2.0
    keep = freqs[freqs < nyquist]
    if keep.size:
        dataset[target].notch_filter(keep, **userargs)
    return dataset


def detect_flat_channels(dataset: dict, userargs: dict) -> dict:
    """osl-ephys recipe step: add dead (flat) channels to ``info['bads']``.

    A channel is flat when its standard deviation is below ``rel_threshold`` (default 1e-3)
    times the median of its channel type's. osl-ephys's GESD channel test looks for outliers
    in a distribution of standard deviations that spans orders of magnitude across sensors,
    and can miss a single dead sensor; this check cannot.
    """
    import numpy as np

    raw = dataset[userargs.get("target", "raw")]
    rel = float(userargs.get("rel_threshold", 1e-3))
    types = np.array(raw.get_channel_types())
    std = raw.get_data().std(axis=1)
    new = []
    for kind in np.unique(types):
        idx = np.flatnonzero(types == kind)
        ref = np.median(std[idx])
        new += [raw.ch_names[i] for i in idx if std[i] <= rel * ref]
    raw.info["bads"] = list(dict.fromkeys([*raw.info["bads"], *new]))
    if new:
        logger.debug("flat channels: %s", new)
    return dataset


EXTRA_FUNCS = [notch_below_nyquist, detect_flat_channels]


def default_recipe(params: RecipeConfig | None = None) -> dict[str, Any]:
    """The built-in osl-ephys recipe as a config dict.

    Band-pass (zero-phase 5th-order Butterworth IIR), notch at the line frequencies below
    Nyquist, resample, then bad segments (GESD on the standard deviation of windows of
    ``bad_segment_seconds``; magnetometers and gradiometers separately, as osl-ephys
    recommends) and bad channels (dead sensors via :func:`detect_flat_channels`, then GESD
    across channels). Bad segments become ``bad_segment_*``
    annotations and bad channels go to ``info['bads']``; stage 2 acts on both.
    """
    p = params or RecipeConfig()
    steps: list[dict[str, Any]] = []
    if p.l_freq is not None or p.h_freq is not None:
        steps.append({"filter": {"l_freq": p.l_freq, "h_freq": p.h_freq, "method": "iir",
                                 "iir_params": {"order": 5, "ftype": "butter"}}})
    if p.notch_freqs:
        steps.append({"notch_below_nyquist": {"freqs": list(p.notch_freqs)}})
    steps.append({"resample": {"sfreq": p.sfreq}})
    seg = max(int(round(p.bad_segment_seconds * p.sfreq)), 2)
    if p.detect_bad_segments:
        for picks in ("mag", "grad"):
            steps.append({"bad_segments": {"segment_len": seg, "picks": picks,
                                           "significance_level": p.significance_level}})
    if p.detect_bad_channels:
        steps.append({"detect_flat_channels": {"rel_threshold": 1e-3}})
        for picks in ("mag", "grad"):
            steps.append({"bad_channels": {"picks": picks,
                                           "significance_level": p.significance_level}})
    return {"meta": {"event_codes": None}, "preproc": steps}


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a user's osl-ephys recipe YAML, checking its shape (a ``preproc`` list of one-key
    mappings) so mistakes surface before any recording is processed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"osl_config {path} does not exist")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"osl_config {path} is not valid YAML: {err}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("preproc"), list):
        raise ValueError(f"osl_config {path}: expected a mapping with a 'preproc' list of steps "
                         f"(osl-ephys recipe), found {type(cfg).__name__} with keys "
                         f"{list(cfg) if isinstance(cfg, dict) else []}")
    for i, step in enumerate(cfg["preproc"]):
        if not isinstance(step, dict) or len(step) != 1:
            raise ValueError(f"osl_config {path}: preproc step {i} should be a mapping with one "
                             f"key (the method name), found {step!r:.80}")
    check_recipe_filters(cfg, str(path))
    return cfg


def output_path(stage1_dir: str | os.PathLike, name: str) -> Path:
    """Where stage 1 puts recording ``name``'s cleaned data."""
    return Path(stage1_dir) / name / f"{name}{OUTPUT_SUFFIX}"


def find_outputs(stage1_dir: str | os.PathLike) -> list[Path]:
    """All finished stage-1 outputs (``<name>/<name>_preproc-raw.fif``) under ``stage1_dir``."""
    stage1_dir = Path(stage1_dir)
    if not stage1_dir.is_dir():
        return []
    return sorted(p for p in stage1_dir.glob(f"*/*{OUTPUT_SUFFIX}")
                  if not p.parent.name.startswith(".") and p.parent.name not in ("logs", "report"))


def clean_partial(stage1_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders an interrupted stage-1 run left; return them.

    Only folders with run_stage1's temporary name (``.tmp-<8 hex digits>``) that carry its
    in-progress marker (or are empty) are removed, and not while the process that wrote the
    marker still runs; each removal is logged. Nothing else is touched.
    """
    stage1_dir = Path(stage1_dir)
    removed: list[Path] = []
    if not stage1_dir.is_dir():
        return removed
    for d in sorted(stage1_dir.iterdir()):
        if not _TMP_NAME.match(d.name) or d.is_symlink() or not d.is_dir():
            continue
        record = in_progress(d)
        if record is None and any(d.iterdir()):
            continue  # not provably ours
        if remove_unfinished(d, record, "temporary folder of an interrupted stage-1 run", logger):
            removed.append(d)
    return removed


def run_stage1(recordings: Sequence[Recording], stage1_dir: str | os.PathLike, *,
               osl_config: str | os.PathLike | None = None, recipe: RecipeConfig | None = None,
               n_workers: int = 1, gen_report: bool = False, progress: bool = True,
               random_seed: int = 0, lock_timeout: float | None = 0.0,
               dask_scheduler: str | None = None) -> RunResult:
    """Run osl-ephys over ``recordings``, writing ``<stage1_dir>/<name>/<name>_preproc-raw.fif``.

    Parameters
    ----------
    recordings : sequence of Recording
        From :func:`ephys_gpt.preprocessing.discovery.discover`.
    stage1_dir : path
        Output folder.
    osl_config : path or None
        osl-ephys recipe YAML; None uses :func:`default_recipe` with ``recipe``.
    n_workers : int
        >1 runs the batch on a local Dask cluster of that many single-threaded workers.
    dask_scheduler : str or None
        Address of an existing Dask cluster (``tcp://host:8786``) to run the batch on instead
        (see :mod:`ephys_gpt.preprocessing.parallel`).
    gen_report : bool
        Also write osl-ephys's HTML report (slow).
    random_seed : int
        Seed osl-ephys sets before each recording (reproducible runs).
    lock_timeout : float or None
        ``stage1_dir`` is locked for the run; seconds to wait for another run holding it
        (0: refuse at once with :class:`~ephys_gpt.locking.FolderLockedError`; None: wait).
    """
    with FolderLock(stage1_dir, timeout=lock_timeout, what="stage-1 folder"):
        return _run_stage1(recordings, Path(stage1_dir), osl_config=osl_config, recipe=recipe,
                           n_workers=n_workers, gen_report=gen_report, progress=progress,
                           random_seed=random_seed, dask_scheduler=dask_scheduler)


def _run_stage1(recordings: Sequence[Recording], stage1_dir: Path, *,
                osl_config: str | os.PathLike | None, recipe: RecipeConfig | None,
                n_workers: int, gen_report: bool, progress: bool, random_seed: int,
                dask_scheduler: str | None) -> RunResult:
    batch = require("osl_ephys.preprocessing.batch")
    import mne

    clean_partial(stage1_dir)
    config = load_recipe(osl_config) if osl_config is not None else default_recipe(recipe)
    result = RunResult()
    todo = []
    recorded_recipe = as_json(config)
    for rec in recordings:
        out = output_path(stage1_dir, rec.name)
        if out.is_file():
            before = read_json_field(out.parent / f"{rec.name}{RECORDING_SUFFIX}",
                                     "stage1_recipe")
            if before is not None and before != recorded_recipe:
                result.failed[rec.name] = (
                    f"{out} exists but was made with another osl-ephys recipe; it was left as "
                    "it is. Delete it (or the whole stage1 folder) to redo stage 1 with the new "
                    "recipe, or write to another save_folder")
            else:
                result.skipped.append(rec.name)
        elif (stage1_dir / rec.name).exists() or (stage1_dir / rec.name).is_symlink():
            result.failed[rec.name] = (
                f"{stage1_dir / rec.name} exists but holds no stage-1 output ({out.name}); it was "
                "left as it is. Move or rename it so that stage 1 can write this recording")
        elif " " in str(rec.path):
            result.failed[rec.name] = (f"{rec.path}: osl-ephys cannot read paths containing "
                                       "spaces; rename the file or folder")
        else:
            todo.append(rec)
    if result.skipped:
        logger.info("stage 1: %d recording(s) already done, skipping", len(result.skipped))
    if not todo:
        return result

    logs, report = stage1_dir / "logs", stage1_dir / "report"
    tmp = stage1_dir / f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    mark_in_progress(tmp)
    for rec in todo:  # so a failure's reason is never read from an earlier run's log
        (logs / f"{rec.name}_preproc.error.log").unlink(missing_ok=True)
    verbose = "INFO" if logging.getLogger("ephys_gpt").isEnabledFor(logging.DEBUG) else "WARNING"
    kwargs = dict(outdir=str(tmp), logsdir=str(logs), reportdir=str(report),
                  gen_report=gen_report, overwrite=True, extra_funcs=EXTRA_FUNCS,
                  random_seed=random_seed, verbose=verbose, mneverbose="ERROR")
    try:
        if n_workers > 1 or dask_scheduler:
            _run_dask(batch, config, todo, n_workers, kwargs, dask_scheduler)
            for rec in todo:
                _collect(rec, tmp, stage1_dir, logs, result, recorded_recipe)
        else:
            for rec in tqdm(todo, desc="stage 1 (osl-ephys)", unit="recording",
                            disable=not progress):
                with _contained_osl_logging():
                    batch.run_proc_batch(config, [str(rec.path)], subjects=[rec.name], **kwargs)
                _collect(rec, tmp, stage1_dir, logs, result, recorded_recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        mne.set_log_file(None)  # osl-ephys points MNE's global log at the last recording's file
    logger.info("stage 1: %d done, %d skipped, %d failed", len(todo) - len(result.failed),
                len(result.skipped), len(result.failed))
    return result


def _run_dask(batch, config, todo, n_workers, kwargs, scheduler: str | None) -> None:
    with dask_client(n_workers, scheduler):
        logger.info("stage 1: %d recording(s) on a Dask cluster", len(todo))
        with _contained_osl_logging():
            batch.run_proc_batch(config, [str(r.path) for r in todo],
                                 subjects=[r.name for r in todo], dask_client=True, **kwargs)


class _LineLogger(io.TextIOBase):
    """A text stream that forwards whole lines to a logger (osl-ephys console output)."""

    def __init__(self, log: logging.Logger, level: int):
        self._log, self._level, self._buf = log, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._buf += text
        *lines, self._buf = self._buf.split("\n")
        for ln in lines:
            if ln.strip():
                self._log.log(self._level, "osl-ephys: %s", ln.rstrip())
        return len(text)


@contextmanager
def _contained_osl_logging() -> Iterator[None]:
    """Keep osl-ephys's logging set-up from leaking into the caller's process.

    osl-ephys configures logging with ``logging.config.dictConfig(disable_existing_loggers=
    True)``, which silences every logger created before (ours included), and prints to
    stdout at INFO whatever level is asked. Here its console output goes to our logger at
    DEBUG, and afterwards the loggers' ``disabled`` flags and MNE's log level are restored
    and osl-ephys's handlers (one holds the last recording's log file open) are closed.
    """
    manager = logging.Logger.manager
    before = {name: lg.disabled for name, lg in manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    sink = _LineLogger(logger, logging.DEBUG)
    mne_level = logging.getLogger("mne").level  # osl-ephys sets MNE's global level
    try:
        with redirect_stdout(sink), redirect_stderr(sink):
            yield
    finally:
        for name, lg in manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.disabled = before.get(name, False) and not name.startswith("ephys_gpt")
        logging.getLogger("mne").setLevel(mne_level)
        osl = logging.getLogger("osl_ephys")
        for h in list(osl.handlers):
            osl.removeHandler(h)
            h.close()


def _collect(rec: Recording, tmp: Path, stage1_dir: Path, logs: Path,
             result: RunResult, recipe: Any = None) -> None:
    """Move a finished recording into place (with its provenance and the recipe it was made
    with) or record why it failed."""
    produced = tmp / rec.name / f"{rec.name}{OUTPUT_SUFFIX}"
    if not produced.is_file():
        result.failed[rec.name] = f"{rec.path}: {_failure_reason(logs, rec.name)}"
        logger.error("stage 1 failed for %s", result.failed[rec.name])
        return
    write_json_atomic(tmp / rec.name / f"{rec.name}{RECORDING_SUFFIX}",
                      {**rec.as_dict(), "ephys_gpt_version": ephys_gpt.__version__,
                       "stage1_recipe": recipe})
    final = stage1_dir / rec.name
    if final.exists() or final.is_symlink():  # appeared during the run: never replaced
        result.failed[rec.name] = (f"{final} appeared while stage 1 ran; it was left as it is "
                                   "and this recording's output discarded. Move it and run "
                                   "again")
        logger.error("stage 1 failed for %s", result.failed[rec.name])
        return
    os.replace(tmp / rec.name, final)
    result.written.append(final / f"{rec.name}{OUTPUT_SUFFIX}")


def _failure_reason(logs: Path, name: str) -> str:
    """osl-ephys's reason for a failure, from ``<logs>/<name>_preproc.error.log``."""
    err = logs / f"{name}_preproc.error.log"
    if not err.is_file():
        return f"osl-ephys produced no output (see the logs in {logs})"
    lines = [ln.strip() for ln in err.read_text(errors="replace").splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        m = re.match(r'Processing failed during stage : "([^"]*)"\s*(<class \'([^\']+)\'>)?', ln)
        if m:
            message = lines[i + 1] if i + 1 < len(lines) else ""
            kind = m.group(3) or "error"
            return f"osl-ephys step {m.group(1)!r} failed: {kind}: {message[:300]} (log: {err})"
    return f"osl-ephys failed (see {err})"

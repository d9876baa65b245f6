"""Simulated raw MEG sessions from the MVAR model that osl-ephys ships, written as BIDS.

:func:`osl_ephys.utils.simulate.simulate_raw_from_template` draws 306-channel MEGIN data
(102 magnetometers, 204 planar gradiometers, 150 Hz) from a reduced multivariate
autoregressive model fitted to real resting-state recordings. ``dynamics="bursty"`` adds
transient, state-switching, non-sinusoidal rhythms on top (:mod:`.dynamics`). The sessions
are written with mne-bids (``write_raw_bids``), so BIDS tools (the BIDS validator,
mne-bids-pipeline, ``mne_bids.read_raw_bids``) accept the dataset, and the normal pipeline
(discovery, stage 1, stage 2) runs on it exactly as on real data::

    <out>/dataset_description.json, README, participants.tsv, participants.json
    <out>/sub-01/ses-01/sub-01_ses-01_scans.tsv
    <out>/sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif       # the recording (float32)
    <out>/sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.json      # sidecar (TaskDescription
                                                                  #  says how it was made)
    <out>/sub-01/ses-01/meg/sub-01_ses-01_task-rest_channels.tsv  # injected noisy/flat
                                                                  #  channels: status "bad"
    <out>/sub-01/ses-01/meg/sub-01_ses-01_task-rest_events.tsv    # injected bad segments
                                                                  #  (BAD_injected), bursts
    <out>/sourcedata/ephys-gpt-simulate/sub-01/ses-01/meg/
        sub-01_ses-01_task-rest_simulation.json   # every parameter, the seeds, the faults
        sub-01_ses-01_task-rest_states.npy        # bursty: the hidden state of every sample

The ``.fif`` itself carries no bad-channel or bad-segment marks, so stage 1 still has to find
the faults; the sidecars hold the ground truth (``read_raw_bids`` applies it). Everything is
reproducible from ``seed``: each session seeds numpy's global RNG (which the osl-ephys
function uses) from ``(seed, subject, session)`` and restores the previous state afterwards;
faults and bursts come from generators seeded the same way.

Writing is safe to interrupt and to repeat: each session is written into a hidden staging
folder and moved into place, the ``.fif`` last; a finished session whose recorded settings
match is kept; one made with other settings is replaced only with ``overwrite``; and a
non-empty folder that is not an ephys-gpt simulation is refused.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import ephys_gpt
from ephys_gpt._optional import require
from ephys_gpt.fileio import (
    atomic_path,
    read_json,
    to_jsonable,
    write_json_atomic,
    write_npy_atomic,
    write_text_atomic,
)
from ephys_gpt.preprocessing.dynamics import (
    BurstTrace,
    BurstyDynamics,
    burst_patterns,
    simulate_bursts,
)
from ephys_gpt.validation import check_number, check_option, validate_type

logger = logging.getLogger(__name__)

TEMPLATE_SFREQ = 150.0  # the osl-ephys template's sampling rate
TASK = "rest"
MAX_SECONDS = 3600.0  # per session: one hour is 1.3 GB in memory (306 x 540000 float64)
DYNAMICS = ("mvar", "bursty")
GENERATOR = "ephys-gpt simulate"
SOURCEDATA = Path("sourcedata") / "ephys-gpt-simulate"
STAGING_PREFIX = ".tmp-simulate-"
BAD_SEGMENT_EVENT = "BAD_injected"  # MNE's convention: annotations starting with "bad"
LINE_FREQ = 50.0  # the template was fitted to recordings made on a 50 Hz mains supply


@dataclass(frozen=True)
class SimulationConfig:
    """What :func:`simulate_dataset` writes.

    Attributes
    ----------
    subjects : int
        Number of subjects (``sub-01`` ...), at least 1.
    sessions : int
        Sessions per subject (``ses-01`` ...), at least 1.
    seconds : float
        Length of each session in seconds (at 150 Hz); 2 s to one hour.
    seed : int
        Base seed; every session derives its own from ``(seed, subject, session)``.
    faults : bool
        Inject bad segments, noisy channels and flat channels (per-session choice from the
        seed) so that stage 1 has something to detect.
    dynamics : str
        ``mvar``: the osl-ephys template alone (linear-Gaussian). ``bursty``: plus transient,
        state-switching, non-sinusoidal rhythms (:class:`.dynamics.BurstyDynamics`).
    bursty : BurstyDynamics
        Parameters of ``dynamics="bursty"`` (ignored for ``mvar``).
    """

    subjects: int = 2
    sessions: int = 2
    seconds: float = 60.0
    seed: int = 0
    faults: bool = False
    dynamics: str = "mvar"
    bursty: BurstyDynamics = field(default_factory=BurstyDynamics)

    def __post_init__(self):
        check_number(self.subjects, "simulation 'subjects' (--subjects)", low=1, integer=True)
        check_number(self.sessions, "simulation 'sessions' (--sessions)", low=1, integer=True)
        check_number(self.seconds, "simulation 'seconds' (--seconds)", low=2,
                     high=MAX_SECONDS)
        check_number(self.seed, "simulation 'seed' (--seed)", low=0, high=2**32 - 1,
                     integer=True)
        validate_type(self.faults, "bool", "simulation 'faults' (--faults)")
        check_option(self.dynamics, DYNAMICS, "simulation 'dynamics' (--dynamics)")
        validate_type(self.bursty, BurstyDynamics, "simulation 'bursty'")
        if self.dynamics == "bursty":
            self.bursty.check_rate(TEMPLATE_SFREQ)

    def session_settings(self, subject: int, session: int) -> dict[str, Any]:
        """What one session's data depend on (recorded; a re-run compares it)."""
        return to_jsonable({
            "seconds": float(self.seconds), "base_seed": self.seed,
            "session_seed": session_seed(self.seed, subject, session), "faults": self.faults,
            "dynamics": self.dynamics,
            "bursty": self.bursty.as_dict() if self.dynamics == "bursty" else None})


@dataclass
class Faults:
    """Artefacts injected into one session (indices into the 306 template channels).

    ``bad_segments`` are ``[start, stop)`` sample ranges; ``noisy_channels`` get extra white
    noise (twice their standard deviation), ``flat_channels`` are set to zero.
    """

    bad_segments: list[tuple[int, int]] = field(default_factory=list)
    noisy_channels: list[int] = field(default_factory=list)
    flat_channels: list[int] = field(default_factory=list)


@dataclass
class SimulatedSession:
    """One simulated session in memory.

    ``raw``: the recording (:class:`mne.io.RawArray`, 306 MEG channels, 150 Hz, tesla and
    tesla/metre); ``background``: the template's MVAR part (306, T) before bursts and faults;
    ``faults``: what was injected (or None); ``bursts``: the bursty part (or None):
    ``trace`` (:class:`.dynamics.BurstTrace`), ``patterns`` (306, K) in sensor units per
    source unit (``u * g_k``), ``unit`` (``u``, tesla).
    """

    raw: Any
    background: np.ndarray
    faults: Faults | None = None
    trace: BurstTrace | None = None
    patterns: np.ndarray | None = None
    unit: float | None = None


def session_seed(seed: int, subject: int, session: int) -> int:
    """The 32-bit seed of one session, derived from the base seed (1-based indices)."""
    ss = np.random.SeedSequence([seed, subject, session])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def draw_faults(rng: np.random.Generator, n_samples: int, sfreq: float,
                n_channels: int = 306) -> Faults:
    """Choose where the artefacts of one session go.

    1-2 bad segments of 2-4 s each (kept 1 s away from the edges and from each other when
    the session is long enough), 1-3 noisy channels and 1-2 flat channels, magnetometers and
    gradiometers alike.
    """
    n_seg = int(rng.integers(1, 3))
    seg_len = rng.integers(int(2 * sfreq), int(4 * sfreq) + 1, size=n_seg)
    margin = int(sfreq)
    segments: list[tuple[int, int]] = []
    for length in seg_len:
        length = int(min(length, max(n_samples // 4, 1)))
        lo, hi = margin, n_samples - margin - length
        for _ in range(50):  # rejection sampling for non-overlapping segments
            start = int(rng.integers(lo, hi + 1)) if hi > lo else max(0, (n_samples - length) // 2)
            if all(start + length + margin <= a or start >= b + margin for a, b in segments):
                segments.append((start, start + length))
                break
    segments.sort()
    n_noisy = int(rng.integers(1, 4))
    n_flat = int(rng.integers(1, 3))
    chosen = rng.choice(n_channels, size=n_noisy + n_flat, replace=False)
    return Faults(bad_segments=segments,
                  noisy_channels=sorted(int(c) for c in chosen[:n_noisy]),
                  flat_channels=sorted(int(c) for c in chosen[n_noisy:]))


def inject_faults(data: np.ndarray, faults: Faults, rng: np.random.Generator) -> None:
    """Apply ``faults`` to ``data`` (C, T) in place, as osl-ephys's simulator does: flat
    channels become 0, noisy channels get white noise of twice their standard deviation, and
    bad segments white noise of five times each channel's standard deviation there."""
    if faults.flat_channels:
        data[faults.flat_channels] = 0.0
    if faults.noisy_channels:
        idx = faults.noisy_channels
        std = data[idx].std(axis=1, keepdims=True)
        data[idx] += rng.standard_normal((len(idx), data.shape[1])) * std * 2
    for a, b in faults.bad_segments:
        std = data[:, a:b].std(axis=1, keepdims=True)
        data[:, a:b] += rng.standard_normal((data.shape[0], b - a)) * std * 5


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG for the block, then put the previous state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def simulate_session(seconds: float, seed: int, faults: bool = False, *,
                     dynamics: str = "mvar", bursty: BurstyDynamics | None = None
                     ) -> SimulatedSession:
    """Simulate one session (see :class:`SimulatedSession`).

    The background comes from osl-ephys's template with numpy's global RNG seeded from
    ``seed``; the faults and the bursts from ``np.random.default_rng([seed, 1])`` and
    ``[seed, 2]``.
    """
    check_option(dynamics, DYNAMICS, "dynamics")
    simulate = require("osl_ephys.utils.simulate")
    import mne

    n_samples = int(round(seconds * TEMPLATE_SFREQ))
    with _numpy_global_seed(seed), mne.utils.use_log_level("ERROR"):
        raw = simulate.simulate_raw_from_template(n_samples)
    background = raw.get_data()
    data = background.copy()
    out = SimulatedSession(raw=raw, background=background)
    if dynamics == "bursty":
        bursty = bursty or BurstyDynamics()
        mags = mne.pick_types(raw.info, meg="mag")
        out.unit = float(np.median(background[mags].std(axis=1)))
        out.patterns = burst_patterns(raw.info, bursty) * out.unit
        out.trace = simulate_bursts(n_samples, TEMPLATE_SFREQ, bursty,
                                    np.random.default_rng([seed, 2]))
        data += out.patterns @ out.trace.sources
    if faults:
        rng = np.random.default_rng([seed, 1])
        out.faults = draw_faults(rng, n_samples, TEMPLATE_SFREQ, len(raw.ch_names))
        inject_faults(data, out.faults, rng)
    raw._data[:] = data
    with raw.info._unlock():
        raw.info["description"] = (f"ephys-gpt simulated MEG (osl-ephys MVAR template, "
                                   f"{dynamics} dynamics, seed {seed})")
        raw.info["line_freq"] = LINE_FREQ
        raw.info["subject_info"] = None
    return out


def template_one_step_mean(background: np.ndarray, info) -> np.ndarray:
    """The best prediction of the template's MVAR part from its past (306, T).

    osl-ephys's simulator draws ``y_t = e_t + sum_{p=1}^{18} A_p y_{t-p}`` in a 50-dimensional
    PCA space per channel type (its loop stops at lag ``order - 1`` = 18 of the 20 stored)
    and maps ``y`` to the sensors with the stored components (scale 2e-12); so column ``t`` of
    the result predicts ``background[:, t]`` exactly up to the innovation ``e_t``. For
    measuring the headroom of predictors (an oracle); the first 18 columns are incomplete.
    """
    simulate = require("osl_ephys.utils.simulate")
    import mne

    folder = Path(simulate.__file__).parent / "simulation_config"
    pred = np.zeros_like(background)
    for kind in ("mag", "grad"):
        params = np.load(folder / f"reduced_mvar_params_{kind}.npy", allow_pickle=False)
        comps = np.load(folder / f"reduced_mvar_pcacomp_{kind}.npy", allow_pickle=False)
        picks = mne.pick_types(info, meg=kind)
        y = comps @ background[picks] / 2e-12
        yhat = np.zeros_like(y)
        for lag in range(1, params.shape[2] - 1):
            yhat[:, lag:] += params[:, :, lag] @ y[:, :-lag]
        pred[picks] = comps.T @ yhat * 2e-12
    return pred


def bids_basename(subject: int, session: int) -> str:
    return f"sub-{subject:02d}_ses-{session:02d}_task-{TASK}"


def _session_dir(subject: int, session: int) -> Path:
    return Path(f"sub-{subject:02d}") / f"ses-{session:02d}"


def recording_path(root: str | os.PathLike, subject: int, session: int) -> Path:
    """Where :func:`simulate_dataset` puts a session's recording."""
    return (Path(root) / _session_dir(subject, session) / "meg"
            / f"{bids_basename(subject, session)}_meg.fif")


def record_path(root: str | os.PathLike, subject: int, session: int) -> Path:
    """Where a session's simulation record (parameters, seeds, faults) lives."""
    return (Path(root) / SOURCEDATA / _session_dir(subject, session) / "meg"
            / f"{bids_basename(subject, session)}_simulation.json")


def read_simulation_record(recording: str | os.PathLike) -> dict:
    """The simulation record of a recording written by :func:`simulate_dataset` (given the
    ``..._meg.fif`` path): settings, seeds, ``faults`` (with channel names and seconds) and,
    for bursty dynamics, the bursts (parameters, state names, ``states_file``)."""
    path = Path(recording)
    m = re.fullmatch(r"sub-(\d+)_ses-(\d+)_task-[^_]+_meg\.fif", path.name)
    if m is None or len(path.parents) < 4:
        raise ValueError(f"{path} is not a recording written by `ephys-gpt simulate` "
                         "(sub-XX/ses-YY/meg/sub-XX_ses-YY_task-rest_meg.fif)")
    root = path.parents[3]
    rec = record_path(root, int(m.group(1)), int(m.group(2)))
    if not rec.is_file():
        raise FileNotFoundError(f"{path}: no simulation record at {rec}")
    return read_json(rec)


def _session_record(cfg: SimulationConfig, sub: int, ses: int, sim: SimulatedSession,
                    files: list[str]) -> dict:
    raw = sim.raw
    record: dict[str, Any] = {
        "generator": GENERATOR,
        "background": "osl_ephys.utils.simulate.simulate_raw_from_template",
        "ephys_gpt_version": ephys_gpt.__version__,
        "settings": cfg.session_settings(sub, ses),
        "subject": f"{sub:02d}", "session": f"{ses:02d}", "task": TASK,
        "sfreq": TEMPLATE_SFREQ, "n_samples": int(raw.n_times),
        "faults": None, "bursts": None,
        "files": files,  # what this session wrote (a re-run with --overwrite replaces them)
    }
    f = sim.faults
    if f is not None:
        record["faults"] = {
            **asdict(f),
            "bad_segments_seconds": [[a / TEMPLATE_SFREQ, b / TEMPLATE_SFREQ]
                                     for a, b in f.bad_segments],
            "noisy_channel_names": [raw.ch_names[i] for i in f.noisy_channels],
            "flat_channel_names": [raw.ch_names[i] for i in f.flat_channels],
        }
    if sim.trace is not None:
        states = sim.trace.states
        record["bursts"] = {
            "model": "ephys_gpt.preprocessing.dynamics (see docs/preprocessing.md)",
            "unit_tesla": sim.unit,
            "state_names": cfg.bursty.state_names,
            "state_fractions": (np.bincount(states, minlength=len(cfg.bursty.rhythms) + 1)
                                / states.size).tolist(),
            "states_file": f"{bids_basename(sub, ses)}_states.npy",
        }
    return to_jsonable(record)


def _episodes(states: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """``(state, start, stop)`` runs of a state sequence, baseline (0) left out."""
    edges = np.flatnonzero(np.diff(states.astype(np.int64))) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [states.size]])
    for a, b in zip(starts, stops):
        if states[a] != 0:
            yield int(states[a]), int(a), int(b)


def _events_tsv(sim: SimulatedSession, names: list[str]) -> tuple[str, dict] | None:
    """BIDS events (onset, duration in s; trial_type; sample) of the injected bad segments
    and the bursts, with their JSON description; None when there are none."""
    rows = []
    if sim.faults is not None:
        rows += [(a, b - a, BAD_SEGMENT_EVENT) for a, b in sim.faults.bad_segments]
    if sim.trace is not None:
        rows += [(a, b - a, f"burst/{names[s]}") for s, a, b in _episodes(sim.trace.states)]
    if not rows:
        return None
    rows.sort()
    lines = ["onset\tduration\ttrial_type\tsample"]
    lines += [f"{a / TEMPLATE_SFREQ:.6f}\t{n / TEMPLATE_SFREQ:.6f}\t{kind}\t{a}"
              for a, n, kind in rows]
    levels = {}
    if sim.faults is not None:
        levels[BAD_SEGMENT_EVENT] = ("a segment where the simulation added white noise of five "
                                     "times each channel's standard deviation")
    for name in names[1:] if sim.trace is not None else []:
        levels[f"burst/{name}"] = f"a burst of the simulated {name} rhythm (hidden state)"
    sidecar = {
        "onset": {"Description": "start of the episode", "Units": "s"},
        "duration": {"Description": "length of the episode", "Units": "s"},
        "trial_type": {"Description": "what the simulation put there", "Levels": levels},
        "sample": {"Description": "first sample of the episode (0-based, at 150 Hz)"},
    }
    return "\n".join(lines) + "\n", sidecar


def _task_description(cfg: SimulationConfig, seed: int) -> str:
    text = (f"Simulated resting-state MEG, not a recording: {GENERATOR} "
            f"(ephys-gpt {ephys_gpt.__version__}) drew it from the MVAR model that osl-ephys "
            f"fitted to MEGIN recordings, session seed {seed} (base seed {cfg.seed})")
    if cfg.dynamics == "bursty":
        text += (", with transient state-switching rhythms ("
                 + ", ".join(f"{r.name} {r.freq_hz:g} Hz" for r in cfg.bursty.rhythms) + ")")
    if cfg.faults:
        text += ", with injected bad segments and noisy/flat channels"
    return text + f". Parameters: {SOURCEDATA.as_posix()}/."


def _readme(cfg: SimulationConfig) -> str:
    return f"""# ephys-gpt simulated MEG

Simulated 306-channel MEGIN resting-state MEG (102 magnetometers, 204 planar gradiometers,
150 Hz), written by `{GENERATOR}` (ephys-gpt {ephys_gpt.__version__}). No person was
recorded: every session was drawn from the multivariate autoregressive model that osl-ephys
ships (`osl_ephys.utils.simulate.simulate_raw_from_template`, fitted to real recordings)
{"plus transient, state-switching, non-sinusoidal rhythms (`--dynamics bursty`)" if
 cfg.dynamics == "bursty" else "(`--dynamics mvar`)"}.

- `sub-XX/ses-YY/meg/*_meg.fif`: the data; `*_channels.tsv` marks injected noisy and flat
  channels `bad`; `*_events.tsv` lists injected bad segments (`{BAD_SEGMENT_EVENT}`) and
  bursts (`burst/<rhythm>`) when there are any.
- `{SOURCEDATA.as_posix()}/`: per session, every simulation parameter and seed
  (`*_simulation.json`) and, for bursty dynamics, the hidden state of every sample
  (`*_states.npy`, int8; 0 is the baseline, the names are in the JSON).

Reproduce (same data, bit for bit, with the same ephys-gpt and osl-ephys):

    ephys-gpt simulate --out DIR --subjects {cfg.subjects} --sessions {cfg.sessions} --seconds {cfg.seconds:g} --seed {cfg.seed}{" --faults" if cfg.faults else ""} --dynamics {cfg.dynamics}

The model and its parameters are described in ephys-gpt's docs/preprocessing.md.
"""


def _is_simulation(root: Path) -> bool:
    try:
        desc = read_json(root / "dataset_description.json")
    except (ValueError, OSError):
        return False
    gen = desc.get("GeneratedBy") if isinstance(desc, dict) else None
    return isinstance(gen, list) and any(isinstance(g, dict) and g.get("Name") == "ephys-gpt"
                                         for g in gen)


def _check_output_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"simulate --out {out} is a file; give a folder")
    if not out.is_dir() or _is_simulation(out):
        return
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(STAGING_PREFIX))
    if others:
        raise ValueError(
            f"simulate --out {out} is not empty and is not a dataset written by `ephys-gpt "
            f"simulate` (its dataset_description.json does not name ephys-gpt in GeneratedBy); "
            f"found {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}. Nothing was "
            "written: give a new or empty folder (simulate never writes into folders it did "
            "not make)")


def _session_state(out: Path, cfg: SimulationConfig, sub: int, ses: int) -> tuple[str, str]:
    """``("done" | "todo" | "conflict", why)`` for one session in ``out``."""
    fif = recording_path(out, sub, ses)
    rec = record_path(out, sub, ses)
    if not fif.is_file():
        return "todo", ""
    try:
        recorded = read_json(rec).get("settings")
    except (ValueError, OSError, AttributeError):
        return "conflict", f"{fif} has no simulation record ({rec})"
    wanted = cfg.session_settings(sub, ses)
    if recorded == wanted:
        return "done", ""
    diff = sorted(k for k in set(wanted) | set(recorded or {})
                  if (recorded or {}).get(k) != wanted.get(k))
    return "conflict", f"{fif} was simulated with other settings ({', '.join(diff)})"


def simulate_dataset(out: str | os.PathLike, config: SimulationConfig | None = None, *,
                     progress: bool = True, overwrite: bool = False) -> list[Path]:
    """Write ``config.subjects x config.sessions`` simulated sessions under ``out`` as BIDS.

    Returns the ``.fif`` paths in order. A session already there with the same recorded
    settings is kept; one simulated with other settings (or without a record) is replaced
    only when ``overwrite`` is true, else nothing is written and a ValueError lists them.
    A folder that holds anything else than an ephys-gpt simulation is refused.
    """
    config = config or SimulationConfig()
    require("mne_bids")
    out = Path(out)
    _check_output_folder(out)
    jobs = [(sub, ses) for sub in range(1, config.subjects + 1)
            for ses in range(1, config.sessions + 1)]
    states = {job: _session_state(out, config, *job) for job in jobs}
    conflicts = [why for state, why in states.values() if state == "conflict"]
    if conflicts and not overwrite:
        listing = "\n  ".join(conflicts[:10]) + ("\n  ..." if len(conflicts) > 10 else "")
        raise ValueError(
            f"simulate --out {out}: {len(conflicts)} session(s) exist that were simulated with "
            f"other settings (or by an ephys-gpt before BIDS output, without a record), so "
            f"nothing was written:\n  {listing}\nRe-run with the same settings to keep them, "
            "pass --overwrite to replace them, or write to a new folder")
    todo = [job for job in jobs if states[job][0] != "done"]
    paths = [recording_path(out, *job) for job in jobs]
    kept = len(jobs) - len(todo)
    if kept:
        logger.info("keeping %d finished session(s) in %s (same settings)", kept, out)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        _prepare_stage(stage, out, config)
        for sub, ses in tqdm(todo, desc="simulate", unit="session", disable=not progress):
            _write_session(stage, out, config, sub, ses)
        _publish_dataset_files(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    _warn_about_extra_subjects(out, config)
    logger.info("simulated %d session(s) under %s (%d written, %d kept)", len(paths), out,
                len(todo), kept)
    return paths


def _prepare_stage(stage: Path, out: Path, cfg: SimulationConfig) -> None:
    """Dataset-level files in the staging root: our dataset_description and README; an
    existing participants list is copied so mne-bids adds to it."""
    mne_bids = require("mne_bids")
    mne_bids.make_dataset_description(
        path=stage, name="ephys-gpt simulated MEG (osl-ephys MVAR template)",
        dataset_type="raw", data_license="CC0",
        authors=["ephys-gpt simulate (generated data; no human participants)",
                 "osl-ephys developers (the MVAR template the data are drawn from)"],
        how_to_acknowledge="Cite osl-ephys (its MVAR template generates the data) and ephys-gpt.",
        generated_by=[{"Name": "ephys-gpt", "Version": ephys_gpt.__version__,
                       "Description": f"{GENERATOR} --dynamics {cfg.dynamics}"},
                      {"Name": "osl-ephys",
                       "Description": "osl_ephys.utils.simulate.simulate_raw_from_template"}],
        overwrite=True, verbose="error")
    write_text_atomic(stage / "README", _readme(cfg))
    for name in ("participants.tsv", "participants.json"):
        if (out / name).is_file():
            shutil.copyfile(out / name, stage / name)


def _write_session(stage: Path, out: Path, cfg: SimulationConfig, sub: int, ses: int) -> None:
    """Simulate one session, write it with mne-bids into ``stage`` and move it into ``out``
    (sidecars and record first, the recording last)."""
    mne_bids = require("mne_bids")
    import mne

    seed = session_seed(cfg.seed, sub, ses)
    sim = simulate_session(cfg.seconds, seed, cfg.faults, dynamics=cfg.dynamics,
                           bursty=cfg.bursty)
    base = bids_basename(sub, ses)
    # mne-bids copies a file-backed Raw as it is stored: save float32 once, then hand it over
    source = stage / f"{base}_meg.fif"
    with mne.utils.use_log_level("ERROR"):
        sim.raw.save(source, fmt="single", overwrite=True)
        raw = mne.io.read_raw_fif(source, preload=False)
    bids_path = mne_bids.BIDSPath(subject=f"{sub:02d}", session=f"{ses:02d}", task=TASK,
                                  datatype="meg", root=stage)
    mne_bids.write_raw_bids(raw, bids_path, overwrite=True, verbose="error")
    del raw
    source.unlink()
    meg_dir = stage / _session_dir(sub, ses) / "meg"
    mne_bids.update_sidecar_json(
        bids_path.copy().update(suffix="meg", extension=".json"),
        {"TaskDescription": _task_description(cfg, seed)}, verbose="error")
    if sim.faults is not None:
        names = [sim.raw.ch_names[i] for i in sim.faults.noisy_channels + sim.faults.flat_channels]
        why = (["injected white noise (simulation)"] * len(sim.faults.noisy_channels)
               + ["flat: set to zero (simulation)"] * len(sim.faults.flat_channels))
        mne_bids.mark_channels(bids_path, ch_names=names, status="bad", descriptions=why,
                               verbose="error")
    events = _events_tsv(sim, cfg.bursty.state_names)
    if events is not None:
        write_text_atomic(meg_dir / f"{base}_events.tsv", events[0])
        write_json_atomic(meg_dir / f"{base}_events.json", events[1])

    produced = sorted(p.relative_to(stage) for p in (stage / f"sub-{sub:02d}").rglob("*")
                      if p.is_file())
    src_dir = stage / SOURCEDATA / _session_dir(sub, ses) / "meg"
    src_dir.mkdir(parents=True, exist_ok=True)
    if sim.trace is not None:
        write_npy_atomic(src_dir / f"{base}_states.npy", sim.trace.states)
    record_rel = record_path(Path(), sub, ses)
    files = sorted({*(p.as_posix() for p in produced),
                    *(p.relative_to(stage).as_posix() for p in src_dir.iterdir()),
                    record_rel.as_posix()})
    write_json_atomic(stage / record_rel, _session_record(cfg, sub, ses, sim, files))

    # retire what an earlier run of this session wrote and this one does not (its record
    # lists it), and the per-session JSON of ephys-gpt versions before BIDS output
    old = record_path(out, sub, ses)
    if old.is_file():
        try:
            before = read_json(old).get("files") or []
        except (ValueError, OSError, AttributeError):
            before = []
        mine = (_session_dir(sub, ses).as_posix() + "/",
                (SOURCEDATA / _session_dir(sub, ses)).as_posix() + "/")
        for rel in set(before) - set(files):
            # only this session's own folders, whatever the record says
            if not isinstance(rel, str) or not rel.startswith(mine) or ".." in Path(rel).parts:
                continue
            if (out / rel).is_file():
                (out / rel).unlink()
    (out / _session_dir(sub, ses) / "meg" / f"{base}_simulation.json").unlink(missing_ok=True)

    recording = recording_path(Path(), sub, ses)
    order = [p for p in files if p != recording.as_posix()] + [recording.as_posix()]
    for rel in order:  # the recording last: its presence marks the session finished
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, out / rel)
    _publish_dataset_files(stage, out)  # participants.tsv lists this subject from now on


def _publish_dataset_files(stage: Path, out: Path) -> None:
    for name in ("dataset_description.json", "README", "participants.tsv",
                 "participants.json"):
        if (stage / name).is_file():
            with atomic_path(out / name) as tmp:
                shutil.copyfile(stage / name, tmp)


def _warn_about_extra_subjects(out: Path, cfg: SimulationConfig) -> None:
    wanted = {f"sub-{s:02d}" for s in range(1, cfg.subjects + 1)}
    extra = sorted(p.name for p in out.glob("sub-*") if p.is_dir() and p.name not in wanted)
    if extra:
        logger.warning("%s also holds %s from an earlier run with more subjects (kept, and "
                       "found by discovery); write to a new folder for exactly %d subject(s)",
                       out, ", ".join(extra), cfg.subjects)

"""Simulated raw MEG sessions from the MVAR model that osl-ephys ships.

:func:`osl_ephys.utils.simulate.simulate_raw_from_template` draws 306-channel MEGIN data
(102 magnetometers, 204 planar gradiometers, 150 Hz) from a reduced multivariate
autoregressive model fitted to real resting-state recordings. This module writes such
sessions as raw ``.fif`` files in a BIDS-like layout, so the normal pipeline (discovery,
stage 1, stage 2) runs on them exactly as on real data::

    <out>/dataset_description.json
    <out>/sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif
    <out>/sub-01/ses-01/meg/sub-01_ses-01_task-rest_simulation.json   # seed and injected faults

Everything is reproducible from ``seed``: each session seeds numpy's global RNG (which the
osl-ephys function uses) from ``(seed, subject, session)`` and restores the previous state
afterwards. With ``faults=True`` each session also gets artefacts for stage 1 to catch:
high-variance bad segments, noisy channels and flat channels, placed from the same seed and
recorded in the JSON sidecar.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import ephys_gpt
from ephys_gpt._optional import require
from ephys_gpt.fileio import atomic_path, write_json_atomic
from ephys_gpt.validation import check_number, validate_type

logger = logging.getLogger(__name__)

TEMPLATE_SFREQ = 150.0  # the osl-ephys template's sampling rate
TASK = "rest"
MAX_SECONDS = 3600.0  # per session: one hour is 1.3 GB in memory (306 x 540000 float64)


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
        Length of each session in seconds (at 150 Hz); at least 2 s.
    seed : int
        Base seed; every session derives its own from ``(seed, subject, session)``.
    faults : bool
        Inject bad segments, noisy channels and flat channels (per-session choice from the
        seed) so that stage 1 has something to detect.
    """

    subjects: int = 2
    sessions: int = 2
    seconds: float = 60.0
    seed: int = 0
    faults: bool = False

    def __post_init__(self):
        check_number(self.subjects, "simulation 'subjects' (--subjects)", low=1, integer=True)
        check_number(self.sessions, "simulation 'sessions' (--sessions)", low=1, integer=True)
        check_number(self.seconds, "simulation 'seconds' (--seconds)", low=2,
                     high=MAX_SECONDS)
        check_number(self.seed, "simulation 'seed' (--seed)", low=0, high=2**32 - 1,
                     integer=True)
        validate_type(self.faults, "bool", "simulation 'faults' (--faults)")


@dataclass
class Faults:
    """Artefacts injected into one session (indices into the 306 template channels).

    ``bad_segments`` are ``[start, stop)`` sample ranges; ``noisy_channels`` get extra white
    noise (twice their standard deviation), ``flat_channels`` are set to zero.
    """

    bad_segments: list[tuple[int, int]] = field(default_factory=list)
    noisy_channels: list[int] = field(default_factory=list)
    flat_channels: list[int] = field(default_factory=list)


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


@contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG for the block, then put the previous state back."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def simulate_session(seconds: float, seed: int, faults: bool = False):
    """Simulate one session; returns ``(raw, faults_or_None)``.

    ``raw`` is an :class:`mne.io.RawArray` with the template's 306 MEG channels at 150 Hz
    (data in tesla and tesla/metre).
    """
    simulate = require("osl_ephys.utils.simulate")
    import mne

    n_samples = int(round(seconds * TEMPLATE_SFREQ))
    drawn = None
    with _numpy_global_seed(seed), mne.utils.use_log_level("ERROR"):
        if faults:
            rng = np.random.default_rng(seed)
            drawn = draw_faults(rng, n_samples, TEMPLATE_SFREQ)
            raw = simulate.simulate_raw_from_template(
                n_samples,
                bad_segments=[list(s) for s in drawn.bad_segments] or None,
                bad_channels=drawn.noisy_channels or None,
                flat_channels=drawn.flat_channels or None)
        else:
            raw = simulate.simulate_raw_from_template(n_samples)
    with raw.info._unlock():
        raw.info["description"] = f"ephys-gpt simulated MEG (osl-ephys MVAR template, seed {seed})"
    return raw, drawn


def bids_basename(subject: int, session: int) -> str:
    return f"sub-{subject:02d}_ses-{session:02d}_task-{TASK}"


def simulate_dataset(out: str | os.PathLike, config: SimulationConfig | None = None, *,
                     progress: bool = True, overwrite: bool = False) -> list[Path]:
    """Write ``config.subjects x config.sessions`` simulated sessions under ``out``.

    Returns the ``.fif`` paths in order. Existing files are kept (and reported) unless
    ``overwrite``; every file is written under a temporary name and renamed into place.
    """
    config = config or SimulationConfig()
    import mne

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "dataset_description.json", {
        "Name": "ephys-gpt simulated MEG (osl-ephys MVAR template)",
        "BIDSVersion": "1.8.0",
        "DatasetType": "raw",
        "GeneratedBy": [{"Name": "ephys-gpt", "Version": ephys_gpt.__version__}],
    })
    jobs = [(sub, ses) for sub in range(1, config.subjects + 1)
            for ses in range(1, config.sessions + 1)]
    paths = []
    for sub, ses in tqdm(jobs, desc="simulate", unit="session", disable=not progress):
        base = bids_basename(sub, ses)
        folder = out / f"sub-{sub:02d}" / f"ses-{ses:02d}" / "meg"
        fif = folder / f"{base}_meg.fif"
        paths.append(fif)
        if fif.exists() and not overwrite:
            logger.info("keeping existing %s", fif)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        seed = session_seed(config.seed, sub, ses)
        raw, faults = simulate_session(config.seconds, seed, config.faults)
        sidecar = {
            "generator": "osl_ephys.utils.simulate.simulate_raw_from_template",
            "ephys_gpt_version": ephys_gpt.__version__,
            "base_seed": config.seed, "session_seed": seed,
            "subject": f"{sub:02d}", "session": f"{ses:02d}", "task": TASK,
            "sfreq": TEMPLATE_SFREQ, "n_samples": int(raw.n_times),
            "faults": None,
        }
        if faults is not None:
            sidecar["faults"] = {
                **asdict(faults),
                "bad_segments_seconds": [[a / TEMPLATE_SFREQ, b / TEMPLATE_SFREQ]
                                         for a, b in faults.bad_segments],
                "noisy_channel_names": [raw.ch_names[i] for i in faults.noisy_channels],
                "flat_channel_names": [raw.ch_names[i] for i in faults.flat_channels],
            }
        # MNE wants raw file names to end in _meg.fif; the temporary name keeps that suffix
        with atomic_path(fif, suffix="_meg.fif") as tmp, mne.utils.use_log_level("ERROR"):
            raw.save(tmp, fmt="single", overwrite=True)
        write_json_atomic(folder / f"{base}_simulation.json", sidecar)
    logger.info("simulated %d session(s) under %s", len(paths), out)
    return paths


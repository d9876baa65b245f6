"""Bursty, state-switching rhythms added to the osl-ephys MVAR template (``--dynamics bursty``).

The template (:mod:`ephys_gpt.preprocessing.simulate`) is a linear-Gaussian MVAR process, so
a long VAR fitted to it is close to the best possible predictor. Real MEG is not like that:
rhythms come in transient bursts, a sensor area switches between rhythms (sensorimotor mu
near 10 Hz and beta near 20 Hz), waveforms are not sinusoidal (the arch-shaped mu rhythm) and
amplitudes are far from Gaussian. This module adds such structure on top of the template, as
a switching linear dynamical system in a few cortical sources, the generative model of the
HMM-MAR family that is fitted to real MEG (Vidaurre et al., NeuroImage 2016, "Spectrally
resolved fast transient brain states in electrophysiological data"):

- a hidden Markov chain ``z_t`` in ``{0, 1, ..., R}``: 0 is the baseline (no rhythm), state
  ``r`` is rhythm ``r`` bursting. Baseline and bursts alternate (``0 -> r -> 0``); the mean
  dwell time of state ``r`` is ``dwell_s`` and the baseline's ``baseline_dwell_s``
  (geometric dwell times), and a burst's rhythm is drawn with probability ``weight``;
- each source ``k`` is a damped oscillator, a second-order autoregressive process whose
  coefficients switch with the state::

      x[k, t+1] = 2 rho cos(omega) x[k, t] - rho^2 x[k, t-1] + sigma eta[k, t]

  with ``(rho, omega, sigma) = (rho_k(z_t), omega_k(z_t), sigma_k(z_t))`` and ``eta``
  standard Gaussian white noise. While rhythm ``r`` of source ``k`` bursts,
  ``omega = 2 pi f_r / sfreq``, ``rho = exp(-pi bandwidth_r / sfreq)`` (a spectral peak of
  that full width at half maximum) and ``sigma`` is set so that ``x`` has standard deviation
  ``amplitude_r`` during the burst; otherwise the source decays with time constant
  ``idle_decay_ms`` at the frequency of its last rhythm, with standard deviation
  ``idle_amplitude``;
- the source waveform is non-sinusoidal: ``s[k, t] = x + harmonic_k * x^2 / A_k``, ``A_k``
  the largest amplitude of the source's rhythms: a static even nonlinearity that adds a
  phase-locked second harmonic (sharp peaks, rounded troughs: the arch-shaped mu rhythm) and
  a baseline shift during bursts (oscillations with a non-zero mean, as reported for alpha
  and mu: Nikulin et al., PNAS 2007; Mazaheri & Jensen, J Neurosci 2008);
- the sensors see ``x_t = background_t + u * sum_k g_k s[k, t]``: ``g_k`` is the field of a
  current dipole (position and tangential orientation in head coordinates) in a spherical
  conductor (MNE's ``make_forward_dipole``), scaled so its largest magnetometer entry is 1,
  and ``u`` is the median standard deviation of the session's background magnetometers. So
  ``amplitude`` is in units of the background: 4 means a burst four times the typical
  background at its strongest magnetometer (gradiometers follow from the same dipole).

The conditional mean of the next sample is a nonlinear function of the past: it depends on
the hidden state, which a predictor must infer from the recent waveform, and on the square
of the latent through the harmonic. Given ``z_t`` and ``x_t, x_{t-1}`` it is exact and cheap
(:func:`burst_one_step_mean`), an oracle to measure a model's headroom against. Nothing in
it is unobservable in principle: ``x`` can be read back from ``s`` and the sensors, only the
state must be inferred, so with one always-on rhythm (a linear AR(2) process) a fitted
linear predictor reaches the oracle.
Everything is drawn from the session's seed; the parameters are recorded with the data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from ephys_gpt.validation import check_number, validate_type

SPHERE_ORIGIN_M = (0.0, 0.0, 0.04)  # head coordinates; MEG fields of a sphere need only the origin


@dataclass(frozen=True)
class BurstSource:
    """A cortical source: a current dipole in head coordinates (metres, RAS: x right, y
    anterior, z up), its orientation made tangential to the sphere, and the waveform's
    second-harmonic strength (0: sinusoidal)."""

    name: str
    position_m: tuple[float, float, float]
    orientation: tuple[float, float, float]
    harmonic: float = 0.0


@dataclass(frozen=True)
class BurstRhythm:
    """One hidden state: a rhythm bursting in one source."""

    name: str
    source: str           # a BurstSource name
    freq_hz: float        # peak frequency
    bandwidth_hz: float   # spectral peak width (FWHM); sets rho = exp(-pi * bw / sfreq)
    amplitude: float      # std of the source during a burst, in background units (see module)
    dwell_s: float        # mean burst duration
    weight: float = 1.0   # relative probability that a burst is of this rhythm


def _default_sources() -> tuple[BurstSource, ...]:
    return (
        BurstSource("occipital", (0.0, -0.07, 0.05), (1.0, 0.0, 0.0)),
        BurstSource("sensorimotor-left", (-0.045, -0.01, 0.085), (0.0, 1.0, 0.0),
                    harmonic=0.25),
        BurstSource("frontal", (0.0, 0.06, 0.06), (1.0, 0.0, 0.0)),
    )


def _default_rhythms() -> tuple[BurstRhythm, ...]:
    return (
        BurstRhythm("alpha-low", "occipital", 8.0, 1.5, 4.0, 0.6),
        BurstRhythm("alpha-high", "occipital", 12.0, 1.5, 4.0, 0.6),
        BurstRhythm("mu", "sensorimotor-left", 10.0, 1.5, 4.0, 0.5),
        BurstRhythm("beta", "sensorimotor-left", 20.0, 2.5, 3.0, 0.25),
        BurstRhythm("theta", "frontal", 6.0, 1.0, 3.0, 0.5, weight=0.5),
        BurstRhythm("beta-frontal", "frontal", 18.0, 2.5, 3.0, 0.25, weight=0.5),
    )


@dataclass(frozen=True)
class BurstyDynamics:
    """Parameters of ``--dynamics bursty`` (defaults in docs/preprocessing.md).

    Attributes
    ----------
    sources, rhythms : tuples of BurstSource / BurstRhythm
        Default: lower (8 Hz) and upper (12 Hz) alpha in an occipital source, mu (10 Hz,
        arch-shaped) and beta (20 Hz) in a left sensorimotor source, theta (6 Hz) and beta
        (18 Hz) in a frontal source.
    baseline_dwell_s : float
        Mean time between bursts (in the baseline state).
    idle_decay_ms : float
        Time constant with which a source's oscillation dies out after its burst.
    idle_amplitude : float
        Noise level of an idle source (background units).
    burn_in_s : float
        Simulated and discarded before the session starts (the chain and the sources start
        from their steady state, not from zero).
    """

    sources: tuple[BurstSource, ...] = field(default_factory=_default_sources)
    rhythms: tuple[BurstRhythm, ...] = field(default_factory=_default_rhythms)
    baseline_dwell_s: float = 0.4
    idle_decay_ms: float = 50.0
    idle_amplitude: float = 0.1
    burn_in_s: float = 2.0

    def __post_init__(self):
        for key in ("baseline_dwell_s", "idle_decay_ms"):
            check_number(getattr(self, key), f"bursty dynamics {key!r}", low=0,
                         low_inclusive=False)
        check_number(self.idle_amplitude, "bursty dynamics 'idle_amplitude'", low=0)
        check_number(self.burn_in_s, "bursty dynamics 'burn_in_s'", low=0)
        names = [s.name for s in self.sources]
        if not self.rhythms or len(set(names)) != len(names):
            raise ValueError("bursty dynamics need at least one rhythm and uniquely named "
                             f"sources, got sources {names}")
        for r in self.rhythms:
            validate_type(r.name, "str", "bursty rhythm 'name'")
            if r.source not in names:
                raise ValueError(f"bursty rhythm {r.name!r}: source {r.source!r} is not one "
                                 f"of {names}")
            for key in ("freq_hz", "bandwidth_hz", "amplitude", "dwell_s", "weight"):
                check_number(getattr(r, key), f"bursty rhythm {r.name!r} {key!r}", low=0,
                             low_inclusive=False)
        for s in self.sources:
            check_number(s.harmonic, f"bursty source {s.name!r} 'harmonic'", low=0)
            if len(s.position_m) != 3 or len(s.orientation) != 3:
                raise ValueError(f"bursty source {s.name!r}: position_m and orientation "
                                 "need 3 values")

    def check_rate(self, sfreq: float) -> None:
        """Every rhythm, its harmonic and its dwell time must fit the sampling rate."""
        for r in self.rhythms:
            top = r.freq_hz * (2 if self.source(r.source).harmonic > 0 else 1)
            if top >= sfreq / 2:
                raise ValueError(f"bursty rhythm {r.name!r}: {top:g} Hz (with its harmonic) "
                                 f"is not below the Nyquist frequency {sfreq / 2:g} Hz")
            if r.dwell_s * sfreq < 1:
                raise ValueError(f"bursty rhythm {r.name!r}: dwell_s {r.dwell_s:g} s is "
                                 f"shorter than one sample at {sfreq:g} Hz")

    def source(self, name: str) -> BurstSource:
        return next(s for s in self.sources if s.name == name)

    @property
    def state_names(self) -> list[str]:
        """Names of the hidden states: ``baseline`` then the rhythms."""
        return ["baseline", *(r.name for r in self.rhythms)]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def transition_matrix(dyn: BurstyDynamics, sfreq: float) -> np.ndarray:
    """The chain's (R+1, R+1) transition matrix per sample (rows sum to 1)."""
    n = len(dyn.rhythms) + 1
    trans = np.zeros((n, n))
    leave = 1.0 / (dyn.baseline_dwell_s * sfreq)
    w = np.array([r.weight for r in dyn.rhythms], dtype=float)
    trans[0, 0] = 1.0 - leave
    trans[0, 1:] = leave * w / w.sum()
    for i, r in enumerate(dyn.rhythms, start=1):
        trans[i, i] = 1.0 - 1.0 / (r.dwell_s * sfreq)
        trans[i, 0] = 1.0 / (r.dwell_s * sfreq)
    return trans


def stationary_distribution(dyn: BurstyDynamics) -> np.ndarray:
    """Long-run fraction of time in each state: baseline ∝ baseline_dwell_s, rhythm r ∝
    weight_r / sum(weights) * dwell_r (every burst is followed by a baseline visit)."""
    w = np.array([r.weight for r in dyn.rhythms], dtype=float)
    occ = np.concatenate([[dyn.baseline_dwell_s],
                          w / w.sum() * np.array([r.dwell_s for r in dyn.rhythms])])
    return occ / occ.sum()


@dataclass
class BurstTrace:
    """What :func:`simulate_bursts` drew for one session (T samples, K sources).

    ``states`` int8 (T,) hidden state per sample (0 baseline, r rhythm r);
    ``latent`` float64 (K, T) the oscillators ``x``;
    ``sources`` float64 (K, T) the waveforms ``s`` (background units);
    ``a1``, ``a2``, ``sigma`` float64 (K, T): the AR coefficients and noise level in force at
    each sample (those of ``z_t`` and the source's last rhythm), mapping t to t+1.
    """

    states: np.ndarray
    latent: np.ndarray
    sources: np.ndarray
    a1: np.ndarray
    a2: np.ndarray
    sigma: np.ndarray


def _harmonic_terms(dyn: BurstyDynamics) -> tuple[np.ndarray, np.ndarray]:
    """(harmonic_k, A_k) as (K, 1) columns."""
    harm = np.array([s.harmonic for s in dyn.sources])[:, None]
    ref = np.array([max([r.amplitude for r in dyn.rhythms if r.source == s.name], default=1.0)
                    for s in dyn.sources])[:, None]
    return harm, ref


def _source_waveform(latent: np.ndarray, dyn: BurstyDynamics) -> np.ndarray:
    """``s = x + harmonic * x^2 / A`` per source (K, T)."""
    harm, ref = _harmonic_terms(dyn)
    return latent + harm * latent * latent / ref


def _ar2_sigma(std: float, rho: float, omega: float) -> float:
    """Innovation std giving an AR(2) with poles ``rho e^{+-i omega}`` the std ``std``."""
    a1, a2 = 2 * rho * math.cos(omega), -rho * rho
    gain = (1 - a2) / ((1 + a2) * ((1 - a2) ** 2 - a1 * a1))  # variance per unit noise
    return std / math.sqrt(gain)


def simulate_bursts(n_samples: int, sfreq: float, dyn: BurstyDynamics,
                    rng: np.random.Generator) -> BurstTrace:
    """Draw the hidden chain and the sources of one session (see the module docstring)."""
    dyn.check_rate(sfreq)
    names = [s.name for s in dyn.sources]
    n_src = len(names)
    burn = int(round(dyn.burn_in_s * sfreq))
    total = n_samples + burn
    trans = transition_matrix(dyn, sfreq)
    cum = np.cumsum(trans, axis=1)
    cum[:, -1] = 1.0
    u = rng.random(total)
    states = np.empty(total, dtype=np.int64)
    states[0] = int(np.searchsorted(np.cumsum(stationary_distribution(dyn)), rng.random()))
    for t in range(1, total):
        states[t] = int(np.searchsorted(cum[states[t - 1]], u[t], side="right"))
    states = np.minimum(states, len(dyn.rhythms))

    # per state: which source bursts, with which coefficients
    rho_idle = math.exp(-1.0 / (dyn.idle_decay_ms * 1e-3 * sfreq))
    active_src = np.full(len(dyn.rhythms) + 1, -1)
    rho_on, om_on, sig_on = (np.zeros(len(dyn.rhythms) + 1) for _ in range(3))
    for i, r in enumerate(dyn.rhythms, start=1):
        active_src[i] = names.index(r.source)
        rho_on[i] = math.exp(-math.pi * r.bandwidth_hz / sfreq)
        om_on[i] = 2 * math.pi * r.freq_hz / sfreq
        sig_on[i] = _ar2_sigma(r.amplitude, rho_on[i], om_on[i])
    last_om = np.array([2 * math.pi * next((r.freq_hz for r in dyn.rhythms if r.source == s),
                                           0.0) / sfreq for s in names])

    rho = np.full((n_src, total), rho_idle)
    omega = np.empty((n_src, total))
    sigma = np.empty((n_src, total))
    on = np.zeros((n_src, total), dtype=bool)
    for t in range(total):
        z = states[t]
        k = active_src[z]
        if k >= 0:
            last_om[k] = om_on[z]
            on[k, t] = True
            rho[k, t], sigma[k, t] = rho_on[z], sig_on[z]
        omega[:, t] = last_om
    # idle sources: the noise that gives std idle_amplitude at their current frequency
    c, r2 = np.cos(omega), rho_idle * rho_idle
    idle_gain = (1 + r2) / ((1 - r2) * ((1 + r2) ** 2 - 4 * r2 * c * c))
    sigma = np.where(on, sigma, dyn.idle_amplitude / np.sqrt(idle_gain))
    a1, a2 = 2 * rho * np.cos(omega), -rho * rho
    eta = rng.standard_normal((n_src, total))
    latent = np.zeros((n_src, total))
    for t in range(1, total - 1):
        latent[:, t + 1] = a1[:, t] * latent[:, t] + a2[:, t] * latent[:, t - 1] \
            + sigma[:, t] * eta[:, t]
    keep = slice(burn, total)
    latent = latent[:, keep]
    return BurstTrace(states=states[keep].astype(np.int8), latent=latent,
                      sources=_source_waveform(latent, dyn), a1=a1[:, keep], a2=a2[:, keep],
                      sigma=sigma[:, keep])


def burst_one_step_mean(trace: BurstTrace, dyn: BurstyDynamics) -> np.ndarray:
    """The oracle's prediction of the source waveforms: ``E[s_{t+1} | z_t, x_t, x_{t-1}]``
    (K, T).

    Column ``t`` predicts ``trace.sources[:, t]`` from time ``t - 1`` (columns 0 and 1 are
    left at 0). With ``m = a1 x_t + a2 x_{t-1}``, ``x_{t+1} ~ N(m, sigma^2)``, so the mean of
    the waveform is ``m + harmonic (m^2 + sigma^2) / A``.
    """
    harm, ref = _harmonic_terms(dyn)
    x = trace.latent
    out = np.zeros_like(x)
    m = trace.a1[:, 1:-1] * x[:, 1:-1] + trace.a2[:, 1:-1] * x[:, :-2]
    out[:, 2:] = m + harm * (m * m + trace.sigma[:, 1:-1] ** 2) / ref
    return out


def burst_patterns(info, dyn: BurstyDynamics) -> np.ndarray:
    """Sensor patterns ``g_k`` (n_channels, K) of the sources' dipoles, each scaled so its
    largest magnetometer entry is 1 (or its largest entry, without magnetometers)."""
    import mne

    origin = np.asarray(SPHERE_ORIGIN_M)
    pos = np.array([s.position_m for s in dyn.sources], dtype=float)
    ori = np.array([s.orientation for s in dyn.sources], dtype=float)
    radial = (pos - origin) / np.linalg.norm(pos - origin, axis=1, keepdims=True)
    ori = ori - (ori * radial).sum(axis=1, keepdims=True) * radial  # radial dipoles are silent
    norm = np.linalg.norm(ori, axis=1, keepdims=True)
    if np.any(norm < 1e-6):
        bad = [s.name for s, n in zip(dyn.sources, norm[:, 0]) if n < 1e-6]
        raise ValueError(f"bursty sources {bad}: orientation is radial (invisible to MEG); "
                         "give a tangential orientation")
    ori /= norm
    sphere = mne.make_sphere_model(tuple(origin), head_radius=None, verbose="error")
    dip = mne.Dipole(np.zeros(len(pos)), pos, np.full(len(pos), 1e-8), ori, np.ones(len(pos)))
    with mne.utils.use_log_level("ERROR"):
        fwd, _ = mne.make_forward_dipole(dip, sphere, info, trans=None, verbose="error")
    rows = list(fwd["sol"]["row_names"])
    gain = np.zeros((len(info["ch_names"]), len(pos)))
    for i, name in enumerate(info["ch_names"]):  # (C, K) in the order of info
        if name in rows:
            gain[i] = fwd["sol"]["data"][rows.index(name)]
    picks = mne.pick_types(info, meg="mag")
    ref = np.abs(gain[picks] if len(picks) else gain).max(axis=0)
    return gain / ref

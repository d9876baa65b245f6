"""``--dynamics bursty``: the hidden chain's statistics, reproducibility, non-Gaussian
waveforms, and headroom over a linear predictor (the point of the option)."""

from __future__ import annotations

import numpy as np
import pytest

from ephys_gpt.preprocessing.dynamics import (
    BurstRhythm,
    BurstyDynamics,
    burst_one_step_mean,
    simulate_bursts,
    stationary_distribution,
    transition_matrix,
)

SFREQ = 150.0


@pytest.fixture(scope="module")
def long_trace():
    """300 s of the default bursty sources (no background: fast)."""
    return simulate_bursts(int(300 * SFREQ), SFREQ, BurstyDynamics(), np.random.default_rng(0))


def _var_one_step_mse(x: np.ndarray, p: int, train: int) -> np.ndarray:
    """Per-channel 1-step MSE on samples >= train of a VAR(p) (with intercept) fitted by plain
    least squares on the samples before ``train``."""
    n = x.shape[1]
    lags = np.vstack([x[:, p - lag - 1: n - lag - 1] for lag in range(p)]
                     + [np.ones((1, n - p))])
    target = x[:, p:]
    fit = slice(0, train - p)
    coef = np.linalg.lstsq(lags[:, fit].T, target[:, fit].T, rcond=None)[0]
    err = target[:, train - p:] - coef.T @ lags[:, train - p:]
    return (err ** 2).mean(axis=1)


def _kurtosis(v):
    v = v - v.mean()
    return (v ** 4).mean() / (v ** 2).mean() ** 2


def _skewness(v):
    v = v - v.mean()
    return (v ** 3).mean() / (v ** 2).mean() ** 1.5


def test_hidden_chain_statistics(long_trace):
    dyn = BurstyDynamics()
    states = long_trace.states.astype(int)
    trans = transition_matrix(dyn, SFREQ)
    np.testing.assert_allclose(trans.sum(axis=1), 1.0)
    # baseline and bursts alternate: no direct jump from one rhythm to another
    changes = np.flatnonzero(np.diff(states)) + 1
    assert np.all((states[changes - 1] == 0) | (states[changes] == 0))
    # time in each state and the mean dwell times match the parameters
    occupancy = np.bincount(states, minlength=len(dyn.rhythms) + 1) / states.size
    np.testing.assert_allclose(occupancy, stationary_distribution(dyn), atol=0.04)
    starts = np.concatenate([[0], changes])
    lengths = np.diff(np.concatenate([starts, [states.size]]))
    for s, dwell in enumerate([dyn.baseline_dwell_s, *(r.dwell_s for r in dyn.rhythms)]):
        episodes = lengths[states[starts] == s][1:-1] / SFREQ  # whole episodes only
        # geometric dwell times: the mean's standard error is about dwell / sqrt(n)
        assert abs(episodes.mean() - dwell) < 3 * dwell / np.sqrt(episodes.size), \
            (dyn.state_names[s], episodes.mean(), episodes.size)


def test_reproducible_from_the_generator(long_trace):
    again = simulate_bursts(int(300 * SFREQ), SFREQ, BurstyDynamics(), np.random.default_rng(0))
    np.testing.assert_array_equal(again.states, long_trace.states)
    np.testing.assert_array_equal(again.sources, long_trace.sources)
    other = simulate_bursts(int(300 * SFREQ), SFREQ, BurstyDynamics(), np.random.default_rng(1))
    assert np.mean(other.states != long_trace.states) > 0.3


def test_bursts_have_the_rhythms_frequencies_and_non_gaussian_amplitudes(long_trace):
    dyn = BurstyDynamics()
    src = [s.name for s in dyn.sources]
    for i, r in enumerate(dyn.rhythms, start=1):
        s = long_trace.sources[src.index(r.source)][long_trace.states == i]
        spec = np.abs(np.fft.rfft(s - s.mean())) ** 2
        freqs = np.fft.rfftfreq(s.size, 1 / SFREQ)
        assert abs(freqs[spec.argmax()] - r.freq_hz) < 1.0, r.name
    for k, name in enumerate(src):  # bursts: heavy tails, far from a Gaussian's 3
        assert _kurtosis(long_trace.sources[k]) > 6, name
    # the arch-shaped mu rhythm (second harmonic) is skewed; the sinusoidal alpha is not
    state = {name: i for i, name in enumerate(dyn.state_names)}
    mu = long_trace.sources[src.index("sensorimotor-left")][long_trace.states == state["mu"]]
    alpha = long_trace.sources[src.index("occipital")][long_trace.states == state["alpha-low"]]
    assert _skewness(mu) > 0.5 and abs(_skewness(alpha)) < 0.2


def test_oracle_is_the_conditional_mean(long_trace):
    """The oracle's residual is the innovation: uncorrelated with the past."""
    dyn = BurstyDynamics()
    resid = long_trace.sources - burst_one_step_mean(long_trace, dyn)
    for k in range(resid.shape[0]):
        for lag in (1, 2, 5):
            r = np.corrcoef(resid[k, lag + 1:], long_trace.sources[k, 1:-lag])[0, 1]
            assert abs(r) < 0.05, (k, lag, r)  # bursts: heavy tails, few effective samples


def test_a_var_cannot_reach_the_oracle(long_trace):
    """The point of the option: the best predictor is nonlinear. A VAR(20) fitted by least
    squares to the sources themselves (150 s, scored on the other 150 s) has a larger 1-step
    error than the oracle that knows the hidden state: most where a source switches between
    two distant rhythms (mu 10 Hz, arch-shaped / beta 20 Hz; theta 6 Hz / beta 18 Hz)."""
    dyn = BurstyDynamics()
    s = long_trace.sources
    half = s.shape[1] // 2
    var = _var_one_step_mse(s, 20, half)
    oracle = ((s - burst_one_step_mean(long_trace, dyn))[:, half:] ** 2).mean(axis=1)
    ratio = dict(zip([x.name for x in dyn.sources], var / oracle))
    assert ratio["sensorimotor-left"] > 1.5 and ratio["frontal"] > 1.2, ratio
    assert ratio["occipital"] > 1.05, ratio  # 8 and 12 Hz: close, a VAR nearly covers both


def test_a_linear_source_leaves_no_headroom():
    """Control: one rhythm per source, always on (a linear AR process): the VAR equals the
    oracle, so the gap above comes from the switching and the harmonic."""
    dyn = BurstyDynamics(rhythms=(BurstRhythm("alpha", "occipital", 10.0, 1.5, 4.0, 1e6),),
                         baseline_dwell_s=1e-6)
    trace = simulate_bursts(int(200 * SFREQ), SFREQ, dyn, np.random.default_rng(2))
    assert np.all(trace.states == 1)
    s = trace.sources[:1]
    half = s.shape[1] // 2
    var = _var_one_step_mse(s, 20, half)[0]
    oracle = ((s - burst_one_step_mean(trace, dyn)[:1])[:, half:] ** 2).mean()
    assert var / oracle < 1.02


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="'beta'.*source 'nowhere'"):
        BurstyDynamics(rhythms=(BurstRhythm("beta", "nowhere", 20.0, 2.0, 1.0, 0.2),))
    with pytest.raises(ValueError, match="'amplitude'"):
        BurstyDynamics(rhythms=(BurstRhythm("a", "occipital", 10.0, 2.0, float("nan"), 0.2),))
    fast = BurstyDynamics(rhythms=(BurstRhythm("gamma", "sensorimotor-left", 40.0, 2.0, 1.0,
                                               0.2),))
    with pytest.raises(ValueError, match="'gamma': 80 Hz .*harmonic.* Nyquist"):
        fast.check_rate(SFREQ)


@pytest.mark.slow
def test_headroom_in_sensor_space_against_the_mvar_control():
    """On a whole session (template background + bursts), a VAR(10)'s 1-step error over the
    oracle's is clearly larger than on the template background alone, where the oracle is
    the template's own MVAR (the same draw: 180 s, one to three minutes; bench/simulate_headroom.py
    gives the figures for longer sessions)."""
    mne = pytest.importorskip("mne")
    from ephys_gpt.preprocessing.simulate import simulate_session, template_one_step_mean

    sim = simulate_session(180, 11, dynamics="bursty")
    info = sim.raw.info
    bg_oracle = template_one_step_mean(sim.background, info)
    oracle = bg_oracle + sim.patterns @ burst_one_step_mean(sim.trace, BurstyDynamics())
    ratios = {}
    for kind in ("mag", "grad"):
        picks = mne.pick_types(info, meg=kind)
        for name, x, pred in (("bursty", sim.raw.get_data(), oracle),
                              ("mvar", sim.background, bg_oracle)):
            x, pred = x[picks, 20:], pred[picks, 20:]  # the template oracle needs 18 lags
            train = int(0.75 * x.shape[1])
            scale = x[:, :train].std(axis=1, keepdims=True)
            # a VAR in the data's principal subspace (the template has rank 50 per type)
            u, sv, _ = np.linalg.svd(x[:, :train] / scale, full_matrices=False)
            basis = u[:, sv > sv[0] * 1e-6]
            y, y_pred = basis.T @ (x / scale), basis.T @ (pred / scale)
            var = _var_one_step_mse(y, 10, train).mean()
            ratios[name, kind] = var / ((y - y_pred)[:, train:] ** 2).mean()
    assert ratios["bursty", "grad"] > 1.08 * ratios["mvar", "grad"], ratios
    assert ratios["bursty", "mag"] > ratios["mvar", "mag"], ratios

"""Spectral / covariance helpers on signals whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from ephys_gpt.eval import spectral

SFREQ = 150.0


def _sine(freq, seconds=20.0, n_ch=3, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SFREQ)) / SFREQ
    return np.sin(2 * np.pi * freq * t)[None] + noise * rng.standard_normal((n_ch, t.size))


def _pink(n, seed=0):
    """1/f-like noise: a random walk with a leak (no spectral peak)."""
    rng = np.random.default_rng(seed)
    x = np.zeros(n)
    e = rng.standard_normal(n)
    for i in range(1, n):
        x[i] = 0.97 * x[i - 1] + e[i]
    return x


def test_welch_psd_peak_of_a_10hz_sine_is_at_10hz():
    freqs, psd = spectral.welch_psd(_sine(10.0), SFREQ)
    assert psd.shape == (3, freqs.size)
    assert freqs[0] == 0 and freqs[-1] == pytest.approx(SFREQ / 2)
    assert np.all(freqs[psd.argmax(axis=-1)] == pytest.approx(10.0))


def test_welch_psd_integrates_to_the_variance():
    x = np.random.default_rng(1).standard_normal((2, 6000)) * 3.0
    freqs, psd = spectral.welch_psd(x, SFREQ)
    power = psd.sum(axis=-1) * (freqs[1] - freqs[0])
    np.testing.assert_allclose(power, 9.0, rtol=0.1)


@pytest.mark.parametrize("freq", [9.0, 10.5, 12.0])
def test_alpha_peak_finds_the_sine_frequency(freq):
    x = _sine(freq, noise=0.0)[:1] + 0.3 * _pink(int(20 * SFREQ))[None] / 10
    freqs, psd = spectral.welch_psd(x, SFREQ, seg_seconds=4.0)
    peak = spectral.alpha_peak(freqs, psd[0])
    assert peak.detected
    assert peak.freq == pytest.approx(freq, abs=0.25)
    assert peak.ratio > 10


def test_no_alpha_peak_in_aperiodic_noise():
    freqs, psd = spectral.welch_psd(_pink(30000), SFREQ)
    peak = spectral.alpha_peak(freqs, psd)
    assert not peak.detected
    assert peak.ratio < 1.5


def test_find_peak_rejects_bad_input():
    freqs = np.linspace(0, 75, 151)
    with pytest.raises(ValueError, match="does not match freqs"):
        spectral.find_peak(freqs, np.ones((2, 151)))
    with pytest.raises(ValueError, match="no frequency bins inside the band"):
        spectral.find_peak(freqs, np.ones(151), band=(80.0, 90.0))
    with pytest.raises(ValueError, match="low < high"):
        spectral.find_peak(freqs, np.ones(151), band=(13.0, 8.0))


def test_psd_by_channel_type_averages_each_type():
    x = np.stack([_sine(10.0, n_ch=1)[0], _sine(20.0, n_ch=1)[0], _sine(20.0, n_ch=1, seed=3)[0]])
    freqs, psds = spectral.psd_by_channel_type(x, SFREQ, ["mag", "grad", "grad"])
    assert list(psds) == ["mag", "grad"]
    assert freqs[psds["mag"].argmax()] == pytest.approx(10.0)
    assert freqs[psds["grad"].argmax()] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="ch_types lists 2"):
        spectral.psd_by_channel_type(x, SFREQ, ["mag", "grad"])


def test_covariance_similarity_of_identical_data_is_one():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((5, 5))
    x = mix @ rng.standard_normal((5, 4000))
    cov = spectral.channel_covariance(x)
    np.testing.assert_allclose(cov, np.cov(x), rtol=1e-10)
    sim = spectral.matrix_similarity(cov, spectral.channel_covariance(x.copy()))
    assert sim["offdiag_correlation"] == pytest.approx(1.0)
    assert sim["relative_frobenius_error"] == pytest.approx(0.0, abs=1e-12)
    corr = spectral.channel_correlation(x)
    np.testing.assert_allclose(corr, np.corrcoef(x), atol=1e-10)


def test_covariance_similarity_of_unrelated_data_is_low():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 20)) @ rng.standard_normal((20, 4000))
    b = rng.standard_normal((20, 20)) @ rng.standard_normal((20, 4000))
    sim = spectral.matrix_similarity(spectral.channel_correlation(a), spectral.channel_correlation(b))
    assert abs(sim["offdiag_correlation"]) < 0.3
    assert sim["relative_frobenius_error"] > 0.5


def test_psd_similarity():
    freqs, psd = spectral.welch_psd(_sine(10.0), SFREQ)
    same = spectral.psd_similarity(psd[0], psd[0], freqs)
    assert same["log_spectral_distance_db"] == 0.0
    assert same["log_psd_correlation"] == pytest.approx(1.0)
    louder = spectral.psd_similarity(psd[0] * 10, psd[0], freqs)
    assert louder["log_spectral_distance_db"] == pytest.approx(10.0)


def test_channel_correlation_with_a_flat_channel():
    x = np.vstack([np.random.default_rng(0).standard_normal(100), np.zeros(100)])
    corr = spectral.channel_correlation(x)
    np.testing.assert_array_equal(corr, [[1.0, 0.0], [0.0, 0.0]])


def test_bad_signals_are_rejected():
    with pytest.raises(ValueError, match="NaN or Inf"):
        spectral.welch_psd(np.array([[1.0, np.nan, 2.0, 3.0, 4.0]]), SFREQ)
    with pytest.raises(ValueError, match="at least 4 samples"):
        spectral.welch_psd(np.ones((2, 3)), SFREQ)
    with pytest.raises(ValueError, match="sfreq"):
        spectral.welch_psd(np.ones((2, 30)), 0)


def test_alpha_peak_beside_a_stronger_beta_peak_is_found():
    """A beta peak on the band's upper flank must not lift the fitted 1/f background."""
    f = np.arange(1.0, 46.0)
    psd = 1.0 / f
    psd[f == 10] *= 3.0   # alpha: 3x its background
    psd[f == 17] *= 30.0  # beta, much stronger, inside the (13, 17] flank
    peak = spectral.alpha_peak(f, psd)
    assert peak.freq == 10.0 and peak.detected
    assert 2.5 < peak.ratio < 3.5
    flat = 1.0 / f
    flat[f == 17] *= 30.0
    assert not spectral.alpha_peak(f, flat).detected

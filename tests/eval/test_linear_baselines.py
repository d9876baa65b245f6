"""Linear AR/VAR baselines (ephys_gpt/linear/): fitting, prediction, tokens, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ephys_gpt.codec import mulaw_quantize, tokens_to_signal
from ephys_gpt.dataset.datasplitter import split_datasets
from ephys_gpt.linear import (
    LinearBaselineOptions,
    LinearPredictor,
    Segments,
    decode_tokens,
    fit_linear,
    fit_linear_baselines,
    requantize,
    token_bin_edges,
)
from ephys_gpt.store import write_session

# -- simulated processes -----------------------------------------------------------------------


def simulate_var(coefs: list[np.ndarray], n: int, seed, noise_cov=None, intercept=None,
                 burn: int = 500):
    """x[t] = b + sum_l A_l x[t - l] + e[t], e ~ N(0, noise_cov): (C, n), or a list of
    them when ``seed`` is a list (one independent segment per seed, simulated together)."""
    seeds = seed if isinstance(seed, list) else [seed]
    C, p = coefs[0].shape[0], len(coefs)
    chol = np.linalg.cholesky(noise_cov if noise_cov is not None else np.eye(C))
    b = np.zeros(C) if intercept is None else np.asarray(intercept, dtype=float)
    e = np.stack([np.random.default_rng(s).standard_normal((n + burn, C)) for s in seeds],
                 axis=1) @ chol.T  # (time, segments, C)
    x = np.zeros_like(e)
    at = [a.T for a in coefs]
    for t in range(p, n + burn):
        acc = b + e[t]
        for lag in range(p):
            acc = acc + x[t - 1 - lag] @ at[lag]
        x[t] = acc
    out = [x[burn:, i].T.copy() for i in range(len(seeds))]
    return out if isinstance(seed, list) else out[0]


def var2_params():
    """A stable 3-channel VAR(2) with cross-channel coupling and correlated innovations."""
    a1 = np.array([[0.5, 0.2, 0.0], [-0.1, 0.4, 0.15], [0.0, 0.25, 0.3]])
    a2 = np.array([[-0.3, 0.0, 0.1], [0.0, -0.2, 0.0], [0.1, 0.0, -0.25]])
    cov = np.array([[1.0, 0.3, 0.1], [0.3, 1.0, 0.2], [0.1, 0.2, 0.5]])
    return [a1, a2], cov


def lagged_design(segments, p, proj=None, per_channel=None):
    """The materialized regression (rows never cross segments): X (n, p*K), Y (n, C);
    column block l-1 holds lag l. ``per_channel=c``: the AR design of channel c."""
    from numpy.lib.stride_tricks import sliding_window_view

    xs, ys = [], []
    for x in segments:
        z = x if proj is None else proj @ x
        if per_channel is not None:
            z, x = z[per_channel:per_channel + 1], x[per_channel:per_channel + 1]
        if x.shape[1] <= p:
            continue
        w = sliding_window_view(z, p, axis=1)[:, :-1, ::-1]  # [k, row, lag - 1]
        xs.append(w.transpose(1, 2, 0).reshape(w.shape[1], -1))
        ys.append(x[:, p:].T)
    return np.concatenate(xs), np.concatenate(ys)


def ridge_reference(X, Y, ridge):
    """Batch ridge with an unpenalized intercept, lam = ridge * trace(Xc'Xc) / F."""
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    G = Xc.T @ Xc
    lam = ridge * np.trace(G) / G.shape[0]
    B = np.linalg.solve(G + lam * np.eye(G.shape[0]), Xc.T @ Yc)
    resid = Yc - Xc @ B
    return B, my - mx @ B, resid.T @ resid / len(Y)


# -- fitting -----------------------------------------------------------------------------------


def test_var_fit_recovers_coefficients_within_their_standard_errors():
    (a1, a2), cov = var2_params()
    segs = simulate_var([a1, a2], 6000, seed=[0, 1, 2, 3], noise_cov=cov,
                        intercept=[0.5, -0.2, 0.0])
    model = fit_linear(segs, "var", 2, ridge=0.0)
    assert model.coef.shape == (2, 3, 3) and model.name == "VAR(2)"
    # OLS: cov(vec B) = noise_cov (x) (X'X)^-1, so each coefficient has standard error
    # sqrt(noise_var_i * [(Xc'Xc)^-1]_jj) ~ 0.01 with n ~ 24000 rows; 5 standard errors
    # bound all 18 coefficients at once with probability > 0.9999.
    X, _ = lagged_design(segs, 2)
    Xc = X - X.mean(0)
    ginv = np.diag(np.linalg.inv(Xc.T @ Xc))  # (p*K,), lag-major
    se = np.sqrt(np.outer(np.diag(cov), ginv)).reshape(3, 2, 3).transpose(1, 0, 2)
    err = np.abs(model.coef - np.stack([a1, a2]))
    assert (err < 5 * se).all(), (err / se).max()
    assert se.max() < 0.02
    # innovations and the process mean come back too (relative error ~ sqrt(2 / n))
    np.testing.assert_allclose(model.noise_cov, cov, atol=0.04)
    mu = np.linalg.solve(np.eye(3) - a1 - a2, [0.5, -0.2, 0.0])
    np.testing.assert_allclose(model.mean, mu, atol=0.05)
    np.testing.assert_allclose(model.intercept, [0.5, -0.2, 0.0], atol=0.05)


def test_ar_fit_recovers_each_channels_own_coefficients():
    # two independent AR(2) channels with different dynamics (a 10 Hz resonance and a slow one)
    coefs = [np.diag([1.6, 0.5]), np.diag([-0.8, 0.2])]
    segs = simulate_var(coefs, 8000, seed=[0, 1, 2])
    model = fit_linear(segs, "ar", 2, ridge=0.0)
    assert model.coef.shape == (2, 2) and model.name == "AR(2)"
    # AR standard errors sqrt((1 - a2^2) / n) <= 0.007 at n = 24000: 6e-3 * 5 = 0.03
    np.testing.assert_allclose(model.coef, [[1.6, 0.5], [-0.8, 0.2]], atol=0.03)
    np.testing.assert_allclose(np.diag(model.noise_cov), [1.0, 1.0], atol=0.05)
    assert np.count_nonzero(model.noise_cov - np.diag(np.diag(model.noise_cov))) == 0


@pytest.mark.parametrize("kind,n_components", [("ar", None), ("var", None), ("var", 2)])
def test_streaming_fit_equals_batch_fit(kind, n_components):
    (a1, a2), cov = var2_params()
    x = simulate_var([a1, a2], 3000, seed=1, noise_cov=cov) * 1e-12 + 3e-12  # SI-like units
    segs = [x[:, :700], x[:, 700:1900], x[:, 1900:1910], x[:, 1910:]]  # uneven, one short
    p, ridge = 4, 1e-3
    kw = {"n_components": n_components} if kind == "var" else {}
    # a tiny block size cuts every segment into many blocks of rows
    model = fit_linear(segs, kind, p, ridge=ridge, buffer_mb=0.003, **kw)
    big = fit_linear(segs, kind, p, ridge=ridge, buffer_mb=64, **kw)
    np.testing.assert_allclose(model.coef, big.coef, rtol=1e-10, atol=0)
    if kind == "ar":
        for c in range(3):
            B, b, res = ridge_reference(*lagged_design(segs, p, per_channel=c), ridge)
            np.testing.assert_allclose(model.coef[:, c], B[:, 0], rtol=1e-9)
            np.testing.assert_allclose(model.intercept[c], b[0], rtol=1e-9)
            np.testing.assert_allclose(model.noise_cov[c, c], res[0, 0], rtol=1e-9)
    else:
        B, b, res = ridge_reference(*lagged_design(segs, p, proj=model.projection), ridge)
        K = 3 if n_components is None else n_components
        np.testing.assert_allclose(model.coef, B.reshape(p, K, 3).transpose(0, 2, 1),
                                   rtol=1e-9, atol=1e-12 * np.abs(B).max())
        np.testing.assert_allclose(model.intercept, b, rtol=1e-9, atol=1e-24)
        np.testing.assert_allclose(model.noise_cov, res, rtol=1e-9)
    assert model.n_rows == sum(s.shape[1] - p for s in segs if s.shape[1] > p)


@pytest.mark.parametrize("kind", ["ar", "var"])
def test_no_lag_crosses_a_segment_boundary(kind):
    # noise-free x[t+1] = 0.9 x[t] inside each segment, each starting at its own level:
    # a row spanning two segments would break the relation and show up as a residual
    rng = np.random.default_rng(0)
    segs = [np.outer(rng.uniform(-5, 5, 2), 0.9 ** np.arange(40)) for _ in range(6)]
    model = fit_linear(segs, kind, 1, ridge=0.0)
    expect = np.full((1, 2), 0.9) if kind == "ar" else 0.9 * np.eye(2)[None]
    np.testing.assert_allclose(model.coef, expect, atol=1e-9)
    assert np.abs(model.noise_cov).max() < 1e-12  # rounding only (the data's variance ~ 5)
    assert model.n_rows == 6 * 39
    joined = fit_linear([np.concatenate(segs, axis=1)], kind, 1, ridge=0.0)
    assert np.abs(joined.noise_cov).max() > 1e-3  # the junction rows do leave residuals


def test_a_flat_channel_without_ridge_uses_the_minimum_norm_solution(caplog):
    (a1, a2), cov = var2_params()
    x = simulate_var([a1, a2], 3000, seed=7, noise_cov=cov)
    flat = np.concatenate([x, np.full((1, 3000), 2.5)])  # a dead sensor: singular Gram
    with caplog.at_level("WARNING", logger="ephys_gpt.linear.fitting"):
        model = fit_linear([flat], "var", 2, ridge=0.0)
    assert "singular" in caplog.text
    assert np.abs(model.coef[:, :, 3]).max() < 1e-12 and np.abs(model.coef[:, 3]).max() < 1e-12
    ref = fit_linear([x], "var", 2, ridge=0.0)
    xt = torch.as_tensor(flat[None, :, :200])
    pred = model.predict_next(xt)[0].numpy()
    np.testing.assert_allclose(pred[:3], ref.predict_next(xt[:, :3])[0].numpy(), atol=1e-8)
    np.testing.assert_allclose(pred[3], 2.5, rtol=1e-12)
    np.testing.assert_allclose(model.noise_cov[:3, :3], ref.noise_cov, atol=1e-10)


def write_continuous_store(root, n_sessions=3, chunks=(300, 300, 120), seed=0):
    """Sessions of a 3-channel VAR(2) in float32 chunks (normalized units)."""
    (a1, a2), cov = var2_params()
    for s in range(n_sessions):
        x = simulate_var([a1, a2], sum(chunks), seed=seed + s, noise_cov=cov).astype(np.float32)
        bounds = np.cumsum((0,) + tuple(chunks))
        meta = {"sfreq": 100.0, "ch_names": ["A", "B", "C"], "ch_types": ["mag"] * 3,
                "pos_2d": [[0, 0], [1, 0], [0, 1]], "chunk_samples": max(chunks),
                "steps": [{"name": "normalize", "method": "robust", "center": [0.0] * 3,
                           "scale": [1.0] * 3}],
                "provenance": {"subject": f"{s:02d}"}}
        write_session(root, f"sub-{s:02d}", [x[:, a:b] for a, b in zip(bounds, bounds[1:])],
                      meta)
    return root


def test_dataset_segments_merge_windows_within_chunks_only(tmp_path):
    root = write_continuous_store(tmp_path / "store")
    splits = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.5,
                            split_by="time", val_ratio=0.2, test_ratio=0.2, seed=0)
    train = splits.train
    seg = Segments(train)
    # every run lies inside one chunk, covers only samples of training windows, and runs of
    # one chunk are separated by a gap (else they would have been merged)
    covered = {}
    for s, c, start in train.indices.tolist():
        covered.setdefault((s, c), set()).update(range(start, start + train.read_samples))
    for s, c, a, b in seg.runs:
        assert set(range(a, b)) <= covered[(s, c)]
        assert b <= train.metas[s].chunk_lengths[c]
    assert sum(b - a for *_, a, b in seg.runs) == sum(len(v) for v in covered.values())
    per_window = Segments(train, contiguous=False)
    assert len(per_window) == len(train) > len(seg)
    x = seg.read(0)
    s, c, a, b = seg.runs[0]
    np.testing.assert_array_equal(x, np.load(train.metas[s].chunk_path(c))[:, a:b])
    # the model fitted on the dataset sees only these segments
    m = fit_linear(train, "var", 3)
    assert m.n_rows == sum(b - a - 3 for *_, a, b in seg.runs if b - a > 3)
    # a sample budget keeps whole segments, spread over the split
    few = Segments(train, max_samples=seg.n_samples // 2)
    assert set(few.runs) < set(seg.runs) and few.n_samples <= seg.n_samples // 2 + max(
        b - a for *_, a, b in seg.runs)
    assert {r[0] for r in few.runs} == {r[0] for r in seg.runs}  # every session still read
    with pytest.raises(ValueError, match="max_samples must be a positive integer"):
        Segments(train, max_samples=0)


def test_dataset_segments_name_the_file_of_a_non_finite_value(tmp_path):
    root = write_continuous_store(tmp_path / "store", n_sessions=1)
    path = root / "sub-00" / "0.npy"
    chunk = np.load(path)
    chunk[1, 50] = np.nan  # damaged after it was written (the writer refuses NaN)
    np.save(path, chunk)
    ds = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.5,
                        split_by="time", val_ratio=0.0, test_ratio=0.0).train
    with pytest.raises(ValueError, match=r"non-finite value \(nan\).*sub-00.*0\.npy.*'B'"):
        fit_linear(ds, "ar", 2)


# -- order selection ---------------------------------------------------------------------------


def var3_params():
    a1 = np.array([[0.4, 0.1, 0.0], [0.0, 0.3, 0.1], [0.1, 0.0, 0.35]])
    a3 = np.array([[-0.35, 0.0, 0.0], [0.1, -0.3, 0.0], [0.0, 0.0, -0.3]])
    return [a1, np.zeros((3, 3)), a3]


@pytest.mark.parametrize("criterion", ["val", "bic"])
@pytest.mark.parametrize("kind", ["ar", "var"])
def test_order_selection_picks_the_true_order(kind, criterion):
    coefs = var3_params() if kind == "var" else [np.diag([0.4, 0.3, 0.35]), np.zeros((3, 3)),
                                                 np.diag([-0.35, -0.3, -0.3])]
    train = simulate_var(coefs, 2500, seed=[0, 1])
    # validation much larger than training: the out-of-sample cost of a surplus lag
    # (~ #coefs / n_train) dominates the validation noise (~ sqrt(#coefs / (n_train n_val)))
    val = simulate_var(coefs, 10000, seed=[10, 11])
    model = fit_linear(train, kind, "auto", val=val, orders=[1, 2, 3, 4, 5, 6],
                       criterion=criterion)
    sel = model.selection
    assert sel["chosen"] == 3 == model.order, sel
    assert sel["criterion"] == ("val_mse" if criterion == "val" else "bic")
    assert sel["orders"] == [1, 2, 3, 4, 5, 6] and len(sel["scores"]) == 6
    # the chosen candidate equals a direct fit on the same rows (those with 6 lags)
    direct = fit_linear([s[:, 3:] for s in train], kind, 3, ridge=model.ridge)
    np.testing.assert_allclose(model.coef, direct.coef, rtol=1e-9, atol=1e-12)


def test_val_criterion_without_val_data_falls_back_to_bic():
    train = [simulate_var(var3_params(), 4000, seed=3)]
    model = fit_linear(train, "var", "auto", max_order=5)
    assert model.selection["criterion"] == "bic" and model.order == 3


# -- prediction --------------------------------------------------------------------------------


def test_predict_next_matches_the_model_equation_and_handles_the_warmup():
    (a1, a2), cov = var2_params()
    model = LinearPredictor(kind="var", coef=np.stack([a1, a2]), intercept=[0.1, 0.0, -0.1],
                            noise_cov=cov, mean=[1.0, 2.0, 3.0])
    x = torch.randn(2, 3, 20, dtype=torch.float32)
    out = model.predict_next(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    xd = x.double().numpy()
    for t in range(1, 20):  # full history from t = p - 1 = 1
        ref = a1 @ xd[:, :, t].T + a2 @ xd[:, :, t - 1].T + np.array([[0.1], [0.0], [-0.1]])
        np.testing.assert_allclose(out[..., t].numpy(), ref.T, rtol=1e-5, atol=1e-5)
    # t = 0: the missing lag is the training mean
    ref0 = a1 @ xd[:, :, 0].T + (a2 @ np.array([1.0, 2.0, 3.0]))[:, None] + \
        np.array([[0.1], [0.0], [-0.1]])
    np.testing.assert_allclose(out[..., 0].numpy(), ref0.T, rtol=1e-5, atol=1e-5)
    assert model.valid_from == 1
    nan = model.predict_next(x, warmup="nan")
    assert torch.isnan(nan[..., 0]).all() and torch.equal(nan[..., 1:], out[..., 1:])
    # numpy in, numpy out, (C, T) accepted
    np.testing.assert_allclose(model.predict_next(xd[0]), out[0].double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["ar", "var"])
def test_order_one_predicts_from_the_last_sample_only(kind):
    (a1, a2), cov = var2_params()
    x = simulate_var([a1, a2], 2000, seed=6, noise_cov=cov)
    model = fit_linear([x], kind, 1)
    assert model.valid_from == 0
    xt = torch.as_tensor(x[None, :, :30])
    out = model.predict_next(xt, warmup="nan")
    assert torch.isfinite(out).all()
    a = np.diag(model.coef[0]) if kind == "ar" else model.coef[0]
    np.testing.assert_allclose(out[0].numpy(), a @ x[:, :30] + model.intercept[:, None],
                               rtol=1e-10)
    assert model.forecast(xt, 3).shape == (1, 3, 3)


def test_forecast_iterates_the_one_step_predictor():
    (a1, a2), cov = var2_params()
    x = simulate_var([a1, a2], 3000, seed=2, noise_cov=cov)
    for kind in ("ar", "var"):
        model = fit_linear([x], kind, 3)
        ctx = torch.as_tensor(x[None, :, :50])
        fut = model.forecast(ctx, 5)
        assert fut.shape == (1, 3, 5)
        seq = ctx
        for k in range(5):  # feed each prediction back as the next input
            nxt = model.predict_next(seq)[..., -1:]
            torch.testing.assert_close(fut[..., k:k + 1], nxt, rtol=1e-12, atol=1e-12)
            seq = torch.cat([seq, nxt], dim=-1)
        # long horizons decay to the fitted process's mean (I - sum_l A_l)^-1 b
        far = model.forecast(ctx, 400)[..., -1]
        gain = (np.diag(model.coef.sum(0)) if kind == "ar" else model.coef.sum(0))
        mu = np.linalg.solve(np.eye(3) - gain, model.intercept)
        np.testing.assert_allclose(far[0].numpy(), mu, atol=1e-9)


def test_var_simulation_reproduces_the_process_covariance():
    (a1, a2), cov = var2_params()
    x = simulate_var([a1, a2], 40000, seed=4, noise_cov=cov)
    model = fit_linear([x], "var", 2)
    # stationary covariance of the true process: the companion form's Lyapunov equation
    C = 3
    A = np.zeros((6, 6))
    A[:3, :3], A[:3, 3:], A[3:, :3] = a1, a2, np.eye(3)
    S = np.zeros((6, 6))
    S[:3, :3] = cov
    gamma = np.linalg.solve(np.eye(36) - np.kron(A, A), S.ravel()).reshape(6, 6)[:C, :C]
    g = torch.Generator().manual_seed(0)
    sim = model.simulate(5000, batch=32, generator=g)
    assert sim.shape == (32, 3, 5000)
    emp = np.cov(sim.permute(1, 0, 2).reshape(3, -1).numpy())
    # sample covariance of 160000 autocorrelated samples (integrated autocorrelation ~5):
    # relative standard error ~ sqrt(2 * 5 / 160000) < 1 %; the fit itself on 40000 rows
    # adds ~1.5 %: 8 % of the largest entry bounds both
    np.testing.assert_allclose(emp, gamma, atol=0.08 * gamma.max())
    assert np.abs(emp - gamma).max() < 0.08 * gamma.max()
    assert model.spectral_radius() < 1
    # AR simulation: right variances, no cross-channel covariance
    ar = fit_linear([x], "ar", 4)
    sim = ar.simulate(5000, batch=16, generator=g).permute(1, 0, 2).reshape(3, -1).numpy()
    emp = np.cov(sim)
    np.testing.assert_allclose(np.diag(emp), np.diag(gamma), rtol=0.1)
    assert np.abs(emp[0, 1]) < 0.05 * gamma[0, 0]


# -- tokens ------------------------------------------------------------------------------------


def mulaw_steps(scale, n_bits=6):
    return [{"name": "normalize", "method": "robust", "center": [5.0] * 3, "scale": [2.0] * 3},
            {"name": "clip", "std_factor": 6, "low": [-6.0] * 3, "high": [6.0] * 3},
            {"name": "mulaw_quantize", "n_bits": n_bits, "mu": 2**n_bits - 1, "scale": scale}]


def test_requantized_tokens_equal_the_quantizers():
    steps = [mulaw_steps(6.0), mulaw_steps(3.5), mulaw_steps(6.0)]  # per-session scales
    rng = np.random.default_rng(0)
    # values spread over the whole range, beyond it (saturation), and exactly on the decoded
    # token levels and half-way between them (the rounding boundaries)
    levels = decode_tokens(torch.arange(64).repeat(3, 1), steps[1])  # (3, 64)
    mids = (levels[:, 1:] + levels[:, :-1]) / 2
    vals = torch.as_tensor(rng.normal(0, 4, (3, 3, 200)), dtype=torch.float32)
    vals[1, :, :64], vals[1, :, 64:127] = levels, mids
    vals[0, 0, :2] = torch.tensor([-100.0, 100.0])
    tok = requantize(vals, steps)
    assert tok.dtype == torch.int64
    for b in range(3):
        expect = mulaw_quantize(vals[b], 6, steps[b][-1]["scale"])
        assert torch.equal(tok[b], expect)
    # numpy too, with the store's dtype
    tok_np = requantize(vals.numpy(), steps)
    for b in range(3):
        np.testing.assert_array_equal(tok_np[b], mulaw_quantize(vals[b].numpy(), 6,
                                                                steps[b][-1]["scale"]))
    # decoding inverts only the mu-law step (normalized units), with each row's own scale
    dec = decode_tokens(tok, steps)
    for b in range(3):
        ref = tokens_to_signal(tok[b], steps[b][-1:])
        assert torch.equal(dec[b], ref)
    assert torch.equal(requantize(dec, steps), tok)  # tokens -> values -> the same tokens


def test_token_predictions_are_the_quantized_signal_predictions():
    (a1, a2), cov = var2_params()
    steps = [mulaw_steps(6.0), mulaw_steps(4.0)]
    x = simulate_var([a1, a2], 4000, seed=5, noise_cov=cov)
    tokens = torch.stack([mulaw_quantize(torch.as_tensor(x[:, :100], dtype=torch.float32), 6,
                                         s[-1]["scale"]) for s in steps])
    model = fit_linear([x], "var", 2)
    pred_tok = model.predict_next_tokens(tokens, steps)
    values = model.predict_next(decode_tokens(tokens, steps))
    assert values.dtype == torch.float32
    for b in range(2):
        assert torch.equal(pred_tok[b], mulaw_quantize(values[b], 6, steps[b][-1]["scale"]))
    fut = model.forecast_tokens(tokens, steps, 7)
    assert fut.shape == (2, 3, 7) and fut.dtype == torch.int64
    sim = model.simulate_tokens(steps[0], 50, generator=torch.Generator().manual_seed(0))
    assert sim.shape == (1, 3, 50) and 0 <= int(sim.min()) and int(sim.max()) <= 63


def test_token_bins_hold_the_values_that_quantize_to_them():
    steps = [mulaw_steps(6.0), mulaw_steps(4.0)]
    lo, hi = token_bin_edges(steps, 2, 3)
    assert lo.shape == hi.shape == (2, 3, 64) and lo.dtype == torch.float64
    assert torch.isinf(lo[..., 0]).all() and torch.isinf(hi[..., -1]).all()
    assert torch.equal(lo[..., 1:], hi[..., :-1])  # the bins tile the line
    vals = torch.as_tensor(np.random.default_rng(0).normal(0, 3, (2, 3, 2000)),
                           dtype=torch.float32)
    tok = requantize(vals, steps)
    v = vals.double()
    assert (lo.gather(-1, tok) <= v).all() and (v <= hi.gather(-1, tok)).all()


def test_token_scores_are_the_gaussian_forecast_over_token_bins():
    """The VAR's 1-step forecast as a distribution over tokens: the masses sum to one, match
    draws from the Gaussian re-quantized, stay finite many standard deviations away, and its
    most probable token scores at least as well as re-quantizing the mean on data the VAR
    describes (wider mu-law bins away from zero hold more mass)."""
    (a1, a2), cov = var2_params()
    steps = mulaw_steps(6.0)
    x = simulate_var([a1, a2], 6000, seed=5, noise_cov=cov)
    model = fit_linear([x[:, :5000]], "var", 2)
    tok = mulaw_quantize(torch.as_tensor(x[None, :, 5000:], dtype=torch.float32), 6, 6.0)
    inp, tgt = tok[..., :-1], tok[..., 1:]
    nll, mode, nearest = model.token_scores(inp, tgt, steps, chunk_elements=5000)  # chunks
    assert torch.equal(nearest, model.predict_next_tokens(inp, steps))
    assert nll.shape == mode.shape == tgt.shape and nll.dtype == torch.float32
    assert torch.isfinite(nll).all() and (nll >= 0).all()
    # every token as the target at a few positions: the probabilities sum to one
    few = inp[..., :4]
    p = torch.stack([model.token_scores(few, torch.full_like(few, v), steps)[0]
                     for v in range(64)], -1).neg().exp()
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.equal(p.argmax(-1), mode[..., :4])
    # Monte Carlo: Gaussian draws around the prediction, re-quantized
    mean = model.predict_next(decode_tokens(few, steps)).double()
    sd = torch.as_tensor(np.sqrt(np.diag(model.noise_cov)))[None, :, None]
    draws = mean[..., None] + sd[..., None] * torch.randn(
        *mean.shape, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.nn.functional.one_hot(
        mulaw_quantize(draws.float(), 6, 6.0), 64).double().mean(-2)
    assert (freq - p).abs().max() < 5e-3
    # far tails: finite and large
    far = model.token_scores(few, torch.zeros_like(few), steps)[0]
    assert torch.isfinite(far).all()
    # the most probable token beats the re-quantized mean (on the VAR's own kind of data)
    assert (mode == tgt).float().mean() >= (nearest == tgt).float().mean()
    with pytest.raises(ValueError, match="targets .* must match tokens"):
        model.token_scores(inp, tgt[..., :-1], steps)


@pytest.mark.parametrize("kind, n_components", [("ar", None), ("var", None), ("var", 2)])
def test_forecast_std_is_the_spread_of_simulated_continuations(kind, n_components):
    """The k-step forecast error's std: the spread of many continuations of one context
    driven by the model's own innovations (the process the model describes), at every k;
    k = 1 is the innovation std, and the error grows towards the process's std."""
    (a1, a2), cov = var2_params()
    x = simulate_var([a1, a2], 8000, seed=6, noise_cov=cov)
    model = fit_linear([x], kind, 3, n_components=n_components)
    sd = model.forecast_std(12)
    assert sd.shape == (12, 3) and model.forecast_std(12) is sd  # cached
    np.testing.assert_allclose(sd[0], np.sqrt(np.diag(model.noise_cov)), rtol=1e-12)
    assert (np.diff(sd, axis=0) >= -1e-12).all()
    ctx = torch.as_tensor(x[None, :, :60]).expand(20000, -1, -1)
    sims = model.forecast(ctx, 12, innovations=True, generator=torch.Generator().manual_seed(1))
    spread = (sims - model.forecast(ctx[:1], 12)).std(0).numpy().T  # (12, 3)
    np.testing.assert_allclose(spread, sd, rtol=0.03)  # 20000 draws: ~0.5% standard error
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model.forecast_std(0)


def test_forecast_token_scores_are_the_k_step_forecast_over_token_bins():
    """k-step token distributions: one step after a context is the teacher-forced
    distribution at the context's last position; at k > 1 the bin masses match continuations
    simulated with the model's innovations and re-quantized, and the mean re-quantized is
    ``forecast_tokens``."""
    (a1, a2), cov = var2_params()
    steps = mulaw_steps(6.0)
    x = simulate_var([a1, a2], 6000, seed=5, noise_cov=cov)
    model = fit_linear([x[:, :5000]], "var", 2)
    tok = mulaw_quantize(torch.as_tensor(x[None, :, 5000:5400], dtype=torch.float32), 6, 6.0)
    ctx = tok.reshape(1, 3, 8, 50).permute(0, 2, 1, 3).reshape(8, 3, 50)  # 8 contexts
    fut = tok.reshape(1, 3, 8, 50).permute(0, 2, 1, 3).reshape(8, 3, 50)[..., :6]
    nll1, mode1, mean1 = model.forecast_token_scores(ctx[..., :-1], steps, 1, ctx[..., -1:])
    tnll, tmode, tnear = model.token_scores(ctx[..., :-1], ctx[..., 1:], steps)
    torch.testing.assert_close(nll1, tnll[..., -1:], rtol=1e-6, atol=1e-6)
    assert torch.equal(mode1, tmode[..., -1:]) and torch.equal(mean1, tnear[..., -1:])
    nll, mode, mean = model.forecast_token_scores(ctx, steps, 6, fut, chunk_elements=3000)
    assert torch.equal(mean, model.forecast_tokens(ctx, steps, 6))
    assert nll.shape == mode.shape == (8, 3, 6) and torch.isfinite(nll).all()
    assert model.forecast_token_scores(ctx, steps, 6)[0] is None
    p = torch.stack([model.forecast_token_scores(ctx[:2], steps, 6,
                                                 torch.full((2, 3, 6), v))[0]
                     for v in range(64)], -1).neg().exp()  # (2, 3, 6, 64)
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-6)
    assert torch.equal(p.argmax(-1), mode[:2])
    sims = model.forecast(decode_tokens(ctx[:2], steps).repeat(50000, 1, 1), 6,
                          innovations=True, generator=torch.Generator().manual_seed(2))
    freq = torch.nn.functional.one_hot(requantize(sims, steps).view(50000, 2, 3, 6),
                                       64).double().mean(0)
    assert (freq - p).abs().max() < 1e-2
    # the spread grows with k: the distribution widens (its NLL of a fixed token changes)
    assert not torch.equal(p[..., 0, :], p[..., -1, :])
    with pytest.raises(ValueError, match="targets .* must be"):
        model.forecast_token_scores(ctx, steps, 6, fut[..., :5])


def test_fit_on_a_token_dataset_decodes_with_each_sessions_step(token_splits):
    train = token_splits.train
    seg = Segments(train)
    assert seg.tokens
    s, c, a, b = seg.runs[0]
    raw = np.load(train.metas[s].chunk_path(c))[:, a:b]
    expect = decode_tokens(raw.astype(np.int64), train.session_steps(s))
    np.testing.assert_array_equal(seg.read(0), expect.astype(np.float64))
    models = fit_linear_baselines(train, token_splits.val,
                                  {"orders": [1, 2, 4], "ridge": 1e-3})
    assert [m.name for m in models] == [f"AR({models[0].order})", f"VAR({models[1].order})"]
    x, _ = token_splits.test[0]
    steps = token_splits.test.session_steps(int(token_splits.test.indices[0][0]))
    tok = models[1].predict_next_tokens(x[None], steps)
    acc = float((tok[..., :-1] == x[None, :, 1:]).float().mean())
    rep = float((x[None, :, :-1] == x[None, :, 1:]).float().mean())
    assert acc > rep  # the 10 Hz rhythm is predictable: a VAR beats repeat-last
    summary = models[1].summary()
    assert summary["selection"]["criterion"] == "val_mse" and summary["n_train_rows"] > 0


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [0, -1, 1.5, True, "3"])
def test_bad_orders_are_refused(order):
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        fit_linear([np.zeros((2, 50))], "ar", order)


def test_bad_data_gets_a_clear_error():
    x = np.random.default_rng(0).standard_normal((2, 100))
    with pytest.raises(ValueError, match=r"no segment is longer than the order 5.*lengths "
                                         r"\[3, 5\].*at least 6"):
        fit_linear([x[:, :3], x[:, :5]], "var", 5)
    bad = x.copy()
    bad[1, 17] = np.inf
    with pytest.raises(ValueError, match=r"data\[1\] holds a non-finite value \(inf\) at "
                                         r"channel 1, sample 17"):
        fit_linear([x, bad], "ar", 2)
    with pytest.raises(ValueError, match=r"data\[1\] has 3 channels.*has 2"):
        fit_linear([x, np.zeros((3, 50))], "var", 2)
    with pytest.raises(ValueError, match="must be \\(C, T\\)"):
        fit_linear([x[0]], "var", 2)
    with pytest.raises(TypeError, match="not a one-shot iterator"):
        fit_linear(iter([x]), "ar", 2)
    with pytest.raises(TypeError, match="TensorDataset is not a chunk dataset"):
        fit_linear(torch.utils.data.TensorDataset(torch.zeros(4, 2, 10)), "ar", 2)
    with pytest.raises(ValueError, match="kind must be one of 'ar', 'var'"):
        fit_linear([x], "arma", 2)
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        fit_linear([x], "ar", 2, ridge=-1.0)
    with pytest.raises(ValueError, match="n_components applies to kind='var' only"):
        fit_linear([x], "ar", 2, n_components=1)
    model = fit_linear([x], "var", 2)
    with pytest.raises(ValueError, match="x has 3 channels; VAR\\(2\\) was fitted on 2"):
        model.predict_next(torch.zeros(1, 3, 10))
    with pytest.raises(ValueError, match="warmup must be 'mean' or 'nan'"):
        model.predict_next(torch.zeros(1, 2, 10), warmup="zero")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model.forecast(torch.zeros(1, 2, 10), 0)
    with pytest.raises(ValueError, match="must end with a recorded 'mulaw_quantize' step"):
        model.predict_next_tokens(torch.zeros(1, 2, 10, dtype=torch.long),
                                  [{"name": "normalize", "center": [0, 0], "scale": [1, 1]}])


def test_options_are_validated():
    with pytest.raises(ValueError, match="extra"):
        LinearBaselineOptions.model_validate({"oder": 3})
    with pytest.raises(ValueError, match="orders must be a non-empty list"):
        LinearBaselineOptions(orders=[0, 2])
    assert LinearBaselineOptions(orders=[5, 1, 5]).orders == [1, 5]
    with pytest.raises(ValueError, match="training split has no windows"):
        class Empty:
            metas, indices, read_samples = [], np.zeros((0, 3)), 10

            def __len__(self):
                return 0
        fit_linear_baselines(Empty())


@pytest.mark.parametrize("kind, n_components", [("ar", None), ("var", None), ("var", 2)])
def test_channel_coefficients_give_the_predictions_on_the_channels(kind, n_components):
    """``channel_coefficients()`` (p, C, C) acts on the channels themselves (a VAR on PCs
    mapped back through its projection, an AR as diagonal matrices): with the intercept it
    reproduces predict_next wherever the history is full."""
    coefs, cov = var2_params()
    x = simulate_var(coefs, 2000, 0, cov)
    kw = {"n_components": n_components} if kind == "var" else {}
    model = fit_linear([x], kind, 2, **kw)
    a = model.channel_coefficients()
    assert a.shape == (2, 3, 3)
    if kind == "ar":
        assert np.count_nonzero(a - np.stack([np.diag(np.diag(m)) for m in a])) == 0
    want = model.predict_next(x[None])[0][:, 1:]
    got = model.intercept[:, None] + a[0] @ x[:, 1:] + a[1] @ x[:, :-1]
    np.testing.assert_allclose(got, want, atol=1e-9)

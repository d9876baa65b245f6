"""BENDRForecast beyond the registry contract: alignment, streaming exactness, learning."""

from __future__ import annotations

import math

import pytest
import torch

from ephys_gpt.layers.conv_encoder import CausalStridedConvEncoder
from ephys_gpt.models.registry import build_model, get_model_spec

TINY = get_model_spec("BENDRForecast").tiny_config


def _model(**over):
    torch.manual_seed(0)
    return build_model("BENDRForecast", {**TINY, **over})


def _sines(B, C, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float32)
    freq = 0.04 + 0.02 * torch.arange(C, dtype=torch.float32)[None, :, None]
    phase = torch.rand(B, C, 1, generator=g) * 2 * math.pi
    return torch.sin(2 * math.pi * freq * t + phase)


@pytest.mark.parametrize("kernels,strides", [([3, 2], [2, 2]), ([4], [4]), ([5, 3, 2], [1, 3, 2])])
def test_encoder_frames_are_causal_and_last_frame_exact(kernels, strides):
    enc = CausalStridedConvEncoder(1, 6, kernels, strides).eval()
    s = enc.total_stride
    x = torch.randn(2, 1, 10 * s)
    full = enc(x)
    assert full.shape == (2, 6, 10)
    for k in range(10):
        # frame k sees samples <= (k+1)s-1 only
        x2 = x.clone()
        x2[..., (k + 1) * s:] = 100.0
        assert torch.allclose(enc(x2)[..., k], full[..., k], atol=1e-6)
        assert torch.allclose(enc.last_frame(x, (k + 1) * s), full[..., k], atol=1e-5)


def test_encoder_rejects_bad_layers():
    with pytest.raises(ValueError, match="kernel >= stride"):
        CausalStridedConvEncoder(1, 4, [2], [3])
    with pytest.raises(ValueError, match="same length"):
        CausalStridedConvEncoder(1, 4, [2, 2], [2])


@pytest.mark.parametrize("T0", [1, 3, 4, 7, 24, 26])
def test_cached_forecast_equals_uncached_at_any_phase(T0):
    model = _model().eval()
    past = torch.randn(2, 4, T0)
    a = model.forecast(past, 11, use_cache=True)
    b = model.forecast(past, 11, use_cache=False)
    assert a.shape == (2, 4, T0 + 11)
    assert torch.equal(a[..., :T0], past)
    assert torch.allclose(a, b, atol=1e-5)


def test_forecast_with_innovations_simulates_around_the_mean_forecast():
    """``noise`` adds Gaussian innovations to each appended sample; cached and uncached
    paths draw them in the same order, and zero noise is the mean forecast."""
    model = _model().eval()
    past = torch.randn(3, 4, 10)
    mean = model.forecast(past, 6)
    assert torch.equal(model.forecast(past, 6, noise=0.0), mean)
    std = torch.tensor([0.1, 0.5, 1.0, 2.0])
    a = model.forecast(past, 6, noise=std, generator=torch.Generator().manual_seed(4))
    b = model.forecast(past, 6, noise=std, use_cache=False,
                       generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a, b, atol=1e-5) and torch.equal(a[..., :10], past)
    # the first new sample is the mean forecast plus exactly std * z
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(a[..., 10], mean[..., 10] + std * z, atol=1e-5)
    # a covariance gives correlated innovations: a diagonal one matches the std version
    c = model.forecast(past, 6, noise=torch.diag(std ** 2),
                       generator=torch.Generator().manual_seed(4))
    assert torch.allclose(c, a, atol=1e-4)
    # and a rank-one covariance moves every channel together
    d = model.forecast(past, 1, noise=torch.ones(4, 4), generator=torch.Generator().manual_seed(4))
    step = d[..., 10] - mean[..., 10]
    assert torch.allclose(step, step[:, :1].expand_as(step), atol=1e-2)
    with pytest.raises(ValueError, match="noise"):
        model.forecast(past, 2, noise=torch.ones(3))


def test_forecast_first_step_is_forward_last_output():
    model = _model().eval()
    x, pos, typ = model.example_inputs(2)
    with torch.no_grad():
        y = model(x, pos, typ).prediction
    f = model.forecast(x, 1, pos_2d=pos, ch_type=typ)
    assert torch.allclose(f[..., -1], y[..., -1], atol=1e-6)


def test_sensor_metadata_is_used_and_defaults_apply():
    model = _model().eval()
    x, pos, typ = model.example_inputs(2)
    with torch.no_grad():
        base = model(x, pos, typ).prediction
        assert torch.equal(model(x).prediction, base)  # defaults = stored layout
        moved = model(x, pos + 0.5, typ).prediction
        retyped = model(x, pos, torch.ones_like(typ)).prediction
    assert not torch.allclose(base, moved)
    assert not torch.allclose(base, retyped)
    model.set_sensor_layout(pos[0] + 0.5, typ[0])
    with torch.no_grad():
        assert torch.allclose(model(x).prediction, moved, atol=1e-6)


def test_bad_inputs_give_clear_errors():
    model = _model().eval()
    with pytest.raises(ValueError, match=r"\(B, 4, T\)"):
        model(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="pos_2d must be"):
        model(torch.randn(2, 4, 16), torch.zeros(2, 4, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="n_sensor_types"):
        model.forecast(torch.randn(1, 4, 8), 2, ch_type=torch.full((1, 4), 20))
    with pytest.raises(ValueError, match="horizon"):
        model.forecast(torch.randn(1, 4, 8), -1)
    with pytest.raises(ValueError, match="n_heads"):
        build_model("BENDRForecast", {**TINY, "d_model": 18, "n_heads": 4})
    with pytest.raises(ValueError, match="sensor_pos"):
        build_model("BENDRForecast", {**TINY, "sensor_pos": [[0.0, 0.0]]})


def test_training_reduces_loss_and_forecast_beats_repeat_last():
    model = _model(d_model=32, enc_width=16, predict_residual=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = _sines(16, 4, 49)
    inp, tgt = x[..., :-1], x[..., 1:]
    _, pos, typ = model.example_inputs(16)

    def loss_fn():
        return torch.nn.functional.mse_loss(model(inp, pos, typ).prediction, tgt)

    with torch.no_grad():
        first = loss_fn().item()
    for _ in range(120):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_fn().item()
    assert last < 0.2 * first, (first, last)
    # held-out phases: 4-step forecasts beat repeating the last value
    model.eval()
    test = _sines(8, 4, 52, seed=1)
    past, fut = test[..., :48], test[..., 48:]
    fc = model.forecast(past, 4)[..., 48:]
    err_model = (fc - fut).pow(2).mean()
    err_repeat = (past[..., -1:] - fut).pow(2).mean()
    assert torch.isfinite(fc).all()
    assert err_model < err_repeat, (err_model.item(), err_repeat.item())


def _var_process(B, C, T, seed=0):
    """A stable VAR(2) with cross-channel coupling: (B, C, T) and its coefficients."""
    g = torch.Generator().manual_seed(seed)
    A1 = 0.5 * torch.eye(C) + 0.3 * torch.roll(torch.eye(C), 1, dims=1)
    A2 = -0.3 * torch.eye(C) + 0.2 * torch.roll(torch.eye(C), -1, dims=1)
    x = torch.zeros(B, C, T)
    noise = torch.randn(B, C, T, generator=g)
    for t in range(2, T):
        x[..., t] = x[..., t - 1] @ A1.T + x[..., t - 2] @ A2.T + noise[..., t]
    return x, (A1, A2)


def test_linear_path_is_zero_at_init_and_adds_a_var_prediction():
    """``linear_order`` p: a causal C -> C conv over the last p samples, zero at init (the
    model starts as the one without it), added to the prediction in forward and in the
    cached forecast alike."""
    plain = _model(linear_order=0)
    withlin = _model(linear_order=2)
    assert withlin.linear.weight.shape == (4, 4, 2)
    missing = withlin.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["linear.bias", "linear.weight"]
    plain.eval(), withlin.eval()
    x, pos, typ = withlin.example_inputs(2)
    with torch.no_grad():
        assert torch.equal(withlin(x, pos, typ).prediction, plain(x, pos, typ).prediction)
        A1, A0 = torch.randn(4, 4), torch.randn(4, 4)  # lags 1 and 0 (x[t-1], x[t])
        withlin.linear.weight.copy_(torch.stack([A1, A0], dim=-1))
        withlin.linear.bias.fill_(0.5)
        diff = withlin(x, pos, typ).prediction - plain(x, pos, typ).prediction
    prev = torch.nn.functional.pad(x, (1, 0))[..., :-1]  # x[t-1], zero before the start
    want = torch.einsum("ij,bjt->bit", A0, x) + torch.einsum("ij,bjt->bit", A1, prev) + 0.5
    assert torch.allclose(diff, want, atol=1e-5)
    a = withlin.forecast(x[..., :7], 9)
    b = withlin.forecast(x[..., :7], 9, use_cache=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_linear_order():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="linear_order"):
            build_model("BENDRForecast", {**TINY, "linear_order": bad})


def test_linear_path_learns_cross_channel_dynamics_a_per_channel_model_misses():
    """On a VAR(2) with cross-channel coupling the encoder (pooled once per frame) cannot see
    the other channels' newest samples: without the linear path the 1-step error stays well
    above the innovation variance (1), with it the model gets close to it."""
    x, _ = _var_process(16, 4, 65)
    inp, tgt = x[..., :-1], x[..., 1:]
    test, _ = _var_process(8, 4, 97, seed=1)

    def train(**over):
        model = _model(d_model=16, enc_width=8, **over)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
        _, pos, typ = model.example_inputs(16)
        for _ in range(80):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(inp, pos, typ).prediction, tgt).backward()
            opt.step()
        with torch.no_grad():
            pred = model.eval()(test[..., :-1]).prediction
        return (pred - test[..., 1:])[..., 8:].pow(2).mean().item()

    with_lin, without = train(linear_order=2), train(linear_order=0)
    assert with_lin < 1.15, with_lin
    assert without > 1.15 * with_lin, (without, with_lin)


def _assert_predicts_as_the_var(model, x, var):
    """With the network's head silenced, the model's 1-step forecast of ``x`` is ``var``'s."""
    with torch.no_grad():
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()
        pred = model(x, *model.example_inputs(x.shape[0])[1:]).prediction
    want = torch.as_tensor(var.predict_next(x.numpy()), dtype=torch.float32)
    assert torch.allclose(pred[..., 1:], want[..., 1:], atol=1e-4)


def test_linear_path_set_to_a_fitted_var_predicts_as_the_var():
    """``set_linear_path(coef, intercept)``: the path alone reproduces a fitted VAR's
    prediction (the residual's identity taken off the first lag), so with the network's
    head silenced the model's forecast is the VAR's."""
    from ephys_gpt.linear import fit_linear

    x, _ = _var_process(4, 4, 400)
    var = fit_linear(list(x.numpy()), "var", 2)
    model = _model(linear_order=2).eval()
    model.set_linear_path(var.channel_coefficients(), var.intercept)
    _assert_predicts_as_the_var(model, x, var)
    with pytest.raises(ValueError, match=r"expected coef \(2, 4, 4\)"):
        model.set_linear_path(var.channel_coefficients()[:1], var.intercept)
    with pytest.raises(ValueError, match="no linear path"):
        _model(linear_order=0).set_linear_path(var.channel_coefficients(), var.intercept)


def test_linear_fit_sets_a_fixed_var_fitted_on_the_training_split():
    """``linear_fit``: the training run's data-dependent initialization fits a ridge VAR(p)
    on the training windows and sets the linear path to it, which the optimizer then never
    moves (no gradient); without it the path is learned from zero."""
    from ephys_gpt.linear import fit_linear
    from ephys_gpt.training.data_init import init_from_training_data

    x, _ = _var_process(2, 4, 300, seed=1)
    segments = list(x.numpy())
    model = _model(linear_order=2, linear_fit=True)
    assert model.linear_init_request == {"kind": "var", "order": 2}
    assert not any(p.requires_grad for p in model.linear.parameters())
    init_from_training_data(model, segments)
    var = fit_linear(segments, "var", 2)
    ref = _model(linear_order=2)
    ref.set_linear_path(var.channel_coefficients(), var.intercept)
    assert torch.equal(model.linear.weight, ref.linear.weight)
    untouched = _model(linear_order=2)
    assert untouched.linear_init_request is None
    assert all(p.requires_grad for p in untouched.linear.parameters())
    init_from_training_data(untouched, segments)
    assert not untouched.linear.weight.any()
    with pytest.raises(ValueError, match="linear_fit must be true or false"):
        _model(linear_order=2, linear_fit="var")
    with pytest.raises(ValueError, match="needs linear_order > 0"):
        _model(linear_order=0, linear_fit=True)


def test_linear_select_chooses_the_order_on_validation_data_and_zeroes_the_lags_above():
    """``linear_select``: ``linear_order`` is the largest order; the fit takes the order
    with the smallest 1-step error on the validation split (what the evals do), and the
    lags above it stay zero, so the model predicts as that VAR."""
    from ephys_gpt.linear import fit_linear
    from ephys_gpt.training.data_init import init_from_training_data

    x, _ = _var_process(4, 4, 400, seed=3)
    train, val = list(x[:3].numpy()), list(x[3:].numpy())
    model = _model(linear_order=6, linear_fit=True, linear_select=True)
    assert model.linear_init_request == {"kind": "var", "order": 6, "select": True}
    init_from_training_data(model, train, val=val)
    var = fit_linear(train, "var", "auto", max_order=6, val=val)
    assert var.order == 2 and var.selection["criterion"] == "val_mse"  # the true order
    w = model.linear.weight  # (C, C, p): tap j multiplies lag p - j
    assert not w[..., :4].any() and w[..., 4:].abs().sum() > 0
    _assert_predicts_as_the_var(model, x, var)
    with pytest.raises(ValueError, match="linear_select needs linear_fit: true"):
        _model(linear_order=6, linear_select=True)
    with pytest.raises(ValueError, match="linear_select must be true or false"):
        _model(linear_order=6, linear_fit=True, linear_select="val")

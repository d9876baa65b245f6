"""NTD beyond the registry contract: schedule, masks, loss, learning and in-painting."""

from __future__ import annotations

import math

import pytest
import torch

from ephys_gpt.layers.diffusion_schedule import NoiseSchedule
from ephys_gpt.losses.diffusion import DiffusionMSE
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import build_loss, build_model, get_model_spec

TINY = get_model_spec("NTD").tiny_config


def _parts(out: ModelOutput):
    return out.target, out.prediction, out.weight


def _model(**over):
    torch.manual_seed(0)
    return build_model("NTD", {**TINY, **over})


def _sines(B, C, L, seed=0, noise=0.05):
    """Per-channel fixed frequency, random phase, plus a little white noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(L, dtype=torch.float32)
    freq = (1.0 + torch.arange(C, dtype=torch.float32)[None, :, None]) / 16.0
    phase = torch.rand(B, C, 1, generator=g) * 2 * math.pi
    return torch.sin(2 * math.pi * freq * t + phase) + noise * torch.randn(B, C, L, generator=g)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_is_monotone_and_ddim_inverts_exact_noise(kind):
    sch = NoiseSchedule(50, kind)
    ab = sch.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and ab[0] > 0.99 and ab[-1] < 0.02
    x0, eps = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    t = torch.tensor([49, 20, 0])
    xt = sch.q_sample(x0, t, eps)
    assert torch.allclose(sch.predict_x0(xt, t, eps), x0, atol=1e-3)
    # one deterministic DDIM jump to the clean signal with the true noise recovers x0
    assert torch.allclose(sch.ddim_step(xt[:1], 49, -1, eps[:1]), x0[:1], atol=1e-3)
    with pytest.raises(ValueError, match="cosine"):
        NoiseSchedule(10, "sigmoid")


def test_forward_masks_and_determinism():
    model = _model(p_forecast=1.0, p_impute=0.0)
    x = model.example_inputs(4)
    torch.manual_seed(3)
    target, pred, mask = _parts(model(x))
    torch.manual_seed(3)
    target2, pred2, mask2 = _parts(model(x))
    assert torch.equal(pred, pred2) and torch.equal(mask, mask2)  # seeded forward repeats
    assert target.shape == pred.shape == mask.shape == x.shape
    assert torch.equal(target, x)  # prediction: x0 (the default) targets the clean signal
    L = x.shape[-1]
    n_obs = (mask == 0).sum(-1)  # observed prefix per (b, c)
    assert (n_obs >= int(0.25 * L)).all() and (n_obs <= int(0.75 * L)).all()
    assert (mask[..., -1] > 0).all() and (mask[..., 0] == 0).all()  # prefix observed
    # observed samples reach the denoiser clean: changing the noise there changes nothing
    obs = mask == 0
    t = torch.full((4,), 5)
    n1 = torch.randn_like(x)
    n2 = torch.where(obs, torch.randn_like(x), n1)
    _, p1, _ = _parts(model(x, t=t, noise=n1, observed=obs))
    _, p2, _ = _parts(model(x, t=t, noise=n2, observed=obs))
    assert torch.equal(p1, p2)


def test_diffusion_loss_is_masked_mse():
    loss = build_loss("DiffusionMSE")
    noise = torch.zeros(1, 1, 4)
    pred = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    mask = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    assert loss(ModelOutput(pred, target=noise, weight=mask), None).item() == \
        pytest.approx((9 + 16) / 2)
    assert loss(ModelOutput(pred, target=noise, weight=torch.zeros_like(mask))).item() == 0.0
    with pytest.raises(TypeError, match="prediction, target and weight"):
        DiffusionMSE()(pred, None)
    with pytest.raises(TypeError, match="without target/weight"):
        DiffusionMSE()(ModelOutput(pred), None)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="mask_channel"):
        build_model("NTD", {**TINY, "mask_channel": False, "p_forecast": 0.5})
    with pytest.raises(ValueError, match="sampling_steps"):
        build_model("NTD", {**TINY, "sampling_steps": 50})
    model = _model()
    with pytest.raises(ValueError, match=r"\(B, 3, L\)"):
        model(torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="cond_channels"):
        model(torch.randn(2, 3, 32), torch.randn(2, 1, 32))
    cmodel = _model(cond_channels=2)
    with pytest.raises(ValueError, match="cond_channels=2"):
        cmodel(torch.randn(2, 3, 32))
    x, c = cmodel.example_inputs(2)
    assert cmodel(x, c).prediction.shape == x.shape
    with pytest.raises(ValueError, match="known_mask"):
        model.impute(torch.randn(2, 3, 32), torch.ones(5, dtype=torch.bool))


def test_sampling_keeps_known_values_and_sampler_options():
    model = _model().eval()
    x = model.example_inputs(2)
    known = torch.tensor([True, False, True])
    out = model.impute(x, known)
    assert torch.equal(out[:, known], x[:, known])
    assert torch.isfinite(out).all() and not torch.equal(out[:, 1], x[:, 1])
    ddpm = model.sample(2, 16, sampler="ddpm", progress=False)
    assert ddpm.shape == (2, 3, 16) and torch.isfinite(ddpm).all()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = model.sample(2, 16, generator=g1, progress=False)
    b = model.sample(2, 16, generator=g2, progress=False)
    assert torch.equal(a, b)  # DDIM with eta=0 and the same start noise is deterministic


def test_forecast_longer_than_window_and_conditioning():
    model = _model(cond_channels=1).eval()
    past = torch.randn(1, 3, 40)
    with pytest.raises(ValueError, match="cover past"):
        model.forecast(past, 20, cond=torch.randn(1, 1, 40))
    out = model.forecast(past, 50, cond=torch.randn(1, 1, 90))  # windows of L=32, chunks of 16
    assert out.shape == (1, 3, 90) and torch.equal(out[..., :40], past)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("prediction", ["x0", "eps"])
def test_training_lowers_loss_and_inpainted_forecast_beats_zero(prediction):
    torch.manual_seed(0)
    cfg = dict(num_channels=2, signal_length=64, hidden=32, n_layers=6, dilation_cycle=6,
               diffusion_steps=50, sampling_steps=10, p_forecast=1.0, p_impute=0.0,
               forecast_chunk=16, prediction=prediction)
    model = build_model("NTD", cfg)
    loss_fn = build_loss("DiffusionMSE")
    val = _sines(64, 2, 64, seed=99)
    t_val = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(1))
    n_val = torch.randn(val.shape, generator=torch.Generator().manual_seed(2))
    o_val = model.sample_observed(64, 64, "cpu", torch.Generator().manual_seed(3))

    def val_loss():
        with torch.no_grad():
            return loss_fn(model(val, t=t_val, noise=n_val, observed=o_val)).item()

    untrained = val_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    for step in range(250):
        batch = _sines(32, 2, 64, seed=step)
        opt.zero_grad()
        loss = loss_fn(model(batch))
        loss.backward()
        opt.step()
    trained = val_loss()
    assert trained < 0.3 * untrained, (untrained, trained)

    model.eval()
    test = _sines(16, 2, 64, seed=1234, noise=0.0)
    past, future = test[..., :48], test[..., 48:]
    torch.manual_seed(0)
    fc = model.forecast(past, 16)[..., 48:]
    mse_model = (fc - future).pow(2).mean().item()
    mse_zero = future.pow(2).mean().item()
    assert mse_model < 0.5 * mse_zero, (mse_model, mse_zero)


def test_x0_and_eps_losses_are_the_same_min_snr_objective():
    """min(SNR, g) |x0_hat - x0|^2 == min(1, g / SNR) |eps_hat - eps|^2 for the implied eps_hat,
    so both parameterizations train (and report) the same number."""
    model = _model(p_forecast=0.0, p_impute=0.0)
    x = model.example_inputs(4)
    t = torch.tensor([0, 3, 6, 9])
    noise = torch.randn_like(x)
    obs = torch.zeros_like(x, dtype=torch.bool)
    obs[..., :5] = True
    target, x0_hat, w = _parts(model(x, t=t, noise=noise, observed=obs))
    snr = model.schedule.snr(t)
    assert torch.allclose(w[:, 0, -1], snr.clamp(max=5.0)) and (w[..., :5] == 0).all()
    ab = model.schedule.alphas_cumprod[t][:, None, None]
    x_t = torch.where(obs, x, model.schedule.q_sample(x, t, noise))
    eps_hat = (x_t - ab.sqrt() * x0_hat) / (1 - ab).sqrt()
    w_eps = (5.0 / snr).clamp(max=1.0)[:, None, None] * (~obs)
    loss = DiffusionMSE()
    assert loss(ModelOutput(x0_hat, target=target, weight=w)).item() == pytest.approx(
        loss(ModelOutput(eps_hat, target=noise, weight=w_eps)).item(), rel=1e-4)
    eps_model = _model(prediction="eps", p_forecast=0.0, p_impute=0.0)
    target_e, _, w_e = _parts(eps_model(x, t=t, noise=noise, observed=obs))
    assert torch.equal(target_e, noise) and torch.allclose(w_e, w_eps.to(w_e.dtype))
    with pytest.raises(ValueError, match="prediction"):
        _model(prediction="v")


def test_wide_low_rank_signal_more_channels_than_hidden():
    """MEG-like data: many channels mixing a few sources, C > hidden. The x0 denoiser with
    its full-rank linear path learns it, samples stay in the data's range (no pile-up at
    ``clip_denoised``), and the mean of in-painted forecasts beats the zero forecast."""
    torch.manual_seed(0)
    C, L = 24, 64
    mix = torch.randn(C, 3, generator=torch.Generator().manual_seed(5))
    mix = mix / mix.norm(dim=1, keepdim=True)

    def data(B, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.arange(L, dtype=torch.float32)
        freq = torch.tensor([1 / 10, 1 / 6, 1 / 17])[None, :, None]
        src = torch.sin(2 * math.pi * freq * t + torch.rand(B, 3, 1, generator=g) * 6.3)
        return torch.einsum("cs,bsl->bcl", mix, src) * 1.4 + 0.05 * torch.randn(
            B, C, L, generator=g)

    model = build_model("NTD", dict(num_channels=C, signal_length=L, hidden=12, n_layers=6,
                                    dilation_cycle=6, diffusion_steps=50, sampling_steps=10,
                                    p_forecast=0.7, p_impute=0.0, forecast_chunk=16))
    loss_fn = build_loss("DiffusionMSE")
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3)
    for step in range(300):
        opt.zero_grad()
        loss_fn(model(data(16, step))).backward()
        opt.step()
    model.eval()
    test = data(8, 999)
    past, future = test[..., :48], test[..., 48:]
    torch.manual_seed(0)
    draws = torch.stack([model.forecast(past, 16)[..., 48:] for _ in range(4)])
    mse_mean = (draws.mean(0) - future).pow(2).mean().item()
    assert mse_mean < 0.5 * future.pow(2).mean().item()
    samples = model.sample(8, L, progress=False)
    ratio = (samples.std() / test.std()).item()
    assert 0.5 < ratio < 1.5 and samples.abs().max() < 0.9 * model.config.clip_denoised, ratio


def _var_process(B, C, T, seed=0):
    """A stable VAR(2) with cross-channel coupling and a non-zero mean: (B, C, T)."""
    g = torch.Generator().manual_seed(seed)
    A1 = 0.5 * torch.eye(C) + 0.3 * torch.roll(torch.eye(C), 1, dims=1)
    A2 = -0.3 * torch.eye(C) + 0.2 * torch.roll(torch.eye(C), -1, dims=1)
    x = torch.zeros(B, C, T)
    noise = torch.randn(B, C, T, generator=g) + 0.2
    for t in range(2, T):
        x[..., t] = x[..., t - 1] @ A1.T + x[..., t - 2] @ A2.T + noise[..., t]
    return x[..., 50:]


def test_linear_forecast_is_the_fitted_vars_closed_loop_forecast():
    """``linear_order`` p: after an observed prefix, :meth:`NTD.linear_forecast` is the
    fitted VAR's recursive mean forecast (the eval's baseline, to float precision), observed
    samples are kept, lags before the window are the VAR's mean, and channels observed
    without a prefix (imputation) do not drive the recursion; the buffers are part of the
    weights (a save/load keeps them)."""
    from ephys_gpt.linear import fit_linear

    x = _var_process(6, 3, 400)
    var = fit_linear(list(x.numpy()), "var", 2)
    model = _model(num_channels=3, linear_order=2, linear_fit=True)
    model.set_linear_path(var.channel_coefficients(), var.intercept)
    L, n_known = TINY["signal_length"], 20
    win = x[..., 100:100 + L]
    observed = torch.zeros_like(win, dtype=torch.bool)
    observed[..., :n_known] = True
    base = model.linear_forecast(win, observed)
    assert torch.equal(base[..., :n_known], win[..., :n_known])
    want = torch.as_tensor(var.forecast(win[..., :n_known].numpy(), L - n_known),
                           dtype=torch.float32)
    assert torch.allclose(base[..., n_known:], want, atol=1e-4)
    # nothing observed: from its mean (the data's, up to the ridge), a VAR stays there
    mean = model.var_mean.float()
    assert torch.allclose(mean, torch.as_tensor(var.mean, dtype=torch.float32), atol=1e-2)
    free = model.linear_forecast(torch.zeros(1, 3, L), torch.zeros(1, 3, L, dtype=torch.bool))
    assert torch.allclose(free, mean[None, :, None].expand(1, 3, L), atol=1e-5)
    # a channel subset observed throughout (imputation): no observed prefix, so the
    # unobserved channels get the mean; the observed ones are kept but drive nothing
    subset = torch.zeros_like(observed)
    subset[:, 0] = True
    imp = model.linear_forecast(win, subset)
    assert torch.equal(imp[:, 0], win[:, 0])
    assert torch.allclose(imp[:, 1:], mean[1:, None].expand(6, 2, L), atol=1e-5)
    again = _model(num_channels=3, linear_order=2, linear_fit=True)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.linear_forecast(win, observed), base)
    with pytest.raises(ValueError, match=r"expected coef \(2, 3, 3\)"):
        model.set_linear_path(var.channel_coefficients()[:1], var.intercept)
    with pytest.raises(ValueError, match="no linear forecast"):
        _model(num_channels=3).set_linear_path(var.channel_coefficients(), var.intercept)


def test_linear_forecast_config_is_checked():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="linear_order must be an integer"):
            _model(linear_order=bad, linear_fit=True)
    with pytest.raises(ValueError, match="needs linear_fit: true"):
        _model(linear_order=2)
    with pytest.raises(ValueError, match="needs linear_order > 0"):
        _model(linear_fit=True)
    with pytest.raises(ValueError, match="linear_fit must be true or false"):
        _model(linear_order=2, linear_fit="yes")
    with pytest.raises(ValueError, match="needs mask_channel"):
        _model(linear_order=2, linear_fit=True, mask_channel=False, p_forecast=0.0,
               p_impute=0.0)


def test_a_silent_denoiser_forecasts_the_var_and_training_targets_its_residual():
    """With the linear forecast, the model diffuses the VAR's residual: its training target
    is ``x - linear_forecast`` (zero loss weight where observed), and a denoiser that
    predicts a zero residual makes every sample the VAR's point forecast."""
    from ephys_gpt.linear import fit_linear
    from ephys_gpt.training.data_init import init_from_training_data

    x = _var_process(4, 3, 300, seed=1)
    model = _model(num_channels=3, linear_order=2, linear_fit=True)
    assert model.linear_init_request == {"kind": "var", "order": 2}
    init_from_training_data(model, list(x.numpy()))
    var = fit_linear(list(x.numpy()), "var", 2)
    assert torch.allclose(model.var_coef, torch.as_tensor(var.channel_coefficients()).float())
    L = TINY["signal_length"]
    win = x[..., :L]
    observed = torch.zeros_like(win, dtype=torch.bool)
    observed[..., :12] = True
    out = model(win, observed=observed, t=torch.full((4,), 3))
    assert torch.allclose(out.target, win - model.linear_forecast(win, observed))
    assert not out.target[..., :12].any() and not out.weight[..., :12].any()
    with torch.no_grad():
        model.denoiser.head[-1].weight.zero_()
        model.denoiser.head[-1].bias.zero_()
        model.denoiser.linear.weight.zero_()
        model.denoiser.linear.bias.zero_()
    fc = model.eval().forecast(win[..., :12], 8)
    want = torch.as_tensor(var.forecast(win[..., :12].numpy(), 8), dtype=torch.float32)
    assert torch.allclose(fc[..., 12:], want, atol=1e-4)

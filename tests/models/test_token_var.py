"""GPT2MEG and STGPT2MEG with a fitted VAR's forecast added to their logits (``linear_order``,
``ephys_gpt/models/token_var.py``; WavenetFullChannel's use of the same part is tested in
test_wavenet.py)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from var_tokens import fitted, set_fitted, var_tokens

from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
from ephys_gpt.models.registry import build_model

TINY = {"num_channels": 3, "vocab_size": 16, "n_positions": 24, "d_model": 16, "n_layers": 2,
        "n_heads": 2, "time_conv": 3}
NAMES = ["GPT2MEG", "STGPT2MEG"]


def _model(name, order=2, **over):
    torch.manual_seed(0)
    return build_model(name, {**TINY, **over, "linear_order": order, "linear_fit": True}).eval()


@pytest.mark.parametrize("name", NAMES)
def test_logits_are_the_networks_plus_the_fitted_vars_token_log_probabilities(name):
    """The forward pass adds, at every step, the token log-probabilities of the fitted VAR's
    Gaussian forecast (its prediction equals the eval's fitted VAR's) to the network's logits,
    which are those of the same weights without the VAR; before a VAR is set it adds
    nothing; saved and reloaded, the model gives the same logits."""
    tok, steps = var_tokens(T=24)
    m = _model(name)
    plain = build_model(name, TINY).eval()
    plain.load_state_dict(m.state_dict(), strict=False)  # the same network, no VAR
    with torch.no_grad():
        base = plain(tok).prediction
        assert torch.equal(m(tok).prediction, base)  # no VAR set yet: nothing added
    var = set_fitted(m, tok, steps, 2)
    assert m.linear_init_request == {"kind": "var", "order": 2, "tokens": True}
    pred = m.linear_prediction(tok)
    _, vals = fitted(tok, steps, 2)
    want = torch.as_tensor(var.predict_next(vals.double().numpy()), dtype=torch.float32)
    assert torch.allclose(pred[..., 1:], want[..., 1:], atol=1e-4)
    with torch.no_grad():
        logits = m(tok).prediction
    assert logits.dtype == torch.float32
    m.train()  # causal in train mode too: later tokens change no earlier logit
    for t in (1, 12, 23):
        later = tok.clone()
        later[..., t:] = (later[..., t:] + 5) % 16
        with torch.no_grad():
            torch.testing.assert_close(m(later).prediction[:, :, :t], m(tok).prediction[:, :, :t])
    m.eval()
    torch.testing.assert_close(logits, base + m.linear_logprior(pred))
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(m, d)
        back = from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(back(tok).prediction, logits)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("order, context", [(2, 10), (6, 4), (6, 20)])
def test_cached_decoding_streams_the_var_exactly(name, order, context):
    """KV-cached generation (the VAR's last p values streamed) gives the tokens of the
    uncached path, greedy and sampled, also with a context shorter than p and past
    n_positions (the window slides and the stream restarts from it); each cached step's
    logits are the forward pass's."""
    tok, steps = var_tokens(T=40)
    m = _model(name, order)
    set_fitted(m, tok, steps, order)
    c = tok[..., :context]
    cached = m.generate(c, 30, temperature=0.0)  # past n_positions = 24
    assert torch.equal(cached, m.generate(c, 30, temperature=0.0, use_cache=False))
    sampled = m.generate(c, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sampled, m.generate(c, 30, generator=torch.Generator().manual_seed(3),
                                           use_cache=False))
    prime, step = m.incremental_decoder(2)
    with torch.no_grad():
        logits = [prime(c, True)]
        logits += [step(cached[..., t]) for t in range(context, 23)]
        full = m(cached[..., :24]).prediction
    torch.testing.assert_close(torch.stack(logits, 2), full[:, :, context - 1:23],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_keeps_the_var_part_in_float32(name):
    tok, steps = var_tokens(T=24)
    m = _model(name)
    set_fitted(m, tok, steps, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(tok).prediction
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        prime, step = m.incremental_decoder(2)
        assert prime(tok[..., :5], True).dtype == torch.float32
        assert step(tok[..., 5]).dtype == torch.float32
        u = m.innovation_uniforms(4, torch.Generator().manual_seed(0))
    assert u.dtype == torch.float32
    assert torch.equal(u, m.innovation_uniforms(4, torch.Generator().manual_seed(0)))


def test_generation_draws_the_channels_with_the_var_errors_correlation():
    """The channels' uniforms go through a Gaussian copula with the fitted errors'
    correlation: their normal scores have that correlation and each stays uniform, and a
    model that is the VAR (its network silenced) generates a signal whose 1-step errors are
    correlated like the data's; drawn independently (a model saved before the correlation
    was kept, which still loads) they are not."""
    corr = torch.tensor([[1.0, 0.8, 0.5], [0.8, 1.0, 0.6], [0.5, 0.6, 1.0]])
    tok, steps = var_tokens(B=4, T=600, bits=6, corr=corr)
    m = _model("GPT2MEG", vocab_size=64, n_positions=48)
    var = set_fitted(m, tok, steps, 2)
    sd = var.noise_cov.diagonal() ** 0.5
    fitted_corr = torch.as_tensor(var.noise_cov / (sd[:, None] * sd[None, :]), dtype=torch.float32)
    u = m.innovation_uniforms(40000, torch.Generator().manual_seed(0))
    assert u.shape == (40000, 3, 1) and ((u > 0) & (u < 1)).all()
    assert torch.allclose(u.mean(0), torch.full((3, 1), 0.5), atol=0.01)
    scores = torch.special.ndtri(u[..., 0].double()).T
    assert torch.allclose(torch.corrcoef(scores).float(), fitted_corr, atol=0.02)
    with torch.no_grad():
        m.head.weight.zero_()  # (tied to the token embedding: silences the network's logits)
    legacy = {k: v for k, v in m.state_dict().items() if k != "var_noise_factor"}
    indep = _model("GPT2MEG", vocab_size=64, n_positions=48)
    indep.load_state_dict(legacy)
    assert torch.equal(indep.var_noise_factor, torch.eye(3))

    def error_corr(model):
        out = model.generate(tok[..., :40], 400, generator=torch.Generator().manual_seed(1))
        gen, _ = fitted(out[..., 40:], steps, 2)
        s = gen.noise_cov.diagonal() ** 0.5
        return torch.as_tensor(gen.noise_cov / (s[:, None] * s[None, :]), dtype=torch.float32)

    assert torch.allclose(error_corr(m), fitted_corr, atol=0.1)
    off = ~torch.eye(3, dtype=torch.bool)
    assert error_corr(indep)[off].abs().max() < 0.15


def test_linear_config_is_checked():
    with pytest.raises(ValueError, match="needs linear_fit: true"):
        build_model("GPT2MEG", {**TINY, "linear_order": 2})
    with pytest.raises(ValueError, match="linear_fit needs linear_order > 0"):
        build_model("GPT2MEG", {**TINY, "linear_fit": True})
    with pytest.raises(ValueError, match=r"linear_order \(30\) must be <= n_positions \(24\)"):
        build_model("STGPT2MEG", {**TINY, "linear_order": 30, "linear_fit": True})
    m = _model("GPT2MEG")
    tok, steps = var_tokens(T=24)
    var, _ = fitted(tok, steps, 2)
    with pytest.raises(ValueError, match=r"noise_corr must be a \(3, 3\) correlation matrix"):
        m.set_linear_path(var.channel_coefficients(), var.intercept, steps=steps,
                          noise_std=var.noise_cov.diagonal() ** 0.5, noise_corr=2 * torch.eye(3))
    with pytest.raises(ValueError, match="no linear forecast"):
        tok, steps = var_tokens(T=24)
        set_fitted(build_model("GPT2MEG", TINY), tok, steps, 2)

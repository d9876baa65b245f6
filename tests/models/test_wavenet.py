"""WavenetFullChannel beyond the registry contract: receptive field, streaming generation,
global and local conditioning."""

from __future__ import annotations

import pytest
import torch
from var_tokens import fitted, var_tokens

from ephys_gpt.models.wavenet import WavenetFullChannel

TINY = dict(num_channels=3, vocab_size=16, embed_dim=4, residual_channels=8,
            dilation_channels=8, skip_channels=8, layers_per_block=3, n_blocks=2)


def tokens(T=20, B=2):
    return torch.randint(0, 16, (B, 3, T), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return WavenetFullChannel(**TINY).eval()


def test_receptive_field_is_exact(model):
    assert model.receptive_field == 1 + 2 * (1 + 2 + 4)  # kernel 2, dilations 1,2,4 twice
    x = tokens(T=30)
    x2 = x.clone()
    x2[..., 10] = (x2[..., 10] + 1) % 16
    with torch.no_grad():
        diff = (model(x).prediction - model(x2).prediction).abs().amax(dim=(0, 1, 3))
    changed = (diff > 0).nonzero().flatten()
    assert changed.min() == 10 and changed.max() == 10 + model.receptive_field - 1


def test_streaming_generation_equals_uncached_past_the_receptive_field(model):
    c = tokens(T=5)  # shorter than the receptive field, then well past it
    cached = model.generate(c, 30, temperature=0.0)
    plain = model.generate(c, 30, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 3, 35) and torch.equal(cached, plain)
    assert torch.equal(model.generate(c, 30, top_k=1), cached)


def test_streaming_step_logits_match_full_forward(model):
    """The logits each cached step produces equal the full forward pass on the sequence."""
    out = model.generate(tokens(T=9), 12, temperature=0.0)
    with torch.no_grad():
        full = model(out).prediction
    assert torch.equal(full[:, :, 8:-1].argmax(-1), out[..., 9:])


def test_global_and_local_conditioning():
    torch.manual_seed(0)
    m = WavenetFullChannel(**TINY, n_subjects=2, global_dim=4, local_channels=2).eval()
    x = tokens(T=12)
    local = torch.randn(2, 2, 20)
    subj = torch.tensor([0, 1])
    with torch.no_grad():
        a = m(x, subject=subj, local_cond=local).prediction
        b = m(x, subject=torch.tensor([1, 1]), local_cond=local).prediction
        local2 = local.clone()
        local2[..., 6:] += 1.0
        c = m(x, subject=subj, local_cond=local2).prediction
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    assert torch.allclose(a[..., :6, :], c[..., :6, :]) and not torch.allclose(a, c)
    g1 = m.generate(x, 8, temperature=0.0, subject=subj, local_cond=local)
    g2 = m.generate(x, 8, temperature=0.0, subject=subj, local_cond=local, use_cache=False)
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="local_cond"):
        m.generate(x, 9, subject=subj, local_cond=local)  # needs 12 + 9 = 21 steps
    with pytest.raises(ValueError, match="subject"):
        m(x, local_cond=local)


def test_bf16_autocast_forward_is_finite(model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens()).prediction
        gen = model.generate(tokens(), 4, temperature=0.0)
    assert out.shape == (2, 3, 20, 16) and torch.isfinite(out.float()).all()
    assert gen.shape == (2, 3, 24)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="kernel_size"):
        WavenetFullChannel(**{**TINY, "kernel_size": 0})
    with pytest.raises(ValueError, match="num_channels=3"):
        WavenetFullChannel(**TINY)(torch.zeros(1, 2, 4, dtype=torch.long))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("kernel_size,context", [(3, 4), (3, 40), (2, 1)])
def test_fused_stream_equals_forward_for_any_kernel_and_context(kernel_size, context, backend):
    """The fused streaming step (one batched matmul for every layer's past taps, folded
    biases, a ring buffer per layer) gives the forward pass's logits at every step, with
    global and local conditioning, whatever the kernel size and however short the context
    (the ring then holds the causal zero padding), in torch and in its NumPy form."""
    torch.manual_seed(0)
    m = WavenetFullChannel(**{**TINY, "kernel_size": kernel_size}, n_subjects=2, global_dim=4,
                           local_channels=2).eval()
    x = tokens(T=context + 12)
    local = torch.randn(2, 2, context + 12)
    subj = torch.tensor([1, 0])
    with torch.no_grad():
        full = m(x, subject=subj, local_cond=local).prediction
    from ephys_gpt.models.wavenet import WavenetStream

    inputs = []
    with torch.no_grad():
        g = m.subject_emb(subj, 2)
        m._run(x[..., :context], g, local[..., :context], last_only=True, inputs=inputs)
    stream = WavenetStream(m, inputs, g, backend=backend)
    assert (stream._numpy is not None) == (backend == "numpy")
    for t in range(context, context + 12):
        got = stream.step(x[..., t], local[..., t])
        assert torch.allclose(got, full[:, :, t], atol=1e-5)


def test_bf16_stream_runs_in_bf16(model):
    from ephys_gpt.models.wavenet import WavenetStream

    x = tokens(T=10)
    inputs = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x).prediction
        model._run(x[..., :6], None, None, last_only=True, inputs=inputs)
        stream = WavenetStream(model, inputs, None)
        got = [stream.step(x[..., t]) for t in range(6, 10)]
    assert stream.ring.dtype == torch.bfloat16 and got[0].dtype == torch.bfloat16
    assert (torch.stack(got, 2).float() - ref[:, :, 6:].float()).abs().max() < 0.1
    with pytest.raises(ValueError, match="numpy backend runs float32 on the CPU"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            WavenetStream(model, inputs, None, backend="numpy")
    with pytest.raises(ValueError, match="backend must be"):
        WavenetStream(model, inputs, None, backend="jax")


def _linear_model(order, **over):
    torch.manual_seed(0)
    return WavenetFullChannel(**{**TINY, **over}, linear_order=order, linear_fit=True).eval()


def test_linear_forecast_is_the_fitted_var_and_the_untrained_model_is_its_distribution():
    """``linear_order`` p: the model's VAR forecast of the next decoded value equals the
    fitted VAR's 1-step prediction (the eval's baseline), and the untrained model's logits
    are the token log-probabilities under that Gaussian forecast (the head starts at zero):
    each token's bin mass, as the eval scores the VAR (``LinearPredictor.token_scores``), to
    the table's interpolation error; floored far out in the tails; rebuilt after a
    save/load."""
    from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
    from ephys_gpt.models.token_var import LOGPRIOR_FLOOR

    tok, steps = var_tokens(bits=6)
    var, vals = fitted(tok, steps, 2)
    m = _linear_model(2, vocab_size=64)
    assert m.linear_init_request == {"kind": "var", "order": 2, "tokens": True}
    std = var.noise_cov.diagonal() ** 0.5
    with torch.no_grad():
        untouched = m(tok).prediction
    m.set_linear_path(var.channel_coefficients(), var.intercept, noise_std=std, steps=steps)
    pred = m.linear_prediction(tok)
    want = torch.as_tensor(var.predict_next(vals.double().numpy()), dtype=torch.float32)
    assert torch.allclose(pred[..., 1:], want[..., 1:], atol=1e-4)
    with torch.no_grad():
        logits = m(tok).prediction
    assert torch.allclose(logits, m.linear_logprior(pred), atol=1e-6)
    assert not torch.allclose(logits, untouched)  # (before the VAR was set it added nothing)
    # the eval's exact scores of the same VAR: every target token's NLL, the most probable
    nll, mode, _ = var.token_scores(tok[..., :-1], tok[..., 1:], steps)
    logp = logits[:, :, :-1].log_softmax(-1)
    got = -logp.gather(-1, tok[..., 1:, None])[..., 0]
    ok = nll < -LOGPRIOR_FLOOR - 5  # away from the floor
    assert ok.float().mean() > 0.99
    assert (got - nll)[ok].abs().max() < 2e-3
    assert (logp.argmax(-1) == mode).float().mean() > 0.99  # ties between bins aside
    assert torch.allclose(logp.exp().sum(-1), torch.ones(()), atol=1e-3)
    assert logits.min() == LOGPRIOR_FLOOR  # far tails floored
    # the table is derived, not saved: a saved and reloaded model rebuilds the same one
    import tempfile

    from ephys_gpt.models.registry import build_model

    built = build_model("WavenetFullChannel", {**TINY, "vocab_size": 64, "linear_order": 2,
                                               "linear_fit": True})
    built.load_state_dict(m.state_dict())  # (the post-load hook rebuilds its table)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(built, d)
        back = from_pretrained(d).eval()
    assert "logprior_table" not in m.state_dict()
    with torch.no_grad():
        assert torch.equal(back(tok).prediction, logits)
    # weights saved before the exact log-prior (with a token_log_width buffer) still load
    legacy = {**m.state_dict(), "token_log_width": torch.zeros(3, 64)}
    fresh = _linear_model(2, vocab_size=64)
    fresh.load_state_dict(legacy)
    with torch.no_grad():
        assert torch.equal(fresh(tok).prediction, logits)


def test_linear_forecast_streams_exactly_even_beyond_the_receptive_field():
    """Cached generation (the VAR's last p values kept in the stream) gives the tokens and
    logits of the uncached path and of the forward pass, also when p exceeds the receptive
    field (8 here) and the context is shorter than p."""
    tok, steps = var_tokens()
    for order, context in ((3, 20), (12, 20), (12, 5)):
        var, _ = fitted(tok, steps, order)
        m = _linear_model(order)
        m.set_linear_path(var.channel_coefficients(), var.intercept,
                          noise_std=var.noise_cov.diagonal() ** 0.5, steps=steps)
        with torch.no_grad():  # give the head weight, so both parts of the logits count
            m.out[-1].weight.normal_(0, 0.1)
        c = tok[..., :context]
        cached = m.generate(c, 25, temperature=0.0)
        assert torch.equal(cached, m.generate(c, 25, temperature=0.0, use_cache=False))
        gen = torch.Generator().manual_seed(3)
        sampled = m.generate(c, 25, generator=gen)
        gen = torch.Generator().manual_seed(3)
        assert torch.equal(sampled, m.generate(c, 25, generator=gen, use_cache=False))
        with torch.no_grad():
            full = m(cached).prediction
        assert torch.equal(full[:, :, context - 1:-1].argmax(-1), cached[..., context:])
        # the stream's NumPy form (used on the CPU in float32) gives the torch step's logits
        from ephys_gpt.models.wavenet import WavenetStream

        streams = []
        for backend in ("torch", "numpy"):
            inputs = []
            with torch.no_grad():
                m._run(c, None, None, last_only=True, inputs=inputs)
            streams.append(WavenetStream(m, inputs, None, c, backend=backend))
        for t in range(context, context + 25):
            a, b = (st.step(cached[..., t]) for st in streams)
            assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, full[:, :, t], atol=1e-4)


def test_linear_forecast_config_and_codec_are_checked():
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="linear_order must be an integer"):
            WavenetFullChannel(**TINY, linear_order=bad, linear_fit=True)
    with pytest.raises(ValueError, match="needs linear_fit: true"):
        WavenetFullChannel(**TINY, linear_order=2)
    with pytest.raises(ValueError, match="needs linear_order > 0"):
        WavenetFullChannel(**TINY, linear_fit=True)
    tok, steps = var_tokens()
    var, _ = fitted(tok, steps, 2)
    m = _linear_model(2)
    args = (var.channel_coefficients(), var.intercept)
    std = var.noise_cov.diagonal() ** 0.5
    with pytest.raises(ValueError, match="needs mu-law token data.*'normalize'"):
        m.set_linear_path(*args, noise_std=std, steps=steps[:1])
    with pytest.raises(ValueError, match="5-bit tokens .* vocab_size is 16"):
        m.set_linear_path(*args, noise_std=std, steps=[{**steps[1], "n_bits": 5}])
    with pytest.raises(ValueError, match=r"expected coef \(2, 3, 3\)"):
        m.set_linear_path(args[0][:1], args[1], noise_std=std, steps=steps)
    with pytest.raises(ValueError, match="no linear forecast"):
        WavenetFullChannel(**TINY).set_linear_path(*args, noise_std=std, steps=steps)

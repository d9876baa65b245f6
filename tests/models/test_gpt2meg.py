"""GPT2MEG beyond the registry contract: sampling options, sliding window, conditioning,
channel independence, errors, bf16."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.models.gpt2meg import GPT2MEG, GPT2MEGConfig

TINY = dict(num_channels=3, vocab_size=16, n_positions=12, d_model=16, n_layers=2, n_heads=2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT2MEG(**TINY).eval()


def ctx(T=6, B=2):
    return torch.randint(0, 16, (B, 3, T), generator=torch.Generator().manual_seed(3))


def test_top_k_one_equals_greedy(model):
    greedy = model.generate(ctx(), 8, temperature=0.0)
    topk1 = model.generate(ctx(), 8, temperature=1.3, top_k=1,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, topk1)


def test_sampling_is_reproducible_with_a_generator(model):
    a = model.generate(ctx(), 10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(ctx(), 10, top_p=0.9, generator=torch.Generator().manual_seed(5))
    c = model.generate(ctx(), 10, top_p=0.9, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 16


@pytest.mark.parametrize("stride", [1, 5, None])
def test_sliding_window_past_n_positions_cached_equals_uncached(stride):
    torch.manual_seed(0)
    model = GPT2MEG(**TINY, slide_stride=stride).eval()
    c = ctx(T=20)  # context already longer than n_positions=12
    cached = model.generate(c, 25, temperature=0.0, use_cache=True)
    plain = model.generate(c, 25, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 3, 45)
    assert torch.equal(cached[..., :20], c)
    assert torch.equal(cached, plain)


def test_stride_one_window_is_the_last_n_positions_tokens(model):
    """With stride 1 the next token is the forward pass's prediction on the last n_positions
    tokens."""
    torch.manual_seed(0)
    m = GPT2MEG(**TINY, slide_stride=1).eval()
    out = m.generate(ctx(T=12), 6, temperature=0.0)
    for t in range(12, 18):
        with torch.no_grad():
            expect = m(out[..., max(0, t - 12):t]).prediction[:, :, -1].argmax(-1)
        assert torch.equal(out[..., t], expect)


def test_default_stride():
    assert GPT2MEGConfig(n_positions=400).stride == 100
    assert GPT2MEGConfig(n_positions=3).stride == 1


def test_channels_are_independent_sequences(model):
    x = ctx(T=10)
    x2 = x.clone()
    x2[:, 1] = (x2[:, 1] + 5) % 16
    with torch.no_grad():
        a, b = model(x).prediction, model(x2).prediction
    assert torch.allclose(a[:, 0], b[:, 0]) and torch.allclose(a[:, 2], b[:, 2])
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_channel_embedding_makes_channels_differ(model):
    x = torch.full((1, 3, 5), 4)
    with torch.no_grad():
        out = model(x).prediction
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_subject_and_condition_embeddings():
    torch.manual_seed(0)
    m = GPT2MEG(**TINY, n_subjects=3, n_conditions=2).eval()
    x = ctx()
    with torch.no_grad():
        a = m(x, subject=torch.tensor([0, 1]), condition=torch.tensor([1, 1])).prediction
        b = m(x, subject=torch.tensor([2, 1]), condition=torch.tensor([1, 1])).prediction
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="subject"):
        m(x, condition=torch.tensor([0, 0]))
    g1 = m.generate(x, 4, temperature=0.0, subject=torch.tensor([0, 1]),
                    condition=torch.tensor([0, 1]))
    g2 = m.generate(x, 4, temperature=0.0, subject=torch.tensor([0, 1]),
                    condition=torch.tensor([0, 1]), use_cache=False)
    assert torch.equal(g1, g2)


def test_tied_and_untied_head():
    tied = GPT2MEG(**TINY)
    assert tied.head.weight is tied.tok_emb.weight
    untied = GPT2MEG(**TINY, tie_weights=False)
    assert untied.head.weight is not untied.tok_emb.weight


def test_bad_inputs_raise(model):
    with pytest.raises(ValueError, match="num_channels=3"):
        model(torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_positions=12"):
        model(torch.zeros(1, 3, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="divisible"):
        GPT2MEG(**{**TINY, "n_heads": 3})
    with pytest.raises(ValueError, match="slide_stride"):
        GPT2MEG(**TINY, slide_stride=13)


def test_bf16_autocast_forward_and_generate_are_finite(model):
    x = ctx(T=12)
    with torch.no_grad():
        ref = model(x).prediction
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).prediction
            gen = model.generate(x, 3, temperature=0.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1
    assert gen.shape == (2, 3, 15)


def _assert_decoder_matches_forward(model, x, n_prime=5):
    """Priming on ``x[..., :n_prime]`` and cached steps over the rest give the forward
    pass's logits; returns the decoder's ``step`` (its cache now full when ``x`` is
    ``n_positions`` long)."""
    prime, step = model.incremental_decoder(x.shape[0])
    with torch.no_grad():
        full = model(x).prediction
        got = [prime(x[..., :n_prime], True)] + [step(x[..., t])
                                                 for t in range(n_prime, x.shape[-1])]
    assert torch.allclose(torch.stack(got, dim=2), full[:, :, n_prime - 1:], atol=1e-5)
    return step


def test_incremental_decoder_matches_forward_and_refuses_overflow(model):
    step = _assert_decoder_matches_forward(model, ctx(T=12))
    with pytest.raises(ValueError, match="cache is full"):
        step(ctx(T=12)[..., 0])


@pytest.mark.slow
def test_compiled_decoder_equals_forward(model):
    """``incremental_decoder(compile=True)``: fixed-shape steps (static cache, position as a
    tensor) compiled once; same logits as the forward pass and the same cache-full check."""
    x = ctx(T=12)
    prime, step = model.incremental_decoder(2, compile=True)
    with torch.no_grad():
        full = model(x)
        got = [prime(x[..., :5], True)] + [step(x[..., t]) for t in range(5, 12)]
    assert torch.allclose(torch.stack(got, dim=2), full[:, :, 4:], atol=1e-5)
    with pytest.raises(ValueError, match="cache is full"):
        step(x[..., 0])


def _ar_tokens(B, C, T, V, seed):
    """Tokens of a per-channel AR(2) oscillation, quantized uniformly into V levels."""
    g = torch.Generator().manual_seed(seed)
    x, e = torch.zeros(B, C, T), torch.randn(B, C, T, generator=g)
    for t in range(2, T):
        x[..., t] = 1.6 * x[..., t - 1] - 0.8 * x[..., t - 2] + e[..., t]
    x = (x / x.std()).clamp(-2.5, 2.5)
    return ((x + 2.5) / 5 * (V - 1)).round().long()


def test_time_conv_starts_as_the_plain_model_and_streams():
    """``time_conv``: zero at init (the model equals the one without it), and the decoding
    stream (prime, steps, re-primes past n_positions) equals re-running the window."""
    torch.manual_seed(0)
    plain = GPT2MEG(**TINY).eval()
    conv = GPT2MEG(**TINY, time_conv=4, slide_stride=5).eval()
    missing = conv.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["time_conv.bias", "time_conv.weight", "time_mix.bias",
                               "time_mix.weight"]
    x = ctx(T=12)
    with torch.no_grad():
        assert torch.allclose(conv(x).prediction, plain(x).prediction, atol=1e-6)
        torch.nn.init.normal_(conv.time_mix.weight)
        assert not torch.allclose(conv(x).prediction, plain(x).prediction, atol=1e-3)
        # causal: changing the last token leaves every earlier prediction unchanged
        y = x.clone()
        y[..., -1] = (y[..., -1] + 1) % 16
        assert torch.equal(conv(y).prediction[..., :-1, :], conv(x).prediction[..., :-1, :])
    cached = conv.generate(ctx(T=6), 20, temperature=0.0, use_cache=True)
    assert torch.equal(cached, conv.generate(ctx(T=6), 20, temperature=0.0, use_cache=False))
    with pytest.raises(ValueError, match="time_conv"):
        conv.incremental_decoder(2, compile=True)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="time_conv"):
            GPT2MEGConfig(**TINY, time_conv=bad)


def test_time_conv_learns_a_per_channel_autoregression_faster():
    """A signed linear filter over the last samples is what attention (convex weights over
    learned positions) learns slowly: with time_conv the same budget reaches a clearly lower
    held-out loss on an AR(2) token process."""
    V = 16
    train, test = _ar_tokens(32, 2, 48, V, 0), _ar_tokens(16, 2, 48, V, 1)

    def fit(k):
        torch.manual_seed(0)
        m = GPT2MEG(num_channels=2, vocab_size=V, n_positions=48, d_model=16, n_layers=1,
                    n_heads=2, time_conv=k)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            logits = m(train[..., :-1]).prediction
            torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                              train[..., 1:].reshape(-1)).backward()
            opt.step()
        with torch.no_grad():
            logits = m.eval()(test[..., :-1]).prediction
            return torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                                     test[..., 1:].reshape(-1)).item()

    with_conv, without = fit(8), fit(0)
    assert with_conv < without - 0.08, (with_conv, without)


@pytest.mark.parametrize("name", ["GPT2MEG", "STGPT2MEG"])
def test_grouped_key_value_heads_decode_like_the_forward_pass(name):
    """``kv_heads``: the time attention's caches hold kv_heads heads (the bytes a decode
    step reads shrink by kv_heads / n_heads); cached steps give the forward pass's logits and
    cached generation the uncached tokens."""
    from ephys_gpt.models.registry import build_model

    torch.manual_seed(0)
    m = build_model(name, {**TINY, "n_heads": 4, "kv_heads": 1, "time_conv": 3}).eval()
    _assert_decoder_matches_forward(m, ctx(T=12))
    cached = m.generate(ctx(), 10, temperature=0.0)
    assert torch.equal(cached, m.generate(ctx(), 10, temperature=0.0, use_cache=False))
    with pytest.raises(ValueError, match=f"{name}Config: kv_heads must be None or a positive "
                                         "integer dividing n_heads=4, got 3"):
        build_model(name, {**TINY, "n_heads": 4, "kv_heads": 3})

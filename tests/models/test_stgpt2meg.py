"""STGPT2MEG beyond the registry contract: channel mixing without future leak, sliding
window cached generation, bf16."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.models.stgpt2meg import STGPT2MEG

TINY = dict(num_channels=4, vocab_size=16, n_positions=10, d_model=16, n_layers=2, n_heads=2)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return STGPT2MEG(**TINY).eval()


def tokens(T=8, B=2):
    return torch.randint(0, 16, (B, 4, T), generator=torch.Generator().manual_seed(1))


def test_channels_mix_at_the_same_step_but_not_from_the_future(model):
    x = tokens()
    x2 = x.clone()
    x2[:, 1, 5] = (x2[:, 1, 5] + 3) % 16  # change channel 1 at t=5 only
    with torch.no_grad():
        a, b = model(x).prediction, model(x2).prediction
    assert torch.allclose(a[:, :, :5], b[:, :, :5], atol=1e-6)  # no channel sees the future
    assert not torch.allclose(a[:, 0, 5], b[:, 0, 5])  # channel 0 reads channel 1 at t=5


def test_sliding_window_cached_equals_uncached(model):
    c = tokens(T=7)
    cached = model.generate(c, 15, temperature=0.0)
    plain = model.generate(c, 15, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 4, 22)
    assert torch.equal(cached, plain)
    topk1 = model.generate(c, 15, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(topk1, cached)


def test_conditioning_and_errors():
    torch.manual_seed(0)
    m = STGPT2MEG(**TINY, n_subjects=2).eval()
    x = tokens()
    with torch.no_grad():
        a = m(x, subject=torch.tensor([0, 0])).prediction
        b = m(x, subject=torch.tensor([1, 0])).prediction
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="num_channels=4"):
        m(torch.zeros(1, 3, 5, dtype=torch.long), subject=torch.tensor([0]))


def test_bf16_autocast_forward_is_finite(model):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens()).prediction
    assert out.shape == (2, 4, 8, 16) and torch.isfinite(out.float()).all()


def test_incremental_decoder_matches_forward_and_refuses_a_full_cache(model):
    """STGPT2MEG decodes on GPT2MEG's shared decoder: prime + cached steps give the forward
    pass's logits, and a step past n_positions is refused (the STGPT2MEG copy of the decoder
    had lost this check and would have written past the position table)."""
    x = tokens(T=10)
    prime, step = model.incremental_decoder(2)
    with torch.no_grad():
        full = model(x).prediction
        got = [prime(x[..., :4], True)] + [step(x[..., t]) for t in range(4, 10)]
    assert torch.allclose(torch.stack(got, dim=2), full[:, :, 3:], atol=1e-5)
    with pytest.raises(ValueError, match="cache is full"):
        step(x[..., 0])


def test_shares_gpt2meg_embeddings_head_and_decoding():
    from ephys_gpt.models.gpt2meg import GPT2MEG, ChannelTokenTransformer

    for cls in (STGPT2MEG, GPT2MEG):
        assert issubclass(cls, ChannelTokenTransformer)
        assert cls.generate is ChannelTokenTransformer.generate
        assert cls.incremental_decoder is ChannelTokenTransformer.incremental_decoder

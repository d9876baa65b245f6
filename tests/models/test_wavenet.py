"""WavenetFullChannel beyond the registry contract: receptive field, streaming generation,
global and local conditioning."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("kernel_size,context", [(3, 4), (3, 40), (2, 1)])
def test_fused_stream_equals_forward_for_any_kernel_and_context(kernel_size, context):
    """The fused streaming step (one batched matmul for every layer's past taps, folded
    biases, a ring buffer per layer) gives the forward pass's logits at every step, with
    global and local conditioning, whatever the kernel size and however short the context
    (the ring then holds the causal zero padding)."""
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
    stream = WavenetStream(m, inputs, g)
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

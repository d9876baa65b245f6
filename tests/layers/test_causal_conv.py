"""Causal convolution: causality, and streaming (any split, ring buffer) equals one full pass."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.layers.causal_conv import CausalConv1d
from ephys_gpt.layers.embeddings import ChannelwiseTokenEmbedding, OptionalEmbedding


@pytest.mark.parametrize("k, d, groups", [(2, 1, 1), (3, 4, 1), (5, 2, 2), (1, 1, 1)])
def test_streaming_equals_full(k, d, groups):
    torch.manual_seed(0)
    conv = CausalConv1d(4, 6, k, dilation=d, groups=groups)
    x = torch.randn(2, 4, 30)
    with torch.no_grad():
        full = conv(x)
        state = conv.new_state()
        outs = [conv(x[..., :7], state)]               # prime with a chunk
        outs += [conv(x[..., t:t + 1], state) for t in range(7, 20)]  # ring-buffer steps
        outs.append(conv(x[..., 20:], state))          # another chunk after steps
    assert full.shape == (2, 6, 30)
    assert torch.allclose(torch.cat(outs, -1), full, atol=1e-5)


def test_step_only_stream_from_scratch():
    torch.manual_seed(0)
    conv = CausalConv1d(3, 3, 3, dilation=3)
    x = torch.randn(1, 3, 12)
    with torch.no_grad():
        state = conv.new_state()
        steps = torch.cat([conv(x[..., t:t + 1], state) for t in range(12)], -1)
        assert torch.allclose(steps, conv(x), atol=1e-5)
    assert conv.receptive_field == 7 and state.buf.shape == (1, 3, 6)


def test_causal_and_receptive_field():
    torch.manual_seed(0)
    conv = CausalConv1d(1, 1, 3, dilation=2)
    x = torch.zeros(1, 1, 20)
    x[..., 10] = 1.0
    y = conv(x)[0, 0]
    nonzero = (y - conv.bias).abs() > 0
    assert nonzero.nonzero().flatten().tolist() == [10, 12, 14]


def test_state_shape_mismatch_raises():
    conv = CausalConv1d(2, 2, 2)
    state = conv.new_state()
    conv(torch.randn(3, 2, 4), state)
    with pytest.raises(ValueError, match="ConvState"):
        conv(torch.randn(2, 2, 1), state)


def test_channelwise_embedding_differs_per_channel():
    torch.manual_seed(0)
    emb = ChannelwiseTokenEmbedding(num_channels=3, vocab_size=5, dim=4)
    tok = torch.full((2, 3, 6), 2)
    out = emb(tok)
    assert out.shape == (2, 3, 6, 4)
    assert not torch.allclose(out[:, 0], out[:, 1])
    assert torch.equal(out[0, 1, 0], emb.table.weight[1 * 5 + 2])
    with pytest.raises(ValueError, match="C=3"):
        emb(torch.zeros(2, 4, 6, dtype=torch.long))


def test_optional_embedding_errors():
    off = OptionalEmbedding(0, 4, "subject")
    assert off(None, 2) is None and not list(off.parameters())
    with pytest.raises(ValueError, match="n_subjects"):
        off(torch.tensor([0, 1]), 2)
    on = OptionalEmbedding(3, 4, "subject")
    assert on(torch.tensor([0, 2]), 2).shape == (2, 4)
    with pytest.raises(ValueError, match="pass subject ids"):
        on(None, 2)
    with pytest.raises(ValueError, match="int64"):
        on(torch.tensor([0.0, 1.0]), 2)

"""Causal self-attention with a KV cache: cached decoding equals the full causal pass."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.layers.attention import KVCache, MultiHeadSelfAttention, TransformerBlock


@pytest.fixture
def block():
    torch.manual_seed(0)
    return TransformerBlock(d_model=16, n_heads=4).eval()


def test_full_pass_is_causal(block):
    x = torch.randn(3, 10, 16)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(3, 4, 16)
    with torch.no_grad():
        a, b = block(x), block(x2)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_step_by_step_cache_equals_full_pass(block):
    x = torch.randn(2, 9, 16)
    cache = KVCache(max_len=12)
    with torch.no_grad():
        full = block(x)
        steps = [block(x[:, t:t + 1], cache=cache) for t in range(9)]
    assert cache.length == 9
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_prompt_then_chunks_equals_full_pass(block):
    """A multi-step chunk after cached steps uses a bottom-right aligned causal mask."""
    x = torch.randn(2, 11, 16)
    cache = KVCache(max_len=11)
    with torch.no_grad():
        full = block(x)
        parts = [block(x[:, :4], cache=cache), block(x[:, 4:7], cache=cache),
                 block(x[:, 7:], cache=cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_cache_is_preallocated_and_reused(block):
    cache = KVCache(max_len=8)
    with torch.no_grad():
        block(torch.randn(2, 3, 16), cache=cache)
        buf = cache.k.data_ptr()
        block(torch.randn(2, 1, 16), cache=cache)
        assert cache.k.data_ptr() == buf and cache.k.shape == (2, 4, 8, 4)
        cache.reset()
        block(torch.randn(2, 5, 16), cache=cache)
        assert cache.k.data_ptr() == buf and cache.length == 5


def test_cache_overflow_raises(block):
    cache = KVCache(max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        block(torch.randn(1, 5, 16), cache=cache)


def test_non_causal_attention_sees_everything_and_refuses_a_cache():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(8, 2, causal=False).eval()
    x = torch.randn(1, 5, 8)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(attn(x)[:, 0], attn(x2)[:, 0])
    with pytest.raises(ValueError, match="causal"):
        attn(x, cache=KVCache(5))


def test_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadSelfAttention(10, 3)


def test_bf16_autocast_with_cache(block):
    x = torch.randn(2, 6, 16)
    cache = KVCache(max_len=6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = block(x)
        steps = torch.cat([block(x[:, t:t + 1], cache=cache) for t in range(6)], dim=1)
    assert cache.k.dtype == torch.bfloat16
    assert torch.isfinite(full).all()
    assert torch.allclose(steps.float(), full.float(), atol=0.1)

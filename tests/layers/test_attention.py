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


# -- one attention function, two paths --------------------------------------------------------

import ephys_gpt.layers.attention as A  # noqa: E402
from ephys_gpt.layers.attention import (  # noqa: E402
    MLP,
    TransformerStack,
    attention,
    attention_backend,
)


def _qkv(N, H, Lq, Lk, Dh, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, H, Lq, Dh, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(N, H, Lk, Dh, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(N, H, Lk, Dh, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Lq,Lk", [(37, 37), (5, 12), (1, 9), (70, 70)])
@pytest.mark.parametrize("save_bytes", [1 << 30, 0])  # keep the tile probabilities, or recompute
def test_tiled_attention_equals_sdpa_values_and_gradients(monkeypatch, causal, Lq, Lk,
                                                          save_bytes):
    """Tiles of batched matmuls (with the causal key blocks skipped, several tiles per
    sequence block and several sequence blocks) give SDPA's values and gradients; causal
    queries after cached keys see the whole past (bottom-right aligned)."""
    monkeypatch.setattr(A, "TILED_ROWS", 16)
    monkeypatch.setattr(A, "TILED_ELEMENTS", 2000)
    monkeypatch.setattr(A, "TILED_SAVE_MAX_BYTES", save_bytes)
    q, k, v = _qkv(3, 2, Lq, Lk, 8)
    do = torch.randn(3, 2, Lq, 8, dtype=torch.float64)
    with attention_backend("sdpa"):
        ref = attention(q, k, v, causal=causal)
    with attention_backend("tiled"):
        out = attention(q, k, v, causal=causal)
    g_ref = torch.autograd.grad(ref, (q, k, v), do)
    g_out = torch.autograd.grad(out, (q, k, v), do)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(g_out, g_ref):
        assert torch.allclose(a, b, atol=1e-12)


def test_tiled_bf16_is_as_accurate_as_bf16_sdpa():
    """bf16 matmuls with the softmax in fp32: relative errors (output and gradients) against
    fp64 at the SPEC shape of one sequence block stay at the bf16 level (< 2%)."""
    q, k, v = _qkv(2, 4, 200, 200, 32)
    do = torch.randn(2, 4, 200, 32, dtype=torch.float64)
    ref = [attention(q, k, v, causal=True)]
    ref += torch.autograd.grad(ref[0], (q, k, v), do)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    with attention_backend("tiled"):
        out = [attention(qb, kb, vb, causal=True)]
    out += torch.autograd.grad(out[0], (qb, kb, vb), do.bfloat16())
    for a, b in zip(out, ref):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - b).norm() / b.norm()) < 0.02


def test_auto_backend_tiles_low_precision_training_on_cpu_only(monkeypatch):
    calls = []
    real = A.tiled_attention
    monkeypatch.setattr(A, "tiled_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = (t.detach().float() for t in _qkv(1, 2, 6, 6, 4))
    attention(q, k, v, causal=True)
    assert calls == []  # fp32: SDPA
    attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert calls == [1]  # bf16 several queries: tiles
    attention(q[:, :, :1].bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert calls == [1]  # a single decode step: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attention(q, k, v, causal=False)
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="dropout"), attention_backend("tiled"):
        attention(q, k, v, causal=True, dropout_p=0.1)
    with pytest.raises(ValueError, match="backend"), attention_backend("flash"):
        pass


def test_static_cache_steps_equal_the_growing_cache(block):
    """Fixed-shape steps (whole buffer + length mask, position as a tensor: what
    torch.compile and CUDA graphs need) give the same outputs as the growing cache."""
    x = torch.randn(2, 9, 16)
    dyn, static = KVCache(max_len=12), KVCache(max_len=12, static=True)
    with torch.no_grad():
        full = block(x)
        block(x[:, :4], cache=dyn)
        block(x[:, :4], cache=static)
        for t in range(4, 9):
            a = block(x[:, t:t + 1], cache=dyn)
            b = block(x[:, t:t + 1], cache=static, position=torch.tensor(t))
            static.length = t + 1
            assert torch.allclose(a, b, atol=1e-6)
            assert torch.allclose(b, full[:, t:t + 1], atol=1e-5)
    with pytest.raises(ValueError, match="one new step"):
        block(x[:, :2], cache=static, position=torch.tensor(0))


def test_mlp_loads_weights_of_the_former_sequential_mlp():
    """The continuous models' MLP was an nn.Sequential (Linear, GELU, Dropout, Linear,
    Dropout): its ``0.*`` / ``3.*`` weights load into ``fc`` / ``proj``."""
    torch.manual_seed(0)
    old = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(0.0),
                              torch.nn.Linear(32, 8), torch.nn.Dropout(0.0))
    new = MLP(8, 32, activation="gelu")
    new.load_state_dict(old.state_dict())
    x = torch.randn(3, 8)
    assert torch.equal(new(x), old(x))


def test_rotary_stack_cached_equals_full_pass():
    """TransformerStack (rotary positions): a prompt then single steps through the caches
    equals one causal pass (positions continue after the cached ones)."""
    torch.manual_seed(0)
    stack = TransformerStack(16, n_layers=2, n_heads=2).eval()
    x = torch.randn(2, 10, 16)
    caches = stack.new_caches(10)
    with torch.no_grad():
        full = stack(x)
        parts = [stack(x[:, :4], caches)] + [stack(x[:, t:t + 1], caches) for t in range(4, 10)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    with torch.no_grad():  # rotary: relative positions, so shifting the start changes outputs
        assert not torch.allclose(stack(x[:, 1:]), full[:, 1:], atol=1e-3)


def test_bidirectional_stack_sees_the_whole_sequence():
    torch.manual_seed(0)
    stack = TransformerStack(16, n_layers=1, n_heads=2, causal=False).eval()
    x = torch.randn(1, 6, 16)
    x2 = x.clone()
    x2[:, -1] = torch.randn(16)
    with torch.no_grad():
        assert not torch.allclose(stack(x)[:, 0], stack(x2)[:, 0])


# -- grouped-query attention (kv_heads) --------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
@pytest.mark.parametrize("causal,Lq,Lk", [(True, 9, 9), (True, 3, 11), (False, 6, 6),
                                          (True, 1, 7), (False, 1, 7)])
def test_grouped_query_attention_equals_repeated_key_heads(backend, causal, Lq, Lk):
    """Fewer key/value heads than query heads: query head i reads key head i // g, values
    and gradients as if each key head were repeated g times; a single query (a decode step)
    takes the folded path, which reads each key head once."""
    q, _, _ = _qkv(2, 6, Lq, Lk, 4)
    _, k, v = _qkv(2, 2, Lq, Lk, 4, seed=1)
    with attention_backend(backend):
        out = attention(q, k, v, causal=causal)
        ref = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=causal)
    do = torch.randn_like(out)
    assert torch.allclose(out, ref, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do),
                    torch.autograd.grad(ref, (q, k, v), do)):
        assert torch.allclose(a, b, atol=1e-12)
    mask = torch.arange(Lk) < Lk - 2  # the static decode step's key mask
    if Lq == 1:
        out = attention(q, k, v, causal=True, mask=mask[None])
        ref = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True,
                        mask=mask[None])
        assert torch.allclose(out, ref, atol=1e-12)
        per_head = mask.expand(2, 6, 1, Lk)  # a mask with head and query axes: no folding
        out = attention(q, k, v, causal=True, mask=per_head)
        ref = attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True,
                        mask=per_head)
        assert torch.allclose(out, ref, atol=1e-12)
    with pytest.raises(ValueError, match="6 query heads cannot share 4"):
        attention(q, torch.cat([k, k], 1), torch.cat([v, v], 1), causal=causal)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_cache_holds_fewer_heads_and_equals_full_pass(kv_heads):
    torch.manual_seed(0)
    blk = TransformerBlock(d_model=16, n_heads=4, kv_heads=kv_heads).eval()
    assert blk.attn.qkv.weight.shape == (16 + 2 * kv_heads * 4, 16)
    x = torch.randn(2, 9, 16)
    cache = KVCache(max_len=12)
    with torch.no_grad():
        full = blk(x)
        steps = [blk(x[:, :4], cache=cache)] + [blk(x[:, t:t + 1], cache=cache)
                                                for t in range(4, 9)]
    assert cache.k.shape == (2, kv_heads, 12, 4)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache.reset()
        low = [blk(x[:, :4], cache=cache)] + [blk(x[:, t:t + 1], cache=cache)
                                              for t in range(4, 9)]
    assert cache.k.dtype == torch.bfloat16
    assert (torch.cat(low, 1).float() - full).abs().max() < 0.1


def test_kv_heads_are_checked():
    for bad in (3, 0, 2.0, True):
        with pytest.raises(ValueError, match="kv_heads must be None or a positive integer "
                                             "dividing n_heads=4"):
            MultiHeadSelfAttention(16, 4, kv_heads=bad)

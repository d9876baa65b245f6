"""Causal 3-D convolutions, per-frame norms, axial/frame attention and the VQ layer."""

from __future__ import annotations

import copy

import pytest
import torch

from ephys_gpt.layers.conv3d import (
    CausalConv3d,
    CausalConvTranspose3d,
    CausalUpsample3d,
    FrameGroupNorm,
)
from ephys_gpt.layers.video_attention import AxialAttention3d, FrameSelfAttention
from ephys_gpt.layers.vq import Quantizer


def _block_causal(module, x, t_in: int, stride_out: float, train: bool = True):
    """Outputs before ``t_in * stride_out`` get no gradient from inputs at >= t_in."""
    module.train(train)
    x = x.clone().requires_grad_(True)
    y = module(x)
    t_out = int(t_in * stride_out)
    y[:, :, :t_out].sum().backward()
    return x.grad[:, :, t_in:].abs().max().item(), y


@pytest.mark.parametrize("kernel,stride", [(3, 1), ((4, 3, 3), (2, 1, 1)), (4, 2), ((3, 4, 4), (1, 2, 2))])
def test_causal_conv3d_shapes_and_block_causality(kernel, stride):
    conv = CausalConv3d(3, 5, kernel, stride)
    x = torch.randn(2, 3, 8, 8, 8)
    st = stride if isinstance(stride, int) else stride[0]
    ss = stride if isinstance(stride, int) else stride[1]
    y = conv(x)
    assert y.shape == (2, 5, 8 // st, 8 // ss, 8 // ss)
    for t in range(st, 8, st):  # a split on a block boundary
        leak, _ = _block_causal(conv, x, t, 1 / st)
        assert leak == 0.0


def test_causal_conv3d_rejects_skipping_kernels():
    with pytest.raises(ValueError, match="time kernel .* at least the time stride"):
        CausalConv3d(1, 1, (1, 3, 3), (2, 1, 1))


@pytest.mark.parametrize("up", [CausalConvTranspose3d(4, 3, 4, 2),
                                CausalConvTranspose3d(4, 3, (3, 4, 4), (1, 2, 2)),
                                CausalUpsample3d(4, 3, (2, 2, 2))])
def test_upsampling_is_causal_per_latent_step(up):
    x = torch.randn(2, 4, 5, 3, 3)
    y = up(x)
    st = up.stride[0] if hasattr(up, "stride") else up.factor[0]
    assert y.shape == (2, 3, 5 * st, 6, 6)
    for t in (1, 2, 4):  # frames of latent steps < t depend on latent steps < t only
        leak, _ = _block_causal(up, x, t, st)
        assert leak == 0.0


def test_frame_group_norm_does_not_pool_time():
    norm = FrameGroupNorm(8, groups=4).train()
    x = torch.randn(2, 8, 6, 4, 4)
    y = norm(x)
    x2 = x.clone()
    x2[:, :, 3:] = x2[:, :, 3:] * 50 + 7  # change later frames wildly
    torch.testing.assert_close(norm(x2)[:, :, :3], y[:, :, :3])
    # each frame is normalised on its own: zero mean per (sample, frame, group)
    g = y.reshape(2, 4, 2, 6, 16).transpose(2, 3).reshape(2, 4, 6, 32)
    assert g.mean(-1).abs().max() < 1e-5


@pytest.mark.parametrize("train", [True, False])
def test_axial_attention_is_causal_in_time(train):
    attn = AxialAttention3d(8, 2)
    x = torch.randn(2, 8, 7, 3, 4)
    for t in (1, 3, 6):
        leak, y = _block_causal(attn, x, t, 1, train)
        assert leak == 0.0
        assert y.shape == x.shape


def test_frame_self_attention_mixes_pixels_of_one_frame():
    attn = FrameSelfAttention(8, groups=4)
    x = torch.randn(3, 8, 4, 4, requires_grad=True)
    y = attn(x)
    y[0, :, 0, 0].sum().backward()
    assert x.grad[0].abs().sum() > 0 and x.grad[1:].abs().sum() == 0


# -- the quantizer -----------------------------------------------------------------------------

def _stage_inputs(z, codes, books):
    inputs, r = [], z
    for i, book in enumerate(books):
        inputs.append(r)
        r = r - book[codes[..., i]]
    return inputs


@pytest.mark.parametrize("n_q", [1, 3])
@pytest.mark.parametrize("train", [True, False])
def test_quantizer_stage_losses_use_each_stage_input(n_q, train):
    """Stage i's commitment loss is ``w * mse(r_i, e_i)`` with ``r_i`` the residual that
    stage quantized (not the encoder output) and ``e_i`` its codes' vectors before the EMA
    update of this step."""
    torch.manual_seed(0)
    q = Quantizer(6, 16, num_quantizers=n_q, commitment_weight=0.3)
    z = torch.randn(4, 40, 6)
    q.train()(z)  # k-means initialisation on a training batch
    q.train(train)
    before = copy.deepcopy(q)
    out = q(z)
    books = [b.clone() for b in before.codebooks()]
    codes = out.codes[..., None] if n_q == 1 else out.codes
    assert codes.shape == (4, 40, n_q) and codes.dtype == torch.long
    names = ["commitment"] if n_q == 1 else [f"commitment_q{i}" for i in range(n_q)]
    assert list(out.losses) == names
    for name, r, book, c in zip(names, _stage_inputs(z, codes, books), books, codes.unbind(-1)):
        expect = 0.3 * ((r - book[c]) ** 2).mean()
        torch.testing.assert_close(out.losses[name], expect)
    if n_q > 1:  # later stages quantize smaller residuals
        assert out.losses[names[0]] > out.losses[names[-1]]
    # the quantized output is the sum of the chosen vectors
    torch.testing.assert_close(out.quantized, sum(b[c] for b, c in zip(books, codes.unbind(-1))))


def test_quantizer_gradients_reach_the_input_and_codes_round_trip():
    q = Quantizer(4, 8).train()
    z = torch.randn(2, 30, 4, requires_grad=True)
    out = q(z)
    (out.quantized.pow(2).sum() + out.losses["commitment"]).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    q.eval()
    out = q(z.detach())
    torch.testing.assert_close(q.lookup(out.codes), out.quantized)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        q.lookup(out.codes + 8)


def test_kmeans_init_happens_on_training_batches_only():
    q = Quantizer(4, 8, kmeans_init=True).eval()
    q(torch.randn(2, 20, 4))
    assert not q.initialised  # evaluation never initialises the codebook from its data
    q.train()(torch.randn(2, 20, 4) + 5.0)
    assert q.initialised
    assert (q.codebooks()[0].mean() - 5.0).abs() < 1.0  # codes sit on the training data


def test_dead_codes_below_threshold_are_replaced_and_only_those():
    torch.manual_seed(0)
    q = Quantizer(2, 8, kmeans_init=False, dead_code_threshold=0.5, decay=0.5).train()
    z = torch.randn(1, 64, 2) * 0.01 + 3.0  # all latents in one tight cluster
    q(z)  # unused codes: EMA counts decay from 1 below the threshold, then get re-seeded
    for _ in range(5):
        out = q(z)
    used = torch.unique(out.codes)
    size = q.vq._codebook.cluster_size[0]
    assert out.metrics["active_codes"] == len(used)
    # codes in use are kept: their EMA count is above the threshold
    assert (size[used] >= 0.5).all()
    # every code now sits on the data (dead ones were re-seeded from batch latents)
    assert (q.codebooks()[0] - 3.0).abs().max() < 0.2
    assert out.metrics["live_codes"] <= 8 and "replaced_codes" in out.metrics


def test_quantizer_metrics_perplexity():
    q = Quantizer(2, 4, kmeans_init=False, dead_code_threshold=0.0).eval()
    with torch.no_grad():
        q.vq._codebook.embed.copy_(torch.tensor([[[0., 0.], [10., 0.], [0., 10.], [10., 10.]]]))
    z = torch.tensor([[[0., 0.], [10., 0.], [0., 10.], [10., 10.]]]).repeat(1, 5, 1)
    out = q(z)
    torch.testing.assert_close(out.metrics["perplexity"], torch.tensor(4.0))
    assert out.metrics["active_codes"] == 4
    out = q(torch.zeros(1, 10, 2))
    torch.testing.assert_close(out.metrics["perplexity"], torch.tensor(1.0))


def _former_axial(state, x, n_heads, causal_time=True):
    """The former AxialAttention3d forward (own projections and SDPA), from its state dict."""
    import torch.nn.functional as F
    from einops import rearrange
    h = F.layer_norm(rearrange(x, "b c t h w -> b t h w c"), (x.shape[1],),
                     state["norm.weight"], state["norm.bias"])
    b, t, hh, w, c = h.shape
    pats = [("b t h w c -> (b h w) t c", "(b h w) t c -> b t h w c"),
            ("b t h w c -> (b t w) h c", "(b t w) h c -> b t h w c"),
            ("b t h w c -> (b t h) w c", "(b t h) w c -> b t h w c")]
    y = 0
    for axis, (there, back) in enumerate(pats):
        seq = rearrange(h, there)
        qkv = F.linear(seq, state[f"qkv.{axis}.weight"], state[f"qkv.{axis}.bias"])
        q, k, v = rearrange(qkv, "n l (three k d) -> three n k l d", three=3, k=n_heads)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal_time and axis == 0)
        o = F.linear(rearrange(o, "n k l d -> n l (k d)"), state[f"out.{axis}.weight"],
                     state[f"out.{axis}.bias"])
        y = y + rearrange(o, back, b=b, t=t, h=hh, w=w)
    return x + rearrange(y, "b t h w c -> b c t h w")


def test_axial_attention_loads_former_weights_and_computes_the_former_block():
    torch.manual_seed(0)
    former = {"norm.weight": torch.randn(8), "norm.bias": torch.randn(8)}
    for axis in range(3):
        former |= {f"qkv.{axis}.weight": torch.randn(24, 8) / 3, f"qkv.{axis}.bias": torch.randn(24),
                   f"out.{axis}.weight": torch.randn(8, 8) / 3, f"out.{axis}.bias": torch.randn(8)}
    attn = AxialAttention3d(8, 2).eval()
    attn.load_state_dict(former)  # strict: every former name maps onto a parameter
    x = torch.randn(2, 8, 5, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _former_axial(former, x, 2), atol=1e-5, rtol=1e-5)


def test_frame_attention_loads_former_conv_weights_and_computes_the_former_block():
    import torch.nn.functional as F
    torch.manual_seed(0)
    former = {"norm.weight": torch.randn(8), "norm.bias": torch.randn(8),
              "qkv.weight": torch.randn(24, 8, 1, 1) / 3, "qkv.bias": torch.randn(24),
              "out.weight": torch.randn(8, 8, 1, 1) / 3, "out.bias": torch.randn(8)}
    attn = FrameSelfAttention(8, groups=4).eval()
    attn.load_state_dict(former)
    x = torch.randn(3, 8, 4, 5)
    hn = F.group_norm(x, 4, former["norm.weight"], former["norm.bias"], eps=1e-6)
    q, k, v = F.conv2d(hn, former["qkv.weight"], former["qkv.bias"]).flatten(2).transpose(
        1, 2).unsqueeze(1).chunk(3, dim=-1)
    o = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(3, 8, 4, 5)
    expected = x + F.conv2d(o, former["out.weight"], former["out.bias"])
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)

"""The video VQ tokenizers (every registered Tokenizer over images): block-causal codes in
training and evaluation mode, consistent encode/decode, clear errors, codebook state saved."""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

from ephys_gpt.models.capabilities import Tokenizer
from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
from ephys_gpt.models.registry import build_model, list_models

SPECS = [s for s in list_models() if s.can(Tokenizer) and s.input_kind == "image"]
IDS = [s.name for s in SPECS]


def _make(spec, **over):
    torch.manual_seed(0)
    return build_model(spec.name, {**spec.tiny_config, **over})


def _trained(spec, **over):
    """A tiny model whose codebook has been initialised on a training batch."""
    model = _make(spec, **over).train()
    model(model.example_inputs(batch_size=2, seq_len=16))
    return model


def test_both_tokenizers_are_registered():
    assert {"VideoGPTTokenizer", "Emu3VisionVQ"} <= set(IDS)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_codes_of_early_frames_ignore_later_frames(spec, mode):
    """Codes of latent step j (frames < (j+1)*dt) and the latents before quantization do not
    change, and get no gradient, when frames at or after (j+1)*dt change."""
    model = _trained(spec).train(mode == "train")
    dt = model.time_downsample
    x = model.example_inputs(batch_size=2, seq_len=16)
    T = x.shape[-1]
    for j in range(1, T // dt):
        t = j * dt  # first frame of latent step j
        x2 = x.clone()
        x2[..., t:] = torch.randn_like(x2[..., t:]) * 3
        # a copy per call: training-mode EMA updates must not make the two calls differ
        a = copy.deepcopy(model).quantize(x)
        b = copy.deepcopy(model).quantize(x2)
        assert torch.equal(a.codes[:, :j], b.codes[:, :j]), (
            f"{spec.name} ({mode}): codes of steps < {j} changed with frames >= {t}")
        xg = x.clone().requires_grad_(True)
        m = copy.deepcopy(model)
        z = m.encode_latents(rearrange(xg, "b h w t -> b 1 t h w"))
        z[:, :, :j].sum().backward()
        assert xg.grad[..., t:].abs().max() == 0, (
            f"{spec.name} ({mode}): latents of steps < {j} get gradient from frames >= {t}")
        assert xg.grad[..., :t].abs().max() > 0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_reconstruction_of_a_frame_depends_on_its_own_and_earlier_codes(spec):
    model = _trained(spec).eval()
    dt = model.time_downsample
    x = model.example_inputs(batch_size=1, seq_len=16)
    codes = model.encode(x)
    with torch.no_grad():
        full = model.decode(codes)
        for j in (1, 3):
            other = codes.clone()
            other[:, j:] = (other[:, j:] + 1) % model.codebook_size
            torch.testing.assert_close(model.decode(other)[..., :j * dt], full[..., :j * dt])


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_encode_decode_and_forward_agree(spec):
    model = _trained(spec).eval()
    x = model.example_inputs(batch_size=2, seq_len=8)
    with torch.no_grad():
        codes = model.encode(x)
        out = model(x)
        q = model.quantize(x)
    t, h, w = model.latent_shape(x.shape[3], x.shape[1], x.shape[2])
    assert codes.shape == (2, t, h, w) and codes.dtype == torch.long
    torch.testing.assert_close(model.decode(codes), out.prediction)
    torch.testing.assert_close(model.codes_to_latents(codes), q.latents)
    assert set(out.aux_losses) == {"commitment"}
    assert {"perplexity", "active_codes"} <= set(out.metrics)
    assert 1.0 <= float(out.metrics["perplexity"]) <= model.codebook_size


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_residual_quantizer_codes_have_a_stage_axis(spec):
    model = _trained(spec, num_quantizers=2).eval()
    x = model.example_inputs(batch_size=2, seq_len=8)
    with torch.no_grad():
        codes = model.encode(x)
        out = model.train()(x)
    assert codes.shape[-1] == 2 and codes.ndim == 5
    assert set(out.aux_losses) == {"commitment_q0", "commitment_q1"}
    model.eval()
    assert model.decode(codes).shape == x.shape


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bad_sizes_name_the_setting_to_change(spec):
    model = _make(spec).eval()
    dt, dh, _ = model.downsample
    x = model.example_inputs(batch_size=1, seq_len=8)
    with pytest.raises(ValueError, match="example_seconds"):
        model(x[..., : 2 * dt + 1])
    with pytest.raises(ValueError, match="image_size"):
        model(x[:, : dh + 1])
    with pytest.raises(ValueError, match=r"float sensor images \(B, H, W, T\)"):
        model(x[0])
    with pytest.raises(ValueError, match="codes must be integers"):
        model.decode(x)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_export_keeps_the_initialised_codebook(spec, tmp_path):
    model = _trained(spec).eval()
    save_pretrained(model, tmp_path / "export")
    loaded = from_pretrained(tmp_path / "export")
    assert loaded.quantizer.initialised
    x = model.example_inputs(batch_size=2, seq_len=8)
    loaded.train()(x)  # a training step after loading must not re-initialise from data
    for a, b in zip(model.quantizer.codebooks(), loaded.quantizer.codebooks()):
        assert torch.allclose(a, b, atol=0.5)  # EMA moved it a little, k-means did not rerun
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "export").encode(x),
                                   model.encode(x))


def test_config_errors_are_clear():
    from ephys_gpt.models.emu3_vq import Emu3VisionVQConfig
    from ephys_gpt.models.videogpt_tokenizer import VideoGPTTokenizerConfig

    with pytest.raises(ValueError, match="downsample dh must be a power of two"):
        VideoGPTTokenizerConfig(downsample=(2, 3, 4))
    with pytest.raises(ValueError, match="temporal_downsample must be a power of two"):
        Emu3VisionVQConfig(temporal_downsample=3)
    with pytest.raises(ValueError, match=r"attn_levels \[5\]"):
        Emu3VisionVQConfig(attn_levels=(5,))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_bf16_autocast_forward_is_finite_and_codes_in_range(spec):
    model = _trained(spec).train()
    x = model.example_inputs(batch_size=2, seq_len=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        codes = model.eval().encode(x)
    assert torch.isfinite(out.prediction.float()).all()
    assert all(torch.isfinite(v) for v in out.aux_losses.values())
    assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size

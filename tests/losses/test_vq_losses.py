"""VQVAELoss and VQNSPLoss: computed at the sensors in channel space, with named parts."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.dataset.image_layout import SensorTarget
from ephys_gpt.losses.vq import VQNSPLoss, VQVAELoss, multires_stft_loss, variance_explained
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import build_loss

PIXELS = torch.tensor([0, 5, 10, 15])  # 4 sensors on a 4 x 4 image


def _case(seed=0, t=64):
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(2, 4, t, generator=g)
    img = torch.randn(2, 4, 4, t, generator=g) * 100  # empty pixels: huge garbage
    flat = img.reshape(2, 16, t)
    flat[:, PIXELS] = signal + 0.1 * torch.randn(2, 4, t, generator=g)
    return ModelOutput(img), SensorTarget(signal, PIXELS), flat[:, PIXELS]


def test_vqvae_loss_only_sees_sensor_pixels():
    out, target, at_sensors = _case()
    parts = VQVAELoss()(out, target)
    expect = ((at_sensors - target.signal) ** 2).mean()
    torch.testing.assert_close(parts["loss"], expect)  # the 100x garbage elsewhere is ignored
    torch.testing.assert_close(parts["mse"], expect)
    ve = 1 - ((at_sensors - target.signal) ** 2).sum() / (
        (target.signal - target.signal.mean(-1, keepdim=True)) ** 2).sum()
    torch.testing.assert_close(parts["variance_explained"], ve)
    assert 0.98 < float(ve) < 1.0


def test_vqvae_loss_terms_and_registry():
    out, target, _ = _case()
    loss = build_loss("VQVAELoss", {"stft_weight": 0.5, "l1_weight": 0.2})
    parts = loss(out, target)
    assert set(parts) == {"loss", "mse", "l1", "stft", "variance_explained"}
    torch.testing.assert_close(parts["loss"],
                               parts["mse"] + 0.2 * parts["l1"] + 0.5 * parts["stft"])
    # batched pixels (B, C), as collated by a DataLoader, work the same
    target2 = SensorTarget(target.signal, PIXELS.expand(2, -1))
    torch.testing.assert_close(loss(out, target2)["loss"], parts["loss"])


def test_vqvae_loss_refuses_image_targets():
    out, target, _ = _case()
    with pytest.raises(TypeError, match="channel-space target of ChunkDatasetImage"):
        VQVAELoss()(out, out.prediction)
    with pytest.raises(ValueError, match="stft_fft_sizes .* longer than the window"):
        VQVAELoss(stft_weight=1.0, stft_fft_sizes=(128,))(out, target)
    with pytest.raises(ValueError, match="at least one of"):
        VQVAELoss(mse_weight=0.0)


def test_stft_loss_is_zero_for_a_perfect_reconstruction_and_sees_spectra():
    x = torch.randn(2, 3, 64)
    assert float(multires_stft_loss(x, x, (8, 16))) < 1e-6
    smooth = torch.nn.functional.avg_pool1d(x, 5, 1, 2)
    assert multires_stft_loss(smooth, x, (8, 16)) > 0.1


def test_nsp_loss_with_equal_weights_is_the_mse():
    """Amplitude and phase terms add up to the squared error (Parseval)."""
    out, target, at_sensors = _case(t=64)
    parts = VQNSPLoss(patch_samples=16, amplitude_weight=1.0, phase_weight=1.0)(out, target)
    torch.testing.assert_close(parts["loss"], ((at_sensors - target.signal) ** 2).mean())
    torch.testing.assert_close(parts["amplitude"] + parts["phase"], parts["mse"])


def test_nsp_loss_separates_amplitude_from_phase():
    t = torch.arange(64, dtype=torch.float32)
    sig = torch.sin(2 * torch.pi * t / 16)[None, None].repeat(1, 4, 1)
    shifted = torch.sin(2 * torch.pi * t / 16 + 1.0)[None, None].repeat(1, 4, 1)
    img = torch.zeros(1, 4, 4, 64)

    def parts(pred):
        im = img.clone().reshape(1, 16, 64)
        im[:, PIXELS] = pred
        return VQNSPLoss(patch_samples=16)(ModelOutput(im.reshape(1, 4, 4, 64)),
                                           SensorTarget(sig, PIXELS))

    phase_only = parts(shifted)  # same amplitude spectrum, other phase
    assert float(phase_only["amplitude"]) < 1e-6 and float(phase_only["phase"]) > 0.1
    scaled = parts(0.5 * sig)  # same phase, other amplitude
    assert float(scaled["phase"]) < 1e-6 and float(scaled["amplitude"]) > 0.05
    # phase_weight scales only the phase term
    full = VQNSPLoss(16, phase_weight=1.0)
    half = VQNSPLoss(16, phase_weight=0.5)
    im = img.clone().reshape(1, 16, 64)
    im[:, PIXELS] = shifted
    out = ModelOutput(im.reshape(1, 4, 4, 64))
    torch.testing.assert_close(half(out, SensorTarget(sig, PIXELS))["loss"],
                               0.5 * full(out, SensorTarget(sig, PIXELS))["loss"])


def test_nsp_loss_errors():
    out, target, _ = _case(t=60)
    with pytest.raises(ValueError, match="not a multiple of patch_samples=16"):
        VQNSPLoss(16)(out, target)
    with pytest.raises(ValueError, match="patch_samples must be an integer >= 2"):
        VQNSPLoss(1)


def test_variance_explained_of_the_per_channel_mean_is_zero():
    x = torch.randn(3, 5, 40)
    assert abs(float(variance_explained(x.mean(-1, keepdim=True).expand_as(x), x))) < 1e-6
    assert float(variance_explained(x, x)) == 1.0


def test_tokenizer_trains_with_vqvae_loss_gradients_reach_the_encoder():
    from ephys_gpt.models.registry import build_model, get_model_spec

    spec = get_model_spec("Emu3VisionVQ")
    model = build_model(spec.name, spec.tiny_config).train()
    x = model.example_inputs(batch_size=2, seq_len=8)
    pixels = torch.tensor([0, 9, 18, 27, 36])
    target = SensorTarget(x.reshape(2, 64, 8)[:, pixels], pixels)
    out = model(x)
    loss = VQNSPLoss(patch_samples=4)(out, target)["loss"] + out.total_aux_loss()
    loss.backward()
    assert model.frame_encoder.conv_in.weight.grad.abs().sum() > 0

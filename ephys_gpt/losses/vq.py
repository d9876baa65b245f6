"""Losses of the VQ tokenizers: ``VQVAELoss`` and ``VQNSPLoss``.

Both compare the tokenizer's reconstruction with the window **in channel space**: the
dataset's target is a :class:`~ephys_gpt.dataset.image_layout.SensorTarget` (the channels
``(B, C, T)`` and each channel's pixel), the predicted image ``(B, H, W, T)`` is read at the
sensor pixels (:func:`~ephys_gpt.dataset.image_layout.gather_channels`), and empty or
interpolated pixels never enter the error. The quantizer's commitment losses are the model's
``aux_losses``, which :class:`~ephys_gpt.training.lit_model.LitModel` adds to the objective
and logs by name; these losses return the reconstruction objective plus named parts that are
logged (``mse``, ``variance_explained``, ...). Errors are in the store's units (normalized
signal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ephys_gpt.dataset.image_layout import SensorTarget, gather_channels
from ephys_gpt.losses.basic import prediction_of
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_loss


def channel_pair(output: ModelOutput, targets, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prediction, target)`` as float32 ``(B, C, T)`` at the sensors."""
    img = prediction_of(output, name)
    if isinstance(targets, (tuple, list)) and len(targets) == 2 and not isinstance(
            targets, SensorTarget):
        targets = SensorTarget(*targets)
    if not isinstance(targets, SensorTarget):
        shape = tuple(getattr(targets, "shape", ()))
        raise TypeError(f"{name} compares the reconstruction with the channel-space target of "
                        f"ChunkDatasetImage (a SensorTarget: signal (B, C, T) and each "
                        f"channel's pixel), got {type(targets).__name__} {shape}; use "
                        "datasplitter.dataset_class: ChunkDatasetImage")
    pred = gather_channels(img, targets.pixels).float()
    signal = targets.signal.float()
    if pred.shape != signal.shape:
        raise ValueError(f"{name}: prediction at the sensors has shape {tuple(pred.shape)} but "
                         f"the target has {tuple(signal.shape)}")
    return pred, signal


def variance_explained(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - SSE / SS`` with ``SS`` around each window's per-channel mean (0: no better than
    the per-channel mean; 1: exact), over the whole batch."""
    centred = target - target.mean(dim=-1, keepdim=True)
    return 1.0 - (pred - target).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12)


def multires_stft_loss(pred: torch.Tensor, target: torch.Tensor,
                       fft_sizes: tuple[int, ...]) -> torch.Tensor:
    """Multi-resolution STFT loss (Yamamoto et al., 2020, "Parallel WaveGAN"): for each FFT
    size, spectral convergence ``||(|Y| - |Ŷ|)||_F / ||Y||_F`` plus the mean absolute
    log-magnitude difference, averaged over sizes. ``(B, C, T)`` signals, each channel alone."""
    x, y = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
    total = pred.new_zeros(())
    for n in fft_sizes:
        win = torch.hann_window(n, device=x.device, dtype=x.dtype)
        kw = dict(n_fft=n, hop_length=max(1, n // 4), window=win, return_complex=True,
                  center=True, pad_mode="constant")
        mx = torch.stft(x, **kw).abs()
        my = torch.stft(y, **kw).abs()
        sc = torch.linalg.norm(my - mx) / torch.linalg.norm(my).clamp_min(1e-8)
        mag = (torch.log(mx + 1e-5) - torch.log(my + 1e-5)).abs().mean()
        total = total + sc + mag
    return total / len(fft_sizes)


def _check_sizes(fft_sizes, name: str) -> tuple[int, ...]:
    sizes = tuple(int(n) for n in fft_sizes)
    if not sizes or any(n < 4 for n in sizes):
        raise ValueError(f"{name}: stft_fft_sizes must be integers >= 4, got {fft_sizes!r}")
    return sizes


@register_loss("VQVAELoss")
class VQVAELoss(nn.Module):
    """VQ-VAE reconstruction objective at the sensors (the quantizer's losses come from the
    model's ``aux_losses``).

    ``loss = mse_weight * MSE + l1_weight * L1 + stft_weight * multi-resolution STFT``, all on
    the channels ``(B, C, T)``. Logged parts: ``mse``, ``variance_explained`` (and ``l1``,
    ``stft`` when weighted).

    Parameters
    ----------
    mse_weight, l1_weight : float
        Weights of the squared and absolute errors.
    stft_weight : float
        Weight of the multi-resolution STFT term (0: off). Spectral detail without any
        downloaded perceptual network.
    stft_fft_sizes : list of int
        FFT sizes of that term (each at most the window length).
    """

    def __init__(self, mse_weight: float = 1.0, l1_weight: float = 0.0, stft_weight: float = 0.0,
                 stft_fft_sizes: tuple[int, ...] | list[int] = (8, 16, 32)):
        super().__init__()
        for key, v in (("mse_weight", mse_weight), ("l1_weight", l1_weight),
                       ("stft_weight", stft_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"VQVAELoss: {key} must be a number >= 0, got {v!r}")
        if mse_weight + l1_weight + stft_weight <= 0:
            raise ValueError("VQVAELoss: at least one of mse_weight, l1_weight, stft_weight "
                             "must be positive")
        self.mse_weight, self.l1_weight = float(mse_weight), float(l1_weight)
        self.stft_weight = float(stft_weight)
        self.fft_sizes = _check_sizes(stft_fft_sizes, "VQVAELoss")

    def forward(self, output: ModelOutput, targets) -> dict[str, torch.Tensor]:
        pred, signal = channel_pair(output, targets, "VQVAELoss")
        mse = F.mse_loss(pred, signal)
        loss = self.mse_weight * mse
        parts = {"mse": mse.detach(),
                 "variance_explained": variance_explained(pred.detach(), signal)}
        if self.l1_weight:
            l1 = F.l1_loss(pred, signal)
            loss = loss + self.l1_weight * l1
            parts["l1"] = l1.detach()
        if self.stft_weight:
            too_long = [n for n in self.fft_sizes if n > signal.shape[-1]]
            if too_long:
                raise ValueError(f"VQVAELoss: stft_fft_sizes {too_long} are longer than the "
                                 f"window ({signal.shape[-1]} samples)")
            stft = multires_stft_loss(pred, signal, self.fft_sizes)
            loss = loss + self.stft_weight * stft
            parts["stft"] = stft.detach()
        return {"loss": loss, **parts}


def patch_spectra(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, T)`` → complex ``(B, C, T / patch, patch // 2 + 1)``: the orthonormal real
    FFT of each non-overlapping patch of each channel."""
    b, c, t = x.shape
    return torch.fft.rfft(x.reshape(b, c, t // patch, patch), dim=-1, norm="ortho")


@register_loss("VQNSPLoss")
class VQNSPLoss(nn.Module):
    """LaBraM's neural-spectrum objective (Jiang et al., 2024, "Large brain model for learning
    generic representations with tremendous EEG data in BCI", the VQ-NSP tokenizer): the
    tokenizer is trained to get the Fourier **amplitude** and **phase** of every patch right.

    Each channel of the window is cut into patches of ``patch_samples``; ``X`` (target) and
    ``X̂`` (the decoder's output read at the sensors) are their orthonormal real FFTs, with
    amplitudes ``A = |X|`` and phases ``φ``. Per frequency bin ``k`` (weight ``w_k = 2``, or 1
    for DC and Nyquist, so the bins add up to the patch's energy):

    - amplitude term: ``w_k (Â - A)²``;
    - phase term: ``w_k · 2ÂA(1 - cos(φ̂ - φ))`` (wrap-around free, and weighted by the
      amplitudes: the phase of a bin with no power carries no signal).

    The two terms add up to the squared error of the patch, so with both weights 1 the loss
    equals the time-domain MSE; ``phase_weight < 1`` asks less of the phase than of the
    spectrum's magnitude (LaBraM's motivation: amplitude spectra of neural signals are more
    reproducible than phases). Since a patch and its spectrum determine each other, the
    decoder's output *is* its amplitude-and-phase prediction (read by the FFT). Logged parts:
    ``amplitude``, ``phase``, ``mse``, ``variance_explained``.

    Parameters
    ----------
    patch_samples : int
        Patch length (the window length must be a multiple of it).
    amplitude_weight, phase_weight : float
        Weights of the two terms.
    """

    def __init__(self, patch_samples: int = 32, amplitude_weight: float = 1.0,
                 phase_weight: float = 0.5):
        super().__init__()
        if isinstance(patch_samples, bool) or not isinstance(patch_samples, int) \
                or patch_samples < 2:
            raise ValueError(f"VQNSPLoss: patch_samples must be an integer >= 2, got "
                             f"{patch_samples!r}")
        for key, v in (("amplitude_weight", amplitude_weight), ("phase_weight", phase_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"VQNSPLoss: {key} must be a number >= 0, got {v!r}")
        self.patch = patch_samples
        self.amplitude_weight, self.phase_weight = float(amplitude_weight), float(phase_weight)

    def forward(self, output: ModelOutput, targets) -> dict[str, torch.Tensor]:
        pred, signal = channel_pair(output, targets, "VQNSPLoss")
        t = signal.shape[-1]
        if t % self.patch:
            raise ValueError(f"VQNSPLoss: windows of {t} samples are not a multiple of "
                             f"patch_samples={self.patch}; change loss.patch_samples or "
                             "datasplitter.example_seconds")
        xh, x = patch_spectra(pred, self.patch), patch_spectra(signal, self.patch)
        w = torch.full((x.shape[-1],), 2.0, device=x.device)
        w[0] = 1.0
        if self.patch % 2 == 0:
            w[-1] = 1.0
        n = signal.numel()  # per time sample, like the MSE
        a_hat, a = xh.abs(), x.abs()
        amplitude = (w * (a_hat - a).pow(2)).sum() / n
        cross = (xh * x.conj()).real  # Â·A·cos(φ̂ - φ)
        phase = (w * 2.0 * (a_hat * a - cross)).sum() / n
        loss = self.amplitude_weight * amplitude + self.phase_weight * phase
        return {"loss": loss, "amplitude": amplitude.detach(), "phase": phase.detach(),
                "mse": F.mse_loss(pred.detach(), signal),
                "variance_explained": variance_explained(pred.detach(), signal)}


@register_loss("CodeCrossEntropy")
class CodeCrossEntropy(nn.Module):
    """Cross-entropy of a prior over a tokenizer's codes (``VQGPT2MEG``), with the
    reconstruction of a co-trained tokenizer.

    Called as ``loss(output, targets)``: ``output.prediction`` holds the logits ``(..., K)``
    and ``output.target`` the codes ``(...)`` the model made itself (the dataset's targets
    are not codes). When the model co-trains its tokenizer, ``output.extras
    ["reconstruction"]`` (images ``(B, H, W, T)``) is compared with the window at the sensors
    (``targets``: the :class:`~ephys_gpt.dataset.image_layout.SensorTarget` of
    ``ChunkDatasetImage``) by :class:`VQVAELoss` and added with ``reconstruction_weight``
    (the quantizer's commitment losses are the model's ``aux_losses``).

    ``loss = CE + reconstruction_weight * (MSE + stft_weight * STFT)``, in nats per code and
    normalized signal units. Logged parts: ``ce``, ``accuracy`` (argmax next-code accuracy),
    and with a reconstruction ``mse``, ``variance_explained`` (and ``stft``).

    Parameters
    ----------
    label_smoothing : float
        As in ``F.cross_entropy``.
    reconstruction_weight : float
        Weight of the co-trained tokenizer's reconstruction objective.
    stft_weight, stft_fft_sizes
        The multi-resolution STFT term of that objective (:class:`VQVAELoss`).
    """

    def __init__(self, label_smoothing: float = 0.0, reconstruction_weight: float = 1.0,
                 stft_weight: float = 0.0,
                 stft_fft_sizes: tuple[int, ...] | list[int] = (8, 16, 32)):
        super().__init__()
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"CodeCrossEntropy: label_smoothing must be in [0, 1), got "
                             f"{label_smoothing!r}")
        if isinstance(reconstruction_weight, bool) or not isinstance(
                reconstruction_weight, (int, float)) or reconstruction_weight < 0:
            raise ValueError(f"CodeCrossEntropy: reconstruction_weight must be a number >= 0, "
                             f"got {reconstruction_weight!r}")
        self.label_smoothing = float(label_smoothing)
        self.reconstruction_weight = float(reconstruction_weight)
        self.reconstruction = VQVAELoss(1.0, 0.0, stft_weight, stft_fft_sizes)

    def forward(self, output: ModelOutput, targets=None) -> dict[str, torch.Tensor]:
        logits = prediction_of(output, "CodeCrossEntropy")
        codes = output.target
        if codes is None or codes.is_floating_point() or codes.shape != logits.shape[:-1]:
            got = "none" if codes is None else f"{codes.dtype} {tuple(codes.shape)}"
            raise ValueError(f"CodeCrossEntropy needs the model's own integer target codes "
                             f"with the logits' shape without the code axis "
                             f"{tuple(logits.shape[:-1])} (a prior over codes such as "
                             f"VQGPT2MEG), got {got}")
        flat = logits.reshape(-1, logits.shape[-1]).float()
        ce = F.cross_entropy(flat, codes.reshape(-1), label_smoothing=self.label_smoothing)
        acc = (flat.detach().argmax(-1) == codes.reshape(-1)).float().mean()
        out = {"ce": ce.detach(), "accuracy": acc}
        loss = ce
        rec = output.extras.get("reconstruction")
        if rec is not None and self.reconstruction_weight > 0:
            parts = self.reconstruction(ModelOutput(rec), targets)
            loss = loss + self.reconstruction_weight * parts.pop("loss")
            out.update(parts)
        return {"loss": loss, **out}

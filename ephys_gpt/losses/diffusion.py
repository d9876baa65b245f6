"""Losses of the diffusion models (NTD)."""

from __future__ import annotations

import torch
from torch import nn

from ephys_gpt.models.registry import register_loss


@register_loss("DiffusionMSE")
class DiffusionMSE(nn.Module):
    """Masked noise-prediction MSE: mean of ``(pred_noise - noise)^2`` where ``mask`` is 1.

    Called as ``loss(outputs, targets)`` with ``outputs = (noise, pred_noise, mask)`` as
    returned by :meth:`ephys_gpt.models.ntd.NTD.forward` (each (B, C, L); ``mask`` may also be
    (B, 1, L) or any shape broadcastable to the noise). ``targets`` are ignored: the
    target of noise prediction is the noise the model drew. Observed (in-painted) samples
    carry no loss; an all-observed batch gives 0.
    """

    def forward(self, outputs, targets=None) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            raise TypeError("DiffusionMSE expects model outputs (noise, pred_noise, mask), got "
                            f"{type(outputs).__name__}"
                            f"{'' if not isinstance(outputs, (tuple, list)) else len(outputs)}")
        noise, pred, mask = outputs
        if pred.shape != noise.shape:
            raise ValueError(f"DiffusionMSE: pred_noise {tuple(pred.shape)} and noise "
                             f"{tuple(noise.shape)} differ in shape")
        err = (pred.float() - noise.float()).pow(2)
        mask = mask.to(err.dtype).expand_as(err)
        return (err * mask).sum() / mask.sum().clamp(min=1.0)

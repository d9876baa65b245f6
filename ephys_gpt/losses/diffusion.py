"""Losses of the diffusion models (NTD)."""

from __future__ import annotations

import torch
from torch import nn

from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_loss


@register_loss("DiffusionMSE")
class DiffusionMSE(nn.Module):
    """Weighted diffusion MSE: the mean of ``weight * (prediction - target)^2`` over the
    elements with ``weight > 0``.

    Called as ``loss(output, targets)`` with the :class:`ModelOutput` of
    :meth:`ephys_gpt.models.ntd.NTD.forward`: its ``prediction``, ``target`` and ``weight``
    (each (B, C, L); ``weight`` may also be (B, 1, L) or any shape broadcastable to the
    target). ``targets`` are ignored: the target of denoising is the clean signal or the noise
    the model drew. ``weight`` is 0 on
    observed (in-painted) samples, which carry no loss (an all-observed batch gives 0), and
    the noise level's min-SNR-gamma weight elsewhere; with weights of 1 this is the masked
    noise-prediction MSE of DDPM.
    """

    def forward(self, output: ModelOutput, targets=None) -> torch.Tensor:
        if not isinstance(output, ModelOutput) or output.target is None \
                or output.weight is None:
            raise TypeError("DiffusionMSE expects a ModelOutput with prediction, target and "
                            f"weight (a diffusion model's forward), got {type(output).__name__}"
                            + (" without target/weight" if isinstance(output, ModelOutput)
                               else ""))
        target, pred, weight = output.target, output.prediction, output.weight
        if pred.shape != target.shape:
            raise ValueError(f"DiffusionMSE: prediction {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        err = (pred.float() - target.float()).pow(2)
        weight = weight.to(err.dtype).expand_as(err)
        return (err * weight).sum() / (weight > 0).sum().clamp(min=1).to(err.dtype)

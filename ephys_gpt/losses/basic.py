"""Basic losses: cross-entropy over logits and mean squared error.

Both are registered by name (``loss_name`` in run configs) and called as
``loss(output, targets)`` by :class:`ephys_gpt.training.lit_model.LitModel`, with ``output`` the
model's :class:`~ephys_gpt.models.output.ModelOutput`; they compare its ``prediction`` with the
dataset's targets (the model's auxiliary losses are added by LitModel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_loss


def prediction_of(output, name: str) -> torch.Tensor:
    """``output.prediction`` of a :class:`ModelOutput` (a clear error for anything else)."""
    if not isinstance(output, ModelOutput):
        raise TypeError(f"{name} expects the model's forward to return a ModelOutput "
                        f"(ephys_gpt.models.output), got {type(output).__name__}")
    return output.prediction


@register_loss("CrossEntropy")
class CrossEntropy(nn.Module):
    """Cross-entropy between logits and integer or soft (mixup) targets.

    Parameters
    ----------
    label_smoothing : float
        Mass spread uniformly over all classes (0 = none), as in ``F.cross_entropy``.
    ignore_index : int
        Integer targets with this value do not count (default -100, like PyTorch).

    Shapes: logits ``(..., V)`` (e.g. ``(B, C, T, V)`` for tokens, ``(B, V)`` for classes);
    targets either int64 ``(...)`` or float ``(..., V)`` probabilities. The loss is computed in
    float32 even under bf16 autocast, averaged over every position.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100):
        super().__init__()
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"CrossEntropy: label_smoothing must be in [0, 1), "
                             f"got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)

    def forward(self, output: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        logits = prediction_of(output, "CrossEntropy")
        if targets.is_floating_point():
            if targets.shape != logits.shape:
                raise ValueError(f"CrossEntropy: soft targets must have the logits' shape "
                                 f"{tuple(logits.shape)}, got {tuple(targets.shape)}")
            flat_t = rearrange(targets.float(), "... v -> (...) v")
        else:
            if targets.shape != logits.shape[:-1]:
                raise ValueError(f"CrossEntropy: integer targets must have shape "
                                 f"{tuple(logits.shape[:-1])} (logits without the class axis), "
                                 f"got {tuple(targets.shape)}")
            flat_t = rearrange(targets, "... -> (...)")
        flat = rearrange(logits.float(), "... v -> (...) v")
        return F.cross_entropy(flat, flat_t, label_smoothing=self.label_smoothing,
                               ignore_index=self.ignore_index)


@register_loss("MSE")
class MSE(nn.Module):
    """Mean squared error between a real-valued prediction and target of the same shape.

    Shapes: prediction and target ``(B, C, T)`` (any matching shape). A prediction longer in
    time than the target (``(..., T')`` with ``T' > T``) is an error, not silently cropped.
    """

    def forward(self, output: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        pred = prediction_of(output, "MSE")
        if pred.shape != targets.shape:
            raise ValueError(f"MSE: prediction shape {tuple(pred.shape)} does not match target "
                             f"shape {tuple(targets.shape)}")
        return F.mse_loss(pred.float(), targets.float())

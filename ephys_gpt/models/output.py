"""The one output type every model's ``forward`` returns.

``ModelOutput`` carries

- ``prediction``: the main prediction (logits ``(B, C, T, V)``, a forecast ``(B, C, T)``, a
  reconstruction ``(B, H, W, T)``, class logits ``(B, K)``...), what a loss compares with the
  dataset's targets and what eval runners read;
- ``aux_losses``: named scalar losses the model adds itself (a VQ commitment loss, a
  codebook loss, a flow's negative log-determinant...); training adds each to the loss and
  logs it as ``<stage>/<name>``;
- ``metrics``: named scalars to log only (codebook perplexity, active codes...);
- ``target`` / ``weight``: a target the model makes itself and a per-element loss weight,
  for objectives whose target is not the dataset's (a diffusion model's clean signal or
  noise with its min-SNR weight; the codes of a frozen tokenizer for a prior over them);
- ``extras``: named secondary predictions a loss may read beside the main one (a co-trained
  tokenizer's reconstruction, compared with the window at the sensors).

Losses take ``(output, targets)``; :class:`~ephys_gpt.training.lit_model.LitModel` has no
per-model branches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What ``forward`` returns (see the module docstring)."""

    prediction: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    target: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (prediction first), for generic checks."""
        out = [self.prediction, *self.aux_losses.values(), *self.metrics.values()]
        out += [t for t in (self.target, self.weight) if t is not None]
        return out + list(self.extras.values())

    def total_aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (None when there are none)."""
        if not self.aux_losses:
            return None
        return sum(v.float() for v in self.aux_losses.values())

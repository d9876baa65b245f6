"""Embeddings for multichannel token sequences.

Legend: B batch, C channels, T time, V vocabulary (quantization levels), D width.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelwiseTokenEmbedding(nn.Module):
    """A separate token embedding table for each channel.

    Token ``v`` on channel ``c`` maps to row ``c·V + v`` of one ``(C·V, D)`` table, so the
    same mu-law level can mean different things on different sensors (WaveNet-style
    full-channel models, quantized CNN baselines).

    ``forward(tokens (B, C, T) int64) -> (B, C, T, D)``
    """

    def __init__(self, num_channels: int, vocab_size: int, dim: int):
        super().__init__()
        self.num_channels, self.vocab_size = num_channels, vocab_size
        self.table = nn.Embedding(num_channels * vocab_size, dim)
        self.register_buffer("offsets", torch.arange(num_channels) * vocab_size,
                             persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() < 2 or tokens.shape[-2] != self.num_channels:
            raise ValueError(f"ChannelwiseTokenEmbedding expects tokens (..., C={self.num_channels}, "
                             f"T), got shape {tuple(tokens.shape)}")
        return self.table(tokens + self.offsets[:, None])


class OptionalEmbedding(nn.Module):
    """An ``nn.Embedding`` for an optional per-example label (subject, condition...).

    With ``num_embeddings == 0`` the module has no parameters and contributes nothing;
    otherwise ``forward(ids (B,) int64) -> (B, D)`` and a missing ``ids`` is an error
    naming ``what``.
    """

    def __init__(self, num_embeddings: int, dim: int, what: str):
        super().__init__()
        self.what = what
        self.num_embeddings = num_embeddings
        self.table = nn.Embedding(num_embeddings, dim) if num_embeddings > 0 else None

    @property
    def enabled(self) -> bool:
        return self.table is not None

    def forward(self, ids: torch.Tensor | None, batch_size: int) -> torch.Tensor | None:
        """Embeddings ``(B, D)``, or None when disabled."""
        if self.table is None:
            if ids is not None:
                raise ValueError(f"{self.what} ids were given but the model was built without "
                                 f"{self.what} embeddings (set n_{self.what}s > 0)")
            return None
        if ids is None:
            raise ValueError(f"the model was built with n_{self.what}s={self.num_embeddings}: "
                             f"pass {self.what} ids (B,) int64 to forward/generate")
        ids = torch.as_tensor(ids, device=self.table.weight.device)
        if ids.dim() == 0:
            ids = ids.expand(batch_size)
        if ids.shape != (batch_size,) or ids.dtype != torch.long:
            raise ValueError(f"{self.what} ids must be int64 of shape ({batch_size},), got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        return self.table(ids)

"""Vector quantization for tokenizers: a thin layer over ``vector-quantize-pytorch``.

:class:`Quantizer` turns latent vectors ``(B, N, D)`` into integer codes and their codebook
vectors, with the library's EMA codebook (van den Oord et al., 2017; Razavi et al., 2019),
k-means initialisation from the first *training* batch, and dead-code replacement of only the
codes whose EMA usage fell below ``dead_code_threshold``. With ``num_quantizers > 1`` it is a
residual quantizer (``ResidualVQ``, Zeghidour et al., 2021): stage ``i`` quantizes what the
stages before it left over.

It returns everything a tokenizer reports, named (:class:`QuantizerOutput`):

- ``losses``: the commitment loss ``weight * mean((r_i - sg(e_i))^2)`` of each stage,
  where ``r_i`` is *that stage's input* (``z`` for the first, ``z - e_0 - ... - e_{i-1}`` for
  later ones) and ``e_i`` its chosen codebook vectors as they were when they were chosen (the
  EMA update moves them afterwards). Named ``commitment`` (one stage) or
  ``commitment_q{i}``. Computed in evaluation too, so validation losses are comparable.
- ``metrics``: ``perplexity`` (``exp`` of the entropy of the batch's code histogram; K for a
  uniform use of K codes), ``active_codes`` (distinct codes in the batch), ``live_codes``
  (codes whose EMA usage is at or above the threshold) and, in training, ``replaced_codes``
  (codes re-seeded from the batch this step); suffixed ``_q{i}`` per stage when there are
  several.

The codebooks are buffers (EMA, not gradient), saved with the model, and the "initialised"
flag is a buffer too, so a reloaded model never re-initialises from data.

Legend: B batch, N latent vectors per example, D latent width, K codebook size, Q stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerOutput:
    """What :meth:`Quantizer.forward` returns."""

    quantized: torch.Tensor          # (B, N, D), straight-through to z in training
    codes: torch.Tensor              # int64 (B, N), or (B, N, Q) for Q > 1 stages
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Quantizer(nn.Module):
    """EMA vector quantizer (``num_quantizers`` residual stages) over ``(B, N, D)`` latents.

    Parameters
    ----------
    dim : int
        D, the latent width (the codebook vectors' width).
    codebook_size : int
        K, codes per stage.
    num_quantizers : int
        Q; 1 is plain VQ, more is residual VQ.
    commitment_weight : float
        Weight of the commitment loss (0.25 in VQ-VAE).
    decay : float
        EMA decay of the codebook statistics, in (0, 1).
    kmeans_init : bool
        Initialise each codebook by k-means on the first training batch (else uniform random
        vectors, which dead-code replacement then moves onto the data).
    kmeans_iters : int
        k-means iterations of that initialisation.
    dead_code_threshold : float
        A code whose EMA usage (expected uses per batch) falls below this is re-seeded from a
        random latent of the current batch; 0 disables replacement. Codes in use are never
        touched.
    rotation_trick : bool
        Pass gradients through the quantizer with the rotation trick (Fifty et al., 2024)
        instead of the plain straight-through estimator.
    """

    def __init__(self, dim: int, codebook_size: int, *, num_quantizers: int = 1,
                 commitment_weight: float = 0.25, decay: float = 0.99, kmeans_init: bool = True,
                 kmeans_iters: int = 10, dead_code_threshold: float = 0.5,
                 rotation_trick: bool = True):
        super().__init__()
        from vector_quantize_pytorch import ResidualVQ, VectorQuantize

        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold!r}")
        if num_quantizers < 1 or codebook_size < 2:
            raise ValueError(f"need num_quantizers >= 1 and codebook_size >= 2, got "
                             f"{num_quantizers} and {codebook_size}")
        self.dim, self.codebook_size, self.num_quantizers = dim, codebook_size, num_quantizers
        self.commitment_weight = float(commitment_weight)
        self.dead_code_threshold = float(dead_code_threshold)
        kw = dict(dim=dim, codebook_size=codebook_size, decay=decay, kmeans_init=kmeans_init,
                  kmeans_iters=kmeans_iters, threshold_ema_dead_code=dead_code_threshold,
                  commitment_weight=0.0, rotation_trick=rotation_trick,
                  straight_through=False)
        self.vq = (VectorQuantize(**kw) if num_quantizers == 1
                   else ResidualVQ(num_quantizers=num_quantizers, **kw))

    # -- codebooks --------------------------------------------------------------------------
    def _stages(self) -> list[nn.Module]:
        return [self.vq] if self.num_quantizers == 1 else list(self.vq.layers)

    def codebooks(self) -> list[torch.Tensor]:
        """The Q codebooks, each ``(K, D)`` (live buffers; clone before the next forward)."""
        return [s._codebook.embed[0] for s in self._stages()]

    @property
    def initialised(self) -> bool:
        return all(bool(s._codebook.initted) for s in self._stages())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, N)`` or ``(B, N, Q)`` → the sum of their codebook vectors ``(B, N, D)``."""
        codes = codes[..., None] if codes.ndim == 2 else codes
        if codes.shape[-1] != self.num_quantizers:
            raise ValueError(f"codes have {codes.shape[-1]} stage(s), the quantizer has "
                             f"{self.num_quantizers}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), found "
                             f"{int(codes.min())}..{int(codes.max())}")
        return sum(F.embedding(codes[..., i], cb) for i, cb in enumerate(self.codebooks()))

    # -- forward ----------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """``z (B, N, D)`` → :class:`QuantizerOutput` (see the module docstring)."""
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"Quantizer expects latents (B, N, {self.dim}), got "
                             f"{tuple(z.shape)}")
        was_initialised = self.initialised
        before = [cb.detach().clone() for cb in self.codebooks()] if was_initialised else None
        with torch.autocast(z.device.type, enabled=False):
            quantized, codes = self._run(z.float())
        if before is None:  # first batch: the codebooks were just initialised from it
            before = [cb.detach().clone() for cb in self.codebooks()]
        stage_codes = codes[..., None] if codes.ndim == 2 else codes
        return QuantizerOutput(quantized.to(z.dtype), codes.long(),
                               self._losses(z.float(), stage_codes, before),
                               self._metrics(stage_codes))

    def _run(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cb = [s._codebook for s in self._stages()]
        if self.training or all(bool(c.initted) for c in cb):
            quantized, codes, _ = self.vq(z)
            return quantized, codes
        # Evaluation before any training: keep the k-means initialisation for training data
        # (codes come from the untrained codebook).
        flags = [bool(c.initted) for c in cb]
        try:
            for c in cb:
                c.initted.fill_(True)
            quantized, codes, _ = self.vq(z)
        finally:
            for c, f in zip(cb, flags):
                c.initted.fill_(f)
        return quantized, codes

    def _losses(self, z: torch.Tensor, codes: torch.Tensor, books: list[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        out, residual = {}, z
        for i, book in enumerate(books):
            chosen = F.embedding(codes[..., i], book)  # (B, N, D), no gradient
            name = "commitment" if self.num_quantizers == 1 else f"commitment_q{i}"
            out[name] = self.commitment_weight * F.mse_loss(residual, chosen)
            residual = residual - chosen
        return out

    @torch.no_grad()
    def _metrics(self, codes: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, stage in enumerate(self._stages()):
            sfx = "" if self.num_quantizers == 1 else f"_q{i}"
            counts = torch.bincount(codes[..., i].reshape(-1), minlength=self.codebook_size)
            p = counts.float() / counts.sum().clamp_min(1)
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
            out[f"perplexity{sfx}"] = entropy.exp()
            out[f"active_codes{sfx}"] = (counts > 0).sum().float()
            size = stage._codebook.cluster_size[0]
            if self.dead_code_threshold > 0:
                out[f"live_codes{sfx}"] = (size >= self.dead_code_threshold).sum().float()
                if self.training:
                    reset = torch.tensor(stage._codebook.reset_cluster_size, dtype=size.dtype)
                    out[f"replaced_codes{sfx}"] = (size == reset).sum().float()
        return out

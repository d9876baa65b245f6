"""What the video VQ tokenizers share: the quantizer, the code grid, encode/decode.

A tokenizer maps a window of sensor images ``x (B, H, W, T)`` (``ChunkDatasetImage``) to a
grid of integer codes ``(B, T', H', W')`` with ``T' = T / dt``, ``H' = H / dh``,
``W' = W / dw`` (``(B, T', H', W', Q)`` with ``Q`` residual stages), and back. Subclasses
define ``encode_latents`` (images → continuous latents ``(B, D, T', H', W')``) and
``decode_latents`` (latents → images); this base adds the quantizer
(:class:`ephys_gpt.layers.vq.Quantizer`) and the public interface:

- ``quantize(x) -> QuantizedLatents``: codes, quantized latents (straight-through), the
  quantizer's named losses and metrics. A model trained on the codes (a prior, or a
  co-trained GPT) calls this and ``decode_latents``; it never needs the encoder's insides.
- ``encode(x) -> codes`` and ``decode(codes) -> images`` (the ``Tokenizer`` capability).
- ``forward(x) -> ModelOutput(reconstruction, aux_losses, metrics)``.
- ``latent_shape(T, H, W)``, ``time_downsample``, ``spatial_downsample``, ``codebook_size``.

Codes are block-causal in time: the codes of latent step ``j`` depend only on frames
``< (j + 1) * dt``, in training and evaluation (causal convolutions and attention, per-frame
normalization); the reconstruction of a frame depends only on the codes of its own and
earlier steps. Legend: B batch, H x W image, T frames (samples), D latent width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn

from ephys_gpt.layers.vq import Quantizer
from ephys_gpt.models.output import ModelOutput


@dataclass
class QuantizedLatents:
    """What :meth:`VQVideoTokenizer.quantize` returns."""

    codes: torch.Tensor     # int64 (B, T', H', W') or (B, T', H', W', Q)
    latents: torch.Tensor   # (B, D, T', H', W') quantized (straight-through in training)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def check_power_of_two(value: int, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 \
            or value & (value - 1):
        raise ValueError(f"{owner}: {name} must be a power of two (1, 2, 4, ...), got {value!r}")
    return int(math.log2(value))


def check_positive(cfg, keys) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(cfg).__name__}: {key} must be a positive integer, got {v!r}")


class VQVideoTokenizer(nn.Module):
    """Base of the video VQ tokenizers (see the module docstring)."""

    #: (dt, dh, dw), set by subclasses
    downsample: tuple[int, int, int] = (1, 1, 1)
    image_size: tuple[int, int] = (16, 16)

    def _init_quantizer(self, cfg) -> None:
        self.quantizer = Quantizer(
            cfg.embed_dim, cfg.codebook_size, num_quantizers=cfg.num_quantizers,
            commitment_weight=cfg.commitment_weight, decay=cfg.ema_decay,
            kmeans_init=cfg.kmeans_init, dead_code_threshold=cfg.dead_code_threshold)

    # -- the Tokenizer capability --------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def num_quantizers(self) -> int:
        return self.quantizer.num_quantizers

    @property
    def time_downsample(self) -> int:
        return self.downsample[0]

    @property
    def spatial_downsample(self) -> tuple[int, int]:
        return self.downsample[1], self.downsample[2]

    def latent_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """The code grid ``(T', H', W')`` of a ``T``-frame ``H x W`` window."""
        self._check_size(t, h, w)
        return t // self.downsample[0], h // self.downsample[1], w // self.downsample[2]

    def _check_size(self, t: int, h: int, w: int) -> None:
        dt, dh, dw = self.downsample
        name = type(self).__name__
        if t % dt:
            raise ValueError(f"{name}: windows of {t} samples are not a multiple of the time "
                             f"downsampling {dt}; choose datasplitter.example_seconds so that "
                             f"example_seconds * sfreq is a multiple of {dt}")
        if h % dh or w % dw:
            raise ValueError(f"{name}: images of {h}x{w} pixels are not a multiple of the "
                             f"spatial downsampling {dh}x{dw}; set "
                             "datasplitter.dataset_kwargs.image_size to a multiple of it")

    def _check_images(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects float sensor images (B, H, W, T), "
                             f"got {x.dtype} {tuple(x.shape)}")
        self._check_size(x.shape[3], x.shape[1], x.shape[2])

    def quantize(self, x: torch.Tensor) -> QuantizedLatents:
        """Images ``(B, H, W, T)`` → :class:`QuantizedLatents`."""
        self._check_images(x)
        z = self.encode_latents(rearrange(x, "b h w t -> b 1 t h w"))  # (B, D, T', H', W')
        b, d, t, h, w = z.shape
        q = self.quantizer(rearrange(z, "b d t h w -> b (t h w) d"))
        codes = q.codes.reshape(b, t, h, w, *q.codes.shape[2:])
        latents = rearrange(q.quantized, "b (t h w) d -> b d t h w", t=t, h=h, w=w)
        return QuantizedLatents(codes, latents, q.losses, q.metrics)

    def codes_to_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, T', H', W'[, Q])`` → quantized latents ``(B, D, T', H', W')``."""
        if codes.ndim not in (4, 5) or codes.is_floating_point():
            raise ValueError(f"codes must be integers (B, T', H', W'[, Q]), got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        b, t, h, w = codes.shape[:4]
        flat = codes.reshape(b, t * h * w, *codes.shape[4:])
        z = self.quantizer.lookup(flat.long())  # (B, N, D)
        return rearrange(z, "b (t h w) d -> b d t h w", t=t, h=h, w=w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, H, W, T)`` → int64 codes ``(B, T', H', W')`` (``(..., Q)`` for Q > 1)."""
        return self.quantize(x).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, T', H', W'[, Q])`` → images ``(B, H, W, T)``."""
        return self.decode_images(self.codes_to_latents(codes))

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Quantized latents ``(B, D, T', H', W')`` → images ``(B, H, W, T)``."""
        y = self.decode_latents(latents)  # (B, 1, T, H, W)
        return rearrange(y, "b 1 t h w -> b h w t")

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Images ``(B, H, W, T)`` → ``ModelOutput(reconstruction (B, H, W, T))`` with the
        quantizer's commitment loss(es) as ``aux_losses`` and codebook usage as ``metrics``."""
        q = self.quantize(x)
        return ModelOutput(self.decode_images(q.latents), aux_losses=q.losses,
                           metrics=q.metrics)

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random images ``(B, H, W, T)`` of ``image_size`` (T = ``seq_len`` rounded up to a
        multiple of the time downsampling; default 4 latent steps)."""
        dt = self.downsample[0]
        t = 4 * dt if seq_len is None else dt * max(1, -(-int(seq_len) // dt))
        return torch.randn(batch_size, *self.image_size, t)

    # subclasses
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

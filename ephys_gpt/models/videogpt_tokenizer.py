"""VideoGPTTokenizer: a VQ-VAE over sensor-image windows with 3-D convolutions and axial
attention (Yan et al., 2021, "VideoGPT: video generation using VQ-VAE and transformers").

Images ``(B, H, W, T)`` are read as one-channel videos ``(B, 1, T, H, W)``:

- encoder: ``log2(max factor)`` strided causal 3-D convolutions (kernel 4 on an axis still
  being downsampled by 2, else 3; ReLU), a causal 3x3x3 convolution, ``n_res_layers``
  pre-norm residual blocks (per-frame GroupNorm, ReLU, 3x3x3 and 1x1x1 causal convolutions,
  then axial attention: causal along time, full along rows and columns), GroupNorm + ReLU
  and a 1x1x1 projection to ``embed_dim``;
- quantizer: EMA codebook through ``vector-quantize-pytorch``
  (:class:`ephys_gpt.layers.vq.Quantizer`);
- decoder: the mirror image, with causal transposed 3-D convolutions to upsample (ReLU
  between them); the last one outputs the one image channel.

Unlike the original VideoGPT (and the port this project replaces) nothing pools statistics
over time (no BatchNorm: GroupNorm per frame, LayerNorm per position), padding in time is
causal, so the codes of latent step ``j`` depend only on frames ``< (j + 1) * dt``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ephys_gpt.layers.conv3d import CausalConv3d, CausalConvTranspose3d, FrameGroupNorm
from ephys_gpt.layers.video_attention import AxialAttention3d
from ephys_gpt.models.capabilities import Tokenizer
from ephys_gpt.models.registry import register_model
from ephys_gpt.models.vq_tokenizer import VQVideoTokenizer, check_positive, check_power_of_two


@dataclass
class VideoGPTTokenizerConfig:
    """VideoGPTTokenizer hyper-parameters (docs/models-vq.md)."""

    hidden: int = 64                     # channels of the conv/attention trunk
    n_res_layers: int = 2                # residual (conv + axial attention) blocks per side
    n_heads: int = 2                     # heads of each axial attention
    downsample: tuple[int, int, int] = (2, 4, 4)  # (dt, dh, dw), powers of two
    embed_dim: int = 32                  # D, latent / codebook vector width
    codebook_size: int = 512             # K, codes per quantizer stage
    num_quantizers: int = 1              # Q; > 1: residual VQ
    commitment_weight: float = 0.25      # weight of the commitment loss
    ema_decay: float = 0.9               # EMA decay of the codebook (0.99 lets codes collapse)
    kmeans_init: bool = True             # codebook from k-means on the first training batch
    dead_code_threshold: float = 0.5     # re-seed codes used less than this per batch (EMA)
    attention: bool = True               # axial attention in the residual blocks
    groups: int = 8                      # GroupNorm groups (per frame)
    image_size: tuple[int, int] = (16, 16)  # H x W of example_inputs (any multiple of dh, dw works)

    def __post_init__(self):
        check_positive(self, ("hidden", "n_res_layers", "n_heads", "embed_dim",
                              "codebook_size", "num_quantizers", "groups"))
        self.downsample = tuple(int(v) for v in self.downsample)
        self.image_size = tuple(int(v) for v in self.image_size)
        if len(self.downsample) != 3:
            raise ValueError(f"VideoGPTTokenizerConfig: downsample must be (dt, dh, dw), got "
                             f"{self.downsample}")
        for name, v in zip(("dt", "dh", "dw"), self.downsample):
            check_power_of_two(v, f"downsample {name}", "VideoGPTTokenizerConfig")
        if self.attention and self.hidden % self.n_heads:
            raise ValueError(f"VideoGPTTokenizerConfig: hidden ({self.hidden}) must be "
                             f"divisible by n_heads ({self.n_heads})")


class ResidualBlock(nn.Module):
    """Pre-norm residual block: ``x + conv1(relu(norm(conv3(relu(norm(x))))))``, then axial
    attention (itself pre-norm and residual)."""

    def __init__(self, dim: int, n_heads: int, groups: int, attention: bool):
        super().__init__()
        self.norm1 = FrameGroupNorm(dim, groups)
        self.conv1 = CausalConv3d(dim, dim // 2, 3, bias=False)
        self.norm2 = FrameGroupNorm(dim // 2, groups)
        self.conv2 = CausalConv3d(dim // 2, dim, 1, bias=False)
        self.attn = AxialAttention3d(dim, n_heads) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.norm1(x)))
        x = x + self.conv2(F.relu(self.norm2(h)))
        return self.attn(x) if self.attn is not None else x


def _steps(downsample: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Per-layer strides: 2 on each axis until its factor is reached."""
    n = [int(v).bit_length() - 1 for v in downsample]
    return [tuple(2 if n[a] > i else 1 for a in range(3)) for i in range(max(n))]


@register_model(
    "VideoGPTTokenizer", input_kind="image", causal=False, capabilities=(Tokenizer,),
    tiny_config={"hidden": 16, "n_res_layers": 1, "n_heads": 2, "downsample": (2, 2, 2),
                 "embed_dim": 8, "codebook_size": 16, "groups": 4, "image_size": (8, 8)},
    default_loss="VQVAELoss", config_class=VideoGPTTokenizerConfig)
class VideoGPTTokenizer(VQVideoTokenizer):
    """VQ-VAE, 3-D convs + axial attention: images (B, H, W, T) ↔ block-causal codes (B, T', H', W')."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = VideoGPTTokenizerConfig(**config)
        self.downsample, self.image_size = cfg.downsample, cfg.image_size
        d, g = cfg.hidden, cfg.groups
        steps = _steps(cfg.downsample)
        self.down = nn.ModuleList(
            CausalConv3d(1 if i == 0 else d, d, tuple(4 if s == 2 else 3 for s in st), st)
            for i, st in enumerate(steps))
        self.enc_in = CausalConv3d(d if steps else 1, d, 3)
        self.enc_res = nn.ModuleList(ResidualBlock(d, cfg.n_heads, g, cfg.attention)
                                     for _ in range(cfg.n_res_layers))
        self.enc_norm = FrameGroupNorm(d, g)
        self.enc_out = CausalConv3d(d, cfg.embed_dim, 1)
        self._init_quantizer(cfg)
        self.dec_in = CausalConv3d(cfg.embed_dim, d, 3)
        self.dec_res = nn.ModuleList(ResidualBlock(d, cfg.n_heads, g, cfg.attention)
                                     for _ in range(cfg.n_res_layers))
        self.dec_norm = FrameGroupNorm(d, g)
        up = list(reversed(steps))
        self.up = nn.ModuleList(
            CausalConvTranspose3d(d, 1 if i == len(up) - 1 else d,
                                  tuple(4 if s == 2 else 3 for s in st), st)
            for i, st in enumerate(up))
        self.dec_out = CausalConv3d(d, 1, 3) if not up else None

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, H, W)`` → ``(B, D, T', H', W')`` (before quantization)."""
        for conv in self.down:
            x = F.relu(conv(x))
        x = self.enc_in(x)
        for block in self.enc_res:
            x = block(x)
        return self.enc_out(F.relu(self.enc_norm(x)))

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized ``(B, D, T', H', W')`` → ``(B, 1, T, H, W)``."""
        x = self.dec_in(z)
        for block in self.dec_res:
            x = block(x)
        x = F.relu(self.dec_norm(x))
        for i, conv in enumerate(self.up):
            x = conv(x)
            x = F.relu(x) if i < len(self.up) - 1 else x
        return self.dec_out(x) if self.dec_out is not None else x

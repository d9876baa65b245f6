"""Emu3VisionVQ: an Emu3/MoVQ-style video tokenizer for sensor-image windows.

After the vision tokenizer of Emu3 (BAAI, 2024, "Emu3: next-token prediction is all you
need"), which builds on MoVQ (Zheng et al., 2022, "MoVQ: modulating quantized vectors for
high-fidelity image generation"):

- **per-frame 2-D encoder** (VQGAN-style): a 3x3 convolution, then per resolution level
  ``num_res_blocks`` ResNet blocks (GroupNorm, SiLU, 3x3 convolutions; self-attention over the
  frame's pixels at the levels in ``attn_levels``) and a stride-2 downsampling between levels
  (spatial factor ``2 ** (len(ch_mult) - 1)``), a middle ResNet-attention-ResNet block, and a
  projection to ``z_channels``. It sees one frame at a time.
- **causal temporal downsampling**: ``log2(temporal_downsample)`` causal 3-D convolutions with
  stride 2 in time (kernel 4x3x3), temporal ResNet blocks (causal 3x3x3 convolutions,
  per-frame GroupNorm), and a causal projection to ``embed_dim``;
- **quantizer**: EMA codebook through ``vector-quantize-pytorch``;
- **decoder**: a causal projection, temporal ResNet blocks and causal temporal upsampling
  (repeat in time, then a causal 3x3x3 convolution), then a per-frame 2-D decoder whose norms
  are MoVQ's *spatially-normalized* norms: ``GroupNorm(f) * a(z_q) + b(z_q)``, with ``a``,
  ``b`` 1x1 convolutions of the frame's quantized latent resized to ``f``'s size, so every
  decoder layer is modulated by the codes.

Everything is time-causal (per-frame 2-D parts, causal 3-D parts, no norm pools time): the
codes of latent step ``j`` depend only on frames ``< (j + 1) * temporal_downsample``. No
perceptual or adversarial loss (Emu3's LPIPS/GAN terms need downloaded networks); train with
``VQVAELoss`` (optionally with its multi-resolution STFT term) or ``VQNSPLoss``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ephys_gpt.layers.conv3d import CausalConv3d, CausalUpsample3d, FrameGroupNorm, group_count
from ephys_gpt.layers.video_attention import FrameSelfAttention
from ephys_gpt.models.capabilities import Tokenizer
from ephys_gpt.models.registry import register_model
from ephys_gpt.models.vq_tokenizer import VQVideoTokenizer, check_positive, check_power_of_two


@dataclass
class Emu3VisionVQConfig:
    """Emu3VisionVQ hyper-parameters (docs/models-vq.md)."""

    ch: int = 32                          # base width of the 2-D encoder/decoder
    ch_mult: tuple[int, ...] = (1, 2, 2)  # width multiplier per level; spatial factor 2**(len-1)
    num_res_blocks: int = 1               # ResNet blocks per level, encoder and decoder alike,
                                          # and per temporal stage
    attn_levels: tuple[int, ...] = ()     # levels with per-frame self-attention (0 = full size)
    mid_attention: bool = True            # attention in the middle block
    z_channels: int = 32                  # width of the temporal part
    temporal_downsample: int = 2          # dt, a power of two
    embed_dim: int = 32                   # D, latent / codebook vector width
    codebook_size: int = 512              # K, codes per quantizer stage
    num_quantizers: int = 1               # Q; > 1: residual VQ
    commitment_weight: float = 0.25
    ema_decay: float = 0.9                # EMA decay of the codebook (0.99 lets codes collapse)
    kmeans_init: bool = True
    dead_code_threshold: float = 0.5
    groups: int = 8                       # GroupNorm groups
    dropout: float = 0.0
    image_size: tuple[int, int] = (16, 16)  # H x W of example_inputs
    # filled in __post_init__
    spatial_factor: int = field(default=0, init=False, repr=False)

    def __post_init__(self):
        check_positive(self, ("ch", "num_res_blocks", "z_channels", "embed_dim",
                              "codebook_size", "num_quantizers", "groups"))
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_levels = tuple(int(a) for a in self.attn_levels)
        self.image_size = tuple(int(v) for v in self.image_size)
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"Emu3VisionVQConfig: ch_mult must be positive ints, got "
                             f"{self.ch_mult}")
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.ch_mult)]
        if bad:
            raise ValueError(f"Emu3VisionVQConfig: attn_levels {bad} are not levels of ch_mult "
                             f"(0..{len(self.ch_mult) - 1})")
        check_power_of_two(self.temporal_downsample, "temporal_downsample", "Emu3VisionVQConfig")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"Emu3VisionVQConfig: dropout must be in [0, 1), got {self.dropout}")
        self.spatial_factor = 2 ** (len(self.ch_mult) - 1)


class SpatialNorm(nn.Module):
    """MoVQ's spatially-normalized norm: ``GroupNorm(f) * a(zq) + b(zq)`` (per frame), with
    ``zq`` resized (nearest) to ``f``'s size. Without ``zq`` (encoder) a plain GroupNorm."""

    def __init__(self, channels: int, zq_channels: int | None, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(group_count(channels, groups), channels, eps=1e-6,
                                 affine=zq_channels is None)
        self.scale = nn.Conv2d(zq_channels, channels, 1) if zq_channels else None
        self.shift = nn.Conv2d(zq_channels, channels, 1) if zq_channels else None

    def forward(self, f: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        f = self.norm(f)
        if self.scale is None:
            return f
        # 1x1 convolutions commute with nearest resizing: modulate at zq's (small) size
        scale = F.interpolate(self.scale(zq), size=f.shape[-2:], mode="nearest")
        shift = F.interpolate(self.shift(zq), size=f.shape[-2:], mode="nearest")
        return f * scale + shift


class ResBlock2d(nn.Module):
    """Frame ResNet block: norm, SiLU, 3x3 conv, norm, SiLU, dropout, 3x3 conv, + skip."""

    def __init__(self, cin: int, cout: int, groups: int, zq_channels: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.norm1 = SpatialNorm(cin, zq_channels, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = SpatialNorm(cout, zq_channels, groups)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(self.drop(F.silu(self.norm2(h, zq))))
        return self.skip(x) + h


class TemporalResBlock(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))`` with causal 3x3x3 convs, per-frame norms."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.norm1, self.norm2 = FrameGroupNorm(dim, groups), FrameGroupNorm(dim, groups)
        self.conv1, self.conv2 = CausalConv3d(dim, dim, 3), CausalConv3d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class FrameEncoder(nn.Module):
    """Per-frame 2-D encoder: ``(N, 1, H, W)`` → ``(N, z_channels, H/f, W/f)``."""

    def __init__(self, cfg: Emu3VisionVQConfig):
        super().__init__()
        g, widths = cfg.groups, [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(1, cfg.ch, 3, padding=1)
        self.levels = nn.ModuleList()
        cin = cfg.ch
        for lvl, cout in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock2d(cin if i == 0 else cout, cout, g,
                                                    dropout=cfg.dropout)
                                         for i in range(cfg.num_res_blocks))
            level.attn = FrameSelfAttention(cout, g) if lvl in cfg.attn_levels else None
            level.down = (nn.Conv2d(cout, cout, 3, stride=2, padding=1)
                          if lvl < len(widths) - 1 else None)
            self.levels.append(level)
            cin = cout
        self.mid1 = ResBlock2d(cin, cin, g)
        self.mid_attn = FrameSelfAttention(cin, g) if cfg.mid_attention else None
        self.mid2 = ResBlock2d(cin, cin, g)
        self.norm_out = nn.GroupNorm(group_count(cin, g), cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            h = level.attn(h) if level.attn is not None else h
            h = level.down(h) if level.down is not None else h
        h = self.mid2(self.mid_attn(self.mid1(h)) if self.mid_attn is not None else self.mid1(h))
        return self.conv_out(F.silu(self.norm_out(h)))


class FrameDecoder(nn.Module):
    """Per-frame 2-D decoder with spatial norms: ``(N, z, H', W')`` and the frames' quantized
    latents ``(N, D, H', W')`` → ``(N, 1, H, W)``."""

    def __init__(self, cfg: Emu3VisionVQConfig):
        super().__init__()
        g, d = cfg.groups, cfg.embed_dim
        widths = [cfg.ch * m for m in cfg.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid1 = ResBlock2d(cin, cin, g, d)
        self.mid_attn = FrameSelfAttention(cin, g) if cfg.mid_attention else None
        self.mid2 = ResBlock2d(cin, cin, g, d)
        self.levels = nn.ModuleList()
        for lvl in reversed(range(len(widths))):
            cout = widths[lvl]
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock2d(cin if i == 0 else cout, cout, g, d,
                                                    cfg.dropout)
                                         for i in range(cfg.num_res_blocks))
            level.attn = FrameSelfAttention(cout, g) if lvl in cfg.attn_levels else None
            level.up = nn.Conv2d(cout, cout, 3, padding=1) if lvl > 0 else None
            self.levels.append(level)
            cin = cout
        self.norm_out = SpatialNorm(cin, d, g)
        self.conv_out = nn.Conv2d(cin, 1, 3, padding=1)

    def forward(self, h: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(h)
        h = self.mid1(h, zq)
        h = self.mid_attn(h) if self.mid_attn is not None else h
        h = self.mid2(h, zq)
        for level in self.levels:
            for block in level.blocks:
                h = block(h, zq)
            h = level.attn(h) if level.attn is not None else h
            if level.up is not None:
                h = level.up(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h, zq)))


@register_model(
    "Emu3VisionVQ", input_kind="image", causal=False, capabilities=(Tokenizer,),
    tiny_config={"ch": 8, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_levels": (1,),
                 "z_channels": 8, "temporal_downsample": 2, "embed_dim": 8,
                 "codebook_size": 16, "groups": 4, "image_size": (8, 8)},
    default_loss="VQVAELoss", config_class=Emu3VisionVQConfig)
class Emu3VisionVQ(VQVideoTokenizer):
    """Emu3/MoVQ-style VQ tokenizer: images (B, H, W, T) ↔ block-causal codes (B, T', H', W').

    Per-frame 2-D encoder, causal temporal down/up-sampling, spatially-normalized decoder
    (see the module docstring)."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = Emu3VisionVQConfig(**config)
        f = cfg.spatial_factor
        self.downsample = (cfg.temporal_downsample, f, f)
        self.image_size = cfg.image_size
        z, g = cfg.z_channels, cfg.groups
        n_t = cfg.temporal_downsample.bit_length() - 1
        self.frame_encoder = FrameEncoder(cfg)
        self.time_down = nn.ModuleList(CausalConv3d(z, z, (4, 3, 3), (2, 1, 1))
                                       for _ in range(n_t))
        self.enc_blocks = nn.ModuleList(TemporalResBlock(z, g) for _ in range(cfg.num_res_blocks))
        self.enc_norm = FrameGroupNorm(z, g)
        self.quant_conv = CausalConv3d(z, cfg.embed_dim, 3)
        self._init_quantizer(cfg)
        self.post_quant_conv = CausalConv3d(cfg.embed_dim, z, 3)
        self.dec_blocks = nn.ModuleList(TemporalResBlock(z, g) for _ in range(cfg.num_res_blocks))
        self.time_up = nn.ModuleList(CausalUpsample3d(z, z, (2, 1, 1)) for _ in range(n_t))
        self.frame_decoder = FrameDecoder(cfg)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, T, H, W)`` → ``(B, D, T', H', W')`` (before quantization)."""
        b = x.shape[0]
        h = self.frame_encoder(rearrange(x, "b c t h w -> (b t) c h w"))
        h = rearrange(h, "(b t) c h w -> b c t h w", b=b)
        for conv in self.time_down:
            h = F.silu(conv(h))
        for block in self.enc_blocks:
            h = block(h)
        return self.quant_conv(F.silu(self.enc_norm(h)))

    def decode_latents(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantized ``(B, D, T', H', W')`` → ``(B, 1, T, H, W)``."""
        b = zq.shape[0]
        h = self.post_quant_conv(zq)
        for block in self.dec_blocks:
            h = block(h)
        for up in self.time_up:
            h = up(h)
        cond = zq.repeat_interleave(self.downsample[0], dim=2)  # frame t gets step t // dt
        y = self.frame_decoder(rearrange(h, "b c t h w -> (b t) c h w"),
                               rearrange(cond, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)

"""CNNLSTM: conv front end + optional BiLSTM + optional transformer, pooled to class logits.

A compact hybrid for classifying short MEG windows (e.g. LibriBrain phonemes). The conv front
end mixes all sensors and downsamples in time (in the spirit of EEGNet/ShallowConvNet-style
spatial-temporal filtering), a bidirectional LSTM models the sequence of pooled features
(Hochreiter & Schmidhuber 1997), optional transformer blocks add global context, and a
pooling step (attention, last or mean) summarizes the window for a linear classifier. None of
it is causal: the whole window is seen at once.

Shapes: B batch, C channels, T samples, T' = T / prod(conv_pool), D feature width, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn

from ephys_gpt.codec import mulaw_decode, mulaw_mu
from ephys_gpt.layers.attention import TransformerStack
from ephys_gpt.models.capabilities import Classifier
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model


@dataclass
class CNNLSTMConfig:
    """Keyword arguments of :class:`CNNLSTM` (``model_config``)."""

    num_channels: int = 306        # C: sensors
    num_classes: int = 39          # K: classes (LibriBrain: 39 phonemes)
    conv_channels: list[int] = field(default_factory=lambda: [128, 128])  # width per conv layer
    conv_kernels: list[int] = field(default_factory=lambda: [7, 5])       # kernel per conv layer
    conv_pool: list[int] = field(default_factory=lambda: [2, 2])          # max-pool per layer (1: none)
    lstm_hidden: int = 64          # LSTM hidden size per direction; 0: no LSTM
    lstm_layers: int = 1
    bidirectional: bool = True
    n_transformer_layers: int = 0  # transformer blocks after the LSTM (0: none)
    d_model: int = 128             # transformer width (features are projected to it)
    n_heads: int = 4
    pooling: str = "attention"     # "attention" | "last" | "mean"
    dropout: float = 0.2
    token_bits: int | None = None  # integer inputs are mu-law tokens of this many bits
    example_length: int = 125      # T of example_inputs() (LibriBrain: 0.5 s at 250 Hz)

    def __post_init__(self):
        n = len(self.conv_channels)
        if n == 0 or len(self.conv_kernels) != n or len(self.conv_pool) != n:
            raise ValueError(f"CNNLSTM: conv_channels {self.conv_channels}, conv_kernels "
                             f"{self.conv_kernels} and conv_pool {self.conv_pool} must be "
                             "non-empty lists of the same length")
        for key in ("num_channels", "num_classes", "example_length", "lstm_layers", "n_heads",
                    "d_model"):
            val = getattr(self, key)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"CNNLSTM: {key} must be a positive integer, got {val!r}")
        if self.num_classes < 2:
            raise ValueError(f"CNNLSTM: num_classes must be >= 2, got {self.num_classes}")
        if self.pooling not in ("attention", "last", "mean"):
            raise ValueError(f"CNNLSTM: pooling must be 'attention', 'last' or 'mean', got "
                             f"{self.pooling!r}")
        if self.n_transformer_layers and (self.d_model % self.n_heads
                                          or (self.d_model // self.n_heads) % 2):
            raise ValueError(f"CNNLSTM: d_model ({self.d_model}) / n_heads ({self.n_heads}) "
                             "must be an even integer")


@register_model(
    "CNNLSTM",
    input_kind="labelled",
    causal=False,
    capabilities=(Classifier,),
    tiny_config={"num_channels": 4, "num_classes": 3, "conv_channels": [8, 8],
                 "conv_kernels": [3, 3], "conv_pool": [2, 1], "lstm_hidden": 8,
                 "n_transformer_layers": 1, "d_model": 16, "n_heads": 2, "dropout": 0.0,
                 "example_length": 32},
    output_time_dim=-1,
    default_loss="CrossEntropy",
    config_class=CNNLSTMConfig,
)
class CNNLSTM(nn.Module):
    """Conv front end + optional BiLSTM + optional transformer → class logits (B, K)."""

    def __init__(self, **kwargs):
        super().__init__()
        cfg = self.config = CNNLSTMConfig(**kwargs)
        layers: list[nn.Module] = []
        c_in = cfg.num_channels
        for c_out, k, p in zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_pool):
            layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out),
                       nn.GELU()]
            if p > 1:
                layers.append(nn.MaxPool1d(p, ceil_mode=True))
            layers.append(nn.Dropout(cfg.dropout))
            c_in = c_out
        self.frontend = nn.Sequential(*layers)
        d = c_in
        self.lstm = None
        if cfg.lstm_hidden:
            self.lstm = nn.LSTM(d, cfg.lstm_hidden, cfg.lstm_layers, batch_first=True,
                                bidirectional=cfg.bidirectional,
                                dropout=cfg.dropout if cfg.lstm_layers > 1 else 0.0)
            d = cfg.lstm_hidden * (2 if cfg.bidirectional else 1)
        self.transformer = None
        if cfg.n_transformer_layers:
            self.to_model = nn.Linear(d, cfg.d_model)
            self.transformer = TransformerStack(cfg.d_model, cfg.n_transformer_layers,
                                                cfg.n_heads, dropout=cfg.dropout, causal=False)
            d = cfg.d_model
        self.attn_score = nn.Linear(d, 1) if cfg.pooling == "attention" else None
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Dropout(cfg.dropout),
                                  nn.Linear(d, cfg.num_classes))

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """A random (B, C, T) float batch."""
        return torch.randn(batch_size, self.config.num_channels,
                           seq_len or self.config.example_length)

    def _as_signal(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            return x
        if self.config.token_bits is None:
            raise TypeError("CNNLSTM got integer inputs but token_bits is not set; pass float "
                            "signals or set token_bits to the mu-law bits of the tokens")
        mu = mulaw_mu(self.config.token_bits)
        return mulaw_decode(x.float() * (2.0 / mu) - 1.0, mu)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """``x`` (B, C, T) float (or int64 mu-law tokens with ``token_bits``) → ``prediction``
        logits (B, K)."""
        if x.ndim != 3 or x.shape[1] != self.config.num_channels:
            raise ValueError(f"CNNLSTM expects x of shape (B, {self.config.num_channels}, T), "
                             f"got {tuple(x.shape)}")
        h = rearrange(self.frontend(self._as_signal(x)), "b d t -> b t d")  # (B, T', D)
        last = None
        if self.lstm is not None:
            h, _ = self.lstm(h)
            if self.config.bidirectional:  # each direction's final state
                H = self.config.lstm_hidden
                last = torch.cat([h[:, -1, :H], h[:, 0, H:]], dim=-1)
        if self.transformer is not None:
            h = self.transformer(self.to_model(h))
            last = None
        if self.config.pooling == "attention":
            w = torch.softmax(self.attn_score(h).squeeze(-1).float(), dim=-1).to(h.dtype)
            pooled = torch.einsum("bt,btd->bd", w, h)
        elif self.config.pooling == "mean":
            pooled = h.mean(dim=1)
        else:
            pooled = last if last is not None else h[:, -1]
        return ModelOutput(self.head(pooled))

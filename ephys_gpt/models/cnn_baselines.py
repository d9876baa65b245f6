"""Causal 1-D CNN baselines: light next-sample predictors for sanity checks and ablations.

Four models share one causal trunk (a stack of dilated causal convolutions, GELU, residual
connections between equal-width layers; dilations ``growth**i``), in the spirit of the
temporal convolutional networks of Bai et al., "An empirical evaluation of generic
convolutional and recurrent networks for sequence modeling" (2018):

- ``CNNMultivariate``: continuous ``(B, C, T)`` → ``(B, C, T)``; the trunk reads all
  channels at once (channels mix). ``out[..., t]`` predicts ``x[..., t+1]``.
- ``CNNUnivariate``: the same, but one trunk shared by all channels, applied to each alone.
- ``CNNMultivariateQuantized`` / ``CNNUnivariateQuantized``: tokens ``(B, C, T)`` int64 →
  logits ``(B, C, T, V)``; channel-wise token embeddings feed the multivariate trunk, a
  shared token embedding the univariate one.

``forecast`` / ``generate`` stream through per-layer ring buffers
(:class:`ephys_gpt.layers.causal_conv.CausalConv1d`): after priming on the context each new
step costs one column of each convolution. Without the cache every step re-runs the trunk
on the last ``receptive_field`` samples (the same numbers, computed the slow way).

Legend: B batch, C channels, T time, V vocabulary, E embedding width, Hd hidden channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from tqdm.auto import tqdm

from ephys_gpt.layers.causal_conv import CausalConv1d, ConvState, PointwiseConv1d
from ephys_gpt.layers.embeddings import ChannelwiseTokenEmbedding
from ephys_gpt.layers.generation import check_token_context, generate_tokens
from ephys_gpt.models.capabilities import Forecaster, TokenGenerator
from ephys_gpt.models.gpt2meg import check_tokens
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model


def _check_positive(cfg, keys) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{type(cfg).__name__}: {key} must be a positive integer, got {v!r}")


@dataclass
class CNNConfig:
    """Continuous CNN baseline hyper-parameters."""

    num_channels: int = 272      # C
    hidden_channels: int = 64    # Hd, trunk width
    n_layers: int = 4            # causal conv layers in the trunk
    kernel_size: int = 3         # taps per conv
    dilation_growth: int = 2     # layer i has dilation dilation_growth**i
    residual_input: bool = True  # predict the increment: out = x + trunk(x)

    def __post_init__(self):
        _check_positive(self, ("num_channels", "hidden_channels", "n_layers", "kernel_size",
                               "dilation_growth"))


@dataclass
class CNNQuantizedConfig:
    """Quantized CNN baseline hyper-parameters."""

    num_channels: int = 272      # C
    vocab_size: int = 256        # V, mu-law levels
    embed_dim: int = 8           # E, token embedding width (per channel)
    hidden_channels: int = 64    # Hd, trunk width
    n_layers: int = 4            # causal conv layers in the trunk
    kernel_size: int = 3         # taps per conv
    dilation_growth: int = 2     # layer i has dilation dilation_growth**i

    def __post_init__(self):
        _check_positive(self, ("num_channels", "vocab_size", "embed_dim", "hidden_channels",
                               "n_layers", "kernel_size", "dilation_growth"))


class CausalConvTrunk(nn.Module):
    """Dilated causal conv stack ``(N, Cin, T) → (N, Hd, T)`` with streaming state.

    ``forward(x, states=None)``: with ``states`` (from :meth:`new_states`), ``x`` continues
    the stream they hold (see :class:`CausalConv1d`).
    """

    def __init__(self, in_channels: int, hidden: int, n_layers: int, kernel_size: int,
                 growth: int):
        super().__init__()
        self.convs = nn.ModuleList(
            CausalConv1d(in_channels if i == 0 else hidden, hidden, kernel_size,
                         dilation=growth ** i) for i in range(n_layers))
        self.receptive_field = 1 + sum(c.context for c in self.convs)

    def new_states(self) -> list[ConvState]:
        return [c.new_state() for c in self.convs]

    def forward(self, x: torch.Tensor, states: list[ConvState] | None = None) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            y = F.gelu(conv(x, None if states is None else states[i]))
            x = x + y if y.shape == x.shape else y
        return x


class _ContinuousCNN(nn.Module):
    """Shared forward/forecast of the continuous baselines (subclasses set the trunk)."""

    config: CNNConfig
    name = "CNN"

    def _run(self, x: torch.Tensor, states=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """``x (B, C, T)`` float → prediction ``(B, C, T)``: ``out[..., t] ≈ x[..., t+1]``."""
        self._check(x)
        return ModelOutput(self._run(x))

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 3 \
                or x.shape[1] != self.config.num_channels:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.name} expects float (B, C={self.config.num_channels}, T), "
                             f"got {got}")

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random normal signal ``(batch_size, C, seq_len)`` (default 32 steps)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, self.config.num_channels, seq_len or 32, generator=g)
        return x.to(next(self.parameters()).device)

    @torch.no_grad()
    def forecast(self, past: torch.Tensor, horizon: int, *, use_cache: bool = True,
                 progress: bool = False) -> torch.Tensor:
        """Roll the one-step predictor forward: ``past (B, C, T0)`` → ``(B, C, T0 + horizon)``
        (the past followed by ``horizon`` predicted samples, each fed back as input)."""
        self._check(past)
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 0:
            raise ValueError(f"horizon must be an integer >= 0, got {horizon!r}")
        R = self.trunk.receptive_field
        T0 = past.shape[-1]
        seq = past.new_empty(*past.shape[:2], T0 + horizon)
        seq[..., :T0] = past
        states = self.trunk.new_states() if use_cache else None
        nxt = self._run(past[..., -R:], states)[..., -1]
        for t in tqdm(range(T0, T0 + horizon), desc=self.name, disable=not progress, leave=False):
            seq[..., t] = nxt
            if t == T0 + horizon - 1:
                break
            if use_cache:
                nxt = self._run(nxt[..., None], states)[..., -1]
            else:
                nxt = self._run(seq[..., max(0, t + 1 - R):t + 1])[..., -1]
        return seq


@register_model(
    "CNNMultivariate", input_kind="continuous", causal=True, capabilities=(Forecaster,),
    tiny_config={"num_channels": 3, "hidden_channels": 8, "n_layers": 3, "kernel_size": 2},
    output_time_dim=-1, default_loss="MSE", config_class=CNNConfig,
)
class CNNMultivariate(_ContinuousCNN):
    """Causal CNN over all channels jointly: ``(B, C, T)`` → next-sample prediction ``(B, C, T)``."""

    name = "CNNMultivariate"

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = CNNConfig(**config)
        self.trunk = CausalConvTrunk(cfg.num_channels, cfg.hidden_channels, cfg.n_layers,
                                     cfg.kernel_size, cfg.dilation_growth)
        self.head = PointwiseConv1d(cfg.hidden_channels, cfg.num_channels)

    def _run(self, x, states=None):
        y = self.head(self.trunk(x, states))  # (B, C, T)
        return x + y if self.config.residual_input else y


@register_model(
    "CNNUnivariate", input_kind="continuous", causal=True, capabilities=(Forecaster,),
    tiny_config={"num_channels": 3, "hidden_channels": 8, "n_layers": 3, "kernel_size": 2},
    output_time_dim=-1, default_loss="MSE", config_class=CNNConfig,
)
class CNNUnivariate(_ContinuousCNN):
    """One causal CNN shared by all channels, each predicted from its own past only."""

    name = "CNNUnivariate"

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = CNNConfig(**config)
        self.trunk = CausalConvTrunk(1, cfg.hidden_channels, cfg.n_layers, cfg.kernel_size,
                                     cfg.dilation_growth)
        self.head = PointwiseConv1d(cfg.hidden_channels, 1)

    def _run(self, x, states=None):
        B = x.shape[0]
        h = self.trunk(rearrange(x, "b c t -> (b c) 1 t"), states)  # (B·C, Hd, T)
        y = rearrange(self.head(h), "(b c) 1 t -> b c t", b=B)
        return x + y if self.config.residual_input else y


class _QuantizedCNN(nn.Module):
    """Shared forward/generate of the quantized baselines (subclasses embed and decode)."""

    config: CNNQuantizedConfig
    name = "CNNQuantized"

    def _run(self, x: torch.Tensor, states=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """Tokens ``(B, C, T)`` int64 → logits ``(B, C, T, V)`` predicting ``x[..., t+1]``."""
        check_tokens(x, self.config.num_channels, None, self.name)
        return ModelOutput(self._run(x))

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random tokens ``(batch_size, C, seq_len)`` (default 32 steps)."""
        cfg = self.config
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.num_channels, seq_len or 32),
                          generator=g)
        return x.to(next(self.parameters()).device)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, steps: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
        """Sample ``steps`` tokens per channel after ``context (B, C, T0)`` → ``(B, C, T0+steps)``.

        Cached: the conv ring buffers are primed on the last ``receptive_field`` tokens, then
        each step runs one column. Uncached: each step re-runs that window.
        """
        check_token_context(context, self.config.num_channels, self.name)
        R = self.trunk.receptive_field
        holder: list = [None]

        def prime(window: torch.Tensor, cached: bool) -> torch.Tensor:
            holder[0] = self.trunk.new_states() if cached else None
            return self._run(window[..., -R:], holder[0])[:, :, -1]

        def step(tok: torch.Tensor) -> torch.Tensor:
            return self._run(tok[..., None], holder[0])[:, :, -1]

        return generate_tokens(context, steps, prime=prime, step=step, use_cache=use_cache,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator, progress=progress, desc=self.name)


_QTINY = {"num_channels": 3, "vocab_size": 16, "embed_dim": 4, "hidden_channels": 8,
          "n_layers": 3, "kernel_size": 2}


@register_model(
    "CNNMultivariateQuantized", input_kind="tokens", causal=True, capabilities=(TokenGenerator,),
    tiny_config=_QTINY, output_time_dim=-2, default_loss="CrossEntropy",
    config_class=CNNQuantizedConfig,
)
class CNNMultivariateQuantized(_QuantizedCNN):
    """Causal CNN over all channels' token embeddings → per-channel logits ``(B, C, T, V)``."""

    name = "CNNMultivariateQuantized"

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = CNNQuantizedConfig(**config)
        self.embed = ChannelwiseTokenEmbedding(cfg.num_channels, cfg.vocab_size, cfg.embed_dim)
        self.trunk = CausalConvTrunk(cfg.num_channels * cfg.embed_dim, cfg.hidden_channels,
                                     cfg.n_layers, cfg.kernel_size, cfg.dilation_growth)
        self.head = PointwiseConv1d(cfg.hidden_channels, cfg.num_channels * cfg.vocab_size)

    def _run(self, x, states=None):
        h = rearrange(self.embed(x), "b c t e -> b (c e) t")
        logits = self.head(self.trunk(h, states))  # (B, C·V, T)
        return rearrange(logits, "b (c v) t -> b c t v", c=self.config.num_channels)


@register_model(
    "CNNUnivariateQuantized", input_kind="tokens", causal=True, capabilities=(TokenGenerator,),
    tiny_config=_QTINY, output_time_dim=-2, default_loss="CrossEntropy",
    config_class=CNNQuantizedConfig,
)
class CNNUnivariateQuantized(_QuantizedCNN):
    """One causal CNN shared by all channels, each predicted from its own past tokens."""

    name = "CNNUnivariateQuantized"

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = CNNQuantizedConfig(**config)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.trunk = CausalConvTrunk(cfg.embed_dim, cfg.hidden_channels, cfg.n_layers,
                                     cfg.kernel_size, cfg.dilation_growth)
        self.head = PointwiseConv1d(cfg.hidden_channels, cfg.vocab_size)

    def _run(self, x, states=None):
        B = x.shape[0]
        h = rearrange(self.embed(x), "b c t e -> (b c) e t")
        logits = self.head(self.trunk(h, states))  # (B·C, V, T)
        return rearrange(logits, "(b c) v t -> b c t v", b=B)

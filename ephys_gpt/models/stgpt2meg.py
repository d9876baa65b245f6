"""STGPT2MEG: a spatio-temporal GPT over mu-law tokens that mixes channels inside each block.

Each block factorises attention over the (channel, time) grid, as in divided space-time
attention (Bertasius et al., "Is space-time attention all you need for video
understanding?", 2021) applied to sensors instead of image patches:

1. causal self-attention over time, separately for each channel;
2. self-attention across channels at each time step (sensor coupling);
3. a position-wise MLP.

Step 2 only combines states of the same time step, each computed from inputs ``<= t``, so
the model stays causal in time. During generation the time attention is served by a KV cache
and the channel attention is computed for the new step only. The blocks are
:class:`~ephys_gpt.layers.axial.AxialTransformerBlock` s with one spatial axis (channels);
embeddings, head and decoding are GPT2MEG's (:class:`~ephys_gpt.models.gpt2meg.ChannelTokenTransformer`).

Legend: B batch, C channels, T time, V vocabulary, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ephys_gpt.layers.attention import KVCache
from ephys_gpt.layers.axial import AxialTransformerBlock
from ephys_gpt.models.gpt2meg import (
    ChannelTokenTransformer,
    GPT2MEGConfig,
    channel_token_registration,
    check_tokens,
)
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model


@dataclass
class STGPT2MEGConfig(GPT2MEGConfig):
    """STGPT2MEG hyper-parameters: the same keys and defaults as :class:`GPT2MEGConfig`;
    ``n_heads`` is used by both the time and the channel attention, ``kv_heads`` by the
    (cached) time attention only."""


@register_model("STGPT2MEG", config_class=STGPT2MEGConfig, **channel_token_registration())
class STGPT2MEG(ChannelTokenTransformer):
    """Spatio-temporal GPT with channel mixing: ``(B, C, T)`` int64 → logits ``(B, C, T, V)``."""

    def __init__(self, **config):
        cfg = STGPT2MEGConfig(**config)
        # three residual branches per block
        super().__init__(cfg, lambda: AxialTransformerBlock(
            cfg.d_model, cfg.n_heads, ("chan",), cfg.mlp_ratio, cfg.dropout, cfg.bias,
            cfg.layer_norm_eps, cfg.activation, kv_heads=cfg.kv_heads),
            int(1.5 * cfg.n_layers) or 1)

    def _blocks(self, h: torch.Tensor, caches: list[KVCache] | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            h = block(h, cache=None if caches is None else caches[i], position=position)
        return h

    def forward(self, x: torch.Tensor, subject: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> ModelOutput:
        """Next-token logits.

        Parameters
        ----------
        x : int64 (B, C, T), tokens in ``[0, V)``, ``T <= n_positions``.
        subject, condition : int64 (B,) or None (see :class:`GPT2MEGConfig`).

        Returns
        -------
        ModelOutput whose ``prediction`` is the logits (B, C, T, V); ``logits[:, c, t]``
        predicts ``x[:, c, t+1]`` from all channels' tokens ``<= t``.
        """
        cfg = self.config
        check_tokens(x, cfg.num_channels, cfg.n_positions, "STGPT2MEG")
        h = self._embed(x, 0, self._labels(x.shape[0], subject, condition))
        return ModelOutput(self.with_linear_forecast(self._logits(self._blocks(h)), x))

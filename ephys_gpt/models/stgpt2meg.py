"""STGPT2MEG: a spatio-temporal GPT over mu-law tokens that mixes channels inside each block.

Each block factorises attention over the (channel, time) grid, as in divided space-time
attention (Bertasius et al., "Is space-time attention all you need for video
understanding?", 2021) applied to sensors instead of image patches:

1. causal self-attention over time, separately for each channel;
2. self-attention across channels at each time step (sensor coupling);
3. a position-wise MLP.

Step 2 only combines states of the same time step, each computed from inputs ``<= t``, so
the model stays causal in time. During generation the time attention is served by a KV cache
and the channel attention is computed for the new step only.

Legend: B batch, C channels, T time, V vocabulary, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ephys_gpt.layers.attention import MLP, KVCache, MultiHeadSelfAttention, init_gpt_weights
from ephys_gpt.layers.embeddings import OptionalEmbedding
from ephys_gpt.layers.generation import check_token_context, generate_tokens
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.gpt2meg import GPT2MEGConfig, check_tokens
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model


@dataclass
class STGPT2MEGConfig(GPT2MEGConfig):
    """STGPT2MEG hyper-parameters: the same keys and defaults as :class:`GPT2MEGConfig`;
    ``n_heads`` is used by both the time and the channel attention."""


class SpatioTemporalBlock(nn.Module):
    """Pre-norm block: causal time attention, channel attention, MLP (each residual).

    ``forward(h (B, C, T, D), cache=None) -> (B, C, T, D)``; ``cache`` is the KV cache of
    the time attention (with it, ``h`` holds the newest T steps).
    """

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.0,
                 bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.ln_time = nn.LayerNorm(d_model, eps=eps)
        self.time_attn = MultiHeadSelfAttention(d_model, n_heads, causal=True, dropout=dropout,
                                                bias=bias)
        self.ln_chan = nn.LayerNorm(d_model, eps=eps)
        self.chan_attn = MultiHeadSelfAttention(d_model, n_heads, causal=False, dropout=dropout,
                                                bias=bias)
        self.ln_mlp = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, mlp_ratio, dropout, bias)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B = h.shape[0]
        x = rearrange(h, "b c t d -> (b c) t d")
        x = x + self.time_attn(self.ln_time(x), cache=cache)
        x = rearrange(x, "(b c) t d -> (b t) c d", b=B)
        x = x + self.chan_attn(self.ln_chan(x))
        x = x + self.mlp(self.ln_mlp(x))
        return rearrange(x, "(b t) c d -> b c t d", b=B)


@register_model(
    "STGPT2MEG",
    input_kind="tokens",
    causal=True,
    capabilities=(TokenGenerator,),
    tiny_config={"num_channels": 3, "vocab_size": 16, "n_positions": 16, "d_model": 16,
                 "n_layers": 2, "n_heads": 2},
    output_time_dim=-2,
    default_loss="CrossEntropy",
    config_class=STGPT2MEGConfig,
)
class STGPT2MEG(nn.Module):
    """Spatio-temporal GPT with channel mixing: ``(B, C, T)`` int64 → logits ``(B, C, T, V)``."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = STGPT2MEGConfig(**config)
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.pos_emb = nn.Embedding(cfg.n_positions, D)
        self.ch_emb = nn.Embedding(cfg.num_channels, D)
        self.subject_emb = OptionalEmbedding(cfg.n_subjects, D, "subject")
        self.condition_emb = OptionalEmbedding(cfg.n_conditions, D, "condition")
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            SpatioTemporalBlock(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.bias,
                                cfg.layer_norm_eps) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        # three residual branches per block
        init_gpt_weights(self, int(1.5 * cfg.n_layers) or 1)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight

    def _labels(self, B: int, subject, condition) -> torch.Tensor | None:
        """Sum of the optional per-example embeddings, ``(B, 1, 1, D)`` or None."""
        embs = [e for e in (self.subject_emb(subject, B), self.condition_emb(condition, B))
                if e is not None]
        return sum(embs)[:, None, None, :] if embs else None

    def _embed(self, x: torch.Tensor, start: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Tokens ``(B, C, T)`` at positions ``start..start+T-1`` → ``(B, C, T, D)``."""
        T = x.shape[-1]
        h = self.tok_emb(x) + self.pos_emb.weight[start:start + T] + self.ch_emb.weight[:, None]
        if labels is not None:
            h = h + labels
        return self.drop(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(h))  # (B, C, T, V)

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
        for block in self.blocks:
            h = block(h)
        return ModelOutput(self._logits(h))

    def example_inputs(self, batch_size: int = 2, seq_len: int | None = None) -> torch.Tensor:
        """Random tokens ``(batch_size, C, seq_len)`` (default ``min(n_positions, 32)`` steps)."""
        cfg = self.config
        T = seq_len or min(cfg.n_positions, 32)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.num_channels, T), generator=g)
        return x.to(self.tok_emb.weight.device)

    @torch.no_grad()
    def generate(self, context: torch.Tensor, steps: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, subject: torch.Tensor | None = None,
                 condition: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
        """Sample ``steps`` new time steps (all channels jointly) after ``context (B, C, T0)``.

        Same arguments and window rule as :meth:`ephys_gpt.models.gpt2meg.GPT2MEG.generate`;
        returns int64 ``(B, C, T0 + steps)``.
        """
        cfg = self.config
        check_token_context(context, cfg.num_channels, "STGPT2MEG")
        labels = self._labels(context.shape[0], subject, condition)
        caches = [KVCache(cfg.n_positions) for _ in self.blocks]
        pos = [0]

        def prime(window: torch.Tensor, cached: bool) -> torch.Tensor:
            h = self._embed(window, 0, labels)
            for block, cache in zip(self.blocks, caches):
                if cached:
                    cache.reset()
                h = block(h, cache=cache if cached else None)
            pos[0] = window.shape[-1]
            return self._logits(h[:, :, -1])

        def step(tok: torch.Tensor) -> torch.Tensor:
            h = self._embed(tok[..., None], pos[0], labels)
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache=cache)
            pos[0] += 1
            return self._logits(h[:, :, -1])

        return generate_tokens(context, steps, prime=prime, step=step, use_cache=use_cache,
                               window=cfg.n_positions, stride=cfg.stride,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator, progress=progress, desc="STGPT2MEG")

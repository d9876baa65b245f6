"""GPT2MEG: a channel-wise GPT-2 over mu-law tokens.

Every channel is its own token sequence (channels are folded into the batch), read by one
shared causal transformer; channels differ only through a learned per-channel embedding
(and optional subject / condition embeddings). The model predicts token ``t+1`` of each
channel from tokens ``<= t`` of the same channel.

Idea: GPT-2 (Radford et al., 2019) applied to quantized MEG as in Csaky et al.,
"Foundational GPT model for MEG" (2024).

Legend: B batch, C channels, T time, V vocabulary (mu-law levels), D width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from einops import rearrange
from torch import nn

from ephys_gpt.layers.attention import KVCache, TransformerBlock, init_gpt_weights
from ephys_gpt.layers.embeddings import OptionalEmbedding
from ephys_gpt.layers.generation import check_token_context, generate_tokens
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model


@dataclass
class GPT2MEGConfig:
    """GPT2MEG hyper-parameters (defaults: the SPEC-sized model)."""

    num_channels: int = 272      # C, sensors; each gets a learned channel embedding
    vocab_size: int = 256        # V, mu-law levels (2**n_bits)
    n_positions: int = 400       # longest context (learned positions); longer sequences slide
    d_model: int = 128           # D, transformer width
    n_layers: int = 8            # transformer blocks
    n_heads: int = 4             # attention heads (d_model divisible by n_heads)
    mlp_ratio: int = 4           # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0         # embedding / attention / residual dropout
    bias: bool = True            # biases in linear layers
    tie_weights: bool = True     # output head shares the token embedding matrix
    n_subjects: int = 0          # > 0: add a subject embedding (forward(..., subject=ids))
    n_conditions: int = 0        # > 0: add a condition embedding (forward(..., condition=ids))
    slide_stride: int | None = None  # generation past n_positions: window jumps by this many
    # tokens (None: max(1, n_positions // 4)); see ephys_gpt.layers.generation
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        name = type(self).__name__
        for key in ("num_channels", "vocab_size", "n_positions", "d_model", "n_layers",
                    "n_heads", "mlp_ratio"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"{name}: d_model ({self.d_model}) must be divisible by "
                             f"n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1), got {self.dropout}")
        if self.n_subjects < 0 or self.n_conditions < 0:
            raise ValueError(f"{name}: n_subjects and n_conditions must be >= 0")
        if self.slide_stride is not None and not 1 <= self.slide_stride <= self.n_positions:
            raise ValueError(f"{name}: slide_stride must be None or in [1, n_positions="
                             f"{self.n_positions}], got {self.slide_stride}")

    @property
    def stride(self) -> int:
        return self.slide_stride or max(1, self.n_positions // 4)


def check_tokens(x: torch.Tensor, num_channels: int, n_positions: int | None, name: str) -> None:
    """Shape/dtype check of a token batch (no host sync: token values are not inspected)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.long or x.dim() != 3:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} expects int64 tokens (B, C, T), got {got}")
    if x.shape[1] != num_channels:
        raise ValueError(f"{name} was built for num_channels={num_channels}, got tokens with "
                         f"{x.shape[1]} channels (shape {tuple(x.shape)})")
    if n_positions is not None and x.shape[2] > n_positions:
        raise ValueError(f"{name}: sequence length {x.shape[2]} exceeds n_positions="
                         f"{n_positions}; use shorter windows or a larger n_positions")


@register_model(
    "GPT2MEG",
    input_kind="tokens",
    causal=True,
    capabilities=(TokenGenerator,),
    tiny_config={"num_channels": 3, "vocab_size": 16, "n_positions": 16, "d_model": 16,
                 "n_layers": 2, "n_heads": 2},
    output_time_dim=-2,
    default_loss="CrossEntropy",
    config_class=GPT2MEGConfig,
)
class GPT2MEG(nn.Module):
    """Channel-wise GPT-2 over mu-law tokens: ``(B, C, T)`` int64 → logits ``(B, C, T, V)``."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = GPT2MEGConfig(**config)
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.pos_emb = nn.Embedding(cfg.n_positions, D)
        self.ch_emb = nn.Embedding(cfg.num_channels, D)
        self.subject_emb = OptionalEmbedding(cfg.n_subjects, D, "subject")
        self.condition_emb = OptionalEmbedding(cfg.n_conditions, D, "condition")
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(D, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.bias,
                             cfg.layer_norm_eps) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        init_gpt_weights(self, cfg.n_layers)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight

    # -- pieces shared by forward and generate ------------------------------------------------

    def _labels(self, B: int, subject, condition) -> torch.Tensor | None:
        """Sum of the optional per-example embeddings, ``(B, 1, 1, D)`` or None."""
        embs = [e for e in (self.subject_emb(subject, B), self.condition_emb(condition, B))
                if e is not None]
        return sum(embs)[:, None, None, :] if embs else None

    def _embed(self, x: torch.Tensor, start: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Tokens ``(B, C, T)`` at positions ``start..start+T-1`` → ``(B·C, T, D)``."""
        T = x.shape[-1]
        h = self.tok_emb(x)  # (B, C, T, D)
        h = h + self.pos_emb.weight[start:start + T] + self.ch_emb.weight[:, None, :]
        if labels is not None:
            h = h + labels
        return rearrange(self.drop(h), "b c t d -> (b c) t d")

    def _logits(self, h: torch.Tensor, B: int) -> torch.Tensor:
        """Hidden ``(B·C, T, D)`` → logits ``(B, C, T, V)``."""
        return rearrange(self.head(self.ln_f(h)), "(b c) t v -> b c t v", b=B)

    # -- public API -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, subject: torch.Tensor | None = None,
                condition: torch.Tensor | None = None) -> ModelOutput:
        """Next-token logits.

        Parameters
        ----------
        x : int64 (B, C, T), tokens in ``[0, V)``, ``T <= n_positions``.
        subject, condition : int64 (B,) or None; required iff built with ``n_subjects`` /
            ``n_conditions`` > 0.

        Returns
        -------
        ModelOutput whose ``prediction`` is the logits (B, C, T, V); ``logits[:, :, t]``
        predicts ``x[:, :, t+1]``.
        """
        cfg = self.config
        check_tokens(x, cfg.num_channels, cfg.n_positions, "GPT2MEG")
        B = x.shape[0]
        h = self._embed(x, 0, self._labels(B, subject, condition))
        for block in self.blocks:
            h = block(h)
        return ModelOutput(self._logits(h, B))

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
        """Sample ``steps`` new tokens per channel after ``context``.

        Parameters
        ----------
        context : int64 (B, C, T0)
        steps : number of new time steps.
        temperature, top_k, top_p, generator : see :func:`ephys_gpt.layers.sampling.sample_logits`
            (``temperature=0``: greedy).
        use_cache : decode with per-layer KV caches (each step attends over the cache: O(T)
            per step) instead of re-running the window.
        subject, condition : int64 (B,), as in :meth:`forward`.

        Returns
        -------
        int64 (B, C, T0 + steps): the context followed by the generated tokens. Past
        ``n_positions`` tokens the context window slides by ``slide_stride`` (identically
        with and without the cache).
        """
        cfg = self.config
        check_token_context(context, cfg.num_channels, "GPT2MEG")
        B = context.shape[0]
        prime, step = self.incremental_decoder(B, subject=subject, condition=condition)
        return generate_tokens(context, steps, prime=prime, step=step, use_cache=use_cache,
                               window=cfg.n_positions, stride=cfg.stride,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator, progress=progress, desc="GPT2MEG")

    def incremental_decoder(self, batch_size: int, subject: torch.Tensor | None = None,
                            condition: torch.Tensor | None = None):
        """The KV-cached decoder :meth:`generate` runs on, for callers that drive decoding
        themselves (benchmarks, custom samplers).

        Returns ``(prime, step)``: ``prime(window (B, C, L), use_cache) -> logits (B, C, V)``
        for the last step of ``window`` (``L <= n_positions``; with ``use_cache`` the per-layer
        caches are reset and filled with ``window`` at positions ``0..L-1``), and
        ``step(tokens (B, C)) -> logits (B, C, V)``, which appends one step to the caches.
        """
        cfg = self.config
        labels = self._labels(batch_size, subject, condition)
        caches = [KVCache(cfg.n_positions) for _ in self.blocks]
        pos = [0]

        def prime(window: torch.Tensor, cached: bool) -> torch.Tensor:
            h = self._embed(window, 0, labels)
            for block, cache in zip(self.blocks, caches):
                if cached:
                    cache.reset()
                h = block(h, cache=cache if cached else None)
            pos[0] = window.shape[-1]
            return self._logits(h[:, -1:], batch_size)[:, :, 0]

        def step(tok: torch.Tensor) -> torch.Tensor:
            if pos[0] >= cfg.n_positions:
                raise ValueError(f"GPT2MEG decoder: the cache is full (n_positions="
                                 f"{cfg.n_positions}); prime a shorter window first")
            h = self._embed(tok[..., None], pos[0], labels)
            for block, cache in zip(self.blocks, caches):
                h = block(h, cache=cache)
            pos[0] += 1
            return self._logits(h, batch_size)[:, :, 0]

        return prime, step

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

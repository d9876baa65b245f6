"""GPT2MEG: a channel-wise GPT-2 over mu-law tokens.

Every channel is its own token sequence (channels are folded into the batch), read by one
shared causal transformer; channels differ only through a learned per-channel embedding
(and optional subject / condition embeddings). The model predicts token ``t+1`` of each
channel from tokens ``<= t`` of the same channel.

Idea: GPT-2 (Radford et al., 2019) applied to quantized MEG as in Csaky et al.,
"Foundational GPT model for MEG" (2024).

Optional linear forecast (``linear_order: p``, ``linear_fit: true``): a VAR(p) over all
channels, fitted on the training split before the first step and held fixed, adds its
forecast's token log-probabilities to the logits (:mod:`ephys_gpt.models.token_var`); the
transformer then learns what the VAR does not predict. It is the one place where channels
meet in GPT2MEG.

Legend: B batch, C channels, T time, V vocabulary (mu-law levels), D width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from einops import rearrange
from torch import nn

from ephys_gpt.layers.attention import (
    ACTIVATIONS,
    KVCache,
    TransformerBlock,
    autocast_dtype,
    check_kv_heads,
    init_gpt_weights,
)
from ephys_gpt.layers.causal_conv import CausalConv1d, ConvState
from ephys_gpt.layers.embeddings import OptionalEmbedding
from ephys_gpt.layers.generation import check_token_context, generate_tokens
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.linear_path import check_linear_config
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model
from ephys_gpt.models.token_var import TokenVARForecast, TokenVARStream


@dataclass
class GPT2MEGConfig:
    """GPT2MEG hyper-parameters (defaults: the SPEC-sized model)."""

    num_channels: int = 272      # C, sensors; each gets a learned channel embedding
    vocab_size: int = 256        # V, mu-law levels (2**n_bits)
    n_positions: int = 400       # longest context (learned positions); longer sequences slide
    d_model: int = 128           # D, transformer width
    n_layers: int = 8            # transformer blocks
    n_heads: int = 4             # attention heads (d_model divisible by n_heads)
    kv_heads: int | None = None  # key/value heads of the time attention, dividing n_heads
    # (None: n_heads). Fewer (grouped-query attention; 1: multi-query) shrink the KV cache a
    # decode step reads by kv_heads / n_heads (docs/models.md, "Generation speed")
    mlp_ratio: int = 4           # MLP hidden width = mlp_ratio * d_model
    dropout: float = 0.0         # embedding / attention / residual dropout
    bias: bool = True            # biases in linear layers
    tie_weights: bool = True     # output head shares the token embedding matrix
    n_subjects: int = 0          # > 0: add a subject embedding (forward(..., subject=ids))
    n_conditions: int = 0        # > 0: add a condition embedding (forward(..., condition=ids))
    slide_stride: int | None = None  # generation past n_positions: window jumps by this many
    # tokens (None: max(1, n_positions // 4)); see ephys_gpt.layers.generation
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # MLP: "gelu_tanh" (GPT-2's approximation) or "gelu" (exact;
    # ~3x cheaper on CPUs, used by the example configs)
    time_conv: int = 0           # > 0: kernel (samples) of a causal depthwise convolution over
    # each channel's embeddings, mixed by a zero-initialized linear map and added before the
    # blocks, so every position holds its recent history; 0: none (models trained before it)
    linear_order: int = 0        # p > 0: add a fitted VAR(p)'s forecast over all channels, as
    # token log-probabilities, to the logits (ephys_gpt/models/token_var.py); needs
    # linear_fit and p <= n_positions (the VAR reads the model's window)
    linear_fit: bool = False     # true: that VAR is a ridge fit on the training split, set
    # before the first step and held fixed (saved with the weights)
    linear_select: bool = False  # true: linear_order is the largest order; the fit takes the
    # order with the smallest 1-step error on the validation split (the higher lags zero)

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
        check_kv_heads(self.n_heads, self.kv_heads, name)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {sorted(ACTIVATIONS)}, got "
                             f"{self.activation!r}")
        if isinstance(self.time_conv, bool) or not isinstance(self.time_conv, int) or \
                self.time_conv < 0:
            raise ValueError(f"{name}: time_conv must be an integer >= 0 (0: none), got "
                             f"{self.time_conv!r}")
        check_linear_config(name, self.linear_order, self.linear_fit, fit_required=True,
                            select=self.linear_select)
        if self.linear_order > self.n_positions:
            raise ValueError(f"{name}: linear_order ({self.linear_order}) must be <= "
                             f"n_positions ({self.n_positions}): the VAR reads the model's "
                             "window")
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


class ChannelTokenTransformer(TokenVARForecast, nn.Module):
    """What GPT2MEG and STGPT2MEG share: the token / position / channel / label embeddings
    ``(B, C, T, D)`` (with ``time_conv``, plus a causal convolution of them over time), the
    final LayerNorm and (tied) head, ``example_inputs``, and the KV-cached decoding behind
    ``generate`` / ``incremental_decoder``.

    Why ``time_conv``: attention mixes past positions with non-negative weights that sum to
    one, so a signed linear filter over the last samples (what a per-channel AR(p) is, and
    what most of the next sample's predictability on MEG-like data is) takes many heads and
    many steps to learn from learned absolute positions. A depthwise causal convolution
    (``time_conv`` taps per feature) followed by a linear map holds such filters directly;
    it starts at zero, so the model starts as the plain transformer.

    With ``linear_order`` (and ``linear_fit``) a VAR over all channels, fitted on the
    training split, adds its forecast to the logits as token log-probabilities
    (:class:`~ephys_gpt.models.token_var.TokenVARForecast`); decoding streams it
    (:class:`~ephys_gpt.models.token_var.TokenVARStream`).

    A subclass builds its blocks (``make_block() -> nn.Module``) and runs them in
    :meth:`_blocks` on hidden states ``(B, C, T, D)``, with one :class:`KVCache` per block.
    ``init_layers``: the depth used to scale the residual projections at initialisation.
    """

    def __init__(self, cfg: GPT2MEGConfig, make_block, init_layers: int):
        super().__init__()
        self.config = cfg
        D = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, D)
        self.pos_emb = nn.Embedding(cfg.n_positions, D)
        self.ch_emb = nn.Embedding(cfg.num_channels, D)
        self.subject_emb = OptionalEmbedding(cfg.n_subjects, D, "subject")
        self.condition_emb = OptionalEmbedding(cfg.n_conditions, D, "condition")
        self.drop = nn.Dropout(cfg.dropout)
        self.time_conv = self.time_mix = None
        if cfg.time_conv:
            self.time_conv = CausalConv1d(D, D, cfg.time_conv, groups=D)
            self.time_mix = nn.Linear(D, D)
        self.blocks = nn.ModuleList(make_block() for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        init_gpt_weights(self, init_layers)
        if self.time_mix is not None:
            nn.init.zeros_(self.time_mix.weight)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        if cfg.linear_order:
            self._init_token_var()

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _blocks(self, h: torch.Tensor, caches: list[KVCache] | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``(B, C, T, D)`` through the blocks (with ``caches``: the T newest
        steps; ``position``: a static cache's slot of a single step)."""
        raise NotImplementedError

    def _labels(self, B: int, subject, condition) -> torch.Tensor | None:
        """Sum of the optional per-example embeddings, ``(B, 1, 1, D)`` or None."""
        embs = [e for e in (self.subject_emb(subject, B), self.condition_emb(condition, B))
                if e is not None]
        return sum(embs)[:, None, None, :] if embs else None

    def _embed(self, x: torch.Tensor, start, labels: torch.Tensor | None,
               conv_state: ConvState | None = None) -> torch.Tensor:
        """Tokens ``(B, C, T)`` at positions ``start..start+T-1`` → ``(B, C, T, D)``
        (``start``: an int, or a 0-d tensor for a single step). The embeddings are summed in
        fp32. ``conv_state``: the ``time_conv`` stream the tokens continue (decoding);
        None: the window starts the stream (zeros before it)."""
        B, _, T = x.shape
        pos = (self.pos_emb.weight[start:start + T] if isinstance(start, int)
               else self.pos_emb(start.view(1)))
        h = self.tok_emb(x) + pos + self.ch_emb.weight[:, None, :]
        if labels is not None:
            h = h + labels
        if self.time_conv is not None:
            seq = rearrange(h, "b c t d -> (b c) d t")
            conv = rearrange(self.time_conv(seq, conv_state), "(b c) d t -> b c t d", b=B)
            h = h + self.time_mix(conv).to(h.dtype)
        low = autocast_dtype(h.device.type)
        if low is not None:
            # Under autocast the residual stream is held in the autocast dtype (bf16), as in
            # Megatron-LM: blocks then pass bf16 activations without a cast per matmul.
            h = h.to(low)
        return self.drop(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden ``(B, C, T, D)`` → logits ``(B, C, T, V)``."""
        return self.head(self.ln_f(h))

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
        """Sample ``steps`` new time steps after ``context``.

        Parameters
        ----------
        context : int64 (B, C, T0)
        steps : number of new time steps.
        temperature, top_k, top_p, generator : see :func:`ephys_gpt.layers.sampling.sample_logits`
            (``temperature=0``: greedy).
        use_cache : decode with per-layer KV caches (each step attends over the cache: O(T)
            per step) instead of re-running the window.
        subject, condition : int64 (B,), as in ``forward``.

        Returns
        -------
        int64 (B, C, T0 + steps): the context followed by the generated tokens. Past
        ``n_positions`` tokens the context window slides by ``slide_stride`` (identically
        with and without the cache).
        """
        cfg = self.config
        check_token_context(context, cfg.num_channels, self._name)
        prime, step = self.incremental_decoder(context.shape[0], subject=subject,
                                               condition=condition)
        return generate_tokens(context, steps, prime=prime, step=step, use_cache=use_cache,
                               window=cfg.n_positions, stride=cfg.stride,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator,
                               uniforms=self.linear_uniforms(context.shape[0]),
                               progress=progress, desc=self._name)

    def incremental_decoder(self, batch_size: int, subject: torch.Tensor | None = None,
                            condition: torch.Tensor | None = None, *, compile: bool = False):
        """The KV-cached decoder :meth:`generate` runs on, for callers that drive decoding
        themselves (benchmarks, custom samplers).

        Returns ``(prime, step)``: ``prime(window (B, C, L), use_cache) -> logits (B, C, V)``
        for the last step of ``window`` (``L <= n_positions``; with ``use_cache`` the per-layer
        caches are reset and filled with ``window`` at positions ``0..L-1``), and
        ``step(tokens (B, C)) -> logits (B, C, V)``, which appends one step to the caches
        (a ValueError once they hold ``n_positions`` steps).

        ``compile``: run each step as one ``torch.compile``-d graph of fixed shapes (the
        caches attend over their whole buffer with a length mask), compiled on the first
        step; on CUDA it is captured as a CUDA graph (``mode="reduce-overhead"``), which
        removes the per-kernel launch cost that dominates small decode steps there. On the
        CPU it does not pay (the step is bound by reading the KV cache; measured with
        ``bench/generate.py --compile``), and the first step takes the compile time.
        """
        cfg = self.config
        if compile and self.time_conv is not None:
            raise ValueError(f"{self._name}: incremental_decoder(compile=True) does not support "
                             f"time_conv={cfg.time_conv} (its streaming state advances on the "
                             "host); decode with compile=False")
        labels = self._labels(batch_size, subject, condition)
        caches = [KVCache(cfg.n_positions, static=compile) for _ in self.blocks]
        state = {"pos": 0, "fn": None, "conv": None, "var": None}

        def prime(window: torch.Tensor, cached: bool) -> torch.Tensor:
            if cached and self.time_conv is not None:
                state["conv"] = self.time_conv.new_state()
            h = self._embed(window, 0, labels, state["conv"] if cached else None)
            if cached:
                for cache in caches:
                    cache.reset()
            h = self._blocks(h, caches if cached else None)
            state["pos"] = window.shape[-1]
            if cached and cfg.linear_order:
                state["var"] = TokenVARStream(self, window)
            return self.with_linear_forecast(self._logits(h[:, :, -1:]), window, True)[:, :, 0]

        def one_step(tok: torch.Tensor, position) -> torch.Tensor:
            h = self._embed(tok[..., None], position, labels, state["conv"])
            h = self._blocks(h, caches, position if compile else None)
            return self._logits(h)[:, :, 0]

        def step(tok: torch.Tensor) -> torch.Tensor:
            if state["pos"] >= cfg.n_positions:
                raise ValueError(f"{self._name} decoder: the cache is full (n_positions="
                                 f"{cfg.n_positions}); prime a shorter window first")
            if compile:
                if state["fn"] is None:
                    mode = "reduce-overhead" if tok.device.type == "cuda" else None
                    state["fn"] = torch.compile(one_step, mode=mode, dynamic=False)
                    state["position"] = torch.zeros((), dtype=torch.long, device=tok.device)
                position = state["position"].fill_(state["pos"])  # no host-device sync
                logits = state["fn"](tok, position)
                for cache in caches:
                    cache.length = state["pos"] + 1
            else:
                logits = one_step(tok, state["pos"])
            state["pos"] += 1
            return logits if state["var"] is None else logits + state["var"].step(tok)

        return prime, step

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())


def channel_token_registration() -> dict:
    """The registry entry every :class:`ChannelTokenTransformer` shares (the same inputs,
    outputs, capability, loss and tiny config); a subclass adds its name and config class."""
    return {"input_kind": "tokens", "causal": True, "capabilities": (TokenGenerator,),
            "tiny_config": {"num_channels": 3, "vocab_size": 16, "n_positions": 16,
                            "d_model": 16, "n_layers": 2, "n_heads": 2, "time_conv": 3},
            "output_time_dim": -2, "default_loss": "CrossEntropy"}


@register_model("GPT2MEG", config_class=GPT2MEGConfig, **channel_token_registration())
class GPT2MEG(ChannelTokenTransformer):
    """Channel-wise GPT-2 over mu-law tokens: ``(B, C, T)`` int64 → logits ``(B, C, T, V)``."""

    def __init__(self, **config):
        cfg = GPT2MEGConfig(**config)
        super().__init__(cfg, lambda: TransformerBlock(
            cfg.d_model, cfg.n_heads, cfg.mlp_ratio, cfg.dropout, cfg.bias, cfg.layer_norm_eps,
            activation=cfg.activation, kv_heads=cfg.kv_heads), cfg.n_layers)

    def _blocks(self, h: torch.Tensor, caches: list[KVCache] | None = None,
                position: torch.Tensor | None = None) -> torch.Tensor:
        B = h.shape[0]
        x = rearrange(h, "b c t d -> (b c) t d")  # every channel is its own sequence
        for i, block in enumerate(self.blocks):
            x = block(x, cache=None if caches is None else caches[i], position=position)
        return rearrange(x, "(b c) t d -> b c t d", b=B)

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
        h = self._embed(x, 0, self._labels(x.shape[0], subject, condition))
        return ModelOutput(self.with_linear_forecast(self._logits(self._blocks(h)), x))

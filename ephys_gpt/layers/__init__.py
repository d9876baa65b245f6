"""Shared building blocks: attention with a KV cache, causal convolutions with streaming
state, embeddings, sampling and the autoregressive generation loop.

- :mod:`ephys_gpt.layers.attention`: the one attention stack: ``attention`` (SDPA, or tiled
  batched matmuls for CPU training), ``KVCache``, ``MultiHeadSelfAttention``, ``MLP``,
  ``TransformerBlock``, ``TransformerStack`` (rotary), ``init_gpt_weights``.
- :mod:`ephys_gpt.layers.rotary`: ``RotaryEmbedding`` (one or several axes), ``apply_rotary``.
- :mod:`ephys_gpt.layers.axial`: ``AxialTransformerBlock`` (causal time attention + attention
  along each spatial axis of a grid), ``axial_rope``.
- :mod:`ephys_gpt.layers.causal_conv`: ``CausalConv1d``, ``ConvState``.
- :mod:`ephys_gpt.layers.embeddings`: ``ChannelwiseTokenEmbedding``, ``OptionalEmbedding``.
- :mod:`ephys_gpt.layers.sampling`: ``sample_logits``, ``filter_logits``.
- :mod:`ephys_gpt.layers.generation`: ``generate_tokens`` (cached / uncached, sliding window).
"""

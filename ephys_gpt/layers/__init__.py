"""Shared building blocks: attention with a KV cache, causal convolutions with streaming
state, embeddings, sampling and the autoregressive generation loop.

- :mod:`ephys_gpt.layers.attention`: ``KVCache``, ``MultiHeadSelfAttention``, ``MLP``,
  ``TransformerBlock``, ``init_gpt_weights``.
- :mod:`ephys_gpt.layers.causal_conv`: ``CausalConv1d``, ``ConvState``.
- :mod:`ephys_gpt.layers.embeddings`: ``ChannelwiseTokenEmbedding``, ``OptionalEmbedding``.
- :mod:`ephys_gpt.layers.sampling`: ``sample_logits``, ``filter_logits``.
- :mod:`ephys_gpt.layers.generation`: ``generate_tokens`` (cached / uncached, sliding window).
"""

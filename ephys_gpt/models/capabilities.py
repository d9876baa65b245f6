"""What a model can do, as small typed interfaces.

A model declares its capabilities when it registers
(``@register_model(..., capabilities=(TokenGenerator,))``); the registry checks at
registration that the class has the methods each one requires, and the CLI, the config
validator, the eval runners and the contract tests dispatch on them
(``spec.can(TokenGenerator)``) instead of inspecting the model.

Legend: B batch, C channels, T time, V vocabulary, K codebook size, H x W image.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch


class Capability(Protocol):
    """Base of the capability interfaces; ``methods`` lists what a class must define."""

    methods: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""


@runtime_checkable
class TokenGenerator(Capability, Protocol):
    """Autoregressive sampling of integer tokens after a context.

    ``generate(context, steps, *, temperature=1.0, top_k=None, top_p=None, use_cache=True,
    generator=None, progress=False)``: ``context`` int64 ``(B, C, T0)`` (or the model's input
    layout) → the same dtype and layout with ``steps`` new time steps appended (the context
    unchanged); a prior over a tokenizer's codes takes and returns sensor images ``(B, H, W,
    T0)`` and samples the codes in between. ``temperature=0`` is greedy. ``use_cache``
    reuses state (KV cache, streaming buffers) so a step costs O(context); cached and
    uncached greedy decoding give the same tokens.
    """

    methods: ClassVar[tuple[str, ...]] = ("generate",)
    description: ClassVar[str] = "token generation"

    def generate(self, context: torch.Tensor, steps: int, **sampling) -> torch.Tensor: ...


@runtime_checkable
class Forecaster(Capability, Protocol):
    """Continuous forecasting: ``forecast(past (B, C, T0), horizon, *, use_cache=True,
    **options) -> (B, C, T0 + horizon)`` (the past followed by the forecast)."""

    methods: ClassVar[tuple[str, ...]] = ("forecast",)
    description: ClassVar[str] = "continuous forecasting"

    def forecast(self, past: torch.Tensor, horizon: int, **options) -> torch.Tensor: ...


@runtime_checkable
class Tokenizer(Capability, Protocol):
    """Discrete codes of a signal and back.

    ``encode(x) -> codes`` (int64, values in ``[0, codebook_size)``) and
    ``decode(codes) -> x_hat`` with ``x``'s shape; ``codebook_size`` is K.
    """

    methods: ClassVar[tuple[str, ...]] = ("encode", "decode")
    description: ClassVar[str] = "tokenizer (encode/decode)"
    codebook_size: int

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Capability, Protocol):
    """Unconditional sampling: ``sample(batch_size, length=None, **options)`` returns new
    signals shaped like the model's inputs (``(B, C, L)`` for continuous models)."""

    methods: ClassVar[tuple[str, ...]] = ("sample",)
    description: ClassVar[str] = "unconditional sampling"

    def sample(self, batch_size: int, length: int | None = None, **options) -> torch.Tensor: ...


@runtime_checkable
class DensityModel(Capability, Protocol):
    """An exact likelihood and sampling.

    ``log_likelihood(x) -> (B,)`` in nats per example (higher is better; the docstring of the
    model states the data units it applies to); ``sample(n, **options)`` returns ``n`` draws
    shaped like the model's inputs.
    """

    methods: ClassVar[tuple[str, ...]] = ("log_likelihood", "sample")
    description: ClassVar[str] = "density model (log-likelihood, sampling)"

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor: ...

    def sample(self, n: int, **options) -> torch.Tensor: ...


@runtime_checkable
class Classifier(Capability, Protocol):
    """Class logits ``(B, num_classes)`` from ``forward`` (``prediction``)."""

    methods: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = "classification"


CAPABILITIES: tuple[type, ...] = (TokenGenerator, Forecaster, Sampler, Tokenizer,
                                  DensityModel, Classifier)


def missing_methods(cls: type, capability: type) -> list[str]:
    """Methods ``capability`` requires that ``cls`` does not define (checked at registration)."""
    return [m for m in capability.methods if not callable(getattr(cls, m, None))]

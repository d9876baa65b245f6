"""The one registry of models and losses (DESIGN.md, contract 3).

The CLI, the config validator, ``ephys-gpt list-models``, the docs and the contract tests all
read from here. A model family registers itself where it is defined::

    @register_model(
        "GPT2MEG",
        input_kind="tokens",          # a dataset kind from INPUT_KINDS
        causal=True,                  # no output at time t depends on inputs after t
        generation="tokens",          # "tokens": generate(); "continuous": forecast(); None
        tiny_config={"num_channels": 4, "vocab_size": 16, ...},
        output_time_dim=-2,           # time axis of the (main) output, for the causality test
        default_loss="CrossEntropy",
        config_class=GPT2MEGConfig,   # dataclass: the model's keyword arguments
    )
    class GPT2MEG(nn.Module): ...

Model contract (every registered class):

- ``__init__(**model_config)``: plain values only; never reads files or global state.
- ``forward(inputs)``: ``inputs`` as the dataset of ``input_kind`` yields it (a tensor, or a
  tuple of tensors unpacked as positional arguments).
- ``example_inputs(batch_size=2, seq_len=None)``: a valid batch for this configuration.
- autoregressive models: ``generate(context, steps, *, temperature=1.0, top_k=None,
  top_p=None, use_cache=True, generator=None)`` for tokens, or ``forecast(past, horizon, *,
  use_cache=True)`` for continuous models. Both return the context followed by the new
  steps along the time axis; ``temperature=0`` is greedy decoding.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INPUT_KINDS = {
    "tokens": "int64 (B, C, T) mu-law tokens; targets shifted one step",
    "continuous": "float32 (B, C, T)",
    "continuous_meta": "(x float32 (B, C, T), pos_2d float32 (B, C, 2), ch_type int64 (B, C))",
    "image": "float32 (B, H, W, T) sensor images",
    "image_tokens": "int64 (B, H, W, T) sensor-image tokens",
    "labelled": "float32 (B, C, T) (or int64 tokens) with an int64 (B,) class label target",
}

# Modules that define registered models/losses. Importing them fills the registries; a module
# that fails to import (a missing optional dependency) is reported, never hidden.
_MODEL_MODULES = [
    "ephys_gpt.models.gpt2meg",
    "ephys_gpt.models.stgpt2meg",
    "ephys_gpt.models.cnn_baselines",
    "ephys_gpt.models.wavenet",
    "ephys_gpt.models.bendr",
    "ephys_gpt.models.ntd",
    "ephys_gpt.models.cnnlstm",
]
_LOSS_MODULES = ["ephys_gpt.losses.basic", "ephys_gpt.losses.diffusion"]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model class."""

    name: str
    cls: type
    input_kind: str
    causal: bool
    generation: str | None  # "tokens", "continuous" or None
    tiny_config: dict[str, Any] | None
    output_time_dim: int = -1
    default_loss: str | None = None
    config_class: type | None = None
    description: str = ""

    def config_fields(self) -> set[str] | None:
        """Names of the accepted ``model_config`` keys (None if the class does not declare them)."""
        if self.config_class is None:
            return None
        return {f.name for f in dataclasses.fields(self.config_class)}


@dataclass(frozen=True)
class LossSpec:
    name: str
    cls: type
    description: str = ""
    extra: dict = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {}
LOSSES: dict[str, LossSpec] = {}
_loaded = False


def register_model(name: str, *, input_kind: str, causal: bool, generation: str | None = None,
                   tiny_config: dict[str, Any] | None = None, output_time_dim: int = -1,
                   default_loss: str | None = None, config_class: type | None = None
                   ) -> Callable[[type], type]:
    """Class decorator adding a model to the registry (see the module docstring)."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind {input_kind!r} is not one of {sorted(INPUT_KINDS)}")
    if generation not in (None, "tokens", "continuous"):
        raise ValueError(f"generation must be None, 'tokens' or 'continuous', got {generation!r}")

    def deco(cls: type) -> type:
        if name in MODELS and MODELS[name].cls is not cls:
            raise ValueError(f"model name {name!r} is registered twice "
                             f"({MODELS[name].cls.__module__} and {cls.__module__})")
        doc = (cls.__doc__ or "").strip().splitlines()
        MODELS[name] = ModelSpec(name, cls, input_kind, causal, generation,
                                 dict(tiny_config) if tiny_config is not None else None,
                                 output_time_dim, default_loss, config_class,
                                 doc[0] if doc else "")
        cls.registry_name = name
        return cls

    return deco


def register_loss(name: str, **extra: Any) -> Callable[[type], type]:
    """Class decorator adding a loss (an ``nn.Module`` called as ``loss(outputs, targets)``)."""

    def deco(cls: type) -> type:
        doc = (cls.__doc__ or "").strip().splitlines()
        LOSSES[name] = LossSpec(name, cls, doc[0] if doc else "", extra)
        return cls

    return deco


def load_all() -> None:
    """Import every module that registers models or losses (once)."""
    global _loaded
    if _loaded:
        return
    for mod in _MODEL_MODULES + _LOSS_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name == mod:  # family not written yet in this checkout
                continue
            raise
    _loaded = True


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Valid {kind}s: {', '.join(sorted(valid))}")


def get_model_spec(name: str) -> ModelSpec:
    load_all()
    if name not in MODELS:
        raise _unknown("model_name", name, list(MODELS))
    return MODELS[name]


def get_loss_spec(name: str) -> LossSpec:
    load_all()
    if name not in LOSSES:
        raise _unknown("loss_name", name, list(LOSSES))
    return LOSSES[name]


def build_model(name: str, config: dict[str, Any] | None = None):
    """Instantiate registered model ``name`` with ``config`` (its keyword arguments).

    The model remembers its name and config (``model.registry_name``, ``model.model_config``)
    so it can be exported with :func:`ephys_gpt.models.pretrained.save_pretrained`.
    """
    spec = get_model_spec(name)
    config = dict(config or {})
    allowed = spec.config_fields()
    if allowed is not None:
        unknown = sorted(set(config) - allowed)
        if unknown:
            raise ValueError(f"model_config for {name}: unknown key(s) {unknown}; "
                             f"allowed keys: {sorted(allowed)}")
    model = spec.cls(**config)
    model.model_config = config
    return model


def build_loss(name: str, config: dict[str, Any] | None = None):
    spec = get_loss_spec(name)
    return spec.cls(**(config or {}))


def list_models() -> list[ModelSpec]:
    load_all()
    return [MODELS[k] for k in sorted(MODELS)]


def list_losses() -> list[LossSpec]:
    load_all()
    return [LOSSES[k] for k in sorted(LOSSES)]

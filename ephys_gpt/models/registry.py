"""The registry of models and losses (DESIGN.md, contract 3).

The CLI, the config validator, ``ephys-gpt list-models``, ``docs/models.md`` and the contract
tests all read from here. A model family registers itself in its own file under
``ephys_gpt/models/`` (found automatically, see :mod:`ephys_gpt.registry`)::

    @register_model(
        "GPT2MEG",
        input_kind="tokens",                 # a dataset kind from INPUT_KINDS
        causal=True,                         # no output at time t depends on inputs after t
        capabilities=(TokenGenerator,),      # from ephys_gpt.models.capabilities
        tiny_config={"num_channels": 4, "vocab_size": 16, ...},
        output_time_dim=-2,                  # time axis of the prediction, for the causality test
        default_loss="CrossEntropy",
        config_class=GPT2MEGConfig,          # dataclass: the model's keyword arguments
    )
    class GPT2MEG(nn.Module): ...

Model contract (every registered class):

- ``__init__(**model_config)``: plain values only; never reads files or global state.
- ``forward(*inputs) -> ModelOutput`` (:mod:`ephys_gpt.models.output`): ``inputs`` as the
  dataset of ``input_kind`` yields them (a tensor, or a tuple unpacked as arguments).
- ``example_inputs(batch_size=2, seq_len=None)``: a valid batch for this configuration.
- the methods of each declared capability (:mod:`ephys_gpt.models.capabilities`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ephys_gpt.models.capabilities import CAPABILITIES, missing_methods
from ephys_gpt.registry import Registry

INPUT_KINDS = {
    "tokens": "int64 (B, C, T) mu-law tokens; targets shifted one step",
    "continuous": "float32 (B, C, T)",
    "continuous_meta": "(x float32 (B, C, T), pos_2d float32 (B, C, 2), ch_type int64 (B, C))",
    "image": "float32 (B, H, W, T) sensor images",
    "image_tokens": "int64 (B, H, W, T) sensor-image tokens",
    "labelled": "float32 (B, C, T) (or int64 tokens) with an int64 (B,) class label target",
}

#: Input kinds whose models index sensors: ``model_config.num_channels`` must match the data.
CHANNEL_KINDS = frozenset({"tokens", "continuous", "continuous_meta", "labelled"})
#: Input kinds made of mu-law tokens: ``model_config.vocab_size`` must cover the data's levels.
TOKEN_KINDS = frozenset({"tokens", "image_tokens"})


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model class."""

    name: str
    cls: type
    input_kind: str
    causal: bool
    capabilities: tuple[type, ...]
    tiny_config: dict[str, Any] | None
    output_time_dim: int = -1
    default_loss: str | None = None
    config_class: type | None = None
    description: str = ""

    def can(self, capability: type) -> bool:
        """True if the model declared ``capability`` (e.g. ``TokenGenerator``)."""
        return capability in self.capabilities

    @property
    def capability_names(self) -> list[str]:
        return [c.__name__ for c in self.capabilities]

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


MODELS: Registry[ModelSpec] = Registry("model_name", ["ephys_gpt.models"])
LOSSES: Registry[LossSpec] = Registry("loss_name", ["ephys_gpt.losses"])


def _first_doc_line(cls: type) -> str:
    doc = (cls.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def register_model(name: str, *, input_kind: str, causal: bool,
                   capabilities: tuple[type, ...] = (),
                   tiny_config: dict[str, Any] | None = None, output_time_dim: int = -1,
                   default_loss: str | None = None, config_class: type | None = None
                   ) -> Callable[[type], type]:
    """Class decorator adding a model to the registry (see the module docstring)."""
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind {input_kind!r} is not one of {sorted(INPUT_KINDS)}")
    capabilities = tuple(capabilities)
    for cap in capabilities:
        if cap not in CAPABILITIES:
            raise ValueError(f"model {name}: capability {cap!r} is not one of "
                             f"{[c.__name__ for c in CAPABILITIES]}")

    def deco(cls: type) -> type:
        for cap in capabilities:
            missing = missing_methods(cls, cap)
            if missing:
                raise TypeError(f"model {name} declares {cap.__name__} but {cls.__name__} "
                                f"does not define {missing}")
        spec = ModelSpec(name, cls, input_kind, causal, capabilities,
                         dict(tiny_config) if tiny_config is not None else None,
                         output_time_dim, default_loss, config_class, _first_doc_line(cls))
        MODELS.add(name, spec, owner=cls)
        cls.registry_name = name
        return cls

    return deco


def register_loss(name: str, **extra: Any) -> Callable[[type], type]:
    """Class decorator adding a loss: an ``nn.Module`` called as ``loss(output, targets)``
    with ``output`` a :class:`~ephys_gpt.models.output.ModelOutput`."""

    def deco(cls: type) -> type:
        LOSSES.add(name, LossSpec(name, cls, _first_doc_line(cls), extra), owner=cls)
        return cls

    return deco


def get_model_spec(name: str) -> ModelSpec:
    return MODELS.get(name)


def get_loss_spec(name: str) -> LossSpec:
    return LOSSES.get(name)


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
    return MODELS.values()


def list_losses() -> list[LossSpec]:
    return LOSSES.values()


def models_table_markdown() -> str:
    """The registered models as the Markdown table of ``docs/models.md``."""
    rows = ["| model | input kind | causal | capabilities | default loss | description |",
            "|---|---|---|---|---|---|"]
    for s in list_models():
        caps = ", ".join(c.description for c in s.capabilities) or "-"
        rows.append(f"| `{s.name}` | `{s.input_kind}` | {'yes' if s.causal else 'no'} | {caps} "
                    f"| {s.default_loss or '-'} | {s.description} |")
    return "\n".join(rows)

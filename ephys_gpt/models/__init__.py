"""Model zoo. Every model registers itself in :mod:`ephys_gpt.models.registry`."""

from ephys_gpt.models.registry import (  # noqa: F401
    MODELS,
    build_model,
    get_model_spec,
    list_models,
    register_model,
)

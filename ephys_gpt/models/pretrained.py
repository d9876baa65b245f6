"""Self-describing model export: ``model.safetensors`` + ``config.json``, no pickles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import ephys_gpt
from ephys_gpt.fileio import read_json, write_json_atomic, write_with
from ephys_gpt.models.registry import build_model
from ephys_gpt.registry import import_plugins
from ephys_gpt.validation import first_line

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_pretrained(model: torch.nn.Module, out_dir: str | os.PathLike,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and the config needed to rebuild it to ``out_dir``.

    ``model`` must come from :func:`ephys_gpt.models.registry.build_model` (it carries its
    registry name and config). ``extra`` is stored too (e.g. the stage-2 steps, so tokens can
    be decoded to signal units without the chunk store).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = getattr(model, "registry_name", None)
    if name is None or not hasattr(model, "model_config"):
        raise ValueError("save_pretrained needs a model made by build_model(); "
                         f"{type(model).__name__} has no registry name/config")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # safetensors refuses tensors that share memory (tied weights): store each once.
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for k in list(state):
        ptr = state[k].untyped_storage().data_ptr() if state[k].numel() else None
        if ptr is not None and ptr in seen:
            tied[k] = seen[ptr]
            del state[k]
        elif ptr is not None:
            seen[ptr] = k
    config = {"model_name": name, "model_module": type(model).__module__,
              "model_config": model.model_config, "tied": tied,
              "ephys_gpt_version": ephys_gpt.__version__, **(extra or {})}
    write_with(out / WEIGHTS_NAME,
               lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    write_json_atomic(out / CONFIG_NAME, config)
    return out


def from_pretrained(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save_pretrained` (no unpickling involved).

    A missing file raises FileNotFoundError; a malformed ``config.json``, a truncated or
    foreign ``model.safetensors`` or weights that do not fit the described model raise
    ValueError in one line naming the file.
    """
    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: {path} is not an exported ephys-gpt model "
                                    f"(expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = load_export_config(path)
    import_plugins(_plugin_modules(config), where=str(cfg_path))
    name = config["model_name"]
    try:
        model = build_model(name, config.get("model_config") or {})
    except TypeError as err:  # a model_config key the model does not take
        raise ValueError(f"export config {cfg_path}: model_config does not fit {name}: "
                         f"{first_line(err)}") from None
    try:
        state = load_file(str(w_path), device=str(map_location))
    except Exception as err:  # safetensors' own error type: truncated, random bytes...
        raise ValueError(f"{w_path} is not a readable safetensors file (truncated or damaged; "
                         f"export the model again): {first_line(err)}") from None
    for k, src in config["tied"].items():
        if src not in state:
            raise ValueError(f"export config {cfg_path}: tied weight {k!r} refers to {src!r}, "
                             f"which {w_path} does not hold")
        state[k] = state[src]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys, wrong shapes
        raise ValueError(f"{w_path} does not hold the weights of {name} as {cfg_path} "
                         f"describes it: {first_line(err)}") from None
    model.to(map_location)
    model.eval()
    return model


def _plugin_modules(config: dict) -> list[str]:
    """The module defining an exported model, when it is not one of the toolkit's own (a
    model family registered by the user's code is imported before it is rebuilt)."""
    module = config.get("model_module")
    if isinstance(module, str) and module and not module.startswith("ephys_gpt."):
        return [module]
    return []


def load_export_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of an exported model, checked (errors name the file)."""
    cfg_path = Path(path) / CONFIG_NAME
    config = read_json(cfg_path, "export config")
    if not isinstance(config, dict):
        raise ValueError(f"export config {cfg_path} should hold a JSON object, found "
                         f"{type(config).__name__}")
    if not isinstance(config.get("model_name"), str):
        raise ValueError(f"export config {cfg_path} has no 'model_name' string (found "
                         f"{config.get('model_name')!r})")
    for key in ("model_config", "tied"):
        if config.get(key) is None:
            config[key] = {}
        if not isinstance(config[key], dict):
            raise ValueError(f"export config {cfg_path}: {key!r} should be a JSON object, "
                             f"found {type(config[key]).__name__}")
    return config

"""Load a trained model from an export folder or a Lightning checkpoint, without unpickling.

``load_model(path)`` accepts

- an export folder (``model.safetensors`` + ``config.json``, written by
  :func:`ephys_gpt.models.pretrained.save_pretrained` after training),
- a Lightning ``.ckpt`` written by ephys-gpt's training (read with
  ``torch.load(weights_only=True)``: only tensors and plain values),
- a run's ``save_dir`` (its ``export/`` folder, else ``checkpoints/best.ckpt``, else
  ``checkpoints/last.ckpt``).

It returns ``(model, info)``; ``info`` is what evaluation needs without the chunk store:
``model_name``, ``model_config``, ``sfreq``, ``ch_names``, ``ch_types``, ``pos_2d``,
``steps`` (the stage-2 steps, to decode tokens to signal units) and ``config`` (the training
run's resolved config, when known), plus ``source`` (the file or folder loaded).

Every checkpoint the toolkit reads goes through :func:`read_checkpoint`, which calls
``torch.load`` with an explicit ``weights_only=True``: torch honours it whatever the
environment (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` only changes the default of calls that
leave ``weights_only`` unset, as Lightning's own loader does).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ephys_gpt.models.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    from_pretrained,
    load_export_config,
)
from ephys_gpt.models.registry import build_model
from ephys_gpt.registry import import_plugins
from ephys_gpt.validation import first_line

logger = logging.getLogger(__name__)

#: Keys of ``info`` describing the data the model was trained on.
DATA_KEYS = ("sfreq", "ch_names", "ch_types", "pos_2d", "steps", "dataset_name",
             "window_samples")


def _info(model_name: str, model_config: dict, data: dict, config: dict | None,
          source: Path) -> dict[str, Any]:
    info: dict[str, Any] = {"model_name": model_name, "model_config": dict(model_config)}
    for key in DATA_KEYS:
        info[key] = data.get(key)
    info["config"] = config
    info["source"] = str(source)
    return info


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """A Lightning checkpoint as a dict, read with ``weights_only=True`` (no pickled classes).

    Raises FileNotFoundError for a missing file and ValueError, in one line naming the file,
    for anything else: a checkpoint that needs to unpickle Python objects (refused: that
    could run code), a truncated or foreign file, or one that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        # weights_only=True explicitly: torch then ignores TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (it asks for {found.group(1)!r})" if found else ""
        raise ValueError(f"refusing to load {path}: it is not a weights-only checkpoint{what}; "
                         "unpickling it could run arbitrary code. ephys-gpt only loads "
                         "checkpoints made of tensors and plain values, as it writes "
                         "them") from None
    except Exception as err:  # truncated file, not a torch file...
        raise ValueError(f"{path} is not a readable checkpoint (truncated, or not written by "
                         f"torch.save): {first_line(err)}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint: it holds a "
                         f"{type(ckpt).__name__}, not a mapping of training state")
    return ckpt


def model_state_from_checkpoint(ckpt: dict, path: str | os.PathLike = "checkpoint") -> dict:
    """The wrapped model's ``state_dict`` (``model.`` prefix removed) from a LitModel checkpoint."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{path}: no 'state_dict' in the checkpoint (not a Lightning checkpoint)")
    out = {}
    for k, v in state.items():
        if k.startswith("model._orig_mod."):  # a model compiled with torch.compile(model)
            out[k[len("model._orig_mod."):]] = v
        elif k.startswith("model."):
            out[k[len("model."):]] = v
    if not out:
        raise ValueError(f"{path}: the checkpoint holds no 'model.*' weights (was it written "
                         "by ephys-gpt's LitModel?)")
    return out


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a trained model (in eval mode) and describe its training data.

    Parameters
    ----------
    path : str | PathLike
        Export folder, ``.ckpt`` file, or a run's ``save_dir``.
    map_location : str | torch.device
        Where to put the weights.

    Returns
    -------
    (torch.nn.Module, dict)
        The model and ``info`` (see the module docstring).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected an export folder, a .ckpt "
                                "file, or a run's save_dir)")
    if path.is_dir():
        if (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
            model = from_pretrained(path, map_location=map_location)
            cfg = load_export_config(path)
            return model, _info(cfg["model_name"], cfg.get("model_config") or {}, cfg,
                                cfg.get("config"), path)
        for cand in (path / "export", path / "checkpoints" / "best.ckpt",
                     path / "checkpoints" / "last.ckpt"):
            if cand.exists():
                logger.info("loading %s", cand)
                return load_model(cand, map_location)
        raise FileNotFoundError(f"{path} holds neither {CONFIG_NAME} + {WEIGHTS_NAME} (an export) "
                                "nor export/ or checkpoints/{best,last}.ckpt (a run folder)")
    ckpt = read_checkpoint(path, map_location)
    hp = ckpt.get("hyper_parameters") or {}
    name = hp.get("model_name")
    if not name:
        raise ValueError(f"{path}: no 'model_name' in the checkpoint's hyper_parameters (not "
                         "written by ephys-gpt's LitModel)")
    model_config = dict(hp.get("model_config") or {})
    import_plugins((hp.get("run_config") or {}).get("imports") or [], where=str(path))
    model = build_model(name, model_config)
    try:
        model.load_state_dict(model_state_from_checkpoint(ckpt, path))
    except RuntimeError as err:  # missing/unexpected keys, wrong shapes
        raise ValueError(f"{path}: the weights do not fit {name} with the checkpoint's "
                         f"model_config: {first_line(err)}") from None
    model.to(map_location)
    model.eval()
    return model, _info(name, model_config, hp.get("data_info") or {}, hp.get("run_config"), path)

"""Load a trained model from an export folder or a Lightning checkpoint, without unpickling.

``load_model(path)`` accepts

- an export folder (``model.safetensors`` + ``config.json``, written by
  :func:`ephys_gpt.models.pretrained.save_pretrained` after training),
- a Lightning ``.ckpt`` written by :class:`~ephys_gpt.training.lit_model.LitModel` (read with
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
leave ``weights_only`` unset, as Lightning's own loader does). Lightning itself never opens a
checkpoint here: :class:`SafeCheckpointIO` (the trainer's checkpoint plugin) hands it the
state :func:`read_checkpoint` read and checked, and writes checkpoints atomically with the
user's umask (a full disk is reported as :class:`ephys_gpt.fileio.DiskFullError`).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ephys_gpt.fileio import is_disk_full, write_with
from ephys_gpt.models.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    from_pretrained,
    load_export_config,
)
from ephys_gpt.models.registry import build_model
from ephys_gpt.registry import import_plugins

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
                         f"torch.save): {_first_line(err)}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a Lightning checkpoint: it holds a "
                         f"{type(ckpt).__name__}, not a mapping of training state")
    return ckpt


def check_checkpoint_fits(ckpt: dict, path: str | os.PathLike, lit_module: torch.nn.Module,
                          model_name: str, resume: bool = True) -> None:
    """Refuse, with the differences named, a checkpoint this run cannot load (``resume``:
    cannot continue training from: optimizer and loop state are needed too)."""
    what = "resume_from" if resume else "checkpoint"
    hp = ckpt.get("hyper_parameters") or {}
    if hp.get("model_name") != model_name:
        raise ValueError(f"{what}: {path} was written for model "
                         f"{hp.get('model_name')!r}, this run has {model_name!r}")
    for key in ("state_dict", "optimizer_states", "loops") if resume else ("state_dict",):
        if not isinstance(ckpt.get(key), (dict, list)):
            raise ValueError(f"{what}: {path} holds no {key!r}: it is not a resumable "
                             "Lightning training checkpoint (an export or weights-only file?)")
    state = ckpt["state_dict"]
    own = lit_module.state_dict()
    missing = sorted(k for k in own if k not in state)
    extra = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state and isinstance(state[k], torch.Tensor)
                    and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {missing[:3]})")
        if extra:
            parts.append(f"unexpected {len(extra)} (e.g. {extra[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: "
                         f"{tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} "
                         "now)")
        raise ValueError(f"{what}: the weights in {path} do not fit this run's "
                         f"{model_name} ({'; '.join(parts)}); resume with the model_config "
                         "the checkpoint was trained with")


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin: weights-only loading and atomic, umask-following saves.

    :meth:`remember` hands it a checkpoint already read (and checked) by
    :func:`read_checkpoint`, so ``trainer.fit(ckpt_path=...)`` does not read the file again.
    """

    def __init__(self):
        super().__init__()
        self._remembered: dict[str, dict] = {}

    def remember(self, path: str | os.PathLike, checkpoint: dict) -> None:
        self._remembered[os.path.abspath(path)] = checkpoint

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        ckpt = self._remembered.pop(os.path.abspath(path), None)
        if ckpt is not None:
            return ckpt
        return read_checkpoint(path, map_location=map_location or "cpu")

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                try:
                    torch.save(checkpoint, fh)
                except RuntimeError as err:  # torch hides the OSError of a full disk inside
                    if err.__context__ is not None and is_disk_full(err.__context__):
                        raise err.__context__ from None
                    raise

        write_with(path, save)


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
                         f"model_config: {_first_line(err)}") from None
    model.to(map_location)
    model.eval()
    return model, _info(name, model_config, hp.get("data_info") or {}, hp.get("run_config"), path)

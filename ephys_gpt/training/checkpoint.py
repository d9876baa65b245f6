"""Checkpoints during training: Lightning never opens a checkpoint itself.

:class:`SafeCheckpointIO` (the trainer's checkpoint plugin) hands Lightning the state
:func:`ephys_gpt.models.loading.read_checkpoint` read and checked (weights-only, whatever the
environment), and writes checkpoints atomically with the user's umask (a full disk is
reported as :class:`ephys_gpt.fileio.DiskFullError`). :func:`check_checkpoint_fits` refuses a
checkpoint of another model before any work starts. Loading a trained model for use is
:func:`ephys_gpt.models.loading.load_model`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ephys_gpt.fileio import is_disk_full, write_with
from ephys_gpt.models.loading import read_checkpoint

logger = logging.getLogger(__name__)


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

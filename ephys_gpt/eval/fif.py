"""Generated signals back to MNE: an array (C, T) in signal units → ``mne.io.RawArray`` → ``.fif``.

Users analyse generated brain activity with the tools they know (``raw.plot()``,
``raw.compute_psd()``, source reconstruction...), so the channel info is kept: names, types,
sampling rate, and sensor positions/orientations when they are known.

Channel info comes, in order of preference, from

1. a template ``mne.Info`` (e.g. read from the stage-1 ``*_preproc-raw.fif`` the chunks were
   made from): its channel entries are copied by name, so coil types, positions and the
   device-to-head transform are exactly the original ones;
2. otherwise :func:`mne.create_info` with the recorded names/types/sfreq, plus 3-D positions
   (``pos_3d``, metres, C×3) and coil normals (``ori_3d``, C×3) from the chunk store's
   ``meta.json`` where present.

Data must be in SI units (tesla for ``mag``, T/m for ``grad``, volts for ``eeg``), which is
what :func:`ephys_gpt.codec.tokens_to_signal` returns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ephys_gpt.fileio import write_with

logger = logging.getLogger(__name__)


def _orthonormal_frame(normal: np.ndarray) -> np.ndarray:
    """Coil frame (ex, ey, ez) with ``ez`` along ``normal``: 9 values, as in ``ch['loc'][3:12]``."""
    ez = normal / np.linalg.norm(normal)
    helper = np.array([1.0, 0.0, 0.0]) if abs(ez[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    ex = np.cross(helper, ez)
    ex /= np.linalg.norm(ex)
    ey = np.cross(ez, ex)
    return np.concatenate([ex, ey, ez])


def build_info(ch_names: Sequence[str], ch_types: Sequence[str], sfreq: float, *,
               pos_3d: np.ndarray | None = None, ori_3d: np.ndarray | None = None,
               template=None):
    """An ``mne.Info`` for channels ``ch_names`` (C) of types ``ch_types`` at ``sfreq`` Hz.

    Parameters
    ----------
    pos_3d, ori_3d : array (C, 3), optional
        Sensor positions (m) and normals, written into ``info['chs'][i]['loc']``.
    template : mne.Info, optional
        Info holding all of ``ch_names``; its channel entries are copied (positions, coil
        types, ``dev_head_t``). Channels it lacks are an error.
    """
    import mne

    ch_names = [str(c) for c in ch_names]
    ch_types = [str(t) for t in ch_types]
    if len(ch_names) != len(ch_types):
        raise ValueError(f"{len(ch_names)} channel names but {len(ch_types)} channel types")
    if len(set(ch_names)) != len(ch_names):
        raise ValueError("channel names must be unique")
    if not sfreq or sfreq <= 0:
        raise ValueError(f"sfreq must be a positive number of Hz, got {sfreq!r}")
    if template is not None:
        missing = [c for c in ch_names if c not in template["ch_names"]]
        if missing:
            raise ValueError(f"template info lacks channel(s) {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        info = mne.pick_info(template, [template["ch_names"].index(c) for c in ch_names])
        with info._unlock():
            info["sfreq"] = float(sfreq)
            info["projs"] = []
            info["bads"] = []
            info["comps"] = []
        got = info.get_channel_types()
        if got != ch_types:
            bad = [(c, a, b) for c, a, b in zip(ch_names, ch_types, got) if a != b][:3]
            raise ValueError(f"template channel types disagree with the recorded ones "
                             f"(name, recorded, template): {bad}")
        return info
    try:
        info = mne.create_info(ch_names, float(sfreq), ch_types)
    except (ValueError, KeyError) as err:
        raise ValueError(f"cannot build channel info: {err}") from err
    for key, arr in (("pos_3d", pos_3d), ("ori_3d", ori_3d)):
        if arr is not None and np.shape(arr) != (len(ch_names), 3):
            raise ValueError(f"{key} should have shape ({len(ch_names)}, 3), "
                             f"found {np.shape(arr)}")
    if pos_3d is not None:
        pos_3d = np.asarray(pos_3d, dtype=np.float64)
        ori = None if ori_3d is None else np.asarray(ori_3d, dtype=np.float64)
        for i, ch in enumerate(info["chs"]):
            ch["loc"][:3] = pos_3d[i]
            if ori is not None and np.linalg.norm(ori[i]) > 0:
                ch["loc"][3:12] = _orthonormal_frame(ori[i])
    return info


def array_to_raw(data: np.ndarray, info=None, *, ch_names: Sequence[str] | None = None,
                 ch_types: Sequence[str] | None = None, sfreq: float | None = None,
                 description: str | None = None, **info_kw):
    """Wrap ``data`` (C, T) in signal units into an ``mne.io.RawArray``.

    Give either a ready ``info`` or ``ch_names``/``ch_types``/``sfreq`` (and optionally
    ``pos_3d``, ``ori_3d``, ``template``: see :func:`build_info`).
    """
    import mne

    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 2:
        raise ValueError(f"data should be (channels, time), found shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("data contains NaN or Inf values")
    if info is None:
        if ch_names is None or ch_types is None or sfreq is None:
            raise ValueError("array_to_raw needs info, or ch_names, ch_types and sfreq")
        info = build_info(ch_names, ch_types, sfreq, **info_kw)
    if data.shape[0] != info["nchan"]:
        raise ValueError(f"data has {data.shape[0]} channels but the info has {info['nchan']}")
    if description:
        with info._unlock():
            info["description"] = description
    return mne.io.RawArray(data, info, verbose=False)


def write_raw_fif(raw, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Save ``raw`` to ``path`` (a name ending in ``_raw.fif``/``-raw.fif``) atomically."""
    path = Path(path)
    if not (path.name.endswith(("_raw.fif", "-raw.fif", "_raw.fif.gz", "-raw.fif.gz"))):
        raise ValueError(f"{path}: MNE raw files should end in '_raw.fif' or '-raw.fif'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    suffix = "_raw.fif.gz" if path.name.endswith(".gz") else "_raw.fif"
    return write_with(path, lambda tmp: raw.save(tmp, overwrite=True, verbose=False),
                      suffix=suffix)


def save_signal_fif(data: np.ndarray, path: str | os.PathLike, *, ch_names: Sequence[str],
                    ch_types: Sequence[str], sfreq: float, description: str | None = None,
                    **info_kw) -> Path:
    """:func:`array_to_raw` then :func:`write_raw_fif` in one call; returns the path."""
    raw = array_to_raw(data, ch_names=ch_names, ch_types=ch_types, sfreq=sfreq,
                       description=description, **info_kw)
    return write_raw_fif(raw, path)


def template_info_from_provenance(provenance: dict, ch_names: Sequence[str]):
    """The ``mne.Info`` of the recording a chunk-store session came from, if still readable.

    Looks for a stage-1 or source file path under common provenance keys; returns None
    (quietly) when there is none, it no longer exists, or it lacks some channel.
    """
    import mne

    for key in ("stage1_file", "stage1", "preproc_file", "source_file", "source", "raw_file"):
        value = provenance.get(key) if isinstance(provenance, dict) else None
        if not isinstance(value, str) or not value:
            continue
        p = Path(value)
        if not p.exists():
            continue
        try:
            info = mne.io.read_info(p, verbose=False)
        except Exception as err:  # unreadable or not a fif: fall back to meta.json info
            logger.debug("cannot read channel info from %s: %s", p, err)
            continue
        if all(c in info["ch_names"] for c in ch_names):
            return info
    return None

"""Sensor metadata for the chunk store: channel types and 2-D / 3-D positions from ``mne.Info``.

``pos_2d`` (C, 2) comes from MNE's layouts: :func:`mne.find_layout` finds the layout of the
system (``Vectorview-all`` for MEGIN, ``CTF-275`` for CTF, ...) and each channel gets the
centre of its layout box (layout units, roughly [0, 1] on both axes; co-located MEGIN sensors
get neighbouring boxes, so positions stay distinct). When no layout matches every channel,
the 3-D sensor positions are projected the way MNE's automatic EEG layouts are: an azimuthal
equidistant projection around the top of the sphere fitted to the sensors, scaled into
[0, 1]. Without usable 3-D positions there is no meaningful 2-D position and it is an error.

``pos_3d`` (C, 3) and ``ori_3d`` (C, 3) are ``info['chs'][i]['loc'][:3]`` (sensor position,
device coordinates, metres) and ``loc[9:12]`` (the coil normal, MEG only); they are None
when unknown.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


def channel_metadata(info) -> dict:
    """``ch_names``, ``ch_types``, ``pos_2d``, ``pos_3d``, ``ori_3d`` for every channel of
    ``info`` (lists of lists, ready for meta.json)."""

    ch_names = list(info["ch_names"])
    ch_types = info.get_channel_types()
    locs = np.array([ch["loc"][:12] for ch in info["chs"]], dtype=np.float64)  # (C, 12)
    pos3 = locs[:, :3]
    has_pos = np.isfinite(pos3).all(axis=1) & (np.abs(pos3).sum(axis=1) > 0)
    pos_3d = pos3 if has_pos.all() else None
    is_meg = np.isin(ch_types, ["mag", "grad", "ref_meg"])
    ori = locs[:, 9:12]
    ori_ok = np.isfinite(ori).all(axis=1) & (np.linalg.norm(ori, axis=1) > 0)
    ori_3d = ori if (is_meg.all() and ori_ok.all()) else None
    pos_2d = _layout_positions(info, ch_names)
    if pos_2d is None:
        if pos_3d is None:
            missing = [n for n, ok in zip(ch_names, has_pos) if not ok][:5]
            raise ValueError(f"no 2-D sensor positions: MNE has no layout for these channels and "
                             f"{len(missing)}+ channel(s) have no 3-D position (e.g. {missing}); "
                             "set a montage (mne.channels.make_standard_montage) on the data")
        pos_2d = project_to_2d(pos_3d)
        logger.info("no MNE layout matches these channels; projected 3-D positions to 2-D")
    return {
        "ch_names": ch_names,
        "ch_types": list(ch_types),
        "pos_2d": pos_2d.tolist(),
        "pos_3d": None if pos_3d is None else pos_3d.tolist(),
        "ori_3d": None if ori_3d is None else ori_3d.tolist(),
    }


def _clean(name: str) -> str:
    return name.replace(" ", "").split("-")[0].upper()


def _layout_positions(info, ch_names: list[str]) -> np.ndarray | None:
    """Layout box centres for every channel, or None if MNE has no layout covering all."""
    import mne

    try:
        with mne.utils.use_log_level("ERROR"):
            layout = mne.find_layout(info)
    except (RuntimeError, ValueError, KeyError):
        return None
    if layout is None:
        return None
    index = {_clean(n): i for i, n in enumerate(layout.names)}
    rows = [index.get(_clean(n)) for n in ch_names]
    if any(r is None for r in rows):
        return None
    box = layout.pos[rows]  # (C, 4): x, y, width, height
    return box[:, :2] + box[:, 2:4] / 2.0


def project_to_2d(pos_3d: np.ndarray) -> np.ndarray:
    """Azimuthal equidistant projection of sensor positions (C, 3) into [0, 1]^2 (C, 2).

    The centre is the least-squares sphere through the sensors; the pole is the sphere's top
    (+z), so the layout looks down on the head, nose up, as MNE's topomaps do.
    """
    pos = np.asarray(pos_3d, dtype=np.float64)
    # least-squares sphere: |p|^2 = 2 c.p + (r^2 - |c|^2)
    a = np.c_[2 * pos, np.ones(len(pos))]
    b = (pos**2).sum(axis=1)
    try:
        sol = np.linalg.lstsq(a, b, rcond=None)[0]
        center = sol[:3]
    except np.linalg.LinAlgError:
        center = pos.mean(axis=0)
    if len(pos) < 4:
        center = pos.mean(axis=0) - np.array([0, 0, 0.05])
    v = pos - center
    r = np.linalg.norm(v, axis=1)
    r[r == 0] = 1.0
    theta = np.arccos(np.clip(v[:, 2] / r, -1, 1))  # angle from the pole
    phi = np.arctan2(v[:, 1], v[:, 0])
    xy = np.c_[theta * np.cos(phi), theta * np.sin(phi)]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0).max()
    return (xy - lo) / span

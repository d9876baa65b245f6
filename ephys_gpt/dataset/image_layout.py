"""Sensor → pixel maps for image-shaped MEG inputs (DESIGN.md, contract 2).

A :class:`ImageLayout` places every channel on its own pixel of an ``H x W`` grid from the
channels' 2-D positions (``pos_2d`` in the chunk store, e.g. from :func:`mne.find_layout`).
It is computed once per layout (cached) and is exactly invertible: :func:`channels_to_image`
scatters ``(..., C, T)`` signals into ``(..., H, W, T)`` images and :func:`image_to_channels`
gathers them back.

Placement
---------
Positions are scaled per axis to fill the grid (row 0 is the front of the head, i.e. the
largest ``y``), then sensors are assigned to pixels by an optimal assignment
(:func:`scipy.optimize.linear_sum_assignment`) that minimises the total squared displacement
from each sensor's ideal sub-pixel position. That makes the map collision-free by
construction; it fails loudly only when a plane has more sensors than pixels.

Co-located sensors (MEGIN/Elekta: one magnetometer and two planar gradiometers share each of
102 locations when positions come from the 3-D sensor geometry) are handled in one of two ways,
chosen with ``planes``:

- ``"single"`` (default): one ``H x W`` plane. Sensors sharing a location are first spread on
  a small circle (0.35 px) in a fixed order (by channel type, then channel order) so that the
  assignment puts them on neighbouring pixels deterministically (e.g. the magnetometer always
  on the same side of its gradiometer pair). The image keeps the requested size.
- ``"by_type"``: one plane per channel type and, for sensors of one type sharing a location
  (gradiometer pairs), one plane per member (``grad``, ``grad#2``...). Planes share the same
  position scaling and are tiled side by side along the width, so the image is
  ``H x (P * W)``. Every plane is a clean topography of one sensor kind.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)

PLANE_MODES = ("single", "by_type")
DEFAULT_IMAGE_SIZE = 32
_SPREAD_PX = 0.35  # radius used to separate co-located sensors before the assignment


@dataclass(frozen=True, eq=False)
class ImageLayout:
    """Where each channel lives in the image.

    Attributes
    ----------
    rows, cols : np.ndarray
        ``(C,)`` int64 pixel coordinates of each channel in the full image.
    height, width : int
        Full image size (``width`` includes all tiled planes).
    planes : tuple[str, ...]
        Names of the tiled planes, left to right (``("all",)`` for ``planes="single"``).
    plane_width : int
        Width of one plane.
    max_displacement : float
        Largest distance (pixels) between a sensor's ideal position and its pixel.
    """

    rows: np.ndarray
    cols: np.ndarray
    height: int
    width: int
    planes: tuple[str, ...]
    plane_width: int
    max_displacement: float

    @property
    def n_channels(self) -> int:
        return int(self.rows.shape[0])

    @property
    def flat_index(self) -> np.ndarray:
        """``(C,)`` index of each channel's pixel in the flattened ``H * W`` image."""
        return self.rows * self.width + self.cols

    @property
    def mask(self) -> np.ndarray:
        """``(H, W)`` bool, True where a sensor lives."""
        m = np.zeros((self.height, self.width), dtype=bool)
        m[self.rows, self.cols] = True
        return m


def _parse_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        h = w = int(image_size)
    elif (isinstance(image_size, (list, tuple)) and len(image_size) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)):
        h, w = (int(v) for v in image_size)
    else:
        raise ValueError(f"image_size must be an int or a pair (H, W) of ints, got {image_size!r}")
    if h < 2 or w < 2:
        raise ValueError(f"image_size must be at least 2x2, got {h}x{w}")
    return h, w


def compute_image_layout(pos_2d: np.ndarray, ch_types: Sequence[str] | None = None,
                         image_size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                         planes: str = "single") -> ImageLayout:
    """Collision-free map from channels to pixels (cached per layout).

    Parameters
    ----------
    pos_2d : array (C, 2)
        2-D sensor positions (any units; only relative placement matters).
    ch_types : sequence of str, optional
        Channel types (``"mag"``, ``"grad"``...). Needed for ``planes="by_type"``; used to
        order co-located sensors otherwise.
    image_size : int or (H, W)
        Size of one plane. Default 32x32 (306 MEGIN sensors fill 30% of a single plane).
    planes : {"single", "by_type"}
        See the module docstring.

    Raises
    ------
    ValueError
        Bad arguments, non-finite positions, or more sensors in a plane than it has pixels.
    """
    pos = np.asarray(pos_2d, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"pos_2d must have shape (C, 2) with C >= 1, got {pos.shape}")
    if not np.isfinite(pos).all():
        bad = int(np.flatnonzero(~np.isfinite(pos).all(axis=1))[0])
        raise ValueError(f"pos_2d has a non-finite position for channel index {bad}: {pos[bad]}")
    types = tuple(str(t) for t in ch_types) if ch_types is not None else ("",) * len(pos)
    if len(types) != len(pos):
        raise ValueError(f"ch_types has {len(types)} entries but pos_2d has {len(pos)} rows")
    if planes not in PLANE_MODES:
        raise ValueError(f"planes must be one of {list(PLANE_MODES)}, got {planes!r}")
    h, w = _parse_size(image_size)
    return _cached_layout(pos.tobytes(), pos.shape[0], types, h, w, planes)


@functools.lru_cache(maxsize=32)
def _cached_layout(pos_bytes: bytes, n: int, types: tuple[str, ...], h: int, w: int,
                   planes: str) -> ImageLayout:
    pos = np.frombuffer(pos_bytes, dtype=np.float64).reshape(n, 2)
    # Ideal sub-pixel coordinates, scaled per axis to fill the plane.
    lo, hi = pos.min(axis=0), pos.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    u = (pos - lo) / span  # in [0, 1]
    ideal = np.stack([(1.0 - u[:, 1]) * (h - 1), u[:, 0] * (w - 1)], axis=1)  # (C, 2) row, col

    # Group sensors by location (co-located = same position up to 1e-6 of the extent).
    key = np.round(u / 1e-6).astype(np.int64)
    _, loc_id = np.unique(key, axis=0, return_inverse=True)
    loc_id = loc_id.reshape(-1)
    order = sorted(range(n), key=lambda i: (loc_id[i], types[i], i))
    rank = np.zeros(n, dtype=np.int64)  # position of a sensor among those at its location
    type_rank = np.zeros(n, dtype=np.int64)  # ... among those of its own type at its location
    seen: dict[int, int] = {}
    seen_type: dict[tuple[int, str], int] = {}
    for i in order:
        rank[i] = seen.get(loc_id[i], 0)
        seen[loc_id[i]] = rank[i] + 1
        type_rank[i] = seen_type.get((loc_id[i], types[i]), 0)
        seen_type[(loc_id[i], types[i])] = type_rank[i] + 1

    if planes == "single":
        plane_of = np.zeros(n, dtype=np.int64)
        plane_names = ("all",)
        count = np.array([seen[loc_id[i]] for i in range(n)])
        angle = 2 * np.pi * rank / np.maximum(count, 1)
        spread = np.where(count > 1, _SPREAD_PX, 0.0)
        target = ideal + spread[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    else:
        labels = [t if r == 0 else f"{t}#{r + 1}" for t, r in zip(types, type_rank)]
        plane_names = tuple(sorted(set(labels), key=lambda s: (s.split("#")[0], s)))
        plane_of = np.array([plane_names.index(lbl) for lbl in labels], dtype=np.int64)
        target = ideal

    rows = np.zeros(n, dtype=np.int64)
    cols = np.zeros(n, dtype=np.int64)
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).reshape(-1, 2)
    from scipy.optimize import linear_sum_assignment

    for p, name in enumerate(plane_names):
        members = np.flatnonzero(plane_of == p)
        if len(members) > h * w:
            need = int(np.ceil(np.sqrt(len(members))))
            raise ValueError(
                f"image_size {h}x{w} has {h * w} pixels per plane but plane {name!r} needs one "
                f"pixel for each of its {len(members)} sensors; use image_size >= {need} "
                "(or planes='by_type' to spread sensor types over separate planes)")
        cost = ((target[members, None, :] - grid[None, :, :]) ** 2).sum(-1)  # (C_p, H*W)
        r_idx, c_idx = linear_sum_assignment(cost)
        px = grid[c_idx]
        rows[members[r_idx]] = px[:, 0]
        cols[members[r_idx]] = px[:, 1] + p * w
    local = np.stack([rows, cols - plane_of * w], axis=1)
    disp = float(np.sqrt(((local - ideal) ** 2).sum(-1)).max())
    flat = rows * (w * len(plane_names)) + cols
    assert len(np.unique(flat)) == n, "image layout has a pixel collision"
    if disp > 3.0:
        logger.warning("image layout %dx%d: a sensor sits %.1f px from its position; the grid "
                       "is crowded, consider a larger image_size", h, w, disp)
    else:
        logger.debug("image layout %dx%d (%s): max displacement %.2f px", h, w, planes, disp)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return ImageLayout(rows=rows, cols=cols, height=h, width=w * len(plane_names),
                       planes=plane_names, plane_width=w, max_displacement=disp)


def channels_to_image(x, layout: ImageLayout, fill: float | int = 0):
    """Scatter channels into an image.

    Parameters
    ----------
    x : np.ndarray or torch.Tensor, shape (..., C, T)
    layout : ImageLayout
    fill : value of pixels without a sensor.

    Returns
    -------
    Same type and dtype as ``x``, shape (..., H, W, T).
    """
    c, t = x.shape[-2], x.shape[-1]
    if c != layout.n_channels:
        raise ValueError(f"signal has {c} channels but the image layout maps "
                         f"{layout.n_channels}")
    lead = tuple(x.shape[:-2])
    hw = layout.height * layout.width
    if isinstance(x, torch.Tensor):
        img = torch.full((*lead, hw, t), fill, dtype=x.dtype, device=x.device)
        img[..., torch.as_tensor(layout.flat_index, device=x.device), :] = x
        return img.reshape(*lead, layout.height, layout.width, t)
    img = np.full((*lead, hw, t), fill, dtype=x.dtype)
    img[..., layout.flat_index, :] = x
    return img.reshape(*lead, layout.height, layout.width, t)


def image_to_channels(img, layout: ImageLayout):
    """Gather channels back from an image: ``(..., H, W, T)`` → ``(..., C, T)``.

    Inverse of :func:`channels_to_image` (exact for the sensor pixels).
    """
    if tuple(img.shape[-3:-1]) != (layout.height, layout.width):
        raise ValueError(f"image has spatial size {tuple(img.shape[-3:-1])} but the layout is "
                         f"{layout.height}x{layout.width}")
    lead = tuple(img.shape[:-3])
    t = img.shape[-1]
    flat = img.reshape(*lead, layout.height * layout.width, t)
    if isinstance(img, torch.Tensor):
        return flat[..., torch.as_tensor(layout.flat_index, device=img.device), :]
    return flat[..., layout.flat_index, :]

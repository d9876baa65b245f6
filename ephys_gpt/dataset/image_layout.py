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

Sparse and dense images
-----------------------
A *sparse* image (:func:`channels_to_image`) holds each sensor on its pixel and a fill value
elsewhere (:attr:`ImageLayout.mask` marks the sensor pixels). A *dense* image
(:func:`dense_map` + :func:`channels_to_dense_image`) also fills the pixels between sensors by
a fixed linear interpolation (Gaussian-weighted or piecewise linear), which suits
convolutional tokenizers; the sensor pixels still hold the sensor values exactly, so the
inverse back to channels is exact in both cases.

Losses and metrics of a *signal* never look at empty or interpolated pixels: image datasets
give their target in channel space (:class:`SensorTarget`: the window ``(C, T)`` and each
channel's pixel), and :func:`gather_channels` reads a predicted image at the sensor pixels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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


# -- channel-space targets -------------------------------------------------------------------

class SensorTarget(NamedTuple):
    """The target of an image item, in channel space (what a "signal" loss compares with).

    Attributes
    ----------
    signal : torch.Tensor
        float32 ``(C, T)`` (batched ``(B, C, T)``): the window's channels, in the store's
        (normalized) units.
    pixels : torch.Tensor
        int64 ``(C,)`` (batched ``(B, C)``): the flat index ``row * W + col`` of each
        channel's pixel in the ``H x W`` image (:attr:`ImageLayout.flat_index`).

    A loss reads the prediction at the sensor pixels with :func:`gather_channels` and compares
    it with ``signal``; empty (or interpolated) pixels never enter a signal error. The
    DataLoader's default collate batches it like a tuple of tensors.
    """

    signal: torch.Tensor
    pixels: torch.Tensor


def gather_channels(img: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """Read images at sensor pixels: ``img (B, H, W, T)`` and ``pixels (C,)`` or ``(B, C)``
    (flat pixel indices, e.g. :attr:`SensorTarget.pixels`) → ``(B, C, T)``."""
    if img.ndim != 4:
        raise ValueError(f"expected images (B, H, W, T), got shape {tuple(img.shape)}")
    b, h, w, t = img.shape
    pixels = pixels.to(img.device).long()
    if pixels.ndim == 1:
        pixels = pixels.expand(b, -1)
    if pixels.ndim != 2 or pixels.shape[0] != b:
        raise ValueError(f"pixels must be (C,) or (B={b}, C), got shape {tuple(pixels.shape)}")
    if int(pixels.max()) >= h * w or int(pixels.min()) < 0:
        raise ValueError(f"pixel index {int(pixels.max())} is outside the {h}x{w} image: the "
                         "images and the target come from different image layouts")
    flat = img.reshape(b, h * w, t)
    return flat.gather(1, pixels[..., None].expand(-1, -1, t))


# -- dense images --------------------------------------------------------------------------

INTERPOLATIONS = ("gaussian", "linear")
_GAUSS_CUTOFF = 4.0  # weights beyond this many sigmas are 0


@dataclass(frozen=True, eq=False)
class DenseMap:
    """A linear map from channels to a dense image (:func:`dense_map`).

    Attributes
    ----------
    matrix : scipy.sparse.csr_matrix
        ``(H * W, C)`` float32; ``image.reshape(H * W, T) = matrix @ x`` (plus ``fill`` on
        the pixels that are not ``covered``). The row of a sensor's pixel is that sensor's
        one-hot row, so sensor pixels carry the sensor values exactly and
        :func:`image_to_channels` inverts the map exactly.
    covered : np.ndarray
        ``(H, W)`` bool: pixels that get a value (sensor pixels and interpolated ones).
    method : str
        ``"gaussian"`` or ``"linear"``.
    sigma : float
        Gaussian width in pixels (also used by ``"linear"`` outside the sensors' hull).
    """

    matrix: Any
    covered: np.ndarray
    method: str
    sigma: float


def dense_map(layout: ImageLayout, method: str = "gaussian",
              sigma: float | None = None) -> DenseMap:
    """Interpolation from a layout's sensor pixels to every pixel of its planes.

    Each plane (``planes="by_type"`` tiles several) is interpolated from its own sensors only.

    - ``"gaussian"``: a pixel takes the Gaussian-weighted mean of the sensors within
      ``4 * sigma`` pixels, ``w = exp(-d² / (2 sigma²))`` with ``d`` the distance to the
      sensor's pixel; ``sigma`` defaults to 0.75 x the median distance from a sensor pixel to
      its nearest neighbour. Pixels with no sensor within reach are not ``covered``.
    - ``"linear"``: inside the convex hull of the plane's sensor pixels, barycentric (piecewise
      linear) interpolation on their Delaunay triangulation, continuous and equal to the
      sensor values at the sensors; outside the hull, the Gaussian rule.

    Sensor pixels always keep their sensor's value (the inverse is exact: read the sensor
    pixels back with :func:`image_to_channels`). Cached per layout and settings.
    """
    if method not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)} (or null for "
                         f"sparse images), got {method!r}")
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float))
                              or not 0 < sigma < 1e3):
        raise ValueError(f"sigma must be a positive number of pixels, got {sigma!r}")
    return _cached_dense_map(layout, method, None if sigma is None else float(sigma))


@functools.lru_cache(maxsize=16)
def _cached_dense_map(layout: ImageLayout, method: str, sigma: float | None) -> DenseMap:
    import scipy.sparse as sp

    h, pw = layout.height, layout.plane_width
    plane_of = layout.cols // pw
    rows_all, cols_all, vals_all = [], [], []
    sigmas = []
    for p in range(len(layout.planes)):
        members = np.flatnonzero(plane_of == p)
        pts = np.stack([layout.rows[members], layout.cols[members] - p * pw], 1).astype(float)
        s = sigma if sigma is not None else _default_sigma(pts)
        sigmas.append(s)
        w = _plane_weights(pts, h, pw, method, s)  # (h * pw, n_p)
        for k in range(len(members)):  # sensor pixels: exactly their sensor
            w[int(pts[k, 0]) * pw + int(pts[k, 1])] = 0.0
            w[int(pts[k, 0]) * pw + int(pts[k, 1]), k] = 1.0
        pix, sens = np.nonzero(w)
        r, c = np.divmod(pix, pw)
        rows_all.append(r * layout.width + c + p * pw)
        cols_all.append(members[sens])
        vals_all.append(w[pix, sens])
    n_pix = h * layout.width
    matrix = sp.csr_matrix((np.concatenate(vals_all).astype(np.float32),
                            (np.concatenate(rows_all), np.concatenate(cols_all))),
                           shape=(n_pix, layout.n_channels), dtype=np.float32)
    covered = (np.asarray(matrix.getnnz(axis=1)) > 0).reshape(h, layout.width)
    return DenseMap(matrix=matrix, covered=covered, method=method, sigma=float(np.mean(sigmas)))


def _default_sigma(pts: np.ndarray) -> float:
    if len(pts) < 2:
        return 1.0
    d = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return max(0.5, 0.75 * float(np.median(d.min(axis=1))))


def _plane_weights(pts: np.ndarray, h: int, w: int, method: str, sigma: float) -> np.ndarray:
    """``(h * w, n)`` row-normalized interpolation weights of one plane's pixels."""
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    d2 = ((grid[:, None, :] - pts[None]) ** 2).sum(-1)
    g = np.exp(-d2 / (2 * sigma ** 2))
    g[d2 > (_GAUSS_CUTOFF * sigma) ** 2] = 0.0
    total = g.sum(1, keepdims=True)
    weights = np.divide(g, total, out=np.zeros_like(g), where=total > 0)
    if method == "linear" and len(pts) >= 3:
        from scipy.spatial import Delaunay, QhullError

        try:
            tri = Delaunay(pts)
        except QhullError:  # collinear sensors: no triangles, the Gaussian rule everywhere
            logger.debug("linear interpolation: sensors are collinear; using the Gaussian rule")
            return weights
        simplex = tri.find_simplex(grid.astype(float))
        inside = np.flatnonzero(simplex >= 0)
        t = tri.transform[simplex[inside]]  # (m, 3, 2)
        b = np.einsum("mij,mj->mi", t[:, :2], grid[inside] - t[:, 2])
        bary = np.concatenate([b, 1 - b.sum(1, keepdims=True)], 1)  # (m, 3)
        weights[inside] = 0.0
        verts = tri.simplices[simplex[inside]]  # (m, 3)
        sub = weights[inside]  # a copy (fancy indexing): fill it, then write it back
        np.put_along_axis(sub, verts, np.clip(bary, 0.0, 1.0), 1)
        weights[inside] = sub / sub.sum(1, keepdims=True)
    return weights


def channels_to_dense_image(x, layout: ImageLayout, dmap: DenseMap, fill: float = 0.0):
    """``(..., C, T)`` channels → dense ``(..., H, W, T)`` images through ``dmap``
    (numpy or torch; pixels not ``covered`` hold ``fill``)."""
    c, t = x.shape[-2], x.shape[-1]
    if c != layout.n_channels:
        raise ValueError(f"signal has {c} channels but the image layout maps "
                         f"{layout.n_channels}")
    h, w = layout.height, layout.width
    lead = tuple(x.shape[:-2])
    cov = dmap.covered.reshape(-1)
    if isinstance(x, torch.Tensor):
        m = torch.as_tensor(dmap.matrix.toarray(), dtype=x.dtype, device=x.device)
        img = torch.einsum("pc,...ct->...pt", m, x)
        img[..., torch.as_tensor(~cov, device=x.device), :] = fill
        return img.reshape(*lead, h, w, t)
    flat = x.reshape(-1, c, t)
    img = np.stack([np.asarray(dmap.matrix @ s, dtype=x.dtype) for s in flat])  # (N, HW, T)
    img[:, ~cov] = fill
    return img.reshape(*lead, h, w, t)

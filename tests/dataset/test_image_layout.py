"""Sensor → pixel maps on the real MEGIN (306-channel) layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ephys_gpt.dataset.datasets import ChunkDatasetImage
from ephys_gpt.dataset.image_layout import (
    channels_to_image,
    compute_image_layout,
    image_to_channels,
)


def _colocated(names, types, pos):
    """MEGIN positions as 3-D geometry gives them: each triplet shares its magnetometer's."""
    mag = {n[:6]: p for n, t, p in zip(names, types, pos) if t == "mag"}
    return np.array([mag[n[:6]] for n in names])


def _assert_collision_free(layout, n):
    flat = layout.rows * layout.width + layout.cols
    assert len(np.unique(flat)) == n
    assert (layout.rows >= 0).all() and (layout.rows < layout.height).all()
    assert (layout.cols >= 0).all() and (layout.cols < layout.width).all()


def test_megin_layout_is_collision_free_and_round_trips(megin_layout):
    names, types, pos = megin_layout
    layout = compute_image_layout(pos, types, image_size=32)
    assert (layout.height, layout.width) == (32, 32) and layout.n_channels == 306
    _assert_collision_free(layout, 306)
    assert layout.max_displacement < 1.5  # sensors stay near their true position
    x = torch.randn(2, 306, 5)
    img = channels_to_image(x, layout)
    assert img.shape == (2, 32, 32, 5)
    torch.testing.assert_close(image_to_channels(img, layout), x)
    assert (img[:, ~torch.from_numpy(layout.mask)] == 0).all()
    xn = np.random.default_rng(0).standard_normal((306, 3)).astype(np.float32)
    np.testing.assert_array_equal(image_to_channels(channels_to_image(xn, layout), layout), xn)
    # Topography is preserved: the frontmost sensor (largest y) lands in the top rows.
    assert layout.rows[np.argmax(pos[:, 1])] <= 1 and layout.rows[np.argmin(pos[:, 1])] >= 30


def test_colocated_triplets_single_plane(megin_layout):
    names, types, pos = megin_layout
    pos3 = _colocated(names, types, pos)
    assert len(np.unique(pos3, axis=0)) == 102  # 3 sensors per location
    layout = compute_image_layout(pos3, types, image_size=32, planes="single")
    _assert_collision_free(layout, 306)
    # The three sensors of a location sit on neighbouring pixels.
    for k in range(0, 306, 3):
        r, c = layout.rows[k:k + 3], layout.cols[k:k + 3]
        assert r.max() - r.min() <= 2 and c.max() - c.min() <= 2
    x = torch.randn(306, 4)
    torch.testing.assert_close(image_to_channels(channels_to_image(x, layout), layout), x)


def test_colocated_triplets_by_type_planes(megin_layout):
    names, types, pos = megin_layout
    layout = compute_image_layout(_colocated(names, types, pos), types, image_size=32,
                                  planes="by_type")
    assert layout.planes == ("grad", "grad#2", "mag")
    assert (layout.height, layout.width, layout.plane_width) == (32, 96, 32)
    _assert_collision_free(layout, 306)
    plane = layout.cols // 32
    types = np.array(types)
    assert set(plane[types == "mag"]) == {2} and set(plane[types == "grad"]) == {0, 1}
    # A location's three sensors take the same pixel in their three planes.
    for k in range(0, 306, 3):
        assert len(set(layout.rows[k:k + 3])) == 1 and len(set(layout.cols[k:k + 3] % 32)) == 1


def test_grid_too_small_fails_loudly(megin_layout):
    names, types, pos = megin_layout
    with pytest.raises(ValueError, match=r"image_size 16x16 has 256 pixels .* 306 sensors; "
                                         r"use image_size >= 18"):
        compute_image_layout(pos, types, image_size=16)
    layout = compute_image_layout(_colocated(names, types, pos), types, image_size=11,
                                  planes="by_type")  # 102 sensors per plane fit 11x11
    _assert_collision_free(layout, 306)


def test_layout_is_cached_and_validated(megin_layout):
    names, types, pos = megin_layout
    assert compute_image_layout(pos, types, 24) is compute_image_layout(pos.copy(), types, 24)
    with pytest.raises(ValueError, match="planes must be one of"):
        compute_image_layout(pos, types, planes="stack")
    with pytest.raises(ValueError, match="image_size must be an int or a pair"):
        compute_image_layout(pos, types, image_size="big")
    with pytest.raises(ValueError, match=r"pos_2d must have shape \(C, 2\)"):
        compute_image_layout(pos[:, :1], types)
    bad = pos.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match="non-finite position for channel index 5"):
        compute_image_layout(bad, types)
    layout = compute_image_layout(pos, types, 32)
    with pytest.raises(ValueError, match="signal has 10 channels"):
        channels_to_image(np.zeros((10, 3)), layout)
    with pytest.raises(ValueError, match=r"image has spatial size \(8, 8\)"):
        image_to_channels(np.zeros((8, 8, 3)), layout)


def test_image_dataset_on_megin_store(make_store, megin_layout):
    names, types, pos = megin_layout
    root = make_store(n_sessions=1, n_channels=306, ch_names=names, ch_types=types,
                      pos_2d=_colocated(names, types, pos), chunk_lengths=(30,))
    ds = ChunkDatasetImage.from_root(root, example_seconds=0.1, planes="by_type")
    img, _ = ds[0]
    assert img.shape == (32, 96, 10)
    raw = np.load(ds.metas[0].chunk_path(0))[:, :10]
    np.testing.assert_array_equal(ds.image_to_channels(img).numpy(), raw)


# -- dense images and channel-space targets ---------------------------------------------------

def _random_layout(n=30, size=12, seed=0):
    pos = np.random.default_rng(seed).uniform(size=(n, 2))
    return compute_image_layout(pos, image_size=size)


@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_dense_image_keeps_sensor_values_and_inverts_exactly(method):
    from ephys_gpt.dataset.image_layout import channels_to_dense_image, dense_map

    layout = _random_layout()
    dmap = dense_map(layout, method)
    x = np.random.default_rng(1).standard_normal((30, 7)).astype(np.float32)
    img = channels_to_dense_image(x, layout, dmap, fill=-5.0)
    assert img.shape == (12, 12, 7) and img.dtype == np.float32
    np.testing.assert_array_equal(image_to_channels(img, layout), x)  # exact inverse
    assert (img[~dmap.covered] == -5.0).all()
    assert dmap.covered.sum() > 2 * layout.mask.sum()  # dense: far more than the sensors
    # an interpolation of a constant field is that constant (weights sum to one)
    const = channels_to_dense_image(np.full((30, 1), 2.5, np.float32), layout, dmap)
    np.testing.assert_allclose(const[dmap.covered], 2.5, rtol=1e-6)
    # torch and numpy agree; batch dims are kept
    xt = torch.from_numpy(np.stack([x, 2 * x]))
    got = channels_to_dense_image(xt, layout, dmap, fill=-5.0)
    assert got.shape == (2, 12, 12, 7)
    np.testing.assert_allclose(got[0].numpy(), img, atol=1e-5)
    torch.testing.assert_close(image_to_channels(got, layout), xt)


def test_linear_interpolation_reproduces_a_linear_field_inside_the_hull():
    from scipy.spatial import Delaunay

    from ephys_gpt.dataset.image_layout import channels_to_dense_image, dense_map

    layout = _random_layout(n=40, size=16, seed=3)
    field = lambda r, c: 0.3 * r - 0.7 * c + 1.0  # noqa: E731
    x = field(layout.rows, layout.cols).astype(np.float32)[:, None]
    img = channels_to_dense_image(x, layout, dense_map(layout, "linear"))[..., 0]
    tri = Delaunay(np.stack([layout.rows, layout.cols], 1).astype(float))
    rr, cc = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    inside = tri.find_simplex(np.stack([rr, cc], -1).reshape(-1, 2).astype(float)) >= 0
    np.testing.assert_allclose(img.reshape(-1)[inside], field(rr, cc).reshape(-1)[inside],
                               atol=1e-4)


def test_dense_map_stays_inside_each_plane(megin_layout):
    from ephys_gpt.dataset.image_layout import dense_map

    names, types, pos = megin_layout
    layout = compute_image_layout(pos, types, image_size=16, planes="by_type")
    dmap = dense_map(layout, "gaussian")
    m = dmap.matrix.tocoo()
    plane_of_pixel = (m.row % layout.width) // layout.plane_width
    plane_of_sensor = layout.cols[m.col] // layout.plane_width
    assert (plane_of_pixel == plane_of_sensor).all()


def test_dense_map_errors():
    from ephys_gpt.dataset.image_layout import dense_map

    layout = _random_layout()
    with pytest.raises(ValueError, match="interpolation must be one of"):
        dense_map(layout, "cubic")
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        dense_map(layout, "gaussian", sigma=-1)


def test_gather_channels_reads_sensor_pixels():
    from ephys_gpt.dataset.image_layout import gather_channels

    layout = _random_layout()
    x = torch.randn(3, 30, 4)
    img = channels_to_image(x, layout, fill=9.0)
    pixels = torch.as_tensor(layout.flat_index)
    torch.testing.assert_close(gather_channels(img, pixels), x)
    torch.testing.assert_close(gather_channels(img, pixels.expand(3, -1)), x)
    with pytest.raises(ValueError, match="outside the 12x12 image"):
        gather_channels(img, pixels + 1000)

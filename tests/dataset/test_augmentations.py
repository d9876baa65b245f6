"""Config-driven augmentations: effects, validation, seeding, order w.r.t. quantization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ephys_gpt.codec import mulaw_quantize
from ephys_gpt.dataset.augmentations import (
    AUGMENTATIONS,
    Augmentations,
    parse_augmentations,
)
from ephys_gpt.dataset.datasets import ChunkDataset, ChunkDatasetForecastCont


def _x(c=8, t=200, seed=0):
    return np.random.default_rng(seed).standard_normal((c, t)).astype(np.float32)


def _apply(spec, x, seed=0):
    return Augmentations(spec, seed=seed)(x.copy())


def test_gaussian_noise():
    x = _x(t=20000)
    y = _apply([{"name": "gaussian_noise", "std": 0.5, "p": 1.0}], x)
    assert abs(float(np.std(y - x)) - 0.5) < 0.01
    assert y.dtype == np.float32


def test_channel_dropout():
    x = _x(c=2000, t=4)
    y = _apply([{"name": "channel_dropout", "rate": 0.25, "p": 1.0}], x)
    dropped = (y == 0).all(axis=1)
    assert 0.2 < dropped.mean() < 0.3
    np.testing.assert_array_equal(y[~dropped], x[~dropped])  # the others are untouched


@pytest.mark.parametrize("fill", ["edge", "zero"])
def test_time_shift(fill):
    x = _x()
    augs = Augmentations([{"name": "time_shift", "max_shift": 5, "fill": fill, "p": 1.0}], seed=1)
    shifts = set()
    for _ in range(30):
        y = augs(x.copy())
        assert y.shape == x.shape
        k = next(k for k in range(-5, 6)
                 if (k >= 0 and np.array_equal(y[:, k:], x[:, :x.shape[1] - k]))
                 or (k < 0 and np.array_equal(y[:, :k], x[:, -k:])))
        shifts.add(k)
        pad = y[:, :k] if k > 0 else y[:, x.shape[1] + k:]
        expect = (x[:, :1] if k > 0 else x[:, -1:]) if fill == "edge" else 0.0
        np.testing.assert_array_equal(pad, np.broadcast_to(expect, pad.shape))
    assert len(shifts) > 3 and max(abs(k) for k in shifts) <= 5


def test_amplitude_scale_and_sign_flip():
    x = _x()
    np.testing.assert_allclose(
        _apply([{"name": "amplitude_scale", "low": 3.0, "high": 3.0, "p": 1.0}], x), 3 * x)
    y = _apply([{"name": "amplitude_scale", "low": 0.5, "high": 1.5, "per_channel": True,
                 "p": 1.0}], x)
    ratio = y / x
    assert np.allclose(ratio, ratio[:, :1], rtol=1e-5) and len(np.unique(ratio[:, 0])) == 8
    np.testing.assert_array_equal(_apply([{"name": "sign_flip", "p": 1.0}], x), -x)


def test_time_mask():
    x = _x() + 10.0  # no natural value equals the mask value
    y = _apply([{"name": "time_mask", "max_width": 7, "n_masks": 1, "value": -1.0, "p": 1.0}], x)
    masked = (y == -1.0).all(axis=0)
    assert 1 <= masked.sum() <= 7
    idx = np.flatnonzero(masked)
    assert idx.max() - idx.min() + 1 == len(idx)  # one contiguous span
    np.testing.assert_array_equal(y[:, ~masked], x[:, ~masked])


def test_probability_zero_leaves_input_unchanged():
    x = _x()
    spec = [{"name": n, "p": 0.0} for n in AUGMENTATIONS]
    np.testing.assert_array_equal(_apply(spec, x), x)


def test_probability_is_respected():
    augs = Augmentations([{"name": "sign_flip", "p": 0.3}], seed=0)
    x = np.ones((1, 1), np.float32)
    flips = sum(float(augs(x.copy())[0, 0]) < 0 for _ in range(2000))
    assert 500 < flips < 700


@pytest.mark.parametrize("spec, match", [
    ([{"name": "gaussian_nois"}], r"augmentations\[0\]: unknown augmentation name "
                                  r"'gaussian_nois'. Did you mean 'gaussian_noise'\? Valid "
                                  r"choices: amplitude_scale"),
    ([{"name": "gaussian_noise", "sigma": 1}], r"augmentations\[0\] \(gaussian_noise\): unknown "
                                               r"key\(s\) \['sigma'\]; valid keys: .*'std'"),
    ([{"name": "gaussian_noise", "p": 2}], r"'p' must be in \[0.0, 1.0\], got 2"),
    ([{"name": "gaussian_noise", "std": "big"}], "'std' must be a number"),
    ([{"name": "time_shift", "max_shift": 1.5}], "'max_shift' must be an integer"),
    ([{"name": "time_shift", "fill": "wrap"}], "'fill' must be 'edge' or 'zero'"),
    ([{"name": "amplitude_scale", "low": 2.0, "high": 1.0}], "'high' must be in"),
    ([{}, ], "unknown augmentation name None"),
    (["gaussian_noise"], r"augmentations\[0\]: expected a mapping"),
    (5, "expected a list of augmentations"),
])
def test_bad_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_augmentations(spec)


def test_spec_forms(tmp_path):
    as_list = parse_augmentations([{"name": "gaussian_noise", "std": 0.1, "p": 0.2}])
    as_map = parse_augmentations({"gaussian_noise": {"std": 0.1, "p": 0.2}})
    wrapped = parse_augmentations({"augmentations": [{"name": "gaussian_noise", "std": 0.1,
                                                      "p": 0.2}]})
    path = tmp_path / "augs.yaml"
    path.write_text("- {name: gaussian_noise, std: 0.1, p: 0.2}\n")
    from_file = parse_augmentations(path)
    assert as_list == as_map == wrapped == from_file
    assert as_list[0].std == 0.1 and as_list[0].p == 0.2
    assert parse_augmentations(None) == []
    with pytest.raises(FileNotFoundError, match="augmentations file .*missing.yaml"):
        parse_augmentations(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: nope}\n")
    with pytest.raises(ValueError, match=rf"{bad}\[0\]: unknown augmentation name 'nope'"):
        parse_augmentations(bad)


def test_seeded_reproducibility():
    spec = [{"name": "gaussian_noise", "std": 1.0, "p": 0.5},
            {"name": "time_mask", "max_width": 20, "p": 0.5}]
    x = _x()
    a = Augmentations(spec, seed=7)(x.copy())
    b = Augmentations(spec, seed=7)(x.copy())
    c = Augmentations(spec, seed=8)(x.copy())
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    augs = Augmentations(spec, seed=7)
    first = augs(x.copy())
    augs.reseed()
    np.testing.assert_array_equal(augs(x.copy()), first)


def test_augmented_before_quantization(make_store):
    root = make_store()
    aug = [{"name": "amplitude_scale", "low": 2.0, "high": 2.0, "p": 1.0}]
    plain = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1)
    ds = ChunkDataset.from_root(root, example_seconds=0.1, quantize={"n_bits": 8, "scale": 1.0},
                                augmentations=aug)
    x, _ = ds[2]
    expect = mulaw_quantize(2 * plain[2][0].numpy(), 8, 1.0).astype(np.int64)
    np.testing.assert_array_equal(x.numpy(), expect)


def test_reproducible_per_worker(make_store):
    ds = ChunkDatasetForecastCont.from_root(
        make_store(), example_seconds=0.1,
        augmentations=[{"name": "gaussian_noise", "std": 1.0, "p": 1.0}])

    def run():
        torch.manual_seed(123)
        loader = DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
        return torch.cat([x for x, _ in loader])

    a, b = run(), run()
    torch.testing.assert_close(a, b)  # same global seed → same augmentations
    # Batch 0 comes from worker 0 and batch 1 from worker 1, each its worker's first draws:
    # equal noise would mean both workers share one stream.
    clean = torch.stack([ChunkDatasetForecastCont(ds.metas, ds.indices, 10)[i][0]
                         for i in range(len(ds))])
    noise = a - clean
    assert not torch.allclose(noise[0:2], noise[2:4])
    assert abs(float(noise.std()) - 1.0) < 0.1

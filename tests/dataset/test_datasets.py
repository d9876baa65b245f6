"""Dataset items: shifts, dtypes, on-the-fly quantization, metadata, errors, workers."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ephys_gpt.codec import invert_steps, mulaw_quantize
from ephys_gpt.dataset import datasets as dmod
from ephys_gpt.dataset.datasets import (
    CH_TYPE_CODES,
    ChunkDataset,
    ChunkDatasetForecastCont,
    ChunkDatasetImage,
    ChunkDatasetImageQuantized,
    ChunkDatasetReconstruction,
)
from ephys_gpt.dataset.indexing import build_indices
from ephys_gpt.store import StoreError, list_sessions


def _raw(ds, i):
    s, c, st = ds.indices[i].tolist()
    arr = np.load(ds.metas[s].chunk_path(c), allow_pickle=False)
    return arr[:, st:st + ds.read_samples]


def test_token_store_one_step_shift(make_store):
    ds = ChunkDataset.from_root(make_store(tokens=True), example_seconds=0.1)
    assert ds.window_samples == 10 and ds.read_samples == 11
    for i in (0, 3, len(ds) - 1):
        x, y = ds[i]
        assert x.dtype == torch.int64 and y.dtype == torch.int64
        assert x.shape == y.shape == (4, 10)
        raw = _raw(ds, i)
        np.testing.assert_array_equal(x.numpy(), raw[:, :-1])
        np.testing.assert_array_equal(y.numpy(), raw[:, 1:])
        torch.testing.assert_close(x[:, 1:], y[:, :-1])  # y is x one step ahead
    assert ds.steps[-1]["name"] == "mulaw_quantize" and len(ds.steps) == 2
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_on_the_fly_quantization(make_store):
    root = make_store()
    ds = ChunkDataset.from_root(root, example_seconds=0.1,
                                quantize={"n_bits": 6, "scale": 0.5})
    x, y = ds[5]
    expect = mulaw_quantize(_raw(ds, 5), 6, 0.5).astype(np.int64)
    np.testing.assert_array_equal(x.numpy(), expect[:, :-1])
    np.testing.assert_array_equal(y.numpy(), expect[:, 1:])
    assert int(x.max()) <= 63 and int(x.min()) >= 0
    step = ds.steps[-1]
    assert step == {"name": "mulaw_quantize", "n_bits": 6, "mu": 63, "scale": 0.5,
                    "scale_from": "config", "on_the_fly": True}
    # The recorded steps decode the tokens back to (close to) the signal.
    back = invert_steps(x.numpy(), ds.steps)
    raw = np.clip(_raw(ds, 5)[:, :-1], -0.5, 0.5)
    assert np.abs(back - raw).max() < 0.05
    # per-channel scales
    ds2 = ChunkDataset.from_root(root, example_seconds=0.1,
                                 quantize={"n_bits": 8, "scale": [1.0, 2.0, 3.0, 4.0]})
    expect = mulaw_quantize(_raw(ds2, 0), 8, np.array([1.0, 2.0, 3.0, 4.0])).astype(np.int64)
    np.testing.assert_array_equal(ds2[0][0].numpy(), expect[:, :-1])


@pytest.mark.parametrize("quantize, match", [
    ({"bits": 8}, r"unknown key\(s\) \['bits'\]"),
    ({"n_bits": 0}, "n_bits must be an integer in"),
    ({"n_bits": 8, "scale": -1}, "scale must be positive"),
    ({"n_bits": 8, "scale": [1.0, 2.0]}, "list of 4 positive numbers"),
    (8, "quantize must be a mapping"),
])
def test_bad_quantize(make_store, quantize, match):
    with pytest.raises(ValueError, match=match):
        ChunkDataset.from_root(make_store(), example_seconds=0.1, quantize=quantize)


def test_kind_mismatches_are_clear_errors(make_store):
    tokens, cont = make_store("tok", tokens=True), make_store("cont")
    with pytest.raises(ValueError, match="needs continuous .* holds integer tokens"):
        ChunkDatasetForecastCont.from_root(tokens, example_seconds=0.1)
    with pytest.raises(ValueError, match="needs continuous .* holds integer tokens"):
        ChunkDatasetImage.from_root(tokens, example_seconds=0.1)
    with pytest.raises(ValueError, match="holds continuous chunks .* pass quantize="):
        ChunkDataset.from_root(cont, example_seconds=0.1)
    with pytest.raises(ValueError, match="already holds tokens"):
        ChunkDataset.from_root(tokens, example_seconds=0.1, quantize={"n_bits": 8})
    with pytest.raises(ValueError, match="'quantize' only applies to token datasets"):
        ChunkDatasetForecastCont.from_root(cont, example_seconds=0.1, quantize={"n_bits": 8})
    with pytest.raises(ValueError, match="augmentations act on continuous signals"):
        ChunkDataset.from_root(tokens, example_seconds=0.1,
                               augmentations=[{"name": "sign_flip", "p": 1.0}])


def test_forecast_cont_and_metadata(make_store):
    root = make_store()
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1, stride_seconds=0.05)
    x, y = ds[7]
    assert x.dtype == torch.float32 and x.shape == y.shape == (4, 10)
    np.testing.assert_array_equal(x.numpy(), _raw(ds, 7)[:, :-1])
    np.testing.assert_array_equal(y.numpy(), _raw(ds, 7)[:, 1:])
    m = list_sessions(root)[0]
    assert ds.sfreq == 100.0 and ds.ch_names == m.ch_names and ds.ch_types == m.ch_types
    np.testing.assert_array_equal(ds.pos_2d, m.pos_2d)
    assert [mm.name for mm in ds.metas] == [mm.name for mm in list_sessions(root)]
    assert ds.steps == m.steps and ds.window_samples == 10
    assert ds.indices[1, 2] - ds.indices[0, 2] == 5  # stride 0.05 s


@pytest.mark.parametrize("shift", [0, 1])
def test_reconstruction_items(make_store, shift):
    types = ["mag", "grad", "grad", "eeg"]
    ds = ChunkDatasetReconstruction.from_root(make_store(ch_types=types), example_seconds=0.1,
                                              target_shift=shift)
    (x, pos, ch_type), target = ds[2]
    raw = _raw(ds, 2)
    assert raw.shape[1] == 10 + shift
    assert x.shape == target.shape == (4, 10) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), raw[:, :10])
    np.testing.assert_array_equal(target.numpy(), raw[:, shift:])
    assert pos.dtype == torch.float32 and pos.shape == (4, 2)
    np.testing.assert_allclose(pos.numpy(), ds.pos_2d, rtol=1e-6)
    assert ch_type.dtype == torch.int64
    assert ch_type.tolist() == [CH_TYPE_CODES[t] for t in types] == [0, 1, 1, 2]


def test_reconstruction_errors(make_store):
    with pytest.raises(ValueError, match="target_shift must be 0 or 1"):
        ChunkDatasetReconstruction.from_root(make_store(), example_seconds=0.1, target_shift=2)
    with pytest.raises(ValueError, match=r"channel type\(s\) \['bio'\] have no code"):
        ChunkDatasetReconstruction.from_root(make_store("b", ch_types=["mag", "bio", "mag", "mag"]),
                                             example_seconds=0.1)


def test_image_items_round_trip(make_store):
    ds = ChunkDatasetImage.from_root(make_store(), example_seconds=0.1, image_size=8)
    img, target = ds[4]
    assert img.shape == (8, 8, 10) and img.dtype == torch.float32
    raw = _raw(ds, 4)
    np.testing.assert_array_equal(ds.image_to_channels(img).numpy(), raw)
    mask = ds.image_layout.mask
    assert mask.sum() == 4 and (img.numpy()[~mask] == 0).all()
    # the target is the window in channel space, with each channel's pixel
    assert target.signal.shape == (4, 10) and target.signal.dtype == torch.float32
    np.testing.assert_array_equal(target.signal.numpy(), raw)
    assert target.pixels.dtype == torch.int64
    np.testing.assert_array_equal(target.pixels.numpy(), ds.image_layout.flat_index)


def test_image_fill_value_and_dense_images(make_store):
    from ephys_gpt.dataset.image_layout import SensorTarget, gather_channels

    root = make_store(n_channels=12)
    sparse = ChunkDatasetImage.from_root(root, example_seconds=0.1, image_size=8,
                                         fill_value=-3.0)
    img, _ = sparse[2]
    assert (img.numpy()[~sparse.image_layout.mask] == -3.0).all()
    np.testing.assert_array_equal(sparse.pixel_mask, sparse.image_layout.mask)
    dense = ChunkDatasetImage.from_root(root, example_seconds=0.1, image_size=8,
                                        interpolation="gaussian", fill_value=-3.0)
    dimg, target = dense[2]
    raw = _raw(dense, 2)
    np.testing.assert_array_equal(dense.image_to_channels(dimg).numpy(), raw)  # exact
    assert dense.pixel_mask.sum() > 2 * 12  # the gaps between sensors are filled
    assert (dimg.numpy()[~dense.pixel_mask] == -3.0).all()
    assert not (dimg.numpy()[dense.pixel_mask & ~dense.image_layout.mask] == -3.0).any()
    torch.testing.assert_close(dense.channels_to_image(target.signal), dimg)
    # batches collate to a SensorTarget whose pixels read the images back exactly
    imgs, tgt = next(iter(DataLoader(dense, batch_size=3)))
    assert isinstance(tgt, SensorTarget) and tgt.signal.shape == (3, 12, 10)
    torch.testing.assert_close(gather_channels(imgs, tgt.pixels), tgt.signal)
    with pytest.raises(ValueError, match="sigma only applies to dense images"):
        ChunkDatasetImage.from_root(root, example_seconds=0.1, image_size=8, sigma=1.0)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        ChunkDatasetImage.from_root(root, example_seconds=0.1, image_size=8,
                                    interpolation="cubic")


def test_image_quantized_dense_and_fill(make_store):
    root = make_store(n_channels=12)
    ds = ChunkDatasetImageQuantized.from_root(root, example_seconds=0.1, image_size=8,
                                              interpolation="linear", fill_value=0.5,
                                              quantize={"n_bits": 8, "scale": 2.0})
    x, y = ds[1]
    tokens = mulaw_quantize(_raw(ds, 1), 8, 2.0).astype(np.int64)
    np.testing.assert_array_equal(ds.image_to_channels(x).numpy(), tokens[:, :-1])
    assert ds.empty_token == int(mulaw_quantize(np.float32([0.5]), 8, 2.0)[0]) != 128
    assert (x.numpy()[~ds.pixel_mask] == ds.empty_token).all()
    with pytest.raises(ValueError, match="dense images .* holds tokens"):
        ChunkDatasetImageQuantized.from_root(make_store("t", tokens=True), example_seconds=0.1,
                                             image_size=6, interpolation="gaussian")


def test_image_quantized_items(make_store):
    ds = ChunkDatasetImageQuantized.from_root(make_store(), example_seconds=0.1,
                                              image_size=(6, 7), quantize={"n_bits": 8})
    x, y = ds[1]
    assert x.shape == y.shape == (6, 7, 10) and x.dtype == torch.int64
    tokens = mulaw_quantize(_raw(ds, 1), 8, 1.0).astype(np.int64)
    np.testing.assert_array_equal(ds.image_to_channels(x).numpy(), tokens[:, :-1])
    np.testing.assert_array_equal(ds.image_to_channels(y).numpy(), tokens[:, 1:])
    assert ds.empty_token == 128  # mu-law token of a zero signal
    assert (x.numpy()[~ds.image_layout.mask] == 128).all()
    tok = ChunkDatasetImageQuantized.from_root(make_store("t", tokens=True), example_seconds=0.1,
                                               image_size=6)
    np.testing.assert_array_equal(tok.image_to_channels(tok[0][1]).numpy(), _raw(tok, 0)[:, 1:])


def test_image_too_small_fails_loudly(make_store):
    with pytest.raises(ValueError, match=r"image_size 2x2 has 4 pixels .* 5 sensors"):
        ChunkDatasetImage.from_root(make_store(n_channels=5), example_seconds=0.1, image_size=2)


def test_nan_in_data_names_session_file_channel_and_sample(make_store):
    root = make_store(n_sessions=1, names=["s"])
    path = root / "s" / "1.npy"
    arr = np.load(path)
    arr[2, 17] = np.nan
    np.save(path, arr)
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1)
    bad = [i for i in range(len(ds)) if ds.indices[i, 1] == 1 and ds.indices[i, 2] == 10][0]
    with pytest.raises(StoreError, match=rf"non-finite value \(nan\) in session 's', chunk file "
                                         rf"{path}, channel 'MEG002' at sample 17"):
        ds[bad]
    ds[0]  # windows elsewhere still read fine
    arr[2, 17] = np.inf
    np.save(path, arr)
    ds = ChunkDataset.from_root(root, example_seconds=0.1, quantize={"n_bits": 8})
    with pytest.raises(StoreError, match=r"non-finite value \(inf\)"):
        ds[bad]


def _store_with(tmp_path, value, *, at=(2, 17), normalized=True, name="s"):
    """One session (4 channels, chunks of 50/50/30 samples) of N(0, 0.3) whose chunk 1 holds
    ``value`` at ``at``; ``normalized`` records a normalize step (else raw SI-like values)."""
    from ephys_gpt.store import write_session

    rng = np.random.default_rng(0)
    scale = 1.0 if normalized else 1e-12
    chunks = [(rng.standard_normal((4, n)) * 0.3 * scale).astype(np.float32) for n in (50, 50, 30)]
    chunks[1][at] = value
    steps = [{"name": "normalize", "method": "robust", "center": [0.0] * 4,
              "scale": [1.0] * 4}] if normalized else []
    meta = {"sfreq": 100.0, "ch_names": [f"MEG{i:03d}" for i in range(4)], "ch_types": ["mag"] * 4,
            "pos_2d": [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], "chunk_samples": 50,
            "steps": steps}
    root = tmp_path / f"store-{name}"
    write_session(root, name, chunks, meta)
    return root


def _window_of(ds, chunk, start):
    return [i for i in range(len(ds)) if ds.indices[i, 1] == chunk and ds.indices[i, 2] == start][0]


@pytest.mark.parametrize("values", [[3e38], [3e38, 3e38], [-2e38, 3e38]],
                         ids=["one", "sum-overflows", "sum-cancels"])
def test_huge_values_in_normalized_data_are_caught(tmp_path, values):
    # before: one 3e38 passed the check (its float32 sum stays finite), and two overflowed the
    # sum to inf, after which the check found no non-finite value and returned silently:
    # val/loss = nan, exit 0
    root = _store_with(tmp_path, 0.0)
    path = root / "s" / "1.npy"
    arr = np.load(path)
    arr[2, 17:17 + len(values)] = values
    np.save(path, arr)
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1)
    bad = _window_of(ds, 1, 10)
    with pytest.raises(StoreError, match=(
            rf"value {re.escape(f'{values[0]:.6g}')} beyond \+-10000, the bound for normalized data "
            rf"\(datasplitter.dataset_kwargs.max_abs_value; .*\), in session 's', chunk file "
            rf"{path}, channel 'MEG002' at sample 17 of the chunk")):
        ds[bad]
    ds[0]  # other windows read fine
    tok = ChunkDataset.from_root(root, example_seconds=0.1, quantize={"n_bits": 8})
    with pytest.raises(StoreError, match="beyond"):  # on-the-fly quantization would saturate
        tok[bad]


def test_the_bound_is_configurable_and_only_for_normalized_data(tmp_path):
    root = _store_with(tmp_path, 2e4)
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1)
    bad = _window_of(ds, 1, 10)
    with pytest.raises(StoreError, match=r"value 20000 beyond \+-10000"):
        ds[bad]
    assert ds.max_abs_value == dmod.MAX_ABS_NORMALIZED == 1e4
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1, max_abs_value=1e5)
    assert ds[bad][0][2, 7] == 2e4
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1, max_abs_value=None)
    with pytest.raises(StoreError, match=r"value 20000 beyond \+-5000"):
        ChunkDatasetForecastCont.from_root(root, example_seconds=0.1, max_abs_value=5e3)[bad]
    ds[bad]
    ds = ChunkDatasetForecastCont.from_root(root, example_seconds=0.1, check_finite=False)
    ds[bad]
    for wrong in (0, -1.0, float("nan"), "big"):
        with pytest.raises((TypeError, ValueError), match="max_abs_value"):
            ChunkDatasetForecastCont.from_root(root, example_seconds=0.1, max_abs_value=wrong)
    # raw values (no normalize step, ~1e-12 T): no bound, but inf is still caught
    raw = _store_with(tmp_path, 5e4, normalized=False, name="raw")
    ds = ChunkDatasetForecastCont.from_root(raw, example_seconds=0.1)
    assert ds[bad][0][2, 7] == 5e4
    path = raw / "raw" / "1.npy"
    arr = np.load(path)
    arr[2, 17] = -np.inf
    np.save(path, arr)
    with pytest.raises(StoreError, match=r"non-finite value \(-inf\) in session 'raw'"):
        ChunkDatasetForecastCont.from_root(raw, example_seconds=0.1)[bad]


def test_the_bound_reaches_datasets_through_split_datasets(tmp_path):
    from ephys_gpt.dataset.datasplitter import split_datasets

    root = _store_with(tmp_path, 2e4)
    kw = {"dataset_class": "ChunkDatasetForecastCont", "example_seconds": 0.1,
          "split_by": "time", "val_ratio": 0.0, "test_ratio": 0.0}
    train = split_datasets(root, **kw).train
    with pytest.raises(StoreError, match="beyond"):
        [train[i] for i in range(len(train))]
    train = split_datasets(root, dataset_kwargs={"max_abs_value": 1e6}, **kw).train
    assert max(float(train[i][0].abs().max()) for i in range(len(train))) == 2e4


def test_memmaps_are_cached_per_chunk(make_store, monkeypatch):
    ds = ChunkDatasetForecastCont.from_root(make_store(n_sessions=1), example_seconds=0.1)
    calls = []
    real = dmod.load_chunk
    monkeypatch.setattr(dmod, "load_chunk", lambda m, c, mmap=True: calls.append(c) or real(m, c))
    for i in range(len(ds)):
        ds[i]
    assert sorted(calls) == [0, 1, 2]  # one open per chunk, however many windows
    assert all(isinstance(a, np.memmap) for a in ds._cache.values())
    ds._max_open = 1
    ds._cache.clear()
    calls.clear()
    for i in range(len(ds)):
        ds[i]
    assert len(ds._cache) == 1 and sorted(calls) == [0, 1, 2]


def test_pickling_drops_open_memmaps(make_store):
    ds = ChunkDataset.from_root(make_store(), example_seconds=0.1, quantize={"n_bits": 8})
    first = ds[3]
    assert len(ds._cache) == 1
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._cache) == 0
    for a, b in zip(first, clone[3]):
        torch.testing.assert_close(a, b)


def test_dataloader_with_two_workers(make_store):
    ds = ChunkDataset.from_root(make_store(), example_seconds=0.1, quantize={"n_bits": 8})
    ref = [torch.stack([ds[i][0] for i in range(j, min(j + 4, len(ds)))])
           for j in range(0, len(ds), 4)]
    loader = DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    got = [x for x, _ in loader]
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape[1:] == (4, 10)
        torch.testing.assert_close(a, b)


def test_bad_indices_are_rejected(make_store):
    metas, idx = build_indices(make_store(n_sessions=1), 10, extra_samples=1)
    bad = idx.copy()
    bad[0, 2] = 45  # 45 + 11 > 50
    with pytest.raises(ValueError, match="runs past the end of a chunk"):
        ChunkDatasetForecastCont(metas, bad, 10)
    with pytest.raises(ValueError, match="window_samples must be a positive integer"):
        ChunkDatasetForecastCont(metas, idx, 0)
    with pytest.raises(TypeError, match="SessionMeta"):
        ChunkDatasetForecastCont(["x"], idx, 10)


@pytest.mark.slow
def test_dataloader_with_spawned_workers(make_store):
    """Spawned workers receive the dataset pickled (no fork): memmaps must reopen there."""
    ds = ChunkDatasetImageQuantized.from_root(make_store(), example_seconds=0.1, image_size=6,
                                              quantize={"n_bits": 8})
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    got = torch.cat([x for x, _ in loader])
    ref = torch.stack([ds[i][0] for i in range(len(ds))])
    torch.testing.assert_close(got, ref)

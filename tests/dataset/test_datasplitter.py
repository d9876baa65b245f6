"""Window indexing, splits, the dataset registry and bad-store errors."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from ephys_gpt.dataset.datasplitter import split_datasets
from ephys_gpt.dataset.indexing import build_indices
from ephys_gpt.dataset.registry import DATASETS, DataSplits, dataset_input_kind, get_splitter
from ephys_gpt.models.registry import INPUT_KINDS
from ephys_gpt.store import StoreError


def _windows(ds):
    """Set of (session name, chunk, start) of every window of a dataset."""
    return {(ds.metas[s].name, c, st) for s, c, st in ds.indices.tolist()}


# ------------------------------------------------------------------------- build_indices
def test_windows_stay_inside_chunks_and_short_chunks_are_dropped(make_store, caplog):
    root = make_store(n_sessions=1, chunk_lengths=(50, 21, 10))
    with caplog.at_level(logging.INFO, logger="ephys_gpt.dataset.indexing"):
        metas, idx = build_indices(root, 10, extra_samples=1)
    by_chunk = {c: idx[idx[:, 1] == c, 2].tolist() for c in range(3)}
    # 11 samples per window: chunk 0 (50) → starts 0..30; 40 would end at 51 > 50.
    assert by_chunk[0] == [0, 10, 20, 30]
    # chunk 1 (21): the last window [10, 21) ends exactly at the chunk's end.
    assert by_chunk[1] == [0, 10]
    assert max(by_chunk[1]) + 11 == metas[0].chunk_lengths[1]
    # chunk 2 (10) is shorter than a window: no window, and it is reported.
    assert by_chunk[2] == []
    assert "1 of 3 chunk(s) are shorter than a window of 11 samples" in caplog.text
    for s, c, st in idx.tolist():
        assert st + 11 <= metas[s].chunk_lengths[c]


def test_stride_and_unshifted_windows(make_store):
    root = make_store(n_sessions=1, chunk_lengths=(50,))
    _, idx = build_indices(root, 20, stride_samples=15)
    assert idx[:, 2].tolist() == [0, 15, 30]  # 30 + 20 == 50: ends exactly at the end
    _, idx = build_indices(root, 50)
    assert idx[:, 2].tolist() == [0]


def test_no_window_fits_is_an_error(make_store):
    root = make_store(n_sessions=1, chunk_lengths=(8, 9))
    with pytest.raises(StoreError, match="holds a window of 11 samples.*longest chunk: 9"):
        build_indices(root, 10, extra_samples=1)


def test_bad_window_arguments(make_store):
    root = make_store(n_sessions=1)
    with pytest.raises(ValueError, match="window_samples must be an integer >= 1"):
        build_indices(root, 0)
    with pytest.raises(ValueError, match="stride_samples"):
        build_indices(root, 5, stride_samples=0)
    with pytest.raises(ValueError, match="example_seconds must be a positive number"):
        split_datasets(root, example_seconds=-1)
    with pytest.raises(ValueError, match="less than one sample"):
        split_datasets(root, example_seconds=0.001)


# ----------------------------------------------------------------------------- splitting
def test_session_split_is_deterministic_and_disjoint(make_store):
    root = make_store(n_sessions=10)
    kw = dict(dataset_class="ChunkDatasetForecastCont", example_seconds=0.1)
    a = split_datasets(root, seed=3, **kw)
    b = split_datasets(root, seed=3, **kw)
    c = split_datasets(root, seed=4, **kw)
    names = [[m.name for m in ds.metas] for ds in a]
    assert names == [[m.name for m in ds.metas] for ds in b]
    assert names != [[m.name for m in ds.metas] for ds in c]
    assert [len(n) for n in names] == [8, 1, 1]
    assert not set(names[0]) & set(names[1]) and not set(names[0]) & set(names[2])
    assert not set(names[1]) & set(names[2])
    windows = [_windows(ds) for ds in a]
    assert sum(len(w) for w in windows) == len(set().union(*windows))  # no window twice
    for ds, nm in zip(a, names):  # chunks of 50, 50, 30 samples: 4 + 4 + 2 windows of 11
        assert len(ds) == len(nm) * 10
    # Each split's items come from its own sessions.
    x, y = a.val[0]
    s, ch, st = a.val.indices[0].tolist()
    raw = np.load(a.val.metas[s].chunk_path(ch), allow_pickle=False)
    np.testing.assert_array_equal(x.numpy(), raw[:, st:st + 10])
    np.testing.assert_array_equal(y.numpy(), raw[:, st + 1:st + 11])


def test_subject_split_keeps_subjects_together(make_store):
    subjects = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    root = make_store(n_sessions=10, subjects=subjects,
                      names=[f"s{i}" for i in range(10)])
    sp = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1,
                        split_by="subject", val_ratio=0.2, test_ratio=0.2, seed=1)
    subj = [{m.provenance["subject"] for m in ds.metas} for ds in sp]
    assert [len(s) for s in subj] == [3, 1, 1]
    assert not (subj[0] & subj[1]) and not (subj[0] & subj[2]) and not (subj[1] & subj[2])
    for ds in sp:  # both sessions of a subject are in the same split
        assert len(ds.metas) == 2 * len({m.provenance["subject"] for m in ds.metas})
    again = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1,
                           split_by="subject", val_ratio=0.2, test_ratio=0.2, seed=1)
    assert [_windows(d) for d in sp] == [_windows(d) for d in again]


def test_too_few_sessions_is_a_clear_error(make_store):
    root = make_store(n_sessions=2)
    with pytest.raises(ValueError, match=r"needs at least 3 sessions .* has 2.*split_by='time'"):
        split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1)
    # Without a test split two sessions are enough.
    sp = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1,
                        test_ratio=0.0)
    assert len(sp.train.metas) == 1 and len(sp.val.metas) == 1 and len(sp.test) == 0


def test_subject_split_needs_subjects(make_store):
    root = make_store(n_sessions=3, subjects=["", "", ""], names=["a", "b", "c"])
    with pytest.raises(StoreError, match=r"a/meta.json has no provenance.subject"):
        split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1,
                       split_by="subject")


def test_time_split_of_a_single_session(make_store):
    root = make_store(n_sessions=1, chunk_lengths=(100, 100, 100))
    sp = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1,
                        split_by="time", val_ratio=0.2, test_ratio=0.2)
    offsets = np.array([0, 100, 200])
    spans = []
    for ds in sp:
        assert len(ds) > 0
        a = offsets[ds.indices[:, 1]] + ds.indices[:, 2]
        spans.append((a.min(), (a + 11).max()))
    # train [0, 180), val [180, 240), test [240, 300): ordered, no sample shared.
    assert spans[0][1] <= 180 <= spans[1][0] and spans[1][1] <= 240 <= spans[2][0]
    assert spans[2][1] <= 300
    assert [len(ds) for ds in sp] == [9 + 7, 1 + 3, 5]  # windows laid out per segment


def test_split_argument_errors(make_store):
    root = make_store(n_sessions=3)
    with pytest.raises(ValueError,
                       match=r"unknown dataset_class 'Nope'.*Valid choices: ChunkDataset"):
        split_datasets(root, dataset_class="Nope")
    with pytest.raises(ValueError, match="split_by must be one of"):
        split_datasets(root, split_by="run")
    with pytest.raises(ValueError, match="val_ratio must be a number in"):
        split_datasets(root, val_ratio=1.5)
    with pytest.raises(ValueError, match="val_ratio \\+ test_ratio must be below 1"):
        split_datasets(root, val_ratio=0.5, test_ratio=0.5)


def test_augmentations_apply_to_the_training_split_only(make_store):
    root = make_store(n_sessions=3)
    aug = [{"name": "amplitude_scale", "low": 2.0, "high": 2.0, "p": 1.0}]
    plain = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1)
    sp = split_datasets(root, dataset_class="ChunkDatasetForecastCont", example_seconds=0.1,
                        augmentations=aug)
    np.testing.assert_allclose(sp.train[0][0].numpy(), 2 * plain.train[0][0].numpy())
    np.testing.assert_array_equal(sp.val[0][0].numpy(), plain.val[0][0].numpy())
    assert sp.val.augmentations is None and sp.test.augmentations is None


# ------------------------------------------------------------------------ registry helpers
def test_registry_and_input_kinds():
    assert set(DATASETS) == {"ChunkDataset", "ChunkDatasetForecastCont",
                                    "ChunkDatasetReconstruction", "ChunkDatasetImage",
                                    "ChunkDatasetImageQuantized"}
    for cls in DATASETS.values():
        assert cls.input_kind in INPUT_KINDS
    assert dataset_input_kind("omega", {}) == "tokens"
    assert dataset_input_kind("chunks", {"dataset_class": "ChunkDatasetImage"}) == "image"
    assert dataset_input_kind("omega", {"dataset_class": "ChunkDatasetReconstruction"}) \
        == "continuous_meta"
    assert get_splitter("omega") is split_datasets and get_splitter("chunks") is split_datasets
    with pytest.raises(ValueError, match=r"unknown dataset_name 'meg'.*Valid choices: chunks"):
        get_splitter("meg")
    with pytest.raises(ValueError, match="unknown dataset_class"):
        dataset_input_kind("omega", {"dataset_class": "ChunkDatasetz"})


def test_libribrain_splitter_is_resolved_lazily():
    split = get_splitter("libribrain")
    assert split.__name__ == "split_datasets_libribrain"
    assert dataset_input_kind("libribrain", {}) == "labelled"
    with pytest.raises(ValueError, match="unknown dataset_class 'ChunkDataset' for libribrain"):
        dataset_input_kind("libribrain", {"dataset_class": "ChunkDataset"})


# ------------------------------------------------------------------------ bad stores
def test_missing_root(tmp_path):
    with pytest.raises(StoreError, match=f"chunk store {tmp_path / 'nope'} does not exist"):
        split_datasets(tmp_path / "nope")


def test_session_without_meta_json(make_store, caplog):
    root = make_store(n_sessions=1, names=["only"])
    (root / "only" / "meta.json").unlink()
    with pytest.raises(StoreError, match="holds no complete session"):
        split_datasets(root)
    # Beside complete sessions, a meta-less folder is not a session: skipped, named.
    make_store(n_sessions=3, names=["a", "b", "c"])
    shutil.copytree(root / "only", tmp := (root.parent / "store" / "broken"))
    with caplog.at_level(logging.INFO):
        sp = split_datasets(root.parent / "store", dataset_class="ChunkDatasetForecastCont",
                            example_seconds=0.1)
    assert f"skipping {tmp}: not a session (no meta.json)" in caplog.text
    assert sorted(m.name for ds in sp for m in ds.metas) == ["a", "b", "c"]


def test_truncated_and_corrupt_chunks_name_the_file(make_store):
    root = make_store(n_sessions=1, names=["s"])
    path = root / "s" / "1.npy"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=f"{path} is not a readable .npy array"):
        build_indices(root, 10)
    path.write_bytes(b"garbage that is no npy header" * 10)
    with pytest.raises(StoreError, match=f"{path} is not a .npy file"):
        build_indices(root, 10)
    path.unlink()
    with pytest.raises(StoreError, match=f"chunk file {path} is missing"):
        build_indices(root, 10)


def test_mixed_channel_sets_and_rates_are_refused(make_store, tmp_path):
    root = make_store(n_sessions=1, names=["a"])
    make_store(name="other", n_sessions=1, n_channels=5, names=["b"])
    shutil.copytree(tmp_path / "other" / "b", root / "b")
    with pytest.raises(StoreError, match=r"different channels \(4 channels .* in a vs 5 channels "
                                         r".* in b; only in a: \[\]; only in b: \['MEG004'\]\)"):
        split_datasets(root)
    shutil.rmtree(root / "b")
    make_store(name="rate", n_sessions=1, sfreq=200.0, names=["c"])
    shutil.copytree(tmp_path / "rate" / "c", root / "c")
    with pytest.raises(StoreError, match=r"different sampling rate \(100 Hz in a vs 200 Hz in c\)"):
        split_datasets(root)


def test_bad_meta_json_names_file_and_key(make_store):
    root = make_store(n_sessions=1, names=["s"])
    meta_path = root / "s" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["sfreq"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"{meta_path}: required key 'sfreq' is missing"):
        split_datasets(root)


def test_module_exports():
    assert DataSplits._fields == ("train", "val", "test")

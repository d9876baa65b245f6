"""LibriBrain datasets through the real pnpl reader, on a tiny folder in LibriBrain's layout."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ephys_gpt.codec import invert_steps, mulaw_quantize
from ephys_gpt.dataset.grouped import GroupedDatasetAugmented, RandomLabelGroupedDataset

pytest.importorskip("pnpl", reason="needs the [libribrain] extra (pnpl)")
h5py = pytest.importorskip("h5py")
pd = pytest.importorskip("pandas")

from ephys_gpt.dataset import libribrain as lb  # noqa: E402

pytestmark = pytest.mark.libribrain

PROC = lb.DEFAULT_PREPROCESSING
SFREQ = 100.0
N_CH = 4
N_T = 2000  # 20 s per run
# Real LibriBrain run keys: a training run and pnpl's validation and test runs.
TRAIN_KEY = ("0", "1", "Sherlock1", "1")
VAL_KEY = ("0", "11", "Sherlock1", "2")
TEST_KEY = ("0", "12", "Sherlock1", "2")
SEGMENTS = ["aa_B", "b_I", "s_E"]  # phonemes with pnpl's position suffixes
TMIN, TMAX = -0.1, 0.4
T_WIN = int((TMAX - TMIN) * SFREQ)


def h5_path(root: Path, key) -> Path:
    s, n, task, r = key
    return root / task / "derivatives" / "serialised" / f"sub-{s}_ses-{n}_task-{task}_run-{r}_proc-{PROC}_meg.h5"


def events_path(root: Path, key) -> Path:
    s, n, task, r = key
    return root / task / "derivatives" / "events" / f"sub-{s}_ses-{n}_task-{task}_run-{r}_events.tsv"


def write_run(root: Path, key, seed: int) -> np.ndarray:
    """One run in LibriBrain's layout; returns its data (C, T)."""
    rng = np.random.default_rng(seed)
    data = (rng.normal(size=(N_CH, N_T)) * [[1.0], [2.0], [0.5], [3.0]] + [[0.0], [1.0], [-2.0], [5.0]])
    data = data.astype(np.float32)
    h5 = h5_path(root, key)
    h5.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(h5, "w") as f:
        f.create_dataset("data", data=data)
        f.attrs["sample_frequency"] = SFREQ
        if key == VAL_KEY:
            f.attrs["channel_names"] = [f"MEG0{i}11".encode() for i in range(N_CH)]
    onsets = np.arange(0.05, N_T / SFREQ, 0.3)  # the first starts before 0 with tmin=-0.1,
    rows = [("phoneme", SEGMENTS[i % 3], t) for i, t in enumerate(onsets)]  # the last runs past the end
    rows += [("phoneme", "sil", 2.0), ("phoneme", "oov_S", 2.5), ("word", "holmes", 3.0)]
    ev = events_path(root, key)
    ev.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["kind", "segment", "timemeg"]).to_csv(ev, sep="\t", index=False)
    return data


@pytest.fixture
def libri(tmp_path, monkeypatch):
    """A LibriBrain folder with a train, validation and test run; returns (root, {key: data})."""
    monkeypatch.setenv("PNPL_CACHE_DIR", str(tmp_path / "pnpl-cache"))
    root = tmp_path / "libribrain"
    runs = {key: write_run(root, key, seed) for seed, key in enumerate((TRAIN_KEY, VAL_KEY, TEST_KEY))}
    return root, runs


def split(root, **kw):
    kw.setdefault("train_runs", [list(TRAIN_KEY)])
    kw.setdefault("tmin", TMIN)
    kw.setdefault("tmax", TMAX)
    kw.setdefault("group_size", 4)
    kw.setdefault("progress", False)
    return lb.split_datasets_libribrain(root, **kw)


def expected_windows(examples, data, means, stds, clip=10.0):
    """Standardized windows (N, C, T) of ``examples`` computed straight from the raw array."""
    out = []
    for i in examples.indices:
        onset = examples.base.samples[i][4]
        start = int((onset + TMIN) * SFREQ)
        w = (data[:, start:start + T_WIN].astype(np.float64) - means[:, None]) / stds[:, None]
        out.append(np.clip(w, -clip, clip))
    return np.stack(out)


def test_examples_read_through_pnpl(libri):
    root, runs = libri
    sp = split(root, dataset_class="LibriBrainPhonemeDataset")
    train = sp.train
    assert isinstance(train, lb.LibriBrainPhonemeDataset)
    assert train.input_kind == "labelled" and train.num_classes == 39
    assert train.sfreq == SFREQ and train.n_times == T_WIN and train.n_channels == N_CH
    # sil/oov/word rows are not phonemes; the first and last windows leave the recording.
    n_onsets = len(np.arange(0.05, N_T / SFREQ, 0.3))
    assert len(train) == n_onsets - 2
    names = [train.label_names[i] for i in train.example_labels]
    assert names[:3] == ["b", "s", "aa"]  # the first phoneme (aa at 0.05 s) was dropped
    assert train.labels == sorted(train.label_names.index(p) for p in ("aa", "b", "s"))

    # Standardized with the training run's statistics, in every split.
    data = runs[TRAIN_KEY].astype(np.float64)
    np.testing.assert_allclose(train.channel_means, data.mean(1), rtol=1e-6)
    np.testing.assert_allclose(train.channel_stds, data.std(1), rtol=1e-6)
    np.testing.assert_allclose(sp.val.channel_stds, train.channel_stds)
    assert sp.val.ch_names == ["MEG0011", "MEG0111", "MEG0211", "MEG0311"]
    want = expected_windows(train, runs[TRAIN_KEY], train.channel_means, train.channel_stds)
    for i in (0, 7, len(train) - 1):
        x, y = train[i]
        assert x.dtype == torch.float32 and x.shape == (N_CH, T_WIN)
        assert y.dtype == torch.int64 and y.ndim == 0 and int(y) == train.example_labels[i]
        np.testing.assert_allclose(x.numpy(), want[i], rtol=1e-5, atol=1e-5)
    # The recorded steps invert the z-scoring back to the raw units.
    raw = invert_steps(train[3][0].double(), train.steps)
    start = int((train.base.samples[train.indices[3]][4] + TMIN) * SFREQ)
    np.testing.assert_allclose(raw.numpy(), runs[TRAIN_KEY][:, start:start + T_WIN], atol=1e-4)


def test_channel_stats_cached_beside_the_data(libri):
    root, runs = libri
    cache_dir = root / "derivatives" / "ephys_gpt"
    split(root, stats_cache=False)
    assert not cache_dir.exists()
    first = split(root).train.dataset
    (cache,) = cache_dir.glob("channel_stats_*.npz")
    with h5py.File(h5_path(root, TRAIN_KEY), "r") as f:  # the data files are never written
        assert set(f["data"].attrs) == set()
    # A second split reads the cache (planted values show it is used) ...
    np.savez(cache, mean=np.zeros(N_CH), std=np.full(N_CH, 2.0))
    again = split(root).train.dataset
    np.testing.assert_array_equal(again.channel_stds, np.full(N_CH, 2.0))
    # ... until a training run changes.
    with h5py.File(h5_path(root, TRAIN_KEY), "a") as f:
        f["data"][0, :10] = 0.0
    changed = split(root).train.dataset
    assert len(list(cache_dir.glob("channel_stats_*.npz"))) == 2
    data = runs[TRAIN_KEY].astype(np.float64)
    data[0, :10] = 0.0
    np.testing.assert_allclose(changed.channel_stds, data.std(1), rtol=1e-6)
    assert not np.allclose(changed.channel_stds, first.channel_stds)


def test_random_groups_average_k_examples_of_one_label(libri):
    root, runs = libri
    sp = split(root, seed=3)
    train = sp.train
    assert isinstance(train, RandomLabelGroupedDataset) and not train.deterministic
    examples = train.dataset
    assert train.num_classes == 39 and train.input_kind == "labelled"
    assert train.label_names == examples.label_names and len(train.labels) == 3
    assert len(train) == math.ceil(len(examples) / 4)
    want = expected_windows(examples, runs[TRAIN_KEY], examples.channel_means, examples.channel_stds)

    train.set_epoch(0)
    items = [train[i] for i in range(len(train))]
    replay = np.random.default_rng([3, 0])  # the stream set_epoch(0) defines
    for x, y in items:
        idx, label = train.draw_group(replay)
        assert len(idx) == 4 and len(set(idx.tolist())) == 4
        assert set(examples.example_labels[idx].tolist()) == {label} and int(y) == label
        np.testing.assert_allclose(x.numpy(), want[idx].mean(0), rtol=1e-5, atol=1e-5)
    # Same epoch, same groups; another epoch, other groups.
    train.set_epoch(0)
    assert all(torch.equal(train[i][0], items[i][0]) for i in range(len(train)))
    train.set_epoch(1)
    assert not all(torch.equal(train[i][0], items[i][0]) for i in range(len(train)))
    with pytest.raises(IndexError):
        train[len(train)]


def test_label_drawn_uniformly_over_labels_present():
    # 90 examples of class 5, 10 of class 2: groups must still pick each class half the time.
    labels = np.array([5] * 90 + [2] * 10)
    data = torch.arange(100, dtype=torch.float32).reshape(100, 1, 1).expand(100, 2, 3)
    base = [(data[i], labels[i]) for i in range(100)]
    ds = RandomLabelGroupedDataset(base, example_labels=labels, num_classes=8, group_size=20,
                                   epoch_length=400, seed=0)
    drawn = [ds.draw_group()[1] for _ in range(400)]
    assert ds.labels == [2, 5] and 160 < drawn.count(2) < 240
    # Class 2 has fewer than k examples: its group averages all 10 of them.
    idx, label = next((i, lab) for i, lab in (ds.draw_group() for _ in range(50)) if lab == 2)
    assert sorted(idx.tolist()) == list(range(90, 100))


def test_fixed_groups_for_evaluation(libri):
    root, runs = libri
    sp = split(root, seed=1)
    val = sp.val
    assert val.deterministic and val.groups is not None
    examples = val.dataset
    # Every example is used exactly once, grouped within its label.
    used = np.concatenate(val.groups)
    assert sorted(used.tolist()) == list(range(len(examples)))
    assert len(val) == len(val.groups) == sum(math.ceil(n / 4) for n in np.bincount(examples.example_labels) if n)
    want = expected_windows(examples, runs[VAL_KEY], examples.channel_means, examples.channel_stds)
    for i in range(len(val)):
        idx = val.groups[i]
        x, y = val[i]
        assert set(examples.example_labels[idx].tolist()) == {int(y)}
        np.testing.assert_allclose(x.numpy(), want[idx].mean(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(val[2][0], val[2][0])
    # Same seed, same groups; drop_last keeps only full groups.
    again = split(root, seed=1, drop_last=True).val
    assert all(len(g) == 4 for g in again.groups)
    full = [g.tolist() for g in val.groups if len(g) == 4]
    assert [g.tolist() for g in again.groups] == full


def test_mulaw_tokens_and_augmentations(libri):
    root, runs = libri
    calls = []

    def flip(x):
        calls.append(x.shape)
        return -x

    plain = split(root, seed=2)
    sp = split(root, seed=2, dataset_class="GroupedDatasetAugmented", quantize_bits=6,
               augmentations=flip)
    train, val = sp.train, sp.val
    assert isinstance(train, GroupedDatasetAugmented) and train.num_classes == 39
    assert train.quantize_scale == 10.0  # defaults to the clipping boundary
    train.set_epoch(0)
    plain.train.set_epoch(0)
    x, y = train[0]
    ref, ref_y = plain.train[0]
    assert calls == [(N_CH, T_WIN)] and int(y) == int(ref_y)
    assert x.dtype == torch.int64 and x.shape == (N_CH, T_WIN)
    assert int(x.min()) >= 0 and int(x.max()) <= 63
    assert torch.equal(x, mulaw_quantize(-ref, 6, 10.0))
    # Evaluation items are never augmented, but are quantized.
    xv, _ = val[0]
    assert len(calls) == 1
    assert torch.equal(xv, mulaw_quantize(plain.val[0][0], 6, 10.0))
    assert val.steps[-1] == {"name": "mulaw_quantize", "n_bits": 6, "mu": 63, "scale": 10.0,
                             "scale_from": "config"}
    decoded = invert_steps(xv, val.steps[-1:])
    assert torch.allclose(decoded, plain.val[0][0], atol=0.2)
    with pytest.raises(ValueError, match="GroupedDatasetAugmented"):
        split(root, quantize_bits=8)


def test_augmentations_from_config(libri):
    pytest.importorskip("ephys_gpt.dataset.augmentations")
    root, _ = libri
    plain = split(root, seed=4)
    sp = split(root, seed=4, dataset_class="GroupedDatasetAugmented",
               augmentations=[{"name": "amplitude_scale", "low": 2.0, "high": 2.0, "p": 1.0}])
    plain.train.set_epoch(0)
    sp.train.set_epoch(0)
    x, y = sp.train[0]
    ref, ref_y = plain.train[0]
    assert x.dtype == torch.float32 and int(y) == int(ref_y)
    torch.testing.assert_close(x, 2 * ref)
    torch.testing.assert_close(sp.val[0][0], plain.val[0][0])  # evaluation: not augmented
    with pytest.raises(ValueError, match="unknown augmentation name"):
        split(root, dataset_class="GroupedDatasetAugmented", augmentations=[{"name": "nope"}])


@pytest.fixture
def fd_free_sharing():
    """Workers pass tensors through shared-memory files, not the unix socket that the
    ``file_descriptor`` strategy opens (conftest's network guard refuses every socket)."""
    old = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    yield
    torch.multiprocessing.set_sharing_strategy(old)


def test_deterministic_with_workers(libri, fd_free_sharing):
    root, _ = libri
    train = split(root, seed=5, epoch_length=8).train

    def run():
        torch.manual_seed(123)
        loader = DataLoader(train, batch_size=2, num_workers=2, shuffle=True)
        return [(x.clone(), y.clone()) for x, y in loader]

    a, b = run(), run()
    assert len(a) == 4 and a[0][0].shape == (2, N_CH, T_WIN) and a[0][1].shape == (2,)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    # The two workers draw from different streams.
    items = torch.cat([x for x, _ in a])
    assert len({tuple(v.flatten()[:5].tolist()) for v in items}) == len(items)


def test_missing_files_are_named(libri):
    root, _ = libri
    ev = events_path(root, VAL_KEY)
    ev.unlink()
    with pytest.raises(FileNotFoundError) as err:
        split(root)
    assert str(ev) in str(err.value) and "val" in str(err.value)
    # The default training partition needs every LibriBrain run: all missing ones are listed.
    with pytest.raises(FileNotFoundError, match="runs have missing files") as err:
        split(root, train_runs="train", val_runs=None, test_runs=None)
    assert str(h5_path(root, ("0", "2", "Sherlock1", "1"))) in str(err.value)
    # skip: the runs present are used; a split with none left still fails.
    sp = split(root, train_runs="train", val_runs=None, missing_runs="skip")
    assert sp.train.dataset.run_keys == [TRAIN_KEY] and sp.val is None and len(sp.test) > 0
    with pytest.raises(FileNotFoundError, match="no run of the split is complete"):
        split(root, missing_runs="skip")
    with pytest.raises(FileNotFoundError, match="nope"):
        split(root / "nope")
    assert not (root / "nope").exists()  # pnpl would have created it


def test_malformed_files_are_named(libri):
    root, _ = libri
    h5 = h5_path(root, TEST_KEY)
    with h5py.File(h5, "a") as f:
        del f.attrs["sample_frequency"]
    with pytest.raises(ValueError, match="sample_frequency") as err:
        split(root)
    assert str(h5) in str(err.value)
    ev = events_path(root, VAL_KEY)
    pd.DataFrame({"kind": ["phoneme"], "onset": [1.0]}).to_csv(ev, sep="\t", index=False)
    with pytest.raises(ValueError, match="segment") as err:
        split(root, test_runs=None)
    assert str(ev) in str(err.value)
    # Well-formed but without a single phoneme: pnpl's error, naming the events file.
    pd.DataFrame({"kind": ["word"], "segment": ["holmes"], "timemeg": [1.0]}).to_csv(
        ev, sep="\t", index=False)
    with pytest.raises(ValueError, match="No samples found") as err:
        split(root, train_runs=[list(VAL_KEY)], val_runs=None, test_runs=None)
    assert str(ev) in str(err.value)
    with pytest.raises(ValueError, match="run key"):
        split(root, train_runs=[["0", "1", "Sherlock1"]])
    with pytest.raises(ValueError, match="dataset_class"):
        split(root, dataset_class="ChunkDataset")


def test_never_touches_the_network(libri, monkeypatch):
    """pnpl's remote constants and HuggingFace downloads are never called, even when unset."""
    import huggingface_hub
    import huggingface_hub.file_download
    import requests
    from pnpl.datasets.libribrain2025 import remote_constants
    from pnpl.datasets.mixins import download

    root, _ = libri
    calls = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: {args!r}")
        return fail

    for mod, attr in [(requests, "get"), (requests, "request"), (requests.Session, "request"),
                      (huggingface_hub, "hf_hub_download"),
                      (huggingface_hub.file_download, "hf_hub_download"),
                      (huggingface_hub, "snapshot_download")]:
        monkeypatch.setattr(mod, attr, forbidden(f"{mod.__name__}.{attr}"))
    monkeypatch.setattr(download.HFDownloadMixin, "_download_with_retry_static",
                        staticmethod(forbidden("pnpl download")))
    monkeypatch.delenv("PNPL_REMOTE_CONSTANTS_DISABLED", raising=False)
    monkeypatch.setattr(remote_constants._manager, "_cached_constants", None)  # force a lookup

    sp = split(root)
    assert len(sp.train.dataset.label_names) == 39 and sp.train[0][0].shape == (N_CH, T_WIN)
    # A file that vanishes after construction is an error naming it, not a download.
    h5_path(root, TEST_KEY).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(h5_path(root, TEST_KEY)))):
        sp.test[0]
    with pytest.raises(FileNotFoundError, match="Sherlock1"):
        split(root)
    assert calls == []
    assert remote_constants._manager._cached_constants is not None
    assert "PNPL_REMOTE_CONSTANTS_DISABLED" not in os.environ  # restored after use


def test_splitter_returns_datasplits(libri):
    root, _ = libri
    sp = split(root)
    assert sp._fields == ("train", "val", "test")
    assert sp.train.dataset.ch_names == [f"ch{i}" for i in range(N_CH)]
    assert sp.train.dataset.window_samples == T_WIN
    # dataset_root is the run YAML's name for the folder; exactly one of the two is given.
    alias = lb.split_datasets_libribrain(dataset_root=root, train_runs=[list(TRAIN_KEY)],
                                         group_size=4, progress=False)
    assert [d.dataset.run_keys for d in alias] == [[TRAIN_KEY], [VAL_KEY], [TEST_KEY]]
    with pytest.raises(ValueError, match="exactly one"):
        lb.split_datasets_libribrain(root, dataset_root=root)
    assert [d.dataset.run_keys for d in sp] == [[TRAIN_KEY], [VAL_KEY], [TEST_KEY]]
    try:
        from ephys_gpt.dataset.registry import DataSplits, dataset_input_kind, get_splitter
    except ImportError:
        return
    assert isinstance(sp, DataSplits)
    assert get_splitter("libribrain") is lb.split_datasets_libribrain
    for name in lb.DATASET_CLASSES:
        assert dataset_input_kind("libribrain", {"dataset_class": name}) == "labelled"


def test_works_with_mixup_loader(libri):
    mixup = pytest.importorskip("ephys_gpt.dataset.mixup")
    root, _ = libri
    train = split(root, epoch_length=6).train
    loader = mixup.MixupDataLoader(train, alpha=0.4, batch_size=3)
    batches = list(loader)
    assert len(batches) == 2
    x, y = batches[0]
    assert x.shape == (3, N_CH, T_WIN) and x.dtype == torch.float32
    assert y.shape == (3, train.num_classes)  # soft targets over all classes
    torch.testing.assert_close(y.sum(-1), torch.ones(3))
    assert set(torch.nonzero(y)[:, 1].tolist()) <= set(train.labels)


PNPL_NAMES = ["MEG0111", "MEG0112", "MEG0113", "MEG0121"]
PNPL_TYPES = ["mag", "grad", "grad", "mag"]


def write_run_with_pnpl(root: Path, key, data: np.ndarray) -> None:
    """Re-write a run's h5 with pnpl's own serializer, exactly as pnpl stores it: the channel
    names and types each as ONE comma-separated string attribute ("MEG0111, MEG0112, ...")."""
    mne = pytest.importorskip("mne")
    from pnpl.preprocessing.serialization import fif_to_h5

    info = mne.create_info(PNPL_NAMES, SFREQ, PNPL_TYPES)
    raw = mne.io.RawArray(data.astype(np.float64), info, verbose="error")
    h5 = h5_path(root, key)
    h5.unlink()
    fif_to_h5(raw, str(h5))


def test_files_written_by_pnpls_serializer(libri):
    root, runs = libri
    for key, data in runs.items():
        write_run_with_pnpl(root, key, data)
    with h5py.File(h5_path(root, TRAIN_KEY), "r") as f:  # the form that used to be refused
        assert f.attrs["channel_names"] == ", ".join(PNPL_NAMES)
        assert f.attrs["channel_types"] == ", ".join(PNPL_TYPES)
    sp = split(root, dataset_class="LibriBrainPhonemeDataset")
    for ds in sp:
        assert ds.ch_names == PNPL_NAMES and ds.ch_types == PNPL_TYPES
    train = sp.train
    want = expected_windows(train, runs[TRAIN_KEY], train.channel_means, train.channel_stds)
    for i in (0, len(train) - 1):
        np.testing.assert_allclose(train[i][0].numpy(), want[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [
    "MEG0111, MEG0112, MEG0113, MEG0121",          # pnpl's serializer (str attribute)
    b"MEG0111,MEG0112,MEG0113,MEG0121",            # the same as bytes
    np.array(b"MEG0111, MEG0112, MEG0113, MEG0121"),  # as a 0-d array
    ["MEG0111", "MEG0112", "MEG0113", "MEG0121"],  # a list of str
    np.array([b"MEG0111", b"MEG0112", b"MEG0113", b"MEG0121"]),  # fixed-length bytes
])
def test_channel_attribute_forms(value):
    assert lb.channel_list_attr(value, "channel_names", "x.h5") == PNPL_NAMES


def test_channel_attribute_with_the_wrong_count_is_named(libri):
    root, _ = libri
    with h5py.File(h5_path(root, TRAIN_KEY), "a") as f:
        f.attrs["channel_types"] = "mag, grad"
    with pytest.raises(ValueError, match=r"attribute 'channel_types' has 2 entries for 4 channels"):
        split(root)
    with h5py.File(h5_path(root, TRAIN_KEY), "a") as f:
        f.attrs["channel_types"] = np.array([1, 2, 3, 4])
    with pytest.raises(ValueError, match=r"'channel_types' should hold text.*found int64 "):
        split(root)

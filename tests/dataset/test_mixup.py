"""MixupDataLoader: soft labels, paired continuous targets, quantization, errors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from ephys_gpt.codec import mulaw_quantize
from ephys_gpt.dataset.datasets import (
    ChunkDataset,
    ChunkDatasetForecastCont,
    ChunkDatasetReconstruction,
)
from ephys_gpt.dataset.mixup import MixupCollate, MixupDataLoader


class Labelled(Dataset):
    """x encodes its own label as a one-hot over channels: (K, 1) float, label int64."""

    def __init__(self, n=32, k=5, with_attr=True):
        g = torch.Generator().manual_seed(0)
        self.labels = torch.randint(0, k, (n,), generator=g)
        self.k = k
        if with_attr:
            self.num_classes = k

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        y = self.labels[i]
        return torch.nn.functional.one_hot(y, self.k).float()[:, None], y


def test_labelled_batches_get_soft_labels():
    loader = MixupDataLoader(Labelled(), alpha=0.4, batch_size=16)
    x, y = next(iter(loader))
    assert x.shape == (16, 5, 1) and y.shape == (16, 5) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(16))
    # The soft label carries exactly the weights used to mix the inputs.
    torch.testing.assert_close(x[:, :, 0], y)
    assert ((y > 0) & (y < 1)).any()  # something was actually mixed


def test_num_classes_from_kwarg_or_error():
    ds = Labelled(with_attr=False)
    x, y = next(iter(MixupDataLoader(ds, num_classes=7, batch_size=4)))
    assert y.shape == (4, 7)
    with pytest.raises(ValueError, match="pass num_classes=K"):
        next(iter(MixupDataLoader(ds, batch_size=4)))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        next(iter(MixupDataLoader(ds, num_classes=3, batch_size=32)))


def test_continuous_pairs_mix_inputs_and_targets_alike(make_store):
    ds = ChunkDatasetForecastCont.from_root(make_store(), example_seconds=0.1)
    torch.manual_seed(0)
    x, y = next(iter(MixupDataLoader(ds, alpha=1.0, batch_size=8, shuffle=False)))
    assert x.shape == y.shape == (8, 4, 10) and x.dtype == torch.float32
    # The same weights and partners: the mixed target is the mixed input one step ahead.
    torch.testing.assert_close(x[:, :, 1:], y[:, :, :-1])
    clean = torch.stack([ds[i][0] for i in range(8)])
    assert not torch.allclose(x, clean)
    # Every mixed window is a convex combination of two windows of the batch.
    for b in range(8):
        found = False
        for j in range(8):
            d = clean[b] - clean[j]
            if torch.allclose(d, torch.zeros_like(d)):
                found = torch.allclose(x[b], clean[b], atol=1e-5) or found
                continue
            lam = ((x[b] - clean[j]) * d).sum() / (d * d).sum()
            if 0 <= lam <= 1 and torch.allclose(x[b], lam * clean[b] + (1 - lam) * clean[j],
                                                atol=1e-5):
                found = True
        assert found


def test_quantize_bits_gives_shifted_tokens(make_store):
    ds = ChunkDatasetForecastCont.from_root(make_store(), example_seconds=0.1)
    torch.manual_seed(0)
    loader = MixupDataLoader(ds, alpha=0.2, quantize_bits=8, quantize_scale=0.5, batch_size=8)
    x, y = next(iter(loader))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 4, 10)
    assert int(x.min()) >= 0 and int(x.max()) <= 255
    torch.testing.assert_close(x[:, :, 1:], y[:, :, :-1])
    # Quantization happens after mixing: same draws without quantization give these tokens.
    torch.manual_seed(0)
    xc, _ = next(iter(MixupDataLoader(ds, alpha=0.2, batch_size=8)))
    torch.testing.assert_close(x, mulaw_quantize(xc, 8, 0.5))


def test_tuple_inputs_mix_only_the_signal(make_store):
    ds = ChunkDatasetReconstruction.from_root(make_store(), example_seconds=0.1)
    (x, pos, ch_type), y = next(iter(MixupDataLoader(ds, batch_size=4)))
    assert x.shape == y.shape == (4, 4, 10)
    torch.testing.assert_close(x, y)  # reconstruction target mixed identically
    torch.testing.assert_close(pos, ds[0][0][1].expand(4, -1, -1))
    assert ch_type.dtype == torch.int64


def test_tokens_cannot_be_mixed(make_store):
    ds = ChunkDataset.from_root(make_store(tokens=True), example_seconds=0.1)
    with pytest.raises(TypeError, match="mixing token ids is meaningless"):
        next(iter(MixupDataLoader(ds, batch_size=4)))


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0}, "alpha must be a positive number"),
    ({"quantize_bits": 20}, "quantize_bits must be None or an integer"),
    ({"quantize_scale": 0}, "quantize_scale must be a positive number"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixupCollate(**kwargs)


def test_workers(make_store):
    ds = ChunkDatasetForecastCont.from_root(make_store(), example_seconds=0.1)
    loader = MixupDataLoader(ds, batch_size=4, num_workers=2, quantize_bits=8)
    batches = list(loader)
    assert sum(len(x) for x, _ in batches) == len(ds)
    assert all(x.dtype == torch.int64 for x, _ in batches)

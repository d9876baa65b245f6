"""Simulated raw MEG -> stage 1 (osl-ephys) -> stage 2 (chunk store) -> every dataset class.

The same path real data takes: `ephys-gpt simulate`, then `ephys-gpt preprocess`, then the
datasplitter's classes must yield correctly shaped items from the store.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from ephys_gpt import store
from ephys_gpt.cli import main
from ephys_gpt.dataset.datasplitter import split_datasets
from ephys_gpt.dataset.registry import DATASETS
from ephys_gpt.preprocessing.stage1 import find_outputs
from ephys_gpt.preprocessing.stage2 import Stage2Settings, run_stage2

C, SFREQ, EXAMPLE_SECONDS = 306, 100.0, 2.0
T = int(EXAMPLE_SECONDS * SFREQ)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """2 subjects x 2 sessions x 60 s, simulated with faults and preprocessed via the CLI."""
    root = tmp_path_factory.mktemp("e2e")
    pkg = logging.getLogger("ephys_gpt")
    saved = (list(pkg.handlers), pkg.propagate, pkg.level)
    try:
        assert main(["-q", "simulate", "--out", str(root / "raw"), "--subjects", "2",
                     "--sessions", "2", "--seconds", "60", "--seed", "0", "--faults",
                     "--no-progress"]) == 0
        cfg = root / "preprocess.yaml"
        cfg.write_text(yaml.safe_dump({
            "data_path": "raw", "save_folder": "preprocessed", "dataset": "auto",
            "chunk_seconds": 10, "progress": False,
            "preproc_config": {"normalize": {"method": "robust"}, "clip": {"std_factor": 6}},
        }, sort_keys=False))
        assert main(["-q", "preprocess", "--args", str(cfg), "--stage", "both"]) == 0
    finally:
        pkg.handlers[:], pkg.propagate, pkg.level = saved
    continuous = root / "preprocessed" / "chunks"
    tokens = root / "tokens"
    result = run_stage2(find_outputs(root / "preprocessed" / "stage1"), tokens,
                        Stage2Settings(steps={"normalize": {"method": "robust"},
                                              "clip": {"std_factor": 6},
                                              "mulaw_quantize": {"n_bits": 8}},
                                       bad_channels="keep"), progress=False)
    assert result.ok
    return continuous, tokens


def test_store_holds_every_session(pipeline):
    continuous, tokens = pipeline
    metas = store.list_sessions(continuous)
    store.check_compatible(metas)
    assert [m.name for m in metas] == [f"sub-{a:02d}_ses-{b:02d}_task-rest"
                                       for a in (1, 2) for b in (1, 2)]
    for m in metas:
        assert m.sfreq == SFREQ and m.n_channels == C and m.dtype == "float32"
        assert sum(m.chunk_lengths) <= 6000 and max(m.chunk_lengths) == 1000
        assert m.provenance["subject"] in ("01", "02")
    assert all(m.is_tokens and m.dtype == "uint8" for m in store.list_sessions(tokens))


def _check_item(cls, ds, item):
    kind = cls.input_kind
    if kind == "tokens":
        x, y = item
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (C, T)
        assert torch.equal(x[:, 1:], y[:, :-1]) and x.min() >= 0 and x.max() <= 255
    elif kind == "continuous":
        x, y = item
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape == (C, T)
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.isfinite(x).all()
    elif kind == "continuous_meta":
        (x, pos, ch_type), target = item
        assert x.dtype == torch.float32 and x.shape == (C, T) and target.shape == (C, T)
        assert pos.shape == (C, 2) and ch_type.shape == (C,) and ch_type.dtype == torch.int64
        assert len(torch.unique(ch_type)) == 2  # magnetometers and gradiometers
    elif kind == "image":
        img, target = item
        h, w = ds.image_shape
        assert img.dtype == torch.float32 and img.shape == (h, w, T)
        back = ds.image_to_channels(img)
        assert back.shape == (C, T) and torch.count_nonzero(back) > 0
    elif kind == "image_tokens":
        x, y = item
        h, w = ds.image_shape
        assert x.dtype == torch.int64 and x.shape == y.shape == (h, w, T)
        assert torch.equal(x[..., 1:], y[..., :-1])
    else:
        pytest.fail(f"{cls.__name__}: input kind {kind!r} has no end-to-end check yet")


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_class_yields_shaped_items(pipeline, name):
    continuous, tokens = pipeline
    cls = DATASETS.get(name)
    produces_tokens = getattr(cls, "produces", "continuous") == "tokens"
    roots = [(continuous, {"quantize": {"n_bits": 8, "scale": 6.0}} if produces_tokens else {})]
    if produces_tokens:
        roots.append((tokens, {}))  # token datasets also read a token store directly
    for root, kwargs in roots:
        splits = split_datasets(root, dataset_class=name, example_seconds=EXAMPLE_SECONDS,
                                split_by="session", val_ratio=0.25, test_ratio=0.25, seed=0,
                                dataset_kwargs=kwargs)
        train = splits.train
        assert len(train) > 0 and len(splits.val) > 0 and len(splits.test) > 0
        for i in (0, len(train) - 1):
            _check_item(cls, train, train[i])
        batch = next(iter(DataLoader(train, batch_size=2, shuffle=False)))
        first = batch[0][0] if isinstance(batch[0], (list, tuple)) else batch[0]
        assert first.shape[0] == 2


def test_tokens_decode_back_to_tesla(pipeline):
    """Dataset tokens -> recorded steps -> stage-1 units (tesla-scale values)."""
    _, tokens = pipeline
    splits = split_datasets(tokens, dataset_class="ChunkDataset",
                            example_seconds=EXAMPLE_SECONDS, val_ratio=0.25, test_ratio=0.25)
    from ephys_gpt.codec import tokens_to_signal

    x, _ = splits.train[0]
    sig = tokens_to_signal(x.numpy(), splits.train.steps)
    mags = [i for i, t in enumerate(splits.train.ch_types) if t == "mag"]
    assert 1e-15 < np.abs(sig[mags]).mean() < 1e-10

"""Small stand-ins and fixtures shared by the training tests.

``make_store`` writes a synthetic chunk store with the real writer. ``StandinSplitter``
mimics ``ephys_gpt.dataset.datasplitter`` (internals.md) for checkouts where the dataset
engineer's module has not landed; tests prefer the real module when it imports.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from ephys_gpt.dataset.store import check_compatible, list_sessions, load_chunk

N_CH, SFREQ, N_BITS = 3, 100.0, 4


def make_store(root: Path, n_sessions: int = 3, n_chunks: int = 2, chunk_samples: int = 200,
               tokens: bool = True, seed: int = 0) -> Path:
    """Write ``n_sessions`` sessions of AR(1)-like signals (as 4-bit tokens or float32)."""
    from ephys_gpt.dataset.store import write_session
    from ephys_gpt.preprocessing.transforms import mulaw_quantize

    rng = np.random.default_rng(seed)
    for s in range(n_sessions):
        chunks = []
        for _ in range(n_chunks):
            x = np.cumsum(rng.standard_normal((N_CH, chunk_samples)), axis=-1) * 0.05
            x = np.clip(x, -1, 1).astype(np.float32)
            chunks.append(mulaw_quantize(x, N_BITS) if tokens else x)
        steps = [{"name": "normalize", "method": "zscore", "center": [0.0] * N_CH,
                  "scale": [1.0] * N_CH}]
        if tokens:
            steps.append({"name": "mulaw_quantize", "n_bits": N_BITS, "mu": 2**N_BITS - 1,
                          "scale": 1.0})
        write_session(root, f"sub-{s:02d}_ses-01", chunks, {
            "sfreq": SFREQ, "ch_names": [f"MEG{i:03d}" for i in range(N_CH)],
            "ch_types": ["mag"] * N_CH, "pos_2d": [[float(i), 0.0] for i in range(N_CH)],
            "chunk_samples": chunk_samples, "steps": steps})
    return root


class _Windows(Dataset):
    input_kind = "tokens"

    def __init__(self, metas, example_seconds: float):
        self.metas = metas
        m = metas[0]
        self.sfreq, self.ch_names, self.ch_types = m.sfreq, m.ch_names, m.ch_types
        self.pos_2d, self.steps = m.pos_2d, m.steps
        self.window_samples = int(round(example_seconds * m.sfreq)) + 1
        self.index = [(mi, ci, st) for mi, me in enumerate(metas)
                      for ci, n in enumerate(me.chunk_lengths)
                      for st in range(0, n - self.window_samples + 1, self.window_samples)]

    def __len__(self):
        return len(self.index)

    def _window(self, i):
        mi, ci, st = self.index[i]
        return np.asarray(load_chunk(self.metas[mi], ci)[:, st:st + self.window_samples])


class _Tokens(_Windows):
    input_kind = "tokens"

    def __getitem__(self, i):
        x = torch.from_numpy(self._window(i).astype(np.int64))
        return x[:, :-1], x[:, 1:]


class _Cont(_Windows):
    input_kind = "continuous"

    def __getitem__(self, i):
        x = torch.from_numpy(self._window(i).astype(np.float32))
        return x[:, :-1], x[:, 1:]


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset


DATASET_CLASSES = {"ChunkDataset": _Tokens, "ChunkDatasetForecastCont": _Cont}


def split_datasets(dataset_root, *, dataset_class="ChunkDataset", example_seconds=2.0,
                   stride_seconds=None, split_by="session", val_ratio=0.1, test_ratio=0.1,
                   seed=0, augmentations=None, dataset_kwargs=None):
    metas = list_sessions(dataset_root)
    check_compatible(metas)
    cls = DATASET_CLASSES[dataset_class]
    return DataSplits(cls(metas[:-2], example_seconds), cls(metas[-2:-1], example_seconds),
                      cls(metas[-1:], example_seconds))


def get_splitter(name):
    if name not in ("omega", "chunks"):
        raise ValueError(f"unknown dataset_name {name!r}; valid: chunks, omega")
    return split_datasets


def dataset_input_kind(name, cfg):
    cls = cfg.get("dataset_class", "ChunkDataset")
    if cls not in DATASET_CLASSES:
        raise ValueError(f"unknown dataset_class {cls!r}; valid: {sorted(DATASET_CLASSES)}")
    return DATASET_CLASSES[cls].input_kind


def install_datasplitter_standin() -> bool:
    """Use the real datasplitter if it imports; otherwise register this stand-in.

    Returns True when the stand-in was installed.
    """
    try:
        importlib.import_module("ephys_gpt.dataset.datasplitter")
        return False
    except ModuleNotFoundError as err:
        if err.name != "ephys_gpt.dataset.datasplitter":
            raise
    mod = types.ModuleType("ephys_gpt.dataset.datasplitter")
    for name in ("DataSplits", "DATASET_CLASSES", "split_datasets", "get_splitter",
                 "dataset_input_kind"):
        setattr(mod, name, globals()[name])
    sys.modules[mod.__name__] = mod
    return True


def tiny_run(store: Path, save_dir: Path, **extra) -> dict:
    """A GPT2MEG run config small enough to train a few steps in about a second."""
    cfg = {
        "model_name": "GPT2MEG",
        "model_config": {"n_positions": 32, "d_model": 16, "n_layers": 1, "n_heads": 2},
        "loss_name": "CrossEntropy",
        "loss": {"label_smoothing": 0.0},
        "datasplitter": {"dataset_root": str(store), "dataset_class": "ChunkDataset",
                         "example_seconds": 0.2, "val_ratio": 0.34, "test_ratio": 0.34},
        "dataloader": {"batch_size": 4},
        "lightning": {"lr": 1e-3, "warmup_steps": 2},
        "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2,
                    "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0},
        "save_dir": str(save_dir),
        "seed": 1,
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path

"""Fixtures of the eval tests (the store itself is built in eval_token_store.py)."""

from __future__ import annotations

import pytest
from eval_token_store import write_token_store

from ephys_gpt.dataset.datasplitter import split_datasets


@pytest.fixture(scope="session")
def token_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    write_token_store(root)
    return root


@pytest.fixture(scope="session")
def token_splits(token_store):
    """ChunkDataset splits by session (2 train, 1 val, 1 test) of 64-sample windows."""
    return split_datasets(token_store, dataset_class="ChunkDataset", example_seconds=0.64,
                          val_ratio=0.25, test_ratio=0.25, seed=0)

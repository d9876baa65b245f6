"""Fixtures of the eval tests (the store itself is built in eval_token_store.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from eval_token_store import TokenWindows, write_token_store


@pytest.fixture(scope="session")
def token_splits(tmp_path_factory):
    """Train (2 sessions) / val / test (1 session) windows of 65 samples of mu-law tokens."""
    metas = write_token_store(tmp_path_factory.mktemp("tokens"))
    window = 65
    return SimpleNamespace(train=TokenWindows(metas[:2], window),
                           val=TokenWindows(metas[2:], window),
                           test=TokenWindows(metas[2:], window))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run faster on one thread, and the test machine's cores are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

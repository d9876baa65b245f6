"""Shared fixtures. Every test runs offline: any socket connection fails loudly."""

from __future__ import annotations

import os
import socket

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("MNE_DONTWRITE_HOME", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any attempt to open a network connection (the project must work offline)."""

    def guard(*args, **kwargs):
        raise NetworkAccessError(f"test tried to open a network connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket.socket, "connect_ex", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    yield


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield

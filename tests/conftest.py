"""Shared fixtures. Every test runs offline: any socket connection fails loudly."""

from __future__ import annotations

import os
import socket

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
# The tests run tiny models; on a 2-core machine (CI), intra-op threads only add
# synchronisation overhead, and they stall badly when the cores are shared.
torch.set_num_threads(1)
os.environ.setdefault("MNE_DONTWRITE_HOME", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any attempt to open a network connection (the project must work offline)."""

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def _check(sock, address):
        # Unix sockets stay usable: DataLoader workers pass tensors through them.
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkAccessError(f"test tried to open a network connection to {address!r}")

    def connect(sock, address):
        _check(sock, address)
        return real_connect(sock, address)

    def connect_ex(sock, address):
        _check(sock, address)
        return real_connect_ex(sock, address)

    def create_connection(address, *args, **kwargs):
        raise NetworkAccessError(f"test tried to open a network connection to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield


@pytest.fixture(autouse=True)
def _seed():
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    yield

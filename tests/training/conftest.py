"""Fixtures for the training tests: a synthetic chunk store and a tiny run YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import make_store, tiny_run


@pytest.fixture(scope="session")
def token_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "chunks")


@pytest.fixture
def run_cfg(token_store, tmp_path) -> dict:
    return tiny_run(token_store, tmp_path / "run")

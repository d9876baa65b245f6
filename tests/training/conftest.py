"""Fixtures for the training tests: a synthetic chunk store and a tiny run YAML."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from training_helpers import make_store, tiny_run


@pytest.fixture(scope="session")
def token_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "chunks")


@pytest.fixture(scope="session")
def cont_store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("cont") / "chunks", tokens=False)


@pytest.fixture
def run_cfg(token_store, tmp_path) -> dict:
    return tiny_run(token_store, tmp_path / "run")


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """`cli.main` points the package logger at the test's captured stderr; give the logger
    back afterwards so later tests do not log to a closed stream."""
    log = logging.getLogger("ephys_gpt")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]

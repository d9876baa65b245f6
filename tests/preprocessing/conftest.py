"""Simulated data and one stage-1 run shared by the preprocessing tests (osl-ephys is slow)."""

from __future__ import annotations

import numpy as np
import pytest

from ephys_gpt.preprocessing.discovery import discover
from ephys_gpt.preprocessing.simulate import SimulationConfig, simulate_dataset
from ephys_gpt.preprocessing.stage1 import run_stage1


@pytest.fixture(scope="session")
def simulated(tmp_path_factory):
    """1 subject x 2 sessions x 30 s of simulated MEG with faults (BIDS-like folder)."""
    root = tmp_path_factory.mktemp("raw")
    paths = simulate_dataset(root, SimulationConfig(subjects=1, sessions=2, seconds=30, seed=7,
                                                    faults=True), progress=False)
    return root, paths


@pytest.fixture(scope="session")
def stage1_run(simulated, tmp_path_factory):
    """Stage 1 (built-in recipe) over the simulated folder plus one unreadable .fif."""
    root, _ = simulated
    recordings = discover(root, "bids")
    garbage = tmp_path_factory.mktemp("garbage") / "broken_meg.fif"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    from ephys_gpt.preprocessing.discovery import Recording

    recordings = [*recordings, Recording("broken", None, None, garbage, "broken")]
    out = tmp_path_factory.mktemp("stage1")
    result = run_stage1(recordings, out, progress=False)
    return out, recordings, result


@pytest.fixture(autouse=True)
def _restore_package_logger():
    """``cli.main`` reconfigures the ``ephys_gpt`` logger; put it back for other tests."""
    import logging

    pkg = logging.getLogger("ephys_gpt")
    saved = (list(pkg.handlers), pkg.propagate, pkg.level)
    yield
    pkg.handlers[:], pkg.propagate, pkg.level = saved[0], saved[1], saved[2]

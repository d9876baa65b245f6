"""Small synthetic chunk stores written with the real store writer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.dataset.store_helpers import write_store


@pytest.fixture
def make_store(tmp_path):
    """``make_store(name="store", **write_store kwargs)`` → the store's root."""

    def make(name: str = "store", **kwargs) -> Path:
        return write_store(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def megin_info():
    """The MEGIN (Elekta Neuromag, 306 channels) template info shipped with osl-ephys."""
    mne = pytest.importorskip("mne")
    spec = importlib.util.find_spec("osl_ephys")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("osl-ephys is not installed")
    path = Path(spec.submodule_search_locations[0]) / "utils/simulation_config/megin_template_info.fif"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return mne.io.read_info(path, verbose=False)


@pytest.fixture(scope="session")
def megin_layout(megin_info):
    """``(ch_names, ch_types, pos_2d)`` of the MEGIN template, positions from mne.find_layout."""
    import mne

    lay = mne.find_layout(megin_info)
    names = megin_info["ch_names"]
    idx = [lay.names.index(n) for n in names]
    pos = lay.pos[idx, :2] + lay.pos[idx, 2:] / 2  # box centres
    return list(names), megin_info.get_channel_types(), pos


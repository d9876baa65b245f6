"""Simulated MEG: layout, reproducibility from the seed, recorded faults, CLI."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest

from ephys_gpt.cli import main
from ephys_gpt.preprocessing.simulate import SimulationConfig, simulate_dataset


def _data(path):
    return mne.io.read_raw_fif(path, preload=True, verbose="error").get_data()


def test_layout_and_channels(simulated):
    root, paths = simulated
    assert [p.relative_to(root).as_posix() for p in paths] == [
        "sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif",
        "sub-01/ses-02/meg/sub-01_ses-02_task-rest_meg.fif"]
    raw = mne.io.read_raw_fif(paths[0], verbose="error")
    assert raw.info["sfreq"] == 150.0 and raw.n_times == 30 * 150
    assert len(raw.ch_names) == 306
    types = raw.get_channel_types()
    assert types.count("mag") == 102 and types.count("grad") == 204
    assert (root / "dataset_description.json").is_file()
    assert not list(root.rglob(".*"))  # no temporary files left behind


def test_faults_are_recorded_and_present(simulated):
    _, paths = simulated
    side = json.loads(paths[0].with_name("sub-01_ses-01_task-rest_simulation.json").read_text())
    faults = side["faults"]
    assert side["base_seed"] == 7 and faults["bad_segments"] and faults["flat_channels"]
    x = _data(paths[0])
    assert np.all(x[faults["flat_channels"]] == 0)
    good = [i for i in range(306) if i not in faults["flat_channels"]]
    assert np.all(x[good].std(axis=1) > 0)
    a, b = faults["bad_segments"][0]
    inside, outside = x[good, a:b].std(axis=1), x[good, :a].std(axis=1)
    assert np.median(inside / outside) > 3  # the injected segment is much noisier
    # sessions differ in where their faults go
    other = json.loads(paths[1].with_name("sub-01_ses-02_task-rest_simulation.json").read_text())
    assert other["session_seed"] != side["session_seed"]


def test_reproducible_from_seed_and_restores_numpy_rng(tmp_path):
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    cfg = SimulationConfig(subjects=1, sessions=1, seconds=3, seed=5)
    a = simulate_dataset(tmp_path / "a", cfg, progress=False)[0]
    assert np.random.rand() == expected_next  # global RNG state was put back
    b = simulate_dataset(tmp_path / "b", cfg, progress=False)[0]
    c = simulate_dataset(tmp_path / "c", SimulationConfig(1, 1, 3, seed=6), progress=False)[0]
    xa, xb, xc = _data(a), _data(b), _data(c)
    np.testing.assert_array_equal(xa, xb)
    assert np.abs(xa - xc).max() > 0.1 * np.abs(xa).max()


def test_existing_files_are_kept(tmp_path):
    cfg = SimulationConfig(subjects=1, sessions=1, seconds=2, seed=0)
    path = simulate_dataset(tmp_path, cfg, progress=False)[0]
    mtime = path.stat().st_mtime_ns
    simulate_dataset(tmp_path, cfg, progress=False)
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("kwargs, key", [({"subjects": 0}, "subjects"),
                                         ({"seconds": 1}, "seconds"),
                                         ({"seed": -1}, "seed")])
def test_bad_simulation_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SimulationConfig(**kwargs)


def test_cli_simulate(tmp_path):
    rc = main(["-q", "simulate", "--out", str(tmp_path), "--subjects", "1", "--sessions", "1",
               "--seconds", "2", "--seed", "3", "--faults", "--no-progress"])
    assert rc == 0
    fif = tmp_path / "sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif"
    assert fif.is_file()
    assert json.loads(fif.with_name("sub-01_ses-01_task-rest_simulation.json").read_text())["faults"]


@pytest.mark.parametrize("argv, needles", [
    (["--seconds", "nan"], ["'seconds' (--seconds)", "finite", "nan"]),
    (["--seconds", "inf"], ["'seconds' (--seconds)", "finite", "inf"]),
    (["--seconds", "0"], ["'seconds' (--seconds)", ">= 2", "0.0"]),
    (["--seconds", "-1"], ["'seconds' (--seconds)", ">= 2", "-1.0"]),
    (["--seconds", "1e9"], ["'seconds' (--seconds)", "<= 3600"]),
    (["--subjects", "0"], ["'subjects' (--subjects)", ">= 1", "0"]),
    (["--sessions", "-2"], ["'sessions' (--sessions)", ">= 1", "-2"]),
    (["--seed", "-1"], ["'seed' (--seed)", ">= 0"]),
])
def test_cli_simulate_refuses_bad_numbers_without_a_traceback(tmp_path, capsys, argv, needles):
    out = tmp_path / "out"
    rc = main(["simulate", "--out", str(out), "--no-progress", *argv])
    assert rc == 1
    msg = capsys.readouterr().err
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert "Traceback" not in msg and not out.exists()  # refused before anything was written

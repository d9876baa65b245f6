"""Simulated MEG: a BIDS dataset (mne-bids), reproducibility from the seed, recorded faults,
safe re-runs, the CLI."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest

from ephys_gpt.cli import main
from ephys_gpt.preprocessing.simulate import (
    SimulationConfig,
    read_simulation_record,
    record_path,
    recording_path,
    session_seed,
    simulate_dataset,
    simulate_session,
)

mne_bids = pytest.importorskip("mne_bids")


def _data(path):
    return mne.io.read_raw_fif(path, preload=True, verbose="error").get_data()


def _bids_path(root, sub, ses):
    return mne_bids.BIDSPath(subject=f"{sub:02d}", session=f"{ses:02d}", task="rest",
                             datatype="meg", root=root)


def test_layout_is_bids(simulated):
    root, paths = simulated
    assert [p.relative_to(root).as_posix() for p in paths] == [
        "sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif",
        "sub-01/ses-02/meg/sub-01_ses-02_task-rest_meg.fif"]
    raw = mne.io.read_raw_fif(paths[0], verbose="error")
    assert raw.info["sfreq"] == 150.0 and raw.n_times == 30 * 150
    types = raw.get_channel_types()
    assert types.count("mag") == 102 and types.count("grad") == 204
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["Authors"] and desc["DatasetType"] == "raw"
    assert desc["GeneratedBy"][0]["Name"] == "ephys-gpt"
    assert "ephys-gpt simulate" in (root / "README").read_text()
    assert (root / "participants.tsv").read_text().splitlines()[1].startswith("sub-01\t")
    meg_dir = paths[0].parent
    base = "sub-01_ses-01_task-rest"
    assert sorted(p.name for p in meg_dir.iterdir()) == sorted([
        f"{base}_meg.fif", f"{base}_meg.json", f"{base}_channels.tsv", f"{base}_events.tsv",
        f"{base}_events.json", "sub-01_ses-01_coordsystem.json"])
    sidecar = json.loads((meg_dir / f"{base}_meg.json").read_text())
    assert sidecar["SamplingFrequency"] == 150.0 and sidecar["PowerLineFrequency"] == 50.0
    assert "Simulated" in sidecar["TaskDescription"]
    # the parameters live in sourcedata/, the one place BIDS leaves free-form
    outside = [p.relative_to(root).as_posix() for p in root.rglob("*simulation*")]
    assert outside and all(p.startswith("sourcedata/ephys-gpt-simulate/") for p in outside)
    assert not list(root.rglob(".*"))  # no temporary files or staging folders left behind


def test_every_recording_reads_back_with_mne_bids(simulated):
    """read_raw_bids gives the simulated data (float32 on disk), the injected noisy/flat
    channels as bads and the injected segments as BAD annotations; the .fif alone carries
    no marks, so stage 1 still has to find them."""
    root, paths = simulated
    for ses, path in enumerate(paths, start=1):
        raw = mne_bids.read_raw_bids(_bids_path(root, 1, ses), verbose="error")
        sim = simulate_session(30, session_seed(7, 1, ses), faults=True)
        # stored as float32 (MNE's fmt="single"): equal to float32 precision
        np.testing.assert_allclose(raw.get_data(), sim.raw.get_data(), rtol=3e-7, atol=0)
        record = read_simulation_record(path)
        faults = record["faults"]
        assert sorted(raw.info["bads"]) == sorted(faults["noisy_channel_names"]
                                                  + faults["flat_channel_names"])
        bad = [(a["onset"], a["duration"]) for a in raw.annotations
               if a["description"] == "BAD_injected"]
        want = [(a, b - a) for a, b in faults["bad_segments_seconds"]]
        np.testing.assert_allclose(bad, want, atol=1e-5)
        plain = mne.io.read_raw_fif(path, verbose="error")
        assert plain.info["bads"] == [] and len(plain.annotations) == 0


def test_faults_are_recorded_and_present(simulated):
    _, paths = simulated
    side = read_simulation_record(paths[0])
    faults = side["faults"]
    assert side["settings"]["base_seed"] == 7 and faults["bad_segments"]
    assert faults["flat_channels"]
    x = _data(paths[0])
    assert np.all(x[faults["flat_channels"]] == 0)
    good = [i for i in range(306) if i not in faults["flat_channels"]]
    assert np.all(x[good].std(axis=1) > 0)
    a, b = faults["bad_segments"][0]
    inside, outside = x[good, a:b].std(axis=1), x[good, :a].std(axis=1)
    assert np.median(inside / outside) > 3  # the injected segment is much noisier
    # sessions differ in where their faults go
    other = read_simulation_record(paths[1])
    assert other["settings"]["session_seed"] != side["settings"]["session_seed"]


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


def test_rerun_keeps_same_settings_and_refuses_other_settings(tmp_path):
    cfg = SimulationConfig(subjects=1, sessions=1, seconds=2, seed=0)
    path = simulate_dataset(tmp_path, cfg, progress=False)[0]
    mtime = path.stat().st_mtime_ns
    simulate_dataset(tmp_path, cfg, progress=False)
    assert path.stat().st_mtime_ns == mtime  # kept
    before = path.read_bytes()
    # other settings: nothing is written, and the message names the session and the keys
    for other in (SimulationConfig(1, 1, 3, seed=0), SimulationConfig(1, 1, 2, seed=1),
                  SimulationConfig(1, 1, 2, seed=0, faults=True)):
        with pytest.raises(ValueError, match=r"(?s)other settings.*sub-01_ses-01_task-rest_meg\.fif"
                                             r".*--overwrite"):
            simulate_dataset(tmp_path, other, progress=False)
        assert path.read_bytes() == before
    # --overwrite replaces it, and retires what the new settings do not write
    events = path.with_name("sub-01_ses-01_task-rest_events.tsv")
    simulate_dataset(tmp_path, SimulationConfig(1, 1, 2, seed=0, faults=True),
                     progress=False, overwrite=True)
    assert events.is_file() and read_simulation_record(path)["faults"]
    simulate_dataset(tmp_path, cfg, progress=False, overwrite=True)
    assert not events.is_file() and read_simulation_record(path)["faults"] is None
    assert path.read_bytes() == before  # same settings, same data


def test_never_writes_into_a_folder_it_did_not_make(tmp_path):
    theirs = tmp_path / "their_bids"
    (theirs / "sub-01").mkdir(parents=True)
    (theirs / "dataset_description.json").write_text('{"Name": "mine", "BIDSVersion": "1.9.0"}')
    snapshot = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a dataset written by `ephys-gpt simulate`"):
            simulate_dataset(theirs, SimulationConfig(1, 1, 2), progress=False,
                             overwrite=overwrite)
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == snapshot
    # a session file without the simulation's record is not ours either
    cfg = SimulationConfig(subjects=1, sessions=1, seconds=2, seed=0)
    path = simulate_dataset(tmp_path / "sim", cfg, progress=False)[0]
    record_path(tmp_path / "sim", 1, 1).unlink()
    with pytest.raises(ValueError, match="no simulation record"):
        simulate_dataset(tmp_path / "sim", cfg, progress=False)
    assert path.is_file()


def test_discovery_finds_the_simulated_recordings(simulated):
    from ephys_gpt.preprocessing.discovery import detect_kind, discover

    root, paths = simulated
    assert detect_kind(root) == "bids"
    for kind in ("auto", "bids"):
        assert [r.path for r in discover(root, kind)] == paths  # sourcedata/ is not a recording


@pytest.mark.parametrize("kwargs, key", [({"subjects": 0}, "subjects"),
                                         ({"seconds": 1}, "seconds"),
                                         ({"seed": -1}, "seed"),
                                         ({"dynamics": "hmm"}, "dynamics")])
def test_bad_simulation_arguments(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SimulationConfig(**kwargs)


def test_cli_simulate(tmp_path):
    rc = main(["-q", "simulate", "--out", str(tmp_path), "--subjects", "1", "--sessions", "1",
               "--seconds", "2", "--seed", "3", "--faults", "--no-progress"])
    assert rc == 0
    fif = tmp_path / "sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif"
    assert fif.is_file() and read_simulation_record(fif)["faults"]


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


def test_overwrite_removes_only_files_of_the_session_it_replaces(tmp_path):
    """The record lists what a session wrote; a record pointing elsewhere (edited by hand, or
    crafted) cannot make --overwrite delete anything outside that session's folders."""
    out = tmp_path / "sim"
    cfg = SimulationConfig(subjects=1, sessions=1, seconds=2, seed=0)
    simulate_dataset(out, cfg, progress=False)
    keep = [tmp_path / "outside.txt", out / "README.mine", out / "sub-01" / "notes.txt"]
    for f in keep:
        f.write_text("user file")
    rec = record_path(out, 1, 1)
    record = json.loads(rec.read_text())
    record["files"] += ["../outside.txt", str(keep[0]), "README.mine", "sub-01/notes.txt",
                        "sub-01/ses-01/../notes.txt"]
    rec.write_text(json.dumps(record))
    simulate_dataset(out, SimulationConfig(1, 1, 2, seed=1), progress=False, overwrite=True)
    assert all(f.read_text() == "user file" for f in keep)
    assert read_simulation_record(recording_path(out, 1, 1))["settings"]["base_seed"] == 1

"""Discovery of Omega-like, BIDS and plain folders (file names only; nothing is read)."""

from __future__ import annotations

import json

import pytest

from ephys_gpt.preprocessing.discovery import detect_kind, discover


def _touch(path, folder=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        path.mkdir()
        (path / "data.meg4").write_bytes(b"")
    else:
        path.write_bytes(b"")
    return path


def test_omega_layout(tmp_path):
    for sub, ses in [("0001", "0001"), ("0001", "0002"), ("0002", "0001")]:
        _touch(tmp_path / f"sub-{sub}/ses-{ses}/meg/sub-{sub}_ses-{ses}_task-rest_run-01_meg.ds",
               folder=True)
    _touch(tmp_path / "sub-0001/ses-0001/meg/sub-0001_ses-0001_task-noise_run-01_meg.ds",
           folder=True)
    _touch(tmp_path / "sub-emptyroom/ses-0001/meg/sub-emptyroom_ses-0001_task-rest_meg.ds",
           folder=True)
    _touch(tmp_path / "sub-0001/ses-0001/meg/sub-0001_ses-0001_scans.tsv")
    assert detect_kind(tmp_path) == "omega"
    recs = discover(tmp_path, "auto")
    assert [r.name for r in recs] == ["sub-0001_ses-0001_task-rest_run-01",
                                      "sub-0001_ses-0002_task-rest_run-01",
                                      "sub-0002_ses-0001_task-rest_run-01"]
    r = recs[1]
    assert (r.subject, r.session, r.task) == ("0001", "0002", "rest")
    assert r.path.name.endswith("_meg.ds") and r.path.is_dir()


def test_bids_layout(tmp_path):
    (tmp_path / "dataset_description.json").write_text(json.dumps({"Name": "x",
                                                                   "BIDSVersion": "1.8.0"}))
    _touch(tmp_path / "sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif")
    _touch(tmp_path / "sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.json")  # sidecar
    _touch(tmp_path / "sub-02/meg/sub-02_task-words_run-2_meg.fif")
    _touch(tmp_path / "sub-02/eeg/sub-02_task-rest_eeg.vhdr")
    _touch(tmp_path / "sub-emptyroom/ses-01/meg/sub-emptyroom_ses-01_task-noise_meg.fif")
    _touch(tmp_path / "derivatives/x/sub-01/ses-01/meg/sub-01_ses-01_task-rest_meg.fif")
    assert detect_kind(tmp_path) == "bids"
    recs = discover(tmp_path, "bids")
    by_name = {r.name: r for r in recs}
    assert sorted(by_name) == ["sub-01_ses-01_task-rest", "sub-02_task-rest",
                               "sub-02_task-words_run-2"]
    r = by_name["sub-02_task-words_run-2"]
    assert (r.subject, r.session, r.task) == ("02", None, "words")


def test_simulated_folder_is_found_as_bids(simulated):
    root, paths = simulated
    recs = discover(root)
    assert [r.path for r in recs] == paths
    assert [r.name for r in recs] == ["sub-01_ses-01_task-rest", "sub-01_ses-02_task-rest"]
    # explicit omega also accepts MNE-readable files in sub-*/ses-*/meg, with the same names
    assert [r.name for r in discover(root, "omega")] == [r.name for r in recs]


def test_plain_folder(tmp_path):
    _touch(tmp_path / "a.fif")
    _touch(tmp_path / "nested/b.edf")
    _touch(tmp_path / "nested/c.ds", folder=True)
    _touch(tmp_path / "other/a.fif")  # same stem as ./a.fif -> path-based names
    _touch(tmp_path / "big.fif")
    _touch(tmp_path / "big-1.fif")  # MNE split continuation of big.fif
    _touch(tmp_path / "notes.txt")
    _touch(tmp_path / ".hidden.fif")
    _touch(tmp_path / "out/stage1/x/x_preproc-raw.fif")
    assert detect_kind(tmp_path) == "files"
    recs = discover(tmp_path, "files", exclude=[tmp_path / "out"])
    assert sorted(r.name for r in recs) == ["a", "b", "big", "c", "other_a"]
    assert {r.path.name for r in recs} == {"a.fif", "b.edf", "big.fif", "c.ds"}


def test_nothing_found_and_bad_arguments(tmp_path):
    _touch(tmp_path / "readme.txt")
    with pytest.raises(ValueError, match=r"no recordings found in .*dataset='omega'"):
        discover(tmp_path, "omega")
    with pytest.raises(ValueError, match="dataset must be one of"):
        discover(tmp_path, "ctf")
    with pytest.raises(FileNotFoundError, match="missing"):
        discover(tmp_path / "missing")

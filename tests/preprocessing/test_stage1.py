"""Stage 1 through osl-ephys: outputs, detected faults, failures with reasons, re-runs."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest

from ephys_gpt.preprocessing.config import RecipeConfig
from ephys_gpt.preprocessing.simulate import read_simulation_record
from ephys_gpt.preprocessing.stage1 import (
    default_recipe,
    find_outputs,
    load_recipe,
    output_path,
    run_stage1,
)


def test_outputs_resampled_with_faults_marked(stage1_run, simulated):
    out, recordings, result = stage1_run
    names = [r.name for r in recordings if r.name != "broken"]
    assert [p.parent.name for p in find_outputs(out)] == names
    assert not list(out.glob(".tmp-*"))  # the temporary osl-ephys folder is gone
    for rec in recordings[:2]:
        fif = output_path(out, rec.name)
        raw = mne.io.read_raw_fif(fif, verbose="error")
        assert raw.info["sfreq"] == 100.0 and raw.n_times == 3000
        side = read_simulation_record(rec.path)["faults"]
        # flat channels are always caught; injected bad segments overlap bad annotations
        assert set(side["flat_channel_names"]) <= set(raw.info["bads"])
        bad = [(a["onset"], a["onset"] + a["duration"]) for a in raw.annotations
               if a["description"].startswith("bad")]
        for a, b in side["bad_segments_seconds"]:
            assert any(lo < b and a < hi for lo, hi in bad), (a, b, bad)
        prov = json.loads((fif.parent / f"{rec.name}_recording.json").read_text())
        assert prov["subject"] == "01" and prov["task"] == "rest"
        assert prov["path"] == str(rec.path)


def test_unreadable_recording_is_reported_and_others_continue(stage1_run):
    out, _, result = stage1_run
    assert list(result.failed) == ["broken"]
    reason = result.failed["broken"]
    assert "broken_meg.fif" in reason and "import_data" in reason and "file id tag" in reason
    assert len(result.written) == 2 and not result.ok


def test_rerun_skips_finished_recordings(stage1_run):
    out, recordings, _ = stage1_run
    fif = output_path(out, recordings[0].name)
    mtime = fif.stat().st_mtime_ns
    again = run_stage1(recordings[:2], out, progress=False)
    assert again.skipped == [r.name for r in recordings[:2]] and again.ok
    assert fif.stat().st_mtime_ns == mtime
    # another recipe: neither reused silently nor overwritten, and the reason names the file
    changed = run_stage1(recordings[:2], out, recipe=RecipeConfig(l_freq=2.0), progress=False)
    assert not changed.skipped and not changed.written and set(changed.failed) == {
        r.name for r in recordings[:2]}
    assert str(fif) in changed.failed[recordings[0].name]
    assert "another osl-ephys recipe" in changed.failed[recordings[0].name]
    assert fif.stat().st_mtime_ns == mtime


def test_default_recipe_follows_parameters():
    recipe = default_recipe(RecipeConfig(l_freq=0.5, h_freq=40, sfreq=200,
                                         bad_segment_seconds=1.5, detect_bad_channels=False))
    steps = [next(iter(s)) for s in recipe["preproc"]]
    assert steps == ["filter", "notch_below_nyquist", "resample", "bad_segments", "bad_segments"]
    steps = [next(iter(s)) for s in default_recipe()["preproc"]]
    assert steps[-3:] == ["detect_flat_channels", "bad_channels", "bad_channels"]
    assert recipe["preproc"][2]["resample"]["sfreq"] == 200
    assert recipe["preproc"][3]["bad_segments"]["segment_len"] == 300


def test_notch_skips_frequencies_above_nyquist():
    from ephys_gpt.preprocessing.stage1 import notch_below_nyquist

    info = mne.create_info(2, 150.0, "mag")
    t = np.arange(1500) / 150.0
    x = np.vstack([np.sin(2 * np.pi * 50 * t), np.sin(2 * np.pi * 10 * t)]) * 1e-12
    raw = mne.io.RawArray(x, info, verbose="error")
    notch_below_nyquist({"raw": raw}, {"freqs": [50, 100], "verbose": "error"})  # 100 >= 75 Hz
    y = raw.get_data()
    assert np.std(y[0, 300:-300]) < 0.1 * np.std(x[0])  # 50 Hz removed
    assert np.std(y[1]) > 0.9 * np.std(x[1])  # 10 Hz kept


def test_user_recipe_is_checked(tmp_path):
    bad = tmp_path / "recipe.yml"
    bad.write_text("preproc:\n  - filter: {l_freq: 1}\n    resample: {sfreq: 100}\n")
    with pytest.raises(ValueError, match="recipe.yml: preproc step 0 should be a mapping with one"):
        load_recipe(bad)
    bad.write_text("steps: []\n")
    with pytest.raises(ValueError, match="'preproc' list"):
        load_recipe(bad)
    good = tmp_path / "good.yml"
    good.write_text("preproc:\n  - resample: {sfreq: 50}\n")
    assert load_recipe(good)["preproc"] == [{"resample": {"sfreq": 50}}]


def test_user_recipe_runs(simulated, tmp_path):
    from ephys_gpt.preprocessing.discovery import discover

    recipe = tmp_path / "recipe.yml"
    recipe.write_text("preproc:\n  - resample: {sfreq: 50}\n")
    rec = discover(simulated[0])[:1]
    result = run_stage1(rec, tmp_path / "s1", osl_config=recipe, progress=False)
    assert result.ok
    raw = mne.io.read_raw_fif(result.written[0], verbose="error")
    assert raw.info["sfreq"] == 50.0


@pytest.mark.slow
def test_dask_workers_give_the_same_outputs(simulated, stage1_run, tmp_path):
    """n_workers > 1 runs osl-ephys on a local Dask cluster (a subprocess: the test process
    blocks sockets, which Dask's scheduler needs)."""
    import subprocess
    import sys

    script = (
        "from ephys_gpt.preprocessing.discovery import discover\n"
        "from ephys_gpt.preprocessing.stage1 import run_stage1\n"
        f"r = run_stage1(discover({str(simulated[0])!r}), {str(tmp_path)!r}, n_workers=2,"
        " progress=False)\n"
        "assert r.ok, r.failed\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for fif in find_outputs(stage1_run[0]):
        other = tmp_path / fif.parent.name / fif.name
        a = mne.io.read_raw_fif(fif, verbose="error")
        b = mne.io.read_raw_fif(other, verbose="error")
        assert a.info["bads"] == b.info["bads"]
        np.testing.assert_allclose(a.get_data(), b.get_data())


def test_osl_logging_does_not_leak(simulated, tmp_path):
    """osl-ephys's dictConfig disables existing loggers; stage 1 puts everything back."""
    import logging

    from ephys_gpt.preprocessing.discovery import discover

    mine = logging.getLogger("ephys_gpt.preprocessing.test_probe")
    other = logging.getLogger("some.other.library")
    mne_level = logging.getLogger("mne").level
    run_stage1(discover(simulated[0])[:1], tmp_path, progress=False)
    assert not mine.disabled and not other.disabled
    assert logging.getLogger("mne").level == mne_level
    assert not logging.getLogger("osl_ephys").handlers


def test_cleanup_removes_only_marked_temporary_folders(tmp_path, caplog):
    import logging
    import os
    import socket
    import subprocess
    import sys

    from ephys_gpt.locking import MARKER_NAME
    from ephys_gpt.preprocessing.stage1 import clean_partial

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    user_hidden = tmp_path / ".tmp-archive"  # a user's folder with a look-alike name
    user_hidden.mkdir()
    (user_hidden / "old.fif").write_text("mine")
    unmarked = tmp_path / ".tmp-1234abcd"  # the writer's name, but no marker: not provable
    unmarked.mkdir()
    (unmarked / "x.txt").write_text("mine")
    crashed = tmp_path / ".tmp-0badc0de"
    crashed.mkdir()
    (crashed / "partial_preproc-raw.fif").write_bytes(b"half")
    (crashed / MARKER_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname()}))
    empty = tmp_path / ".tmp-89abcdef"
    empty.mkdir()
    live = tmp_path / ".tmp-00c0ffee"
    live.mkdir()
    (live / MARKER_NAME).write_text(json.dumps({"pid": os.getppid(),
                                                "host": socket.gethostname()}))
    with caplog.at_level(logging.INFO, logger="ephys_gpt.preprocessing.stage1"):
        removed = clean_partial(tmp_path)
    assert sorted(removed) == sorted([crashed, empty])
    assert (user_hidden / "old.fif").exists() and (unmarked / "x.txt").exists() and live.exists()
    assert f"removed {crashed}: temporary folder of an interrupted stage-1 run (pid {dead}" \
        in caplog.text


def test_folder_in_the_way_of_an_output_is_never_replaced(simulated, tmp_path):
    from ephys_gpt.preprocessing.discovery import discover

    rec = discover(simulated[0])[:1]
    mine = tmp_path / rec[0].name
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    result = run_stage1(rec, tmp_path, progress=False)
    assert (mine / "notes.txt").read_text() == "my notes"
    assert not result.written
    assert f"{mine} exists but holds no stage-1 output" in result.failed[rec[0].name]


def test_stage1_refuses_a_folder_another_process_is_writing(simulated, tmp_path):
    import subprocess
    import sys

    from ephys_gpt.locking import FolderLockedError
    from ephys_gpt.preprocessing.discovery import discover

    script = ("import time\nfrom ephys_gpt.locking import FolderLock\n"
              f"with FolderLock({str(tmp_path)!r}):\n"
              "    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=f"stage-1 folder {tmp_path} is in use by "
                                                    f"another ephys-gpt run: pid {holder.pid}"):
            run_stage1(discover(simulated[0])[:1], tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()

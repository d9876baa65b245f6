"""Stage 2: inversion back to the stage-1 signal, bad segments, metadata, errors, interruption."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import mne
import numpy as np
import pytest

from ephys_gpt import store
from ephys_gpt.codec import invert_steps, mulaw_dequantize
from ephys_gpt.preprocessing.stage1 import find_outputs
from ephys_gpt.preprocessing.stage2 import (
    Stage2Settings,
    chunk_bounds,
    good_spans,
    process_session,
    run_stage2,
)

CONT = {"normalize": {"method": "robust"}, "clip": {"std_factor": 4.0}}
TOKENS = {**CONT, "mulaw_quantize": {"n_bits": 10}}
FAST_TOKENS = Stage2Settings(steps=TOKENS, bad_channels="keep")  # no interpolation: faster


@pytest.fixture(scope="module")
def stage1_files(stage1_run):
    return find_outputs(stage1_run[0])


def _stage1_signal(fif, picks="meg"):
    raw = mne.io.read_raw_fif(fif, preload=True, verbose="error").pick(picks, exclude=[])
    return raw


def _windows(meta):
    for i, start in enumerate(meta.provenance["chunk_starts"]):
        yield i, start, start + meta.chunk_lengths[i]


def test_continuous_chunks_invert_to_stage1_signal(stage1_files, tmp_path):
    fif = stage1_files[0]
    out = process_session(fif, tmp_path, Stage2Settings(steps=CONT, chunk_seconds=5,
                                                        bad_channels="keep"))
    meta = store.read_meta(out)
    x = _stage1_signal(fif).get_data()
    clip = meta.step("clip")
    low, high = np.array(clip["low"])[:, None], np.array(clip["high"])[:, None]
    norm = meta.step("normalize")
    z_all = (x - np.array(norm["center"])[:, None]) / np.array(norm["scale"])[:, None]
    n_clipped = 0
    for i, a, b in _windows(meta):
        chunk = store.load_chunk(meta, i)
        assert chunk.dtype == np.float32 and chunk.shape == (306, b - a)
        back = invert_steps(np.asarray(chunk, dtype=np.float64), meta.steps)
        z = z_all[:, a:b]
        inside = (z > low) & (z < high)
        n_clipped += (~inside).sum()
        scale = np.maximum(np.abs(x[:, a:b]).max(axis=1, keepdims=True), 1e-30)
        err = np.abs(back - x[:, a:b]) / scale
        assert err[inside & (x[:, a:b] != 0)].max() < 1e-5  # exact up to float32 rounding
        # clipped samples sit at the bound and never move past it
        assert np.all((chunk >= low.astype(np.float32) - 1e-5) & (chunk <= high + 1e-5))
    assert n_clipped > 0  # the simulated artefacts do get clipped


def test_token_chunks_invert_within_quantization_step(stage1_files, tmp_path):
    fif = stage1_files[0]
    out = process_session(fif, tmp_path, Stage2Settings(steps=TOKENS, chunk_seconds=5,
                                                        bad_channels="keep"))
    meta = store.read_meta(out)
    assert meta.is_tokens and meta.dtype == "int16"
    q = meta.step("mulaw_quantize")
    clip = meta.step("clip")
    assert q["scale"] == pytest.approx(max(-min(clip["low"]), max(clip["high"])), rel=1e-5)
    x = _stage1_signal(fif).get_data()
    norm = meta.step("normalize")
    center, nscale = np.array(norm["center"])[:, None], np.array(norm["scale"])[:, None]
    levels = mulaw_dequantize(np.arange(q["mu"] + 1), q["n_bits"], q["scale"])
    max_gap = np.diff(levels).max()
    for i, a, b in _windows(meta):
        tokens = store.load_chunk(meta, i)
        assert tokens.min() >= 0 and tokens.max() <= q["mu"]
        z = np.clip((x[:, a:b] - center) / nscale, np.array(clip["low"])[:, None],
                    np.array(clip["high"])[:, None])  # what was quantized
        back = invert_steps(np.asarray(tokens), meta.steps)  # stage-1 units
        assert np.all(np.abs(back - (z * nscale + center)) <= max_gap * nscale + 1e-20)


def test_chunks_never_straddle_bad_segments_and_meta_is_complete(stage1_files, tmp_path):
    fif = stage1_files[1]
    out = process_session(fif, tmp_path, Stage2Settings(steps=CONT, chunk_seconds=4))
    meta = store.read_meta(out)
    raw = mne.io.read_raw_fif(fif, verbose="error")
    sf = raw.info["sfreq"]
    bad = [(a["onset"] * sf, (a["onset"] + a["duration"]) * sf) for a in raw.annotations
           if a["description"].startswith("bad")]
    assert bad, "the simulated faults should give bad segments"
    for _, a, b in _windows(meta):
        assert b - a <= 400
        for lo, hi in bad:
            assert b <= round(lo) or a >= round(hi), (a, b, lo, hi)
    assert meta.sfreq == 100.0 and meta.chunk_samples == 400
    assert meta.n_channels == 306
    assert meta.ch_types.count("mag") == 102 and meta.ch_types.count("grad") == 204
    assert meta.pos_2d.shape == (306, 2) and np.isfinite(meta.pos_2d).all()
    assert len({tuple(p) for p in np.round(meta.pos_2d, 6)}) == 306  # distinct positions
    assert meta.pos_3d.shape == (306, 3) and meta.ori_3d.shape == (306, 3)
    np.testing.assert_allclose(np.linalg.norm(meta.ori_3d, axis=1), 1.0, atol=1e-3)
    prov = meta.provenance
    assert prov["subject"] == "01" and prov["session"] == "02" and prov["task"] == "rest"
    assert prov["source_file"].endswith("sub-01_ses-02_task-rest_meg.fif")
    assert prov["ephys_gpt_version"] and prov["bad_channel_handling"] == "interpolate"
    assert prov["bad_channels"] and prov["bad_segments_seconds"]
    # interpolated channels carry signal (flat sensors are rebuilt from their neighbours)
    chunk = store.load_chunk(meta, 0)
    idx = [meta.ch_names.index(c) for c in prov["bad_channels"]]
    assert np.all(np.asarray(chunk)[idx].std(axis=1) > 0)


def test_helpers_split_spans():
    mask = np.array([1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=bool)
    assert good_spans(mask) == [(0, 3), (5, 12), (13, 14)]
    assert chunk_bounds(good_spans(mask), 3, 2) == [(0, 3), (5, 8), (8, 11)]


def _raw_file(path, data, sfreq=100.0):
    info = mne.create_info([f"MEG{i:04d}" for i in range(data.shape[0])], sfreq, "mag")
    raw = mne.io.RawArray(data, info, verbose="error")
    raw.save(path, verbose="error", overwrite=True)
    return path


def test_nan_in_recording_is_a_clear_error(tmp_path, stage1_files):
    raw = mne.io.read_raw_fif(stage1_files[0], preload=True, verbose="error")
    raw._data[5, 100:110] = np.nan
    bad = tmp_path / "sub-09_ses-01_task-rest_preproc-raw.fif"
    raw.save(bad, verbose="error")
    with pytest.raises(ValueError, match=r"sub-09_ses-01_task-rest_preproc-raw.fif: .*NaN.*"
                                         + raw.ch_names[5]):
        process_session(bad, tmp_path / "chunks", Stage2Settings(bad_channels="keep"))
    # in a batch it is reported and the good session is still written
    result = run_stage2([bad, stage1_files[0]], tmp_path / "chunks",
                        Stage2Settings(bad_channels="keep"), progress=False)
    assert list(result.failed) == ["sub-09_ses-01_task-rest"]
    assert "NaN" in result.failed["sub-09_ses-01_task-rest"]
    assert [p.name for p in result.written] == ["sub-01_ses-01_task-rest"]


def test_unreadable_fif_is_a_clear_error(tmp_path):
    garbage = tmp_path / "junk_preproc-raw.fif"
    garbage.write_bytes(b"not a fif file at all" * 50)
    with pytest.raises(ValueError, match=r"junk_preproc-raw.fif: MNE cannot read it"):
        process_session(garbage, tmp_path / "chunks", Stage2Settings())
    with pytest.raises(FileNotFoundError, match="missing_preproc-raw.fif"):
        process_session(tmp_path / "missing_preproc-raw.fif", tmp_path, Stage2Settings())


def test_no_matching_channels_is_a_clear_error(tmp_path):
    info = mne.create_info(["EEG1", "EEG2"], 100.0, "eeg")
    path = tmp_path / "eeg_preproc-raw.fif"
    mne.io.RawArray(np.zeros((2, 500)), info, verbose="error").save(path, verbose="error")
    with pytest.raises(ValueError, match=r"eeg_preproc-raw.fif: no channels match picks='meg'"):
        process_session(path, tmp_path / "chunks", Stage2Settings())


def test_exception_mid_session_leaves_nothing_then_rerun_completes(stage1_files, tmp_path,
                                                                   monkeypatch):
    root = tmp_path / "chunks"
    real_write = store._write_chunk
    calls = {"n": 0}

    def failing_write(path, arr):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_write(path, arr)

    monkeypatch.setattr(store, "_write_chunk", failing_write)
    result = run_stage2(stage1_files[:1], root, FAST_TOKENS, progress=False)
    assert "injected failure" in result.failed["sub-01_ses-01_task-rest"]
    assert not store.is_complete(root, "sub-01_ses-01_task-rest")
    assert list(root.iterdir()) == []  # the temporary folder was removed (and the lock file)
    monkeypatch.setattr(store, "_write_chunk", real_write)
    result = run_stage2(stage1_files[:1], root, FAST_TOKENS, progress=False)
    assert result.ok and len(result.written) == 1
    meta = store.list_sessions(root)[0]
    assert all(store.load_chunk(meta, i).shape[1] == n for i, n in enumerate(meta.chunk_lengths))


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL semantics")
def test_sigkill_mid_write_then_rerun_gives_complete_store(stage1_files, tmp_path):
    root = tmp_path / "chunks"
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        from ephys_gpt import store
        from ephys_gpt.preprocessing.stage2 import Stage2Settings, run_stage2
        real, n = store._write_chunk, [0]
        def write(path, arr):
            n[0] += 1
            if n[0] == 4:
                path.write_bytes(b"half a chunk")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(path, arr)
        store._write_chunk = write
        run_stage2([{str(stage1_files[0])!r}], {str(root)!r}, Stage2Settings(bad_channels="keep"),
                   progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = sorted(p.name for p in root.iterdir())
    assert len(leftovers) == 2 and leftovers[0] == ".ephys-gpt.lock"  # released by the kernel
    assert leftovers[1].startswith(".tmp-sub-01_ses-01_task-rest-")
    assert not store.is_complete(root, "sub-01_ses-01_task-rest")
    with pytest.raises(store.StoreError, match="no complete session"):
        store.list_sessions(root)
    result = run_stage2([stage1_files[0]], root, Stage2Settings(bad_channels="keep"),
                        progress=False)
    assert result.ok
    assert [p.name for p in root.iterdir()] == ["sub-01_ses-01_task-rest"]
    meta = store.list_sessions(root)[0]
    for i in range(meta.n_chunks):
        assert np.isfinite(store.load_chunk(meta, i)).all()


def test_rerun_skips_and_process_pool_matches_serial(stage1_files, tmp_path):
    serial = run_stage2(stage1_files, tmp_path / "a", FAST_TOKENS,
                        progress=False)
    assert serial.ok and len(serial.written) == 2
    again = run_stage2(stage1_files, tmp_path / "a", FAST_TOKENS,
                       progress=False)
    assert again.skipped == [p.parent.name for p in stage1_files] and not again.written
    pooled = run_stage2(stage1_files, tmp_path / "b", FAST_TOKENS,
                        n_workers=2, progress=False)
    assert pooled.ok and len(pooled.written) == 2
    for name in ("sub-01_ses-01_task-rest", "sub-01_ses-02_task-rest"):
        ma, mb = store.read_meta(tmp_path / "a" / name), store.read_meta(tmp_path / "b" / name)
        assert ma.steps == mb.steps and ma.chunk_lengths == mb.chunk_lengths
        np.testing.assert_array_equal(store.load_chunk(ma, 1), store.load_chunk(mb, 1))


def test_rerun_with_changed_settings_refuses_and_keeps_the_store(stage1_files, tmp_path):
    """A complete session written with other stage-2 settings is neither reused silently nor
    overwritten: the run reports it (naming the session and what changed) and leaves it."""
    import dataclasses

    first = run_stage2(stage1_files, tmp_path, FAST_TOKENS, progress=False)
    assert first.ok
    name = stage1_files[0].parent.name
    before = (tmp_path / name / "meta.json").read_text()
    changed = dataclasses.replace(FAST_TOKENS, chunk_seconds=FAST_TOKENS.chunk_seconds / 2)
    again = run_stage2(stage1_files, tmp_path, changed, progress=False)
    assert not again.ok and not again.written and not again.skipped
    reason = again.failed[name]
    assert "chunk_seconds" in reason and str(tmp_path / name) in reason and "Delete" in reason
    assert (tmp_path / name / "meta.json").read_text() == before
    # the same settings still skip
    assert len(run_stage2(stage1_files, tmp_path, FAST_TOKENS, progress=False).skipped) == 2
    # a session from before settings were recorded cannot be checked: it is skipped as before
    import json

    for session in {p.parent.name for p in stage1_files}:
        meta_path = tmp_path / session / "meta.json"
        meta = json.loads(meta_path.read_text())
        del meta["provenance"]["stage2_settings"]
        meta_path.write_text(json.dumps(meta))
    assert len(run_stage2(stage1_files, tmp_path, changed, progress=False).skipped) == 2


def test_zero_bad_channels_option(stage1_files, tmp_path):
    out = process_session(stage1_files[0], tmp_path, Stage2Settings(steps={}, bad_channels="zero"))
    meta = store.read_meta(out)
    idx = [meta.ch_names.index(c) for c in meta.provenance["bad_channels"]]
    assert np.all(np.asarray(store.load_chunk(meta, 0))[idx] == 0)


def test_flat_channel_gets_its_type_median_scale():
    from ephys_gpt.codec import fit_steps

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1000)).astype(np.float32) * np.array([[1e-12], [2e-12], [0], [1e-11]],
                                                                  dtype=np.float32)
    good = np.ones(1000, dtype=bool)
    _, steps, _ = fit_steps(x.copy(), good, {"normalize": {"method": "zscore"}},
                              ["mag", "mag", "mag", "grad"])
    scale = steps[0]["scale"]
    assert scale[2] == pytest.approx(np.median(scale[:2]))  # not 1.0 tesla
    assert scale[3] == pytest.approx(1e-11, rel=0.1)


def test_stage2_leaves_folders_it_did_not_write(stage1_files, tmp_path):
    """A user's folders under the chunk store survive a run: a folder without meta.json is
    neither removed nor replaced, even when it has a session's name."""
    root = tmp_path / "chunks"
    notes = root / "my-notes"
    notes.mkdir(parents=True)
    (notes / "notes.txt").write_text("keep me")
    blocking = root / stage1_files[0].parent.name  # the user's folder, named like a session
    blocking.mkdir()
    (blocking / "draft.txt").write_text("mine")
    result = run_stage2(stage1_files, root, FAST_TOKENS, progress=False)
    assert (notes / "notes.txt").read_text() == "keep me"
    assert (blocking / "draft.txt").read_text() == "mine"
    assert [p.name for p in result.written] == [stage1_files[1].parent.name]
    reason = result.failed[blocking.name]
    assert f"{blocking} exists but is not a session written by ephys-gpt" in reason
    assert "left as it is" in reason
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["my-notes", blocking.name, stage1_files[1].parent.name])


def _digests(folder):
    return json.loads((folder / "meta.json").read_text())["chunk_checksums"]["digests"]


def test_rerun_rewrites_damaged_sessions(stage1_files, tmp_path, caplog):
    """Re-runs compare chunk sizes (cheap, always) and, with verify, checksums; damaged
    sessions are rewritten from their stage-1 file, identical to the first write."""
    root = tmp_path / "chunks"
    assert run_stage2(stage1_files, root, FAST_TOKENS, progress=False).ok
    a, b = (root / f.parent.name for f in stage1_files)
    before = {a: _digests(a), b: _digests(b)}
    chunk = a / "1.npy"
    chunk.write_bytes(chunk.read_bytes()[:1000])  # truncated
    chunk = b / "0.npy"
    data = bytearray(chunk.read_bytes())
    data[-10:] = bytes(10)  # changed, same size
    chunk.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = run_stage2(stage1_files, root, FAST_TOKENS, progress=False)
    assert again.repaired == [a.name] and again.skipped == [b.name] and again.ok
    assert "(of which 1 repaired)" in again.counts()
    assert f"{a} is damaged (chunk 1 (1.npy): 1000 bytes" in caplog.text
    assert store.check_session(a).ok and _digests(a) == before[a]
    assert not store.check_session(b).ok  # a size check cannot see this one
    verified = run_stage2(stage1_files, root, FAST_TOKENS, progress=False, verify=True)
    assert verified.repaired == [b.name] and verified.skipped == [a.name]
    assert store.check_session(b).ok and _digests(b) == before[b]
    assert sorted(p.name for p in root.iterdir()) == [a.name, b.name]


def test_disk_full_during_stage2_names_the_file_and_keeps_other_sessions(stage1_files, tmp_path,
                                                                         monkeypatch):
    real = store._write_chunk
    full_in = {"name": stage1_files[1].parent.name}

    def writer(path, array):
        if path.parent.name.startswith(f".tmp-{full_in['name']}-") and path.name == "2.npy":
            path.write_bytes(b"\x93NUMPY partial")
            raise OSError("306000 requested and 49024 written")
        return real(path, array)

    monkeypatch.setattr(store, "_write_chunk", writer)
    root = tmp_path / "chunks"
    result = run_stage2(stage1_files, root, FAST_TOKENS, progress=False)
    first, second = (f.parent.name for f in stage1_files)
    assert [p.name for p in result.written] == [first]
    reason = result.failed[second]
    assert "the disk is full" in reason and str(root / second / "2.npy") in reason
    assert "requested and" in reason  # the original error is kept for the record
    assert sorted(p.name for p in root.iterdir()) == [first]  # no partial session
    assert store.check_session(root / first).ok
    # a full disk stops the sessions not started yet (each would fail the same way)
    full_in["name"] = first
    other = tmp_path / "other"
    result = run_stage2(stage1_files, other, FAST_TOKENS, progress=False)
    assert "the disk is full" in result.failed[first] and not result.written
    assert result.failed[second].startswith("not started: the disk is full")
    assert list(other.iterdir()) == []


def test_stage2_refuses_a_store_another_process_is_writing(stage1_files, tmp_path):
    from ephys_gpt.locking import FolderLockedError

    root = tmp_path / "chunks"
    script = textwrap.dedent(f"""
        import time
        from ephys_gpt.locking import FolderLock
        with FolderLock({str(root)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=f"chunk store {root} is in use by .*pid "
                                                    f"{holder.pid}"):
            run_stage2(stage1_files, root, FAST_TOKENS, progress=False)
        assert sorted(p.name for p in root.iterdir()) == [".ephys-gpt.lock"]
    finally:
        holder.kill()
        holder.wait()

"""The chunk store never removes or replaces what it did not write, records each chunk's size
and SHA-256, detects damaged chunks, and names the file when the disk fills up."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from ephys_gpt import store
from ephys_gpt.fileio import DiskFullError
from ephys_gpt.locking import MARKER_NAME, mark_in_progress

META = {"sfreq": 100.0, "ch_names": ["A", "B"], "ch_types": ["mag", "mag"],
        "pos_2d": [[0.0, 0.0], [1.0, 1.0]], "chunk_samples": 50, "steps": []}


def _chunks(seed=0, n=3):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 50)).astype(np.float32) for _ in range(n)]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _leftover(folder, pid):
    """A folder as a killed writer leaves it: some files and the in-progress marker of ``pid``."""
    folder.mkdir()
    (folder / "0.npy").write_bytes(b"half a chunk")
    (folder / MARKER_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                  "started": "2024-01-01T00:00:00",
                                                  "command": "ephys-gpt preprocess"}))


def test_clean_partial_removes_only_the_toolkits_unfinished_folders(tmp_path, caplog):
    root = tmp_path / "chunks"
    store.write_session(root, "done", _chunks(), META)
    notes = root / "my-notes"  # a user's folder without meta.json
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    archived = root / "done-archived"  # an archived copy of a session, meta.json removed
    archived.mkdir()
    (archived / "0.npy").write_bytes((root / "done" / "0.npy").read_bytes())
    hidden = root / ".tmp-my-scratch"  # a user's hidden folder, not the writer's name
    hidden.mkdir()
    (hidden / "x").write_text("mine")
    dead = _dead_pid()
    crashed = root / ".tmp-sess-0123abcd"
    _leftover(crashed, dead)
    replacing = root / "half-replaced"  # a session killed while it was being replaced
    _leftover(replacing, dead)
    empty = root / ".tmp-sess-89abcdef"  # killed right after creating its work folder
    empty.mkdir()
    live = root / ".tmp-live-00000000"  # being written by a running process
    _leftover(live, os.getppid())

    with caplog.at_level(logging.INFO, logger="ephys_gpt.store"):
        removed = store.clean_partial(root)
    assert sorted(removed) == sorted([crashed, replacing, empty])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [".tmp-live-00000000", ".tmp-my-scratch", "done", "done-archived", "my-notes"])
    assert (notes / "todo.txt").read_text() == "keep me" and (hidden / "x").read_text() == "mine"
    # every removal is logged with the path and who left it
    for path in (crashed, replacing):
        assert f"removed {path}: unfinished work of an interrupted run (pid {dead}" in caplog.text
    assert f"removed the empty temporary folder {empty}" in caplog.text
    assert f"leaving {live} alone" in caplog.text


def test_write_session_never_replaces_a_folder_it_did_not_write(tmp_path):
    root = tmp_path / "chunks"
    mine = root / "sub-01"
    mine.mkdir(parents=True)
    (mine / "analysis.txt").write_text("my notes")
    with pytest.raises(store.StoreError, match=r"sub-01 exists but is not a session written by "
                                               r"ephys-gpt .*left as it is"):
        store.write_session(root, "sub-01", _chunks(), META)
    assert (mine / "analysis.txt").read_text() == "my notes"
    assert sorted(p.name for p in root.iterdir()) == ["sub-01"]  # no temporary leftovers
    # a meta.json that is not the store's (no "format") does not prove it either
    (mine / "meta.json").write_text(json.dumps({"note": "my own meta"}))
    with pytest.raises(store.StoreError, match="not a session written by ephys-gpt"):
        store.write_session(root, "sub-01", _chunks(), META)
    assert (mine / "analysis.txt").exists()
    # a session of this store is replaced, with nothing left beside it
    store.write_session(root, "sub-02", _chunks(0), META)
    store.write_session(root, "sub-02", _chunks(1), META)
    np.testing.assert_array_equal(store.load_chunk(store.read_meta(root / "sub-02"), 0),
                                  _chunks(1)[0])
    assert sorted(p.name for p in root.iterdir()) == ["sub-01", "sub-02"]
    assert not (root / "sub-02" / MARKER_NAME).exists()
    with pytest.raises(ValueError, match="plain folder name"):
        store.write_session(root, "../escape", _chunks(), META)


def test_interrupted_replacement_is_finished_by_the_next_write(tmp_path):
    """A session killed while being replaced carries the marker: it is not complete, not
    listed, and the next write replaces it."""
    root = tmp_path / "chunks"
    store.write_session(root, "s", _chunks(0), META)
    store.write_session(root, "t", _chunks(0), META)
    mark_in_progress(root / "s", replacing=True)
    assert not store.is_complete(root, "s") and store.is_complete(root, "t")
    assert [m.name for m in store.list_sessions(root)] == ["t"]
    store.write_session(root, "s", _chunks(2), META)
    assert store.is_complete(root, "s")
    assert store.check_session(root / "s").ok


def test_list_sessions_skips_non_sessions_once_at_info(tmp_path, caplog):
    root = tmp_path / "chunks"
    store.write_session(root, "s", _chunks(), META)
    (root / "notes").mkdir()
    (root / ".ipynb_checkpoints").mkdir()
    with caplog.at_level(logging.DEBUG, logger="ephys_gpt.store"):
        assert [m.name for m in store.list_sessions(root)] == ["s"]
        assert [m.name for m in store.list_sessions(root)] == ["s"]
    records = [r for r in caplog.records if "notes" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage() == f"skipping {root / 'notes'}: not a session (no meta.json)"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ".ipynb_checkpoints" not in caplog.text


def test_sizes_and_checksums_are_recorded_from_the_written_bytes(tmp_path):
    chunks = _chunks(n=3)
    folder = store.write_session(tmp_path, "s", chunks, META)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["chunk_checksums"]["algorithm"] == "sha256"
    for i, chunk in enumerate(chunks):
        data = (folder / f"{i}.npy").read_bytes()
        assert meta["chunk_sizes"][i] == len(data)
        assert meta["chunk_checksums"]["digests"][i] == hashlib.sha256(data).hexdigest()
        # the file is exactly what np.save writes
        np.testing.assert_array_equal(np.load(folder / f"{i}.npy", allow_pickle=False), chunk)
    check = store.check_session(folder)
    assert check.ok and check.level == "checksums" and check.n_bytes == sum(meta["chunk_sizes"])


def test_check_session_finds_truncated_changed_and_missing_chunks(tmp_path):
    folder = store.write_session(tmp_path, "s", _chunks(n=3), META)
    c1, c2 = folder / "1.npy", folder / "2.npy"
    c1.write_bytes(c1.read_bytes()[:300])
    data = bytearray(c2.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # a NaN, same size
    c2.write_bytes(bytes(data))
    quick = store.check_session(folder, checksums=False)
    assert quick.level == "sizes"
    assert quick.problems == [f"chunk 1 (1.npy): 300 bytes, meta.json records {128 + 400}"]
    full = store.check_session(folder)
    assert full.problems[0] == quick.problems[0]
    assert full.problems[1] == ("chunk 2 (2.npy): sha256 differs from meta.json (its content "
                                "changed after it was written)")
    (folder / "0.npy").unlink()
    assert store.check_session(folder).problems[0] == "chunk 0 (0.npy): missing"
    # the reader names the damage and the command that repairs it
    with pytest.raises(store.ChunkDamagedError, match=r"1.npy is not a readable .npy array"):
        store.load_chunk(store.read_meta(folder), 1)


def test_stores_written_before_checksums_keep_working(tmp_path, caplog):
    root = tmp_path / "chunks"
    for name in ("old", "old-damaged"):
        folder = store.write_session(root, name, _chunks(n=2), META)
        meta = json.loads((folder / "meta.json").read_text())
        del meta["chunk_sizes"], meta["chunk_checksums"]
        (folder / "meta.json").write_text(json.dumps(meta))
    chunk = root / "old-damaged" / "1.npy"
    chunk.write_bytes(chunk.read_bytes() + b"extra")
    with caplog.at_level(logging.INFO, logger="ephys_gpt.store"):
        checks = store.verify_store(root, progress=False)
    assert [c.level for c in checks] == ["structure", "structure"]
    assert checks[0].ok
    assert checks[1].problems == ["chunk 1 (1.npy): 533 bytes, its header and meta.json make 528"]
    assert "2 session(s) were written before ephys-gpt recorded chunk sizes and checksums" \
        in caplog.text
    assert np.asarray(store.load_chunk(store.read_meta(root / "old"), 0)).shape == (2, 50)


@pytest.mark.parametrize("error", [
    OSError("306000 requested and 49024 written"),
    OSError(errno.ENOSPC, "No space left on device"),
], ids=["numpy-short-write", "ENOSPC"])
def test_disk_full_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, error):
    root = tmp_path / "chunks"
    store.write_session(root, "first", _chunks(), META)
    real = store._write_chunk
    calls = []

    def writer(path, array):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"partial")
            raise error
        return real(path, array)

    monkeypatch.setattr(store, "_write_chunk", writer)
    with pytest.raises(DiskFullError) as info:
        store.write_session(root, "second", _chunks(), META)
    msg = str(info.value)
    assert "the disk is full" in msg and str(root / "second" / "1.npy") in msg
    assert "Traceback" not in msg and "free some space" in msg
    assert sorted(p.name for p in root.iterdir()) == ["first"]
    assert store.check_session(root / "first").ok

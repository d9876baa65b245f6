"""The atomic writers and JSON helpers every part of the toolkit writes through."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest

from ephys_gpt import fileio


def test_atomic_write_publishes_only_complete_content(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), fileio.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
    fileio.write_json_atomic(target, {"a": np.float32(1.5), "b": np.arange(2)})
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1]}


def test_keyboard_interrupt_leaves_nothing(tmp_path):
    target = tmp_path / "x.npy"
    with pytest.raises(KeyboardInterrupt), fileio.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = fileio.write_text_atomic(tmp_path / "a.txt", "x")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o077)
        q = fileio.write_text_atomic(tmp_path / "b.txt", "x")
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("err", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError("306000 requested and 49024 written"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                 "\"No space left on device\" }) (os error 28)"),
])
def test_disk_full_is_named(tmp_path, err):
    target = tmp_path / "model.safetensors"
    with pytest.raises(fileio.DiskFullError, match="disk is full.*model.safetensors"):
        with fileio.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise err
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_unchanged(tmp_path):
    with pytest.raises(ValueError, match="^bad value$"), fileio.atomic_path(tmp_path / "f"):
        raise ValueError("bad value")


def test_npy_refuses_objects(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        fileio.write_npy_atomic(tmp_path / "a.npy", np.array([{}], dtype=object))
    p = fileio.write_npy_atomic(tmp_path / "a.npy", np.arange(3))
    assert np.load(p, allow_pickle=False).tolist() == [0, 1, 2]


def test_json_conversions(tmp_path):
    assert fileio.to_jsonable({"x": float("nan"), 1: (np.int64(2), tmp_path)}) == \
        {"x": None, "1": [2, str(tmp_path)]}
    with pytest.raises(TypeError, match="object"):
        fileio.to_jsonable(object())
    assert fileio.as_json({"f": np.float64(0.5), "o": fileio}) == \
        {"f": 0.5, "o": str(fileio)}


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"export config .*config.json is not valid JSON"):
        fileio.read_json(bad, "export config")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        fileio.read_json(tmp_path / "missing.json")
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        fileio.read_json(bad)
    assert fileio.read_json_field(tmp_path / "missing.json", "a") is None


def test_suffix_for_writers_that_insist_on_an_ending(tmp_path):
    target = tmp_path / "stats.npz"
    fileio.write_with(target, lambda tmp: np.savez(tmp, a=np.arange(2)), suffix=".npz")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]
    with np.load(target, allow_pickle=False) as f:
        assert f["a"].tolist() == [0, 1]
    assert fileio.is_temp_name(fileio.temp_name(target, "_raw.fif").name)
    assert not fileio.is_temp_name("stats.npz")

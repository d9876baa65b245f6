"""The output-folder lock: a second process is refused (naming the holder) or waits; a lock
left by a killed process or a stale record is taken over with a warning."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from ephys_gpt import locking
from ephys_gpt.locking import LOCK_NAME, FolderLock, FolderLockedError

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX processes and signals")


def _holder(folder, hold_seconds=60.0):
    """A real second process that takes the lock of ``folder`` and holds it."""
    script = textwrap.dedent(f"""
        import sys, time
        from ephys_gpt.locking import FolderLock
        with FolderLock({str(folder)!r}, command="ephys-gpt preprocess --args other.yaml"):
            print("locked", flush=True)
            time.sleep({hold_seconds})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderLockedError) as info:
            FolderLock(tmp_path, what="save_folder").acquire()
        msg = str(info.value)
        assert f"save_folder {tmp_path} is in use by another ephys-gpt run" in msg
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg
        assert "started 20" in msg and "command: ephys-gpt preprocess --args other.yaml" in msg
        assert "--wait SECONDS" in msg
        assert (tmp_path / LOCK_NAME).exists()
    finally:
        proc.kill()
        proc.wait()


def test_waiting_run_gets_the_lock_when_the_holder_finishes(tmp_path, caplog):
    proc = _holder(tmp_path, hold_seconds=1.5)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="ephys_gpt.locking"):
            with FolderLock(tmp_path, timeout=60):
                waited = time.monotonic() - t0
                record = json.loads((tmp_path / LOCK_NAME).read_text())
                assert record["pid"] == os.getpid()
        assert 0.3 < waited < 30
        assert f"is in use by pid {proc.pid}" in caplog.text and "waiting" in caplog.text
        assert "taking over" not in caplog.text  # a clean release leaves no stale record
        assert not (tmp_path / LOCK_NAME).exists()  # removed on release
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    proc = _holder(tmp_path)
    with pytest.raises(FolderLockedError):
        FolderLock(tmp_path).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="ephys_gpt.locking"):
        with FolderLock(tmp_path):
            pass
    assert f"taking over the lock of output folder {tmp_path} left by pid {proc.pid}" \
        in caplog.text
    assert "killed or crashed" in caplog.text


def test_stale_record_is_taken_over_and_nested_use_is_allowed(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({
        "pid": dead, "host": socket.gethostname(), "started": "2024-01-01T00:00:00",
        "command": "ephys-gpt preprocess"}))
    with caplog.at_level(logging.WARNING, logger="ephys_gpt.locking"):
        with FolderLock(tmp_path) as outer:
            with FolderLock(tmp_path):  # stage 2 inside the pipeline's lock
                pass
            assert outer.held and (tmp_path / LOCK_NAME).exists()
    assert f"left by pid {dead}" in caplog.text
    assert not (tmp_path / LOCK_NAME).exists()


def test_without_flock_the_record_decides(tmp_path, monkeypatch, caplog):
    """File systems without flock: a live holder on this host is respected, a dead one is
    stale."""
    monkeypatch.setattr(locking, "_try_flock", lambda fd: None)
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "x",
            "command": "other run"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(FolderLockedError, match=f"pid {os.getppid()} on host"):
        FolderLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**live, "pid": _dead_pid()}))
    with caplog.at_level(logging.WARNING, logger="ephys_gpt.locking"):
        with FolderLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "taking over" in caplog.text


def test_bad_timeout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="lock timeout must be a number of seconds >= 0"):
        FolderLock(tmp_path, timeout=-1)

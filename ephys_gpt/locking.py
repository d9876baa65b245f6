"""Who is writing an output folder: one lock per folder, and in-progress markers.

Two runs writing the same folder would undo each other's work (one would clean up the other's
live temporary files). :class:`FolderLock` makes the second run wait or refuse, naming the
holder. It combines

- an operating-system advisory lock (``fcntl.flock``) on ``<folder>/.ephys-gpt.lock``, which
  the kernel releases when the holding process ends in any way (even ``kill -9``), so a crash
  never blocks later runs; and
- a small JSON record in that file (pid, host, start time, command) so that a refused run can
  say who holds the folder. A record found in a lock that nobody holds is the trace of a run
  that crashed: it is taken over with a warning. The holder removes the file when it is done.

Where ``flock`` is unavailable (Windows, some network file systems) the record alone is used:
a record naming a process that no longer runs on this host is stale; any other record is
respected.

An in-progress marker (``.ephys-gpt-in-progress``, the same kind of record) is written into a
folder the toolkit is filling, before anything else, and removed once the folder is complete.
A folder carrying it is the toolkit's own unfinished work, which cleanup may remove; a folder
without it is never removed (it may be the user's).

This module sits low in the package: it imports nothing from ``ephys_gpt`` but :mod:`fileio`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ephys_gpt.fileio import write_json_atomic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".ephys-gpt.lock"
MARKER_NAME = ".ephys-gpt-in-progress"
_POLL_SECONDS = 0.5
# errors meaning "this file system cannot flock" (fall back to the record alone)
_NO_FLOCK = {errno.ENOLCK, errno.EINVAL, getattr(errno, "EOPNOTSUPP", -1),
             getattr(errno, "ENOTSUP", -1)}

_held: dict[Path, list] = {}  # resolved folder -> [count, FolderLock] (re-entry in one process)
_held_guard = threading.Lock()


class FolderLockedError(RuntimeError):
    """Another run holds the lock of an output folder."""


def current_command() -> str:
    """This process's command line, as a user would type it."""
    argv = list(sys.argv) or ["python"]
    argv[0] = Path(argv[0]).name or "python"
    return shlex.join(argv)


def holder_record(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{"pid", "host", "started", "command", **extra}`` describing this process."""
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
            "command": command if command is not None else current_command(), **extra}


def describe_holder(record: dict | None) -> str:
    """``"pid 123 on host h, started <time>, command: <cmd>"`` (what is known of it)."""
    if not record:
        return "another process (it has not written its details yet)"
    parts = [f"pid {record.get('pid', '?')} on host {record.get('host', '?')}"]
    if record.get("started"):
        parts.append(f"started {record['started']}")
    if record.get("command"):
        parts.append(f"command: {record['command']}")
    return ", ".join(parts)


def process_alive(pid: Any) -> bool:
    """True if a process with id ``pid`` exists on this host (False for a malformed id)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def record_is_stale(record: dict | None) -> bool:
    """True when ``record`` names a process of this host that no longer runs (or is empty)."""
    if not record:
        return True
    if record.get("host") != socket.gethostname():
        return False  # cannot tell for another machine: respect it
    return not process_alive(record.get("pid"))


def _read_record_fd(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 1 << 16, 0)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"unreadable": data[:200].decode("utf-8", "replace")}
    return rec if isinstance(rec, dict) else None


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: held by another open file; None: not supported here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if err.errno in _NO_FLOCK:
            return None
        raise
    return True


class FolderLock:
    """Exclusive use of ``folder`` by this process (a context manager).

    Parameters
    ----------
    folder : path
        The output folder (created if missing). The lock file is ``<folder>/.ephys-gpt.lock``.
    timeout : float or None
        Seconds to wait for another holder to finish: 0 refuses at once (the default), None
        waits as long as it takes.
    command : str or None
        What to record as the holder's command (default: this process's command line).
    what : str
        How messages call the folder (``"save_folder"``, ``"chunk store"``...).

    Raises :class:`FolderLockedError` naming the holder (pid, host, start time, command) when
    the folder stays locked for ``timeout`` seconds. A process may take the lock of a folder
    again while it holds it (nested stages); it is released when the outermost holder exits.
    """

    def __init__(self, folder: str | os.PathLike, *, timeout: float | None = 0.0,
                 command: str | None = None, what: str = "output folder"):
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float)) or timeout < 0):
            raise ValueError(f"lock timeout must be a number of seconds >= 0 or None, "
                             f"got {timeout!r}")
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.timeout = timeout
        self.command = command
        self.what = what
        self._fd: int | None = None
        self._flock = False
        self._key: Path | None = None

    # -- context manager ----------------------------------------------------------------------
    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # -- acquire / release --------------------------------------------------------------------
    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        with _held_guard:
            if key in _held:
                _held[key][0] += 1
                self._key = key
                return
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        announced = False
        while True:
            holder = self._try_once()
            if holder is None:  # acquired
                with _held_guard:
                    _held[key] = [1, self]
                self._key = key
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise FolderLockedError(self._busy_message(holder))
            if not announced:
                logger.warning("%s %s is in use by %s; waiting for it to finish%s", self.what,
                               self.folder, describe_holder(holder),
                               "" if remaining is None else f" (at most {remaining:.0f} s)")
                announced = True
            time.sleep(_POLL_SECONDS if remaining is None else min(_POLL_SECONDS, remaining))

    def _try_once(self) -> dict | None:
        """Take the lock if free (returns None), else return the holder's record ({} if
        unknown)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            got = _try_flock(fd)
            previous = _read_record_fd(fd)
            if got is False:
                os.close(fd)
                return previous or {}
            if got is True:
                # a holder that is releasing unlinks the file while still locking it: make
                # sure the file we locked is the one at the path, else try again
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    return self._try_once()
            elif not record_is_stale(previous):  # no flock here: the record decides
                os.close(fd)
                return previous
            if previous:
                logger.warning("taking over the lock of %s %s left by %s: that run ended "
                               "without releasing it (killed or crashed)", self.what,
                               self.folder, describe_holder(previous))
            data = json.dumps(holder_record(self.command)).encode("utf-8")
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._flock = fd, bool(got)
        return None

    def release(self) -> None:
        key = self._key
        if key is None:
            return
        self._key = None
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[0] -= 1
            if entry[0] > 0:
                return
            del _held[key]
            owner = entry[1]
        owner._unlock()

    def _unlock(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:  # remove the file while still holding the lock (see _try_once)
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.path.unlink()
            except FileNotFoundError:
                pass
            if self._flock:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._key is not None

    def _busy_message(self, holder: dict) -> str:
        msg = (f"{self.what} {self.folder} is in use by another ephys-gpt run: "
               f"{describe_holder(holder)}. Two runs writing one folder would undo each "
               "other's work. Wait until that run finishes (or pass --wait SECONDS to wait for "
               "it), or write to another folder. The lock is released as soon as that process "
               "ends, even if it is killed.")
        host = holder.get("host")
        if host and host != socket.gethostname():
            msg += (f" If host {host} crashed and that run is surely gone, delete {self.path}.")
        elif holder.get("pid") is not None and not process_alive(holder.get("pid")):
            msg += (f" Process {holder.get('pid')} no longer runs, but a process it started "
                    "still holds the lock; end that process.")
        return msg


# -- in-progress markers ----------------------------------------------------------------------
def mark_in_progress(folder: str | os.PathLike, **extra: Any) -> None:
    """Write ``<folder>/.ephys-gpt-in-progress`` (this process's record plus ``extra``)."""
    write_json_atomic(Path(folder) / MARKER_NAME, holder_record(**extra))


def clear_in_progress(folder: str | os.PathLike) -> None:
    """Remove the in-progress marker of ``folder`` (the folder is complete)."""
    (Path(folder) / MARKER_NAME).unlink(missing_ok=True)


def in_progress(folder: str | os.PathLike) -> dict | None:
    """The marker's record if ``folder`` carries one (``{}`` if unreadable), else None."""
    path = Path(folder) / MARKER_NAME
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def written_by_live_process(record: dict | None) -> bool:
    """True when a marker's ``record`` names another process still running on this host (its
    folder may be live work, not a leftover)."""
    if not record or record.get("host") != socket.gethostname():
        return False
    pid = record.get("pid")
    return pid != os.getpid() and process_alive(pid)


def remove_unfinished(folder: Path, record: dict | None, what: str,
                      log: logging.Logger = logger) -> bool:
    """Remove ``folder``, unfinished work the toolkit marked (``record``, its marker), unless
    the process that wrote it is still running here; say which on ``log`` (the caller's
    logger). True if removed."""
    if written_by_live_process(record):
        log.info("leaving %s alone: %s is still writing it", folder, describe_holder(record))
        return False
    shutil.rmtree(folder, ignore_errors=True)
    log.info("removed %s: %s%s", folder, what, f" ({describe_holder(record)})" if record else "")
    return True


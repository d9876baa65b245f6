"""Writing files so that nothing half-written is ever mistaken for complete, and JSON helpers.

Every file the toolkit writes goes through :func:`atomic_path`: the content is written under a
hidden temporary name in the destination folder (``.<name>.<id>.tmp``), flushed to disk, given
the permissions the user's umask allows, and only then renamed onto the final name. A crash or
Ctrl-C leaves either the old file or the new one, plus at worst a hidden temporary file that
no reader looks at. A full disk is reported as :class:`DiskFullError` naming the file.

JSON: :func:`to_jsonable` turns numpy values, paths and dataclasses into JSON types (strict:
anything else is an error), :func:`as_json` does the same but stores unknown objects as their
string (what a recorded setting is compared against), :func:`read_json` reads a file with an
error that names it.

This module is the bottom layer of the package: it imports nothing from ``ephys_gpt``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

TMP_SUFFIX = ".tmp"
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# numpy's short-write message, Rust's ENOSPC text (safetensors), the C library's text
_DISK_FULL_TEXT = re.compile(r"\d+ requested and \d+ written|os error 28|no space left on device",
                             re.IGNORECASE)


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing a file; the message names the file."""


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` says the device or quota is full (errno or the libraries' texts)."""
    if isinstance(err, DiskFullError):
        return True
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    return bool(_DISK_FULL_TEXT.search(str(err)))


def disk_full_error(path: str | os.PathLike, err: BaseException) -> DiskFullError:
    """A :class:`DiskFullError` for ``path`` explaining what happened and what to do."""
    return DiskFullError(errno.ENOSPC,
                         f"the disk is full: could not write {path} ({err}). Nothing partial was "
                         "kept under that name; free some space (or choose another output "
                         "folder) and run the command again")


def temp_name(path: str | os.PathLike, suffix: str = "") -> Path:
    """A hidden temporary name beside ``path`` (same folder, so the final rename is atomic).

    ``suffix`` is appended for writers that insist on an ending (MNE wants ``_raw.fif``,
    ``np.savez`` appends ``.npz`` to any other name).
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}{suffix}")


def is_temp_name(name: str) -> bool:
    """True for names made by :func:`temp_name` (left behind only by a crash)."""
    return name.startswith(".") and re.search(r"\.[0-9a-f]{8}\.tmp", name) is not None


def _umask() -> int:
    # os.umask can only be read by setting it; restore at once (no thread writes files here)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open()``/``mkdir()`` would under the umask.

    Some writers (``tempfile``, safetensors) create files readable by the owner only; an
    export meant for colleagues on a shared machine should follow the user's umask instead.
    """
    base = 0o777 if directory else 0o666
    os.chmod(path, base & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", mkdir: bool = True
                ) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; publish it on success.

    On a clean exit the temporary file is fsynced, given umask permissions and renamed onto
    ``path``. On any exception (including KeyboardInterrupt) it is removed and ``path`` is left
    as it was; an error caused by a full disk is raised as :class:`DiskFullError`.
    ``suffix``: see :func:`temp_name`.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {path}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, Exception) and not isinstance(err, DiskFullError) \
                and is_disk_full(err):
            raise disk_full_error(path, err) from err
        raise


def write_with(path: str | os.PathLike, writer: Callable[[Path], Any], suffix: str = ""
               ) -> Path:
    """Call ``writer(tmp_path)`` and publish the result at ``path`` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 1,
                      strict: bool = True) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically.

    ``strict`` converts with :func:`to_jsonable` (unknown objects are an error, NaN becomes
    null); otherwise with :func:`as_json` (unknown objects are stored as their string).
    """
    data = to_jsonable(obj) if strict else as_json(obj)
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save a plain numeric array (never pickled) to ``path`` atomically."""
    array = np.asarray(array)
    if array.dtype == object:
        raise TypeError(f"refusing to save an object array to {path} (it would need pickle)")

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return write_with(path, save)


def to_jsonable(obj: Any) -> Any:
    """``obj`` with numpy values, tensors, paths and dataclasses turned into JSON types.

    Non-finite floats become ``None`` (JSON has no NaN); tuples become lists; mapping keys
    become strings. Anything else raises TypeError.
    """
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = obj.to_dict() if hasattr(obj, "to_dict") else asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # a torch tensor (torch not imported)
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def as_json(obj: Any) -> Any:
    """``obj`` as the plain data it reads back as from JSON, unknown objects as their string.

    This is what a recorded setting is compared against (a value read back from a file
    equals ``as_json`` of the value that was written).
    """

    def default(o: Any):
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        if is_dataclass(o) and not isinstance(o, type):
            return asdict(o)
        return str(o)

    return json.loads(json.dumps(obj, default=default))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse the JSON file ``path``; a missing file or bad JSON raises ValueError naming it.

    ``what`` says what the file is for the message (``"meta.json"``, ``"export config"``...).
    Missing files raise FileNotFoundError (a ValueError would hide that they are absent).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not a UTF-8 text file ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None


def read_json_field(path: str | os.PathLike, *keys: str) -> Any:
    """``data[keys[0]][keys[1]]...`` of the JSON file ``path``; None when the file is missing
    or unreadable or a key is absent (e.g. a record written before the field existed)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data

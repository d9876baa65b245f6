"""Find the raw recordings to preprocess: Omega layout, BIDS folders, or plain folders.

Each recording becomes a :class:`Recording` ``(subject, session, task, path, name)``; ``name``
is unique within a dataset and names the recording's outputs in both stages.

- ``omega``: ``sub-*/ses-*/meg/<recording>``, CTF ``.ds`` folders as in the Omega dataset
  (other MNE-readable files in that place are accepted too). Names are
  ``sub-<id>_ses-<id>_<task>``, ``<task>`` being the rest of the file name without the
  ``_meg`` suffix (``task-rest``, ``task-rest_run-01``), the same names ``bids`` gives;
  empty-room noise recordings (``sub-emptyroom``, ``task-noise``) are skipped.
- ``bids``: any BIDS dataset, found through :func:`mne_bids.find_matching_paths` (MEG and
  EEG data types); names are the BIDS base names without the data suffix, e.g.
  ``sub-01_ses-01_task-rest``. Empty-room and noise recordings, ``derivatives/`` and split
  continuation files are skipped.
- ``files``: every MNE-readable file (or ``.ds``/``.mff`` folder) below the folder; names are
  the file name without extension (the relative path, ``/`` replaced by ``_``, where two
  files share a name).
- ``auto``: ``omega`` if ``sub-*/ses-*/meg/*.ds`` exists, else ``bids`` if the folder has a
  ``dataset_description.json`` or ``sub-*`` folders, else ``files``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ephys_gpt._optional import require

logger = logging.getLogger(__name__)

# file extensions MNE reads as raw recordings (folders: .ds, .mff)
READABLE_FILE_EXTENSIONS = (".fif", ".fif.gz", ".con", ".sqd", ".edf", ".bdf", ".gdf", ".vhdr",
                            ".set", ".cnt", ".egi", ".nxe", ".lay", ".snirf", ".bin", ".meg4")
READABLE_DIR_EXTENSIONS = (".ds", ".mff")
DATASET_KINDS = ("omega", "bids", "files", "auto")
_ENTITY = re.compile(r"(?:^|_)(sub|ses|task|run|acq|split)-([a-zA-Z0-9]+)")
_NOISE = re.compile(r"noise|emptyroom", re.IGNORECASE)


@dataclass(frozen=True)
class Recording:
    """One raw recording found by discovery."""

    subject: str
    session: str | None
    task: str | None
    path: Path
    name: str

    def as_dict(self) -> dict:
        return {"subject": self.subject, "session": self.session, "task": self.task,
                "path": str(self.path), "name": self.name}


def _entities(name: str) -> dict[str, str]:
    return {k: v for k, v in _ENTITY.findall(name)}


def _readable_ext(path: Path) -> str | None:
    low = path.name.lower()
    if path.is_dir():
        return next((e for e in READABLE_DIR_EXTENSIONS if low.endswith(e)), None)
    return next((e for e in READABLE_FILE_EXTENSIONS if low.endswith(e)), None)


def _hidden(path: Path, root: Path) -> bool:
    return any(p.startswith(".") for p in path.relative_to(root).parts)


def _is_output(path: Path) -> bool:
    """Files this pipeline writes (stage-1 outputs) are never inputs."""
    return path.name.endswith(("_preproc-raw.fif", "-ica.fif", "_ica.fif"))


def discover_omega(root: str | os.PathLike) -> list[Recording]:
    """Recordings in the Omega layout ``sub-*/ses-*/meg/*`` (``.ds`` folders first)."""
    root = _check_root(root)
    out = []
    for meg in sorted(root.glob("sub-*/ses-*/meg")):
        subject = meg.parent.parent.name.removeprefix("sub-")
        session = meg.parent.name.removeprefix("ses-")
        if _NOISE.search(subject):
            continue
        for rec in sorted(meg.iterdir()):
            ext = _readable_ext(rec)
            if ext is None or rec.name.startswith(".") or _is_output(rec) or ext == ".meg4":
                continue
            stem = rec.name[: -len(ext)].removesuffix("_meg")
            ent = _entities(stem)
            # what follows sub-X_ses-Y in the file name: task-rest, task-rest_run-01, ...
            rest = re.sub(r"^(sub-[^_]+_)?(ses-[^_]+_?)?", "", stem) or "rec"
            task = ent.get("task", rest)
            if _NOISE.search(rest):
                logger.debug("skipping noise recording %s", rec)
                continue
            name = f"sub-{subject}_ses-{session}_{rest}"
            out.append(Recording(subject, session, task, rec, name))
    return _check_unique(out, root)


def discover_bids(root: str | os.PathLike) -> list[Recording]:
    """Recordings of a BIDS dataset via :func:`mne_bids.find_matching_paths`."""
    root = _check_root(root)
    mne_bids = require("mne_bids")
    exts = [".fif", ".ds", ".con", ".sqd", ".edf", ".bdf", ".vhdr", ".set", ".mff", ".snirf"]
    paths = mne_bids.find_matching_paths(root, datatypes=["meg", "eeg", "ieeg"],
                                         extensions=exts, ignore_nosub=True)
    out = []
    for bp in sorted(paths, key=lambda p: str(p.fpath)):
        fpath = Path(bp.fpath)
        rel = fpath.relative_to(root)
        if rel.parts[0] in ("derivatives", "sourcedata") or _hidden(fpath, root):
            continue
        if _is_output(fpath):
            continue
        if (bp.subject or "") == "emptyroom" or _NOISE.search(bp.task or ""):
            continue
        if bp.split not in (None, "01", "1"):
            continue  # MNE reads split files from the first part
        name = bp.copy().update(suffix=None, extension=None, split=None, check=False).basename
        out.append(Recording(bp.subject, bp.session, bp.task, fpath, name))
    return _check_unique(out, root)


def discover_files(root: str | os.PathLike, exclude: list[Path] | None = None) -> list[Recording]:
    """Every MNE-readable recording below ``root`` (``exclude``: folders to leave out)."""
    root = _check_root(root)
    exclude = [Path(e).resolve() for e in (exclude or [])]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if any(here.resolve() == e or e in here.resolve().parents for e in exclude):
            dirnames[:] = []
            continue
        keep_dirs = []
        for d in sorted(dirnames):
            p = here / d
            if d.startswith("."):
                continue
            if _readable_ext(p):
                out.append(p)  # .ds / .mff folders are recordings, not searched inside
            else:
                keep_dirs.append(d)
        dirnames[:] = keep_dirs
        for f in sorted(filenames):
            p = here / f
            ext = _readable_ext(p)
            if f.startswith(".") or ext is None or ext == ".meg4" or _is_output(p):
                continue
            m = re.match(r"^(.*)-(\d+)\.fif$", f)
            if m and (here / f"{m.group(1)}.fif").exists():
                continue  # split continuation of an MNE .fif, read with the first part
            out.append(p)
    def clean(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", s.replace(os.sep, "_"))

    out = sorted(out)
    stems = [clean(p.name[: -len(_readable_ext(p))]) for p in out]
    recs = []
    for p, stem in zip(out, stems):
        # the file name alone when it is unique, else the path relative to root
        name = stem if stems.count(stem) == 1 else clean(
            str(p.relative_to(root))[: -len(_readable_ext(p))])
        ent = _entities(stem)
        recs.append(Recording(ent.get("sub", name), ent.get("ses"), ent.get("task"), p, name))
    return _check_unique(recs, root)


def detect_kind(root: str | os.PathLike) -> str:
    """Guess the layout of ``root``: ``omega``, ``bids`` or ``files``."""
    root = _check_root(root)
    if any(root.glob("sub-*/ses-*/meg/*.ds")):
        return "omega"
    if (root / "dataset_description.json").is_file() or any(
            p.is_dir() for p in root.glob("sub-*")):
        return "bids"
    return "files"


def discover(root: str | os.PathLike, kind: str = "auto",
             exclude: list[Path] | None = None) -> list[Recording]:
    """Recordings under ``root`` for a layout ``kind`` (omega | bids | files | auto).

    Raises ValueError for an unknown kind or when nothing is found (naming the folder, the
    layout that was searched and what the folder holds).
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    root = _check_root(root)
    chosen = detect_kind(root) if kind == "auto" else kind
    if chosen == "omega":
        recs = discover_omega(root)
    elif chosen == "bids":
        recs = discover_bids(root)
    else:
        recs = discover_files(root, exclude=exclude)
    if exclude:
        ex = [Path(e).resolve() for e in exclude]
        recs = [r for r in recs if not any(e == r.path.resolve() or e in r.path.resolve().parents
                                           for e in ex)]
    if not recs:
        hint = {"omega": "sub-*/ses-*/meg/*.ds",
                "bids": "a BIDS dataset (sub-*/[ses-*/]meg|eeg/*_meg.fif, *.ds, ...)",
                "files": "MNE-readable files (" + ", ".join(READABLE_FILE_EXTENSIONS[:8]) + ", .ds)"}
        raise ValueError(f"no recordings found in {root} with dataset={kind!r} "
                         f"(searched as {chosen}: {hint[chosen]}); "
                         f"{'try dataset=auto or ' if kind != 'auto' else ''}"
                         "check data_path")
    logger.info("found %d recording(s) in %s (%s layout)", len(recs), root, chosen)
    return recs


def _check_root(root) -> Path:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"data_path {root} is a file; expected the folder holding the recordings")
    return root


def _check_unique(recs: list[Recording], root: Path) -> list[Recording]:
    seen: dict[str, Path] = {}
    for r in recs:
        if r.name in seen:
            raise ValueError(f"two recordings in {root} map to the same name {r.name!r}: "
                             f"{seen[r.name]} and {r.path}; rename one of them")
        seen[r.name] = r.path
    return recs

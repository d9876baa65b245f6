"""A run's folder (``save_dir``): what the toolkit writes there, who may replace it, the split.

Policy (``docs/training.md``):

- ``train`` refuses a ``save_dir`` that already holds a run (any file of
  :func:`run_outputs`), before any work, with the three ways on: continue it
  (``resume_from=last``), train elsewhere (``save_dir=...``), or replace it (``--overwrite`` /
  ``overwrite=true``). Resuming into the run's own folder is always allowed.
- Replacing removes only the files the toolkit wrote for that run (the list below, plus its
  own leftover temporary files); anything else in the folder stays, and folders are removed
  only when that leaves them empty.
- The split of a run is recorded in ``save_dir/split.json`` when it trains: the session names
  per split, the split settings and the store's root. Resume, ``test`` and ``eval`` of that
  run use the record instead of drawing again, and refuse (naming the sessions and the file)
  when the store no longer holds a session it names, or when the config's split settings
  differ from the recorded ones. ``--resplit`` (``resplit=true``) draws a new split on
  purpose (and a training run then records it).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ephys_gpt.fileio import is_temp_name, read_json, write_json_atomic

logger = logging.getLogger(__name__)

SPLIT_RECORD = "split.json"
CONFIG_NAME = "config.yaml"
TEST_METRICS = "test_metrics.json"
CHECKPOINT_NAMES = ("best.ckpt", "last.ckpt")
EXPORT_NAMES = ("model.safetensors", "config.json")
#: Split settings that decide which session goes where (checked against the record).
SPLIT_SETTINGS = ("split_by", "val_ratio", "test_ratio", "seed")
_RECORD_FORMAT = 1


class RunFolderError(ValueError):
    """``save_dir`` holds another run, or its split record does not fit (message says why)."""


# -------------------------------------------------------------------------- run outputs
def _glob_files(folder: Path, patterns: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for pattern in patterns:
        out.extend(p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink())
    return out


def _eval_outputs(evals: Path) -> list[Path]:
    """Files an eval runner listed in its ``summary.json`` (and the summary itself)."""
    out: list[Path] = []
    for d in sorted(p for p in evals.iterdir() if p.is_dir()) if evals.is_dir() else []:
        summary = d / "summary.json"
        if not summary.is_file():
            continue
        try:
            listed = read_json(summary, "eval summary").get("files") or []
        except (ValueError, OSError, AttributeError):
            listed = []
        for name in listed:
            p = (d / str(name)).resolve()
            if p.is_file() and d.resolve() in p.parents:
                out.append(d / str(name))
        out.append(summary)
    return out


def run_outputs(save_dir: str | os.PathLike) -> list[Path]:
    """The files a previous training/test/eval run wrote in ``save_dir`` (those that exist)."""
    save = Path(save_dir)
    if not save.is_dir():
        return []
    out = [save / n for n in (CONFIG_NAME, SPLIT_RECORD, TEST_METRICS) if (save / n).is_file()]
    out += [save / "checkpoints" / n for n in CHECKPOINT_NAMES
            if (save / "checkpoints" / n).is_file()]
    out += [save / "export" / n for n in EXPORT_NAMES if (save / "export" / n).is_file()]
    out += _glob_files(save / "logs", ["csv/version_*/metrics.csv", "csv/version_*/hparams.yaml",
                                       "tensorboard/version_*/events.out.tfevents.*",
                                       "tensorboard/version_*/hparams.yaml"])
    out += _eval_outputs(save / "evals")
    return out


def _leftover_temporaries(save: Path) -> list[Path]:
    """Hidden temporary files the toolkit's atomic writes left behind after a crash."""
    out = []
    for d in (save, save / "checkpoints", save / "export"):
        if d.is_dir():
            out += [p for p in d.iterdir() if p.is_file() and is_temp_name(p.name)]
    return out


def _remove_empty_dirs(save: Path) -> None:
    dirs = [p for p in (save / "logs").glob("*/version_*") if p.is_dir()]
    dirs += [save / "logs" / "csv", save / "logs" / "tensorboard", save / "logs"]
    dirs += [p for p in (save / "evals").glob("*") if p.is_dir()] + [save / "evals"]
    dirs += [save / "checkpoints", save / "export"]
    for d in dirs:
        try:
            d.rmdir()  # only succeeds when empty
        except OSError:
            pass


def clear_run(save_dir: str | os.PathLike) -> list[Path]:
    """Delete the files of :func:`run_outputs` (and the toolkit's leftover temporaries); return
    what was removed. Nothing else in ``save_dir`` is touched."""
    save = Path(save_dir)
    removed = []
    for p in run_outputs(save) + _leftover_temporaries(save):
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    _remove_empty_dirs(save)
    return removed


def replace_run(save_dir: str | os.PathLike) -> list[Path]:
    """:func:`clear_run`, logged (what ``overwrite`` does when training starts)."""
    save = Path(save_dir)
    removed = clear_run(save)
    kept = [p for p in save.rglob("*") if p.is_file()] if save.is_dir() else []
    logger.warning("overwrite: removed %d file(s) of the previous run in %s%s", len(removed),
                   save, f" (kept {len(kept)} file(s) ephys-gpt did not write)" if kept else "")
    return removed


def _describe(files: list[Path], save: Path, n: int = 4) -> str:
    names = [str(p.relative_to(save)) for p in files[:n]]
    more = f" and {len(files) - n} more" if len(files) > n else ""
    return ", ".join(names) + more


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    p, f = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return f == p or f in p.parents


def claim_save_dir(save_dir: str | os.PathLike, *, resume_from: str | None,
                   overwrite: bool) -> bool:
    """Refuse to train into a ``save_dir`` holding another run (before any work starts).

    Allowed without asking: an empty or new folder, and resuming (``resume_from: last`` or a
    checkpoint inside ``save_dir``). With ``overwrite`` it returns True: the caller removes
    the previous run (:func:`replace_run`) when training starts, so a run that fails to set
    up destroys nothing.
    """
    save = Path(save_dir)
    if overwrite and resume_from:
        raise RunFolderError(f"overwrite and resume_from={resume_from!r} contradict each other: "
                             "overwrite replaces the run in save_dir, resume continues it")
    found = run_outputs(save)
    if not found:
        return False
    if resume_from == "last" or (resume_from and _inside(resume_from, save)):
        return False
    if overwrite:
        return True
    raise RunFolderError(
        f"save_dir {save} already holds a run ({_describe(found, save)}); refusing to replace it. "
        f"To continue that run: resume_from=last. To train a new run: save_dir=NEW_FOLDER. To "
        f"replace it: --overwrite (or overwrite=true), which deletes only the files ephys-gpt "
        f"wrote there")


# -------------------------------------------------------------------------- split record
def _splitter_defaults(splitter) -> dict[str, Any]:
    sig = inspect.signature(splitter)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not p.empty}


def split_settings(splitter, datasplitter: dict) -> dict[str, Any]:
    """The settings that decide the session assignment, defaults filled in."""
    defaults = _splitter_defaults(splitter)
    return {k: datasplitter.get(k, defaults.get(k)) for k in SPLIT_SETTINGS}


def record_split(save_dir: str | os.PathLike, splits, config: dict) -> Path | None:
    """Write ``save_dir/split.json`` (session names per split, split settings, store root)
    for a chunk-store run; None for datasets with fixed splits of their own (LibriBrain)."""
    from ephys_gpt.dataset.datasplitter import split_datasets
    from ephys_gpt.dataset.registry import get_splitter

    splitter = get_splitter(config["dataset_name"])
    if splitter is not split_datasets:
        return None
    dcfg = config["datasplitter"]
    record = {
        "format": _RECORD_FORMAT,
        "dataset_name": config["dataset_name"],
        "dataset_root": str(dcfg.get("dataset_root")),
        "settings": split_settings(splitter, dcfg),
        "sessions": {name: [m.name for m in getattr(ds, "metas", [])] if ds is not None else []
                     for name, ds in zip(("train", "val", "test"), splits)},
    }
    return write_json_atomic(Path(save_dir) / SPLIT_RECORD, record)


def read_split_record(path: str | os.PathLike) -> dict:
    """Read and check a split record (errors name the file)."""
    path = Path(path)
    record = read_json(path, "split record")
    ok = (isinstance(record, dict) and isinstance(record.get("sessions"), dict)
          and all(isinstance(record["sessions"].get(k, []), list)
                  for k in ("train", "val", "test"))
          and isinstance(record.get("settings", {}), dict))
    if not ok:
        raise RunFolderError(f"split record {path} is malformed: expected {{'sessions': "
                             "{'train': [...], 'val': [...], 'test': [...]}, 'settings': {...}}")
    return record


def run_splits(config: dict, *, resplit: bool | None = None, augmentations: bool = True):
    """The train/val/test datasets of a run: from its split record when there is one.

    Parameters
    ----------
    config : dict
        A validated run config (``dataset_name``, ``datasplitter``, ``save_dir``...).
    resplit : bool, optional
        Draw the split from the config even though the run recorded one (default: the
        config's ``resplit`` key).
    augmentations : bool
        Give the training split the config's ``augmentations`` (training does; evaluation
        reads the training split as it is).

    Returns
    -------
    (DataSplits, dict | None)
        The datasets, and the record used (None when the split was drawn).
    """
    from ephys_gpt.dataset.datasplitter import split_datasets
    from ephys_gpt.dataset.registry import get_splitter
    from ephys_gpt.store import list_sessions

    splitter = get_splitter(config.get("dataset_name", "omega"))
    kwargs = dict(config["datasplitter"])
    if augmentations and config.get("augmentations") is not None and "augmentations" not in kwargs:
        kwargs["augmentations"] = config["augmentations"]
    if resplit is None:
        resplit = bool(config.get("resplit", False))
    if splitter is not split_datasets:  # LibriBrain: the dataset's own fixed splits
        return splitter(**kwargs), None
    path = Path(config["save_dir"]) / SPLIT_RECORD if config.get("save_dir") else None
    if path is None or not path.is_file():
        return splitter(**kwargs), None
    if resplit:
        logger.warning("resplit: ignoring the split recorded in %s and drawing one from the "
                       "config; results are not comparable with the run's earlier ones", path)
        return splitter(**kwargs), None
    record = read_split_record(path)
    now = split_settings(splitter, kwargs)
    recorded = record.get("settings") or {}
    diff = [f"datasplitter.{k} is {now[k]!r}, the record says {recorded[k]!r}"
            for k in SPLIT_SETTINGS if k in recorded and recorded[k] != now[k]]
    if diff:
        raise RunFolderError(f"the config does not match the split this run recorded in {path} ("
                             + "; ".join(diff) + "): restore those settings, or pass --resplit "
                             "(resplit=true) to draw a new split on purpose")
    root = kwargs.get("dataset_root")
    if record.get("dataset_root") and os.path.abspath(str(root)) != os.path.abspath(
            record["dataset_root"]):
        logger.info("the run's split was recorded for %s; reading its sessions from %s",
                    record["dataset_root"], root)
    named = sorted({n for k in ("train", "val", "test") for n in record["sessions"].get(k, [])})
    present = {m.name for m in list_sessions(root)}
    missing = [n for n in named if n not in present]
    if missing:
        raise RunFolderError(
            f"the split recorded in {path} names {len(missing)} session(s) that the chunk store "
            f"{root} no longer holds as complete sessions (no meta.json): {missing[:10]}. "
            "Restore them (re-run stage 2 for them), or pass --resplit (resplit=true) to draw a "
            "new split from the sessions that are there")
    logger.info("using the split recorded in %s", path)
    return splitter(**kwargs, sessions=record["sessions"]), record

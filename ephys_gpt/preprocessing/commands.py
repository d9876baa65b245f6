"""``ephys-gpt`` sub-commands of the preprocessing area: simulate, preprocess, convert-legacy,
check-store.

Each ``func(args)`` returns an exit code: 0 when everything succeeded, 1 when any recording
or session failed (the others are still processed; failures are listed at the end), when a
store check found damage, or when another run holds the output folder.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``simulate``, ``preprocess`` and ``convert-legacy`` to the ``ephys-gpt`` parser."""
    p = subparsers.add_parser(
        "simulate", help="write simulated raw MEG sessions as BIDS (osl-ephys MVAR template, 306 ch)",
        description="Simulate 306-channel MEGIN resting-state MEG (150 Hz) from the MVAR model "
                    "osl-ephys ships, written as a BIDS dataset with mne-bids (the simulation "
                    "parameters go to sourcedata/ephys-gpt-simulate/). Sessions already in "
                    "--out with the same settings are kept; see docs/preprocessing.md.")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or an earlier ephys-gpt simulation")
    p.add_argument("--subjects", type=int, default=2, help="number of subjects (default 2)")
    p.add_argument("--sessions", type=int, default=2, help="sessions per subject (default 2)")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="seconds per session, 2 to 3600 (default 60)")
    p.add_argument("--seed", type=int, default=0, help="base random seed (default 0)")
    p.add_argument("--faults", action="store_true",
                   help="inject bad segments, noisy and flat channels (recorded in the BIDS "
                        "channels.tsv and events.tsv, not in the .fif: stage 1 must find them)")
    p.add_argument("--dynamics", choices=("mvar", "bursty"), default="mvar",
                   help="mvar: the linear-Gaussian template alone (a long VAR is close to the "
                        "best predictor of it); bursty: plus transient, state-switching, "
                        "non-sinusoidal rhythms (alpha, mu, beta, theta bursts from a hidden "
                        "Markov chain), where the best predictor is nonlinear (default mvar)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace sessions that were simulated with other settings (only in a "
                        "folder written by ephys-gpt simulate)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    add_preprocess_parser(subparsers)
    add_check_store_parser(subparsers)

    p = subparsers.add_parser(
        "convert-legacy",
        help="convert the original toolkit's pickled .npy chunks (needs --trust-pickle)",
        description="Convert chunks of the original toolkit (pickled dicts in .npy files, one "
                    "folder per session) into the chunk store. Reading them means unpickling, "
                    "and unpickling executes any code the files contain: a crafted .npy can "
                    "run commands as you. So convert-legacy refuses unless you pass "
                    "--trust-pickle, and you should pass it only for files from a source you "
                    "trust (e.g. chunks you wrote yourself with the original toolkit). The "
                    "converted store holds plain arrays and is read without pickle.")
    p.add_argument("src", help="a legacy session folder, or a folder of them")
    p.add_argument("dst", help="chunk store folder to write")
    p.add_argument("--trust-pickle", action="store_true",
                   help="I trust these files: unpickle them, which executes any code they "
                        "contain (without this flag nothing is read)")
    p.add_argument("--ch-type", default="mag",
                   help="channel type for chunks that do not record ch_types (default mag)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert_legacy)


def add_preprocess_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preprocess", help="stage 1 (osl-ephys) and stage 2 (chunks) from a YAML config",
        description="Preprocess raw recordings: stage 1 cleans them with osl-ephys, stage 2 "
                    "normalizes, clips, optionally mu-law quantizes and cuts them into the "
                    "chunk store. Extra key=value arguments override the YAML "
                    "(e.g. n_workers=4 preproc_config.clip.std_factor=4).")
    add_preprocess_arguments(p)
    p.set_defaults(func=cmd_preprocess)
    return p


def add_preprocess_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--args", dest="config", metavar="YAML",
                   help="preprocessing YAML (see configs/local/preprocess.yaml)")
    p.add_argument("--stage", choices=("stage_1", "stage_2", "both"), default="both",
                   help="which stage(s) to run (default both)")
    p.add_argument("--dataset", choices=("omega", "bids", "files", "auto"), default=None,
                   help="layout of data_path (default: the YAML's 'dataset', else auto)")
    p.add_argument("--verify", action="store_true",
                   help="before skipping finished sessions, compare their chunks' checksums "
                        "with meta.json (reads every chunk); without it only file sizes are "
                        "compared. Damaged sessions are rewritten from their stage-1 file")
    add_wait_argument(p)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override YAML keys; dotted keys reach into blocks")


def add_wait_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", type=_wait_seconds, default=0.0, metavar="SECONDS",
                   help="if another run is writing the same output folder, wait up to SECONDS "
                        "for it to finish ('inf': as long as it takes) instead of refusing "
                        "at once (default 0)")


def _wait_seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if math.isnan(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return None if math.isinf(value) else value


def add_check_store_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "check-store", help="verify a chunk store's files against meta.json (and repair)",
        description="Check every session of a chunk store (stage 2's output, "
                    "<save_folder>/chunks): each chunk file's size and SHA-256 against those "
                    "meta.json recorded when it was written. Exit 0 when every session is "
                    "whole, 1 with the list of damaged sessions otherwise. --repair rewrites "
                    "damaged sessions from the stage-1 file and stage-2 settings each one "
                    "recorded.")
    p.add_argument("store", metavar="DIR", help="the chunk store (or the save_folder holding "
                                                "chunks/)")
    p.add_argument("--sizes-only", action="store_true",
                   help="compare file sizes only (fast; does not read the chunks)")
    p.add_argument("--repair", action="store_true",
                   help="rewrite damaged sessions (locks the store meanwhile)")
    add_wait_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check_store)
    return p


def cmd_simulate(args) -> int:
    from ephys_gpt.preprocessing.simulate import SimulationConfig, simulate_dataset

    cfg = SimulationConfig(subjects=args.subjects, sessions=args.sessions, seconds=args.seconds,
                           seed=args.seed, faults=args.faults, dynamics=args.dynamics)
    paths = simulate_dataset(args.out, cfg, progress=not args.no_progress,
                             overwrite=args.overwrite)
    logger.info("wrote %d session(s) to %s", len(paths), args.out)
    return 0


def cmd_preprocess(args) -> int:
    from ephys_gpt.locking import FolderLockedError
    from ephys_gpt.preprocessing.config import load_preprocess_config
    from ephys_gpt.preprocessing.pipeline import run_preprocess, summarize

    overrides = list(args.overrides or [])
    if args.dataset is not None:
        overrides.append(f"dataset={args.dataset}")
    if args.config is None and not any(o.startswith("data_path=") for o in overrides):
        raise ValueError("preprocess needs --args <preprocess.yaml> (or at least "
                         "data_path=<folder> on the command line)")
    cfg = load_preprocess_config(args.config, overrides, require_data=args.stage != "stage_2")
    try:
        result = run_preprocess(cfg, args.stage, verify=args.verify, lock_timeout=args.wait)
    except FolderLockedError as err:
        logger.error("%s", err)
        return 1
    logger.info("%s", summarize(result, cfg))
    if result.failed:
        logger.error("%d failure(s):", len(result.failed))
        for name, reason in result.failed.items():
            logger.error("  %s: %s", name, reason)
        return 1
    return 0


def cmd_convert_legacy(args) -> int:
    from ephys_gpt.preprocessing.legacy import convert_legacy

    result = convert_legacy(args.src, args.dst, trust_pickle=args.trust_pickle,
                            progress=not args.no_progress, default_ch_type=args.ch_type)
    logger.info("convert-legacy: %s -> %s", result.counts(), args.dst)
    for name, reason in result.failed.items():
        logger.error("  %s: %s", name, reason)
    return 1 if result.failed else 0


def cmd_check_store(args) -> int:
    from pathlib import Path

    from ephys_gpt import store
    from ephys_gpt.locking import FolderLockedError

    root = Path(args.store)
    if root.is_dir() and not store.session_folders(root) and (root / "chunks").is_dir():
        root = root / "chunks"  # the save_folder was given
    checksums, progress = not args.sizes_only, not args.no_progress
    try:
        if args.repair:
            from ephys_gpt.preprocessing.stage2 import repair_store

            checks, repaired = repair_store(root, checksums=checksums, progress=progress,
                                            lock_timeout=args.wait)
        else:
            checks, repaired = store.verify_store(root, checksums=checksums,
                                                  progress=progress), None
    except FolderLockedError as err:
        logger.error("%s", err)
        return 1
    damaged = [c for c in checks if not c.ok]
    n_bytes = sum(c.n_bytes for c in checks)
    how = "sizes and checksums" if checksums else "sizes"
    logger.info("check-store: %d session(s), %.1f MB of chunks checked (%s) in %s",
                len(checks), n_bytes / 1e6, how, root)
    for c in damaged:
        logger.error("damaged: %s: %s", c.path, "; ".join(c.problems[:5]) +
                     (f"; ... ({len(c.problems)} problems)" if len(c.problems) > 5 else ""))
    if not damaged:
        logger.info("check-store: every session is whole")
        return 0
    if repaired is None:
        logger.error("check-store: %d damaged session(s): %s. To repair: %s", len(damaged),
                     ", ".join(c.name for c in damaged), _repair_command(root, damaged))
        return 1
    for name, reason in repaired.failed.items():
        logger.error("could not repair %s: %s", name, reason)
    logger.info("check-store: %d of %d damaged session(s) rewritten", len(repaired.repaired),
                len(damaged))
    return 1 if repaired.failed else 0


def _repair_command(root, damaged) -> str:
    """How to repair ``damaged`` sessions: this command with --repair where it can, else what
    each of the others needs."""
    from ephys_gpt import store

    own = f"`ephys-gpt check-store {shlex.quote(str(root))} --repair`"
    others = {}
    for c in damaged:
        advice = (store.repair_advice(c.path) if c.ours else
                  f"its meta.json does not show that ephys-gpt wrote it: delete {c.path} and "
                  "re-run stage 2")
        if "check-store" not in advice:
            others[c.name] = advice
    if not others:
        return own
    head = f"{own} for the others; " if len(others) < len(damaged) else ""
    return head + "; ".join(f"{name}: {advice}" for name, advice in others.items())

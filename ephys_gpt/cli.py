"""The ``ephys-gpt`` console script.

Each area of the package adds its own sub-commands through a ``register(subparsers)``
function; this file only assembles them and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

import ephys_gpt

# Modules that contribute sub-commands (each defines register(subparsers); a sub-parser sets
# ``func`` to the callable that runs it and returns an exit code).
_COMMAND_MODULES = [
    "ephys_gpt.preprocessing.commands",  # simulate, preprocess, convert-legacy
    "ephys_gpt.training.commands",       # train, test, list-models
    "ephys_gpt.eval.commands",           # eval
    "ephys_gpt.tokenizers.commands",     # tokenizer
    "ephys_gpt.demo",                    # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ephys-gpt",
        description="Preprocess MEG, train and evaluate generative/forecasting models.")
    parser.add_argument("--version", action="version", version=f"ephys-gpt {ephys_gpt.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


class _DropLightningTips(logging.Filter):
    """Lightning's rank-zero "💡 Tip" advertisements on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Silence known, harmless third-party chatter on the command line (not on import).

    - Lightning's "Tip: ... litlogger" line on every Trainer;
    - Lightning's own use of torch's deprecated ``LeafSpec`` (a warning per run);
    - at ``test``/``eval`` time, the note that the training-time checkpoint callback is not
      re-created (evaluation needs only the weights).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in log.filters):
            log.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")
    # a resumed run writes into its own checkpoint folder; claim_save_dir already refuses
    # a folder holding another run (ephys_gpt/training/run_folder.py)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is when each record is emitted, not as it
    was when logging was set up: a notebook or a test harness that swaps ``sys.stderr`` (and
    closes the old one) must not leave the package logging into a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the property always wins
        pass


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log lines of the package to stderr. In a distributed run, ranks other than 0 run the
    same code as rank 0, which already says everything once: they print only errors,
    prefixed with their rank."""
    from ephys_gpt.training.distributed import launch_rank

    rank = launch_rank()
    level = (logging.ERROR if rank else logging.WARNING if quiet
             else logging.DEBUG if verbose else logging.INFO)
    prefix = f"[rank {rank}] " if rank else ""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}%(asctime)s %(levelname)s %(name)s: "
                                           "%(message)s", datefmt="%H:%M:%S"))
    pkg = logging.getLogger("ephys_gpt")
    pkg.handlers[:] = [h for h in pkg.handlers if isinstance(h, logging.NullHandler)]
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    quiet_third_party()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    log = logging.getLogger("ephys_gpt")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        log.error("interrupted; finished outputs are kept, unfinished ones were discarded")
        return 130
    except Exception as err:
        code = user_error_code(err)
        if code is None:
            raise
        if args.verbose and code == 1:
            raise
        log.error("%s", err, exc_info=bool(args.verbose))
        return code


def user_error_code(err: BaseException) -> int | None:
    """The exit code for an error the user can act on (shown as one line), else None.

    Bad input (ValueError, FileNotFoundError), a missing extra (ImportError) and a full disk
    (DiskFullError) exit 1; a run stopped on purpose carries its own code (130 after SIGINT,
    143 after SIGTERM; see ``ephys_gpt/training/errors.py``).
    """
    from ephys_gpt.fileio import DiskFullError
    from ephys_gpt.training.errors import RunStopped

    if isinstance(err, RunStopped):
        return int(err.exit_code)
    if isinstance(err, (ValueError, FileNotFoundError, ImportError, DiskFullError)):
        return 1
    return None


if __name__ == "__main__":
    sys.exit(main())
